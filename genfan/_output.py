"""Typed outputs: the JSON-schema response format for a type, and answers validated into it.

``output_type=`` (on ``FanOut``, ``Agent`` and LLM steps) takes a pydantic model class, or any
type pydantic's ``TypeAdapter`` takes (``list[City]``, ``Literal["yes", "no"]``, a dataclass,
a ``TypedDict``, ``int``...). `output_spec` turns it into an `OutputSpec`:

* the request's ``response_format``: a JSON schema of the type, made strict-compatible where
  that is possible (every object closed and every property required, as OpenAI's strict
  structured outputs demand), sent as it is (``strict=False``) where it is not (a ``dict[str,
  X]`` field); a type whose schema is not an object (a list, a union, a scalar) is wrapped as
  ``{"response": ...}``, since providers ask for an object at the root;
* the validation of each answer: its JSON (the whole text, else a fenced code block, else the
  first ``{...}`` or ``[...]`` that parses), unwrapped, validated by pydantic into an instance;
  what fails is an [`OutputValidationError`][genfan.OutputValidationError] naming each wrong field.

``str`` (or no type at all) asks for nothing and "validates" to the answer's text.

``validate=`` (on ``Fallback``, ``FanOut`` and ``Cascade``) is the one way to say what a good
answer is, beyond its type: `AnswerValidator` compiles it once (a function, an object
with a ``check`` method, a per-answer scorer of ``genfan.select``, a type as for
``output_type``, or a list of these) and rejects an answer with an
[`AnswerRejectedError`][genfan.AnswerRejectedError] (an [`OutputValidationError`][genfan.OutputValidationError] for a type).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeAlias, cast, get_origin, runtime_checkable

from pydantic import PydanticUserError, TypeAdapter, ValidationError
from typing_extensions import TypeVar

from ._errors import AnswerRejectedError, ConfigurationError, MalformedResponseError
from ._types import ChatRequest, Completion, JsonValue, ResponseFormat

__all__ = [
    "AnswerCheck",
    "AnswerValidator",
    "OutputSpec",
    "OutputValidationError",
    "ValidateLike",
    "answer_validator",
    "output_spec",
]

T = TypeVar("T")

#: The key a non-object output is wrapped in (``{"response": [...]}``).
WRAP_KEY = "response"


class OutputValidationError(MalformedResponseError, AnswerRejectedError):
    """An answer is not a valid instance of the requested ``output_type``.

    In a fan-out the candidate counts as failed (``status="failed"``, this error, and its
    ``completion`` kept so that its tokens still count); the other candidates are chosen from.
    It is retryable: another sample may well be valid. It is an
    [`AnswerRejectedError`][genfan.AnswerRejectedError] too (the type is one way to say what a good answer is),
    so a ``validate=`` type rejects an answer with it, and ``except AnswerRejectedError`` sees
    both.

    Attributes:
        output_type: the type's name (``"City"``, ``"list[City]"``).
        reason: what is wrong, without the type's name (each wrong field, or "no JSON found").
        text: the answer's text.
        errors: pydantic's errors (``loc``, ``msg``, ``type``; empty when the text held no JSON).
        completion: the answer that failed validation.
    """

    def __init__(
        self,
        message: str,
        *,
        backend: str = "?",
        output_type: str = "",
        reason: str = "",
        text: str = "",
        errors: Sequence[Mapping[str, Any]] = (),
        completion: Completion | None = None,
    ) -> None:
        super().__init__(
            message, backend=backend, reason=reason, completion=completion, check=output_type
        )
        self.output_type = output_type
        self.text = text
        self.errors = [dict(e) for e in errors]


class OutputSpec(Generic[T]):
    """One output type, ready to use: its response format and its validator.

    Attributes:
        type: the type as given.
        name: a short name (``City``, ``list[City]``).
        response_format: what requests ask for (``None`` for ``str``: plain text).
        wrapped: the schema wraps the type in ``{"response": ...}``.
    """

    __slots__ = ("_adapter", "name", "response_format", "type", "wrapped")

    def __init__(self, output_type: Any) -> None:
        self.type = output_type
        self.name = type_name(output_type)
        self.wrapped = False
        self.response_format: ResponseFormat | None = None
        self._adapter: TypeAdapter[T] | None = None
        if output_type is str:
            return
        try:
            self._adapter = TypeAdapter(output_type)
            schema = self._adapter.json_schema()
        except (PydanticUserError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"output_type {self.name} is not a type pydantic can validate and describe as "
                f"a JSON schema: {exc}"
            ) from exc
        self.wrapped = schema.get("type") != "object"
        if self.wrapped:
            defs = schema.pop("$defs", None)
            schema = {
                "type": "object",
                "properties": {WRAP_KEY: schema},
                "required": [WRAP_KEY],
                "additionalProperties": False,
                **({"$defs": defs} if defs else {}),
            }
        strict = strict_schema(schema)
        self.response_format = ResponseFormat(
            type="json_schema",
            json_schema=strict if strict is not None else schema,
            name=_schema_name(self.name),
            strict=strict is not None,
        )

    @property
    def is_text(self) -> bool:
        """The output is the answer's text (``output_type=str``)."""
        return self._adapter is None

    def __repr__(self) -> str:
        return f"OutputSpec({self.name})"

    def prepare(self, request: ChatRequest) -> ChatRequest:
        """``request`` asking for this type's JSON (a request that already asks for a JSON
        schema keeps its own)."""
        fmt = request.response_format
        if self.response_format is None or (fmt is not None and fmt.type == "json_schema"):
            return request
        return request.model_copy(update={"response_format": self.response_format})

    def validate(self, completion: Completion, *, backend: str | None = None) -> T:
        """The answer as an instance of the type.

        Raises:
            OutputValidationError: the answer holds no JSON, or its JSON is not a valid instance.
        """
        text = completion.text
        if self._adapter is None:
            return cast(T, text)
        who = backend or completion.backend or "?"
        try:
            value = find_json(text)
        except ValueError as exc:
            start = text.strip()[:60]
            reason = f"{exc}" + (f" (it starts {start!r})" if start else "")
            raise OutputValidationError(
                f"answer is not a valid {self.name}: {reason}",
                backend=who,
                output_type=self.name,
                reason=reason,
                text=text,
                completion=completion,
            ) from None
        if self.wrapped and isinstance(value, dict) and set(value) == {WRAP_KEY}:
            value = value[WRAP_KEY]
        try:
            return self._adapter.validate_json(json.dumps(value))
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False)
            reason = describe_errors(errors)
            raise OutputValidationError(
                f"answer is not a valid {self.name}: {reason}",
                backend=who,
                output_type=self.name,
                reason=reason,
                text=text,
                errors=errors,
                completion=completion,
            ) from None

    def dump(self, value: Any) -> JsonValue:
        """``value`` as JSON-able data (a model's ``model_dump(mode="json")``)."""
        if self._adapter is None:
            return value
        return self._adapter.dump_python(value, mode="json")


@functools.lru_cache(maxsize=256)
def _cached_spec(output_type: Any) -> OutputSpec[Any]:
    return OutputSpec(output_type)


def output_spec(output_type: Any) -> OutputSpec[Any] | None:
    """The `OutputSpec` of ``output_type`` (``None``: no type, the answer's text).

    Specs are cached per type (schema generation and validator building happen once).

    Raises:
        ConfigurationError: pydantic cannot validate the type or describe it as a JSON schema.
    """
    if output_type is None:
        return None
    if isinstance(output_type, OutputSpec):
        return output_type
    try:
        return _cached_spec(output_type)
    except TypeError:  # an unhashable type form: build it each time
        return OutputSpec(output_type)


# -- what a good answer is: validate= ------------------------------------------------------------


@runtime_checkable
class AnswerCheck(Protocol):
    """Checks one answer: ``check(completion)`` returns ``None`` to accept it, or the reason to
    reject it (it may also raise [`AnswerRejectedError`][genfan.AnswerRejectedError] or ``ValueError``).

    Any object with such a method is a check ``validate=`` takes.
    """

    def check(self, completion: Completion, /) -> str | None: ...


#: What ``validate=`` takes: a function ``(completion) -> None | True | False | reason`` (plain
#: or ``async``; raising ``ValueError`` rejects too), an `AnswerCheck`, a per-answer
#: scorer of ``genfan.select`` (``SchemaValid()``, ``RefusalDetector()``, ``LengthBounds(...)``,
#: ``Patterns(...)``, ``Finished()``: it passes when it scores above 0, as a ``Select`` filter),
#: a type as for ``output_type`` (a pydantic model, ``list[City]``...), or a list of these (all
#: must pass, checked in order).
ValidateLike: TypeAlias = Any

_Verdict: TypeAlias = "str | bool | None"
_CheckFn: TypeAlias = Callable[[Completion, ChatRequest], "_Verdict | Awaitable[_Verdict]"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _AnswerView:
    """One answer as a per-answer scorer reads a candidate (``genfan.select.Candidate``'s
    fields; this floor cannot import selection)."""

    completion: Completion
    backend: str
    index: int = 0
    status: str = "ok"
    error: None = None
    started: float = 0.0
    latency: float = 0.0
    finished_order: int | None = 0

    @property
    def ok(self) -> bool:
        return True

    @property
    def text(self) -> str:
        return self.completion.text


def _score_verdict(scores: Any, name: str) -> _Verdict:
    score = scores.get(0) if isinstance(scores, Mapping) else None
    if score is None:
        return f"not scored by {name}"
    value = getattr(score, "value", score)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return None
    reason = getattr(score, "reason", "")
    return str(reason) if reason else f"scored 0 by {name}"


def _compile_check(item: Any) -> tuple[str, _CheckFn]:
    """``(name, check)`` for one item of ``validate=``."""
    if isinstance(item, AnswerValidator):
        return item.name, lambda completion, request: item(completion, request=request)
    if isinstance(item, OutputSpec) or isinstance(item, type) or get_origin(item) is not None:
        spec = output_spec(item)
        assert spec is not None

        def by_type(completion: Completion, request: ChatRequest) -> _Verdict:
            spec.validate(completion)  # raises OutputValidationError
            return None

        return spec.name, by_type
    check = getattr(item, "check", None)
    if callable(check):
        return str(getattr(item, "name", None) or type(item).__name__), (
            lambda completion, request: check(completion)
        )
    score = getattr(item, "score", None)
    if callable(score):
        name = str(getattr(item, "name", None) or type(item).__name__)

        def by_scorer(
            completion: Completion, request: ChatRequest
        ) -> _Verdict | Awaitable[_Verdict]:
            view = _AnswerView(completion=completion, backend=completion.backend or "?")
            scores = score(request, [view])
            if inspect.isawaitable(scores):

                async def later() -> _Verdict:
                    return _score_verdict(await scores, name)

                return later()
            return _score_verdict(scores, name)

        return name, by_scorer
    if callable(item):
        name = getattr(item, "__name__", "") or type(item).__name__
        return ("validate" if name == "<lambda>" else name), (
            lambda completion, request: item(completion)
        )
    raise ConfigurationError(
        "validate= takes a function (completion) -> None | bool | reason, an object with a "
        "check(completion) method, a per-answer scorer (SchemaValid(), RefusalDetector()...), "
        f"a type as for output_type, or a list of these; got {item!r}"
    )


class AnswerValidator:
    """What a good answer is, compiled once from ``validate=`` (see `ValidateLike`).

    Awaiting ``validator(completion, request=...)`` runs the checks in order; the first that
    rejects the answer raises [`AnswerRejectedError`][genfan.AnswerRejectedError] (with the reason, the
    completion and the check's name; an [`OutputValidationError`][genfan.OutputValidationError] for a type). An answer
    that asks for tools is not checked: it is not the answer yet.

    Attributes:
        name: the checks' names, joined by ``+``.
    """

    __slots__ = ("_checks", "name")

    def __init__(self, validate: ValidateLike) -> None:
        items = list(validate) if isinstance(validate, list | tuple) else [validate]
        if not items:
            raise ConfigurationError("validate= needs at least one check")
        self._checks = tuple(_compile_check(item) for item in items)
        self.name = "+".join(name for name, _ in self._checks)

    def __repr__(self) -> str:
        return f"AnswerValidator({self.name})"

    async def __call__(
        self, completion: Completion, *, request: ChatRequest, backend: str | None = None
    ) -> None:
        """Accept ``completion`` (return) or reject it.

        Raises:
            AnswerRejectedError: a check rejected the answer.
        """
        if completion.tool_calls:
            return
        who = backend or completion.backend or "?"
        for name, check in self._checks:
            try:
                verdict = check(completion, request)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
            except AnswerRejectedError as exc:
                if exc.completion is None:
                    exc.completion = completion
                if exc.backend == "?":
                    exc.backend = who
                if not exc.check:
                    exc.check = name
                raise
            except ValidationError as exc:
                verdict = describe_errors(exc.errors(include_url=False, include_context=False))
            except ValueError as exc:
                verdict = str(exc) or type(exc).__name__
            if verdict is None or verdict is True:
                continue
            if verdict is not False and not isinstance(verdict, str):
                raise ConfigurationError(
                    f"validate check {name} must return None or True (accept), False or a "
                    f"reason (reject), not {type(verdict).__name__}"
                )
            reason = verdict or f"rejected by {name}"
            raise AnswerRejectedError(
                f"answer rejected by {name}: {reason}",
                backend=who,
                reason=reason,
                completion=completion,
                check=name,
            )


def answer_validator(validate: ValidateLike | None) -> AnswerValidator | None:
    """``validate=`` compiled (``None``: no checks).

    Raises:
        ConfigurationError: something in it is not a check.
    """
    if validate is None or isinstance(validate, AnswerValidator):
        return validate
    return AnswerValidator(validate)


def type_name(output_type: Any) -> str:
    """``City`` for a class, ``list[City]`` for a generic alias, the repr otherwise."""
    if isinstance(output_type, type) and not getattr(output_type, "__args__", None):
        return output_type.__name__
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", repr(output_type)).replace("typing.", "")


def _schema_name(name: str) -> str:
    """A JSON-schema name OpenAI accepts: ``[A-Za-z0-9_-]{1,64}``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:64] or "response"


def describe_errors(errors: Sequence[Mapping[str, Any]], *, limit: int = 5) -> str:
    """``population: Input should be a valid integer (got 'many'); name: Field required``."""
    parts: list[str] = []
    for e in errors[:limit]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != WRAP_KEY) or "(root)"
        text = f"{loc}: {e.get('msg', 'invalid')}"
        if e.get("type") not in ("missing",) and "input" in e:
            shown = repr(e["input"])
            text += f" (got {shown if len(shown) <= 40 else shown[:37] + '...'})"
        parts.append(text)
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)


_FENCE = re.compile(r"```[ \t]*(?:json|JSON|json5)?[ \t]*\n?(.*?)```", re.DOTALL)
_decoder = json.JSONDecoder()


def find_json(text: str, *, empty: str = "the answer is empty") -> JsonValue:
    """The JSON value in ``text``: the whole text, else a fenced code block, else the first
    ``{...}`` or ``[...]`` that parses (typed outputs and ``genfan.select.extract_json`` alike).

    Raises:
        ValueError: no JSON found (``empty`` is the message for a blank text).
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError(empty)
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    for block in _FENCE.findall(text):
        try:
            return json.loads(block.strip())
        except json.JSONDecodeError:
            continue
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = _decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        return value
    raise ValueError("no JSON found in the answer")


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any] | None:
    """``schema`` in the form OpenAI's strict structured outputs accept, or ``None`` where it
    cannot be (an open object such as ``dict[str, int]``, ``allOf`` of several schemas).

    Every object gets ``additionalProperties: false`` and all its properties ``required``
    (optional fields stay nullable: pydantic writes them as ``anyOf [..., null]``); ``default``
    is dropped (strict mode refuses it, and every field is required anyway); a ``$ref`` with
    sibling keys is inlined; ``oneOf`` becomes ``anyOf``.
    """
    root = copy.deepcopy(dict(schema))
    defs = root.get("$defs", {})

    def resolve(ref: str) -> dict[str, Any] | None:
        prefix = "#/$defs/"
        if not ref.startswith(prefix) or ref[len(prefix) :] not in defs:
            return None
        return cast(dict[str, Any], copy.deepcopy(defs[ref[len(prefix) :]]))

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            items = [walk(item) for item in node]
            return None if any(item is None for item in items) else items
        if not isinstance(node, dict):
            return node
        node = dict(node)
        if "$ref" in node and len(node) > 1:
            target = resolve(node["$ref"])
            if target is None:
                return None
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node = {**target, **rest}
        if "allOf" in node:
            parts = node.pop("allOf")
            if not isinstance(parts, list) or len(parts) != 1:
                return None
            node = {**parts[0], **node}
        if "oneOf" in node:
            node["anyOf"] = node.pop("oneOf")
        node.pop("discriminator", None)
        node.pop("default", None)
        if node.get("type") == "object" or "properties" in node:
            extra = node.get("additionalProperties")
            props = node.get("properties")
            if extra not in (None, False) or not isinstance(props, dict) or not props:
                return None
            node["additionalProperties"] = False
            node["required"] = list(props)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("properties", "$defs", "patternProperties"):
                if not isinstance(value, dict):
                    return None
                inner = {k: walk(v) for k, v in value.items()}
                if any(v is None for v in inner.values()):
                    return None
                out[key] = inner
            elif key in ("items", "anyOf", "prefixItems", "not", "if", "then", "else"):
                walked = walk(value)
                if walked is None:
                    return None
                out[key] = walked
            else:
                out[key] = value
        return out

    result = walk(root)
    return cast(dict[str, Any] | None, result)
