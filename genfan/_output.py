"""Typed outputs: the JSON-schema response format for a type, and answers validated into it.

``output_type=`` (on ``FanOut``, ``Agent`` and LLM steps) takes a pydantic model class, or any
type pydantic's ``TypeAdapter`` takes (``list[City]``, ``Literal["yes", "no"]``, a dataclass,
a ``TypedDict``, ``int``...). :func:`output_spec` turns it into an :class:`OutputSpec`:

* the request's ``response_format``: a JSON schema of the type, made strict-compatible where
  that is possible (every object closed and every property required, as OpenAI's strict
  structured outputs demand), sent as it is (``strict=False``) where it is not (a ``dict[str,
  X]`` field); a type whose schema is not an object (a list, a union, a scalar) is wrapped as
  ``{"response": ...}``, since providers ask for an object at the root;
* the validation of each answer: its JSON (the whole text, else a fenced code block, else the
  first ``{...}`` or ``[...]`` that parses), unwrapped, validated by pydantic into an instance;
  what fails is an :class:`OutputValidationError` naming each wrong field.

``str`` (or no type at all) asks for nothing and "validates" to the answer's text.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Generic, cast

from pydantic import PydanticUserError, TypeAdapter, ValidationError
from typing_extensions import TypeVar

from ._errors import ConfigurationError, MalformedResponseError
from ._types import ChatRequest, Completion, JsonValue, ResponseFormat

__all__ = ["OutputSpec", "OutputValidationError", "output_spec"]

T = TypeVar("T")

#: The key a non-object output is wrapped in (``{"response": [...]}``).
WRAP_KEY = "response"


class OutputValidationError(MalformedResponseError):
    """An answer is not a valid instance of the requested ``output_type``.

    In a fan-out the candidate counts as failed (``status="failed"``, this error, and its
    ``completion`` kept so that its tokens still count); the other candidates are chosen from.
    It is retryable: another sample may well be valid.

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
        super().__init__(message, backend=backend)
        self.output_type = output_type
        self.reason = reason or message
        self.text = text
        self.errors = [dict(e) for e in errors]
        self.completion = completion


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
            value = _find_json(text)
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
    """The :class:`OutputSpec` of ``output_type`` (``None``: no type, the answer's text).

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


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_decoder = json.JSONDecoder()


def _find_json(text: str) -> JsonValue:
    """The JSON value in ``text``: the whole text, else a fenced code block, else the first
    ``{...}`` or ``[...]`` that parses.

    Raises:
        ValueError: no JSON found.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("the answer is empty")
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
