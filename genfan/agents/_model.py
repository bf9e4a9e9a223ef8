"""What agents and chains call: a :class:`~genfan.Backend`, or a fan-out.

Agents sit below the fan-out in genfan's floors, so a fan-out is recognised by shape (an
``async run(request)`` whose result has a ``completion``), not imported.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing, nullcontext
from typing import Any, Protocol, TypeAlias, runtime_checkable

from .. import telemetry
from .._backend import Backend
from .._errors import ConfigurationError, MalformedResponseError
from .._types import ChatRequest, Completion, StreamEnd, TextDelta

__all__ = ["FanOutLike", "Model", "complete", "model_name"]


class _HasCompletion(Protocol):
    @property
    def completion(self) -> Completion: ...


@runtime_checkable
class FanOutLike(Protocol):
    """A :class:`~genfan.FanOut` (or anything that runs a request and picks one completion)."""

    async def run(self, request: ChatRequest) -> _HasCompletion: ...


#: A backend, or a fan-out whose chosen completion is used.
Model: TypeAlias = Backend | FanOutLike


def check_model(model: object, *, what: str) -> Model:
    if isinstance(model, Backend) or isinstance(model, FanOutLike):
        return model
    raise ConfigurationError(
        f"{what} needs a genfan Backend or a FanOut, got {type(model).__name__}"
    )


def model_name(model: Model) -> str:
    if isinstance(model, Backend):
        return model.name
    names = getattr(model, "names", None)
    return "fanout(" + ",".join(names) + ")" if isinstance(names, list) else "fanout"


async def complete(
    model: Model,
    request: ChatRequest,
    *,
    on_text: Callable[[str], Awaitable[None]] | None = None,
) -> Completion:
    """One model call: streamed (text pieces to ``on_text``) when asked and possible."""
    if not isinstance(model, Backend):
        return (await model.run(request)).completion
    name = model.name
    with telemetry.span(
        f"chat {request.model or name}",
        **{
            "gen_ai.operation.name": "chat",
            "gen_ai.system": name.split(":", 1)[0],
            "gen_ai.request.model": request.model,
            "genfan.backend": name,
        },
    ) as span:
        if on_text is None:
            completion = await model.complete(request)
        else:
            completion = await _streamed(model, request, on_text)
        span.set_attribute("gen_ai.usage.input_tokens", completion.usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", completion.usage.output_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", (completion.finish_reason,))
        return completion


async def _streamed(
    model: Backend, request: ChatRequest, on_text: Callable[[str], Awaitable[None]]
) -> Completion:
    events: Any = model.stream(request)
    async with aclosing(events) if hasattr(events, "aclose") else nullcontext():
        async for ev in events:
            if isinstance(ev, TextDelta):
                if ev.text:
                    await on_text(ev.text)
            elif isinstance(ev, StreamEnd):
                return ev.completion
    raise MalformedResponseError(
        "stream ended without a final event (truncated)", backend=model.name
    )
