"""The LLM step: a prompt template filled with named inputs, sent to a backend, the answer parsed.

`LLMCall` is a plain async callable of keyword inputs, so a chain runs it like any other
function step (``Chain.llm`` builds one; ``Chain.map`` can take one). With an ``output_type``
(or a ``response_model``) it asks the backend for JSON of that type's schema and returns a
validated instance; otherwise the answer's text.

`ask` is the one typed model call of agents and chains: a plain backend's answer is
validated; a [`FanOut`][genfan.FanOut] validates every candidate, so its selector chooses among
the valid answers only.
"""

from __future__ import annotations

import inspect
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel

from .._backend import Backend
from .._errors import ConfigurationError, MalformedResponseError, NoAnswerError
from .._fanout import FanOut
from .._output import OutputSpec, OutputValidationError, output_spec
from .._types import ChatRequest, Completion, StreamEnd, StreamEvent, TextDelta
from ._model import check_model, complete

__all__ = ["LLMCall", "ask"]


async def ask(
    model: Backend,
    request: ChatRequest,
    spec: OutputSpec[Any] | None,
    *,
    on_text: Callable[[str], Awaitable[None]] | None = None,
) -> tuple[Completion, Any]:
    """One model call and its output: the answer validated into ``spec``'s type (``None``, or
    an answer asking for tools: the answer's text, or ``None``).

    ``request`` already asks for the type's JSON. A [`FanOut`][genfan.FanOut] model validates
    each candidate (streamed or not) and chooses among the valid ones.

    Raises:
        OutputValidationError: the answer (every candidate's, for a fan-out) is not a valid
            instance; ``completion`` is the (first) invalid answer.
        BackendError: the call failed (``NoAnswerError`` for a fan-out).
    """
    if spec is None or spec.is_text:
        completion = await complete(model, request, on_text=on_text)
        return completion, completion.text
    if isinstance(model, FanOut):
        try:
            if on_text is None:
                completion = await model.complete(request, output_type=spec.type)
            else:
                events = model.stream(request, output_type=spec.type)
                completion = await _read(events, on_text, model.name)
        except NoAnswerError as exc:
            invalid = [e for e in exc.errors if isinstance(e, OutputValidationError)]
            if invalid and len(invalid) == len(exc.errors):
                raise invalid[0] from exc
            raise
    else:
        completion = await complete(model, request, on_text=on_text)
    if completion.tool_calls:
        return completion, None
    return completion, spec.validate(completion, backend=model.name)


async def _read(
    events: AsyncIterator[StreamEvent], on_text: Callable[[str], Awaitable[None]], name: str
) -> Completion:
    """A stream's completion, its text pieces passed to ``on_text`` on the way."""
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if isinstance(event, TextDelta):
                if event.text:
                    await on_text(event.text)
            elif isinstance(event, StreamEnd):
                return event.completion
    raise MalformedResponseError("stream ended without a final event (truncated)", backend=name)


class LLMCall:
    """An LLM call as a function of named inputs: the prompt is a ``str.format`` template.

    ``LLMCall(model, "Summarise:\\n{text}")`` takes the keyword ``text``. Used by
    `Chain.llm`, and usable on its own (for instance with `Chain.map`).

    Args:
        model: a [`Backend`][genfan.Backend] (a [`FanOut`][genfan.FanOut] is one).
        prompt: the template; its ``{fields}`` are the call's inputs. Or a function of the
            inputs returning the prompt or a whole [`ChatRequest`][genfan.ChatRequest].
        system: a system prompt.
        output_type: validate the answer into this type (a pydantic model class, or any type
            pydantic's ``TypeAdapter`` takes: ``list[Fact]``, a ``Literal``...) and ask the
            backend for JSON of its schema; the call returns the instance. A
            [`FanOut`][genfan.FanOut] model validates every candidate and chooses among the
            valid ones. An invalid answer raises [`OutputValidationError`][genfan.OutputValidationError].
        response_model: the same, for a pydantic model (the older name).
        temperature: sampling temperature.
        max_tokens: output limit.
    """

    def __init__(
        self,
        model: Backend,
        prompt: str | Callable[..., str | ChatRequest],
        *,
        system: str | None = None,
        response_model: type[BaseModel] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        output_type: Any = None,
    ) -> None:
        self.model = check_model(model, what="an LLM step")
        self.prompt = prompt
        self.system = system
        if response_model is not None and output_type is not None:
            raise ConfigurationError(
                "give an LLM step output_type= or response_model= (its older name), not both"
            )
        self.response_model = response_model
        self.output_type: Any = output_type if output_type is not None else response_model
        self.output_spec = output_spec(self.output_type)
        self.temperature = temperature
        self.max_tokens = max_tokens
        if isinstance(prompt, str):
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
            except ValueError as exc:
                raise ConfigurationError(f"bad prompt template {prompt!r}: {exc}") from exc
            names: list[str] = []
            for f in fields:
                base = f.split(".", 1)[0].split("[", 1)[0]
                if not base.isidentifier():
                    raise ConfigurationError(
                        f"prompt template fields must be named, like {{text}}; got {{{f}}} in "
                        f"{prompt!r}"
                    )
                if base not in names:
                    names.append(base)
            self.__signature__ = inspect.Signature(
                [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
            )
        else:
            self.__signature__ = inspect.signature(prompt)
        self.__name__ = f"llm[{self.model.name}]"

    def __repr__(self) -> str:
        return f"LLMCall({self.model.name!r})"

    def request(self, **values: Any) -> ChatRequest:
        """The request for these input values."""
        if isinstance(self.prompt, str):
            request: ChatRequest | str = self.prompt.format(**values)
        else:
            request = self.prompt(**values)
        req = ChatRequest.from_prompt(request) if isinstance(request, str) else request
        if self.system is not None:
            req = req.with_system(self.system)
        req = req.with_overrides(temperature=self.temperature, max_tokens=self.max_tokens)
        return req if self.output_spec is None else self.output_spec.prepare(req)

    async def __call__(self, **values: Any) -> Any:
        _, output = await ask(self.model, self.request(**values), self.output_spec)
        return output
