"""What agents and chains call: a [`Backend`][genfan.Backend].

A provider, a guard stack, a pool and every composite (``FanOut``, ``Cascade``, ``Synthesis``)
are all backends, so agents need nothing else: a fan-out's ``complete`` is its chosen answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing, nullcontext
from typing import Any

from .. import telemetry
from .._backend import Backend
from .._errors import ConfigurationError, MalformedResponseError
from .._types import ChatRequest, Completion, StreamEnd, TextDelta

__all__ = ["check_model", "complete"]


def check_model(model: object, *, what: str) -> Backend:
    if isinstance(model, Backend):
        return model
    raise ConfigurationError(
        f"{what} needs a genfan Backend or a FanOut (or any composite: they are backends), "
        f"got {type(model).__name__}"
    )


async def complete(
    model: Backend,
    request: ChatRequest,
    *,
    on_text: Callable[[str], Awaitable[None]] | None = None,
) -> Completion:
    """One model call: streamed (text pieces to ``on_text``) when asked and possible."""
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
