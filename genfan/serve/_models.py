"""The models the gateway serves: every configured backend (pools and fallbacks included), the
fan-out and its selector, and the ``[serve]`` table's extra fan-outs and cascades; and how each
one answers, as one completion or as a stream, with the selection's explanation and what every
candidate used and cost.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._backend import Backend, backend_options
from .._cascade import Cascade, Tier
from .._config import GenfanConfig
from .._errors import ConfigurationError
from .._fanout import CandidateDelta, FanOut, FanOutFinished, FanOutResult
from .._types import ChatRequest, Completion, StreamEnd, TextDelta, ToolCallDelta
from ._errors import GatewayError
from ._settings import ServeSettings

__all__ = ["Outcome", "ServedModel", "build_models"]

Kind = Literal["backend", "pool", "fallback", "fanout", "cascade"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """One answer: the completion, what every candidate used and cost, and why it won.

    Attributes:
        completion: the chosen completion.
        extension: the ``genfan`` field of the answer (explanation, candidates, cost).
        input_tokens, output_tokens, cost: over every candidate (what the answer cost).
    """

    completion: Completion
    extension: dict[str, Any]
    input_tokens: int
    output_tokens: int
    cost: float


@dataclass(eq=False, kw_only=True, slots=True)
class ServedModel:
    """A model of ``GET /v1/models``: what answers under that name."""

    name: str
    kind: Kind
    backend: Backend
    owned: list[Backend] = field(default_factory=list)

    @property
    def fanout(self) -> FanOut[Any] | None:
        return self.backend if isinstance(self.backend, FanOut) else None

    @property
    def cascade(self) -> Cascade | None:
        return self.backend if isinstance(self.backend, Cascade) else None

    def describe(self) -> dict[str, Any]:
        """The model's entry in ``GET /v1/models``."""
        out: dict[str, Any] = {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "genfan",
            "genfan": {"kind": self.kind},
        }
        fan = self.fanout
        if fan is not None:
            out["genfan"].update(
                backends=fan.names, mode=fan.mode, selector=type(fan.selector).__name__
            )
        cascade = self.cascade
        if cascade is not None:
            out["genfan"]["tiers"] = [t.name for t in cascade.tiers]
        return out

    # -- answering --------------------------------------------------------------------------

    async def answer(self, request: ChatRequest) -> Outcome:
        """The whole answer (the ``stream: false`` path)."""
        fan = self.fanout
        if fan is not None:
            return _fanout_outcome(self, await fan.run(request))
        cascade = self.cascade
        if cascade is not None:
            result = await cascade.run(request)
            chosen = result.chosen
            if chosen is None or chosen.completion is None:
                raise _none_chosen(self.name, result.selection.explanation)
            ext = _extension(self, chosen.completion, result.candidates, result.selection)
            ext["tiers"] = [
                {"name": t.name, "ran": t.ran, "cost_usd": t.cost, "accepted": t.accepted}
                for t in result.tiers
            ]
            return _outcome(chosen.completion, ext, result.candidates)
        completion = await self.backend.complete(request)
        return _single(self, completion)

    async def events(
        self, request: ChatRequest
    ) -> AsyncGenerator[TextDelta | ToolCallDelta | Outcome, None]:
        """The answer's pieces as they come, then its `Outcome` (the ``stream: true`` path)."""
        fan = self.fanout
        if fan is not None:
            live = (fan.mode == "first" or len(fan.targets) == 1) and not fan.validate_streams
            held: dict[int, list[TextDelta | ToolCallDelta]] = {}
            result: FanOutResult[Any] | None = None
            async with fan.run_stream(request) as stream:
                async for ev in stream:
                    if isinstance(ev, CandidateDelta):
                        if live:
                            yield ev.delta
                        else:
                            held.setdefault(ev.index, []).append(ev.delta)
                    elif isinstance(ev, FanOutFinished):
                        result = ev.result
            assert result is not None  # run_stream ends with FanOutFinished or raises
            outcome = _fanout_outcome(self, result)
            if not live and result.selection.chosen is not None:
                for delta in held.get(result.selection.chosen, ()):
                    yield delta
            yield outcome
            return
        if self.cascade is not None:
            outcome = await self.answer(request)
            for delta in _replay(outcome.completion):
                yield delta
            yield outcome
            return
        pieces = self.backend.stream(request)
        try:
            async for piece in pieces:
                if isinstance(piece, StreamEnd):
                    yield _single(self, piece.completion)
                else:
                    yield piece
        finally:
            aclose = getattr(pieces, "aclose", None)
            if aclose is not None:
                await aclose()


def _replay(completion: Completion) -> Iterator[TextDelta | ToolCallDelta]:
    if completion.text:
        yield TextDelta(text=completion.text)
    for i, call in enumerate(completion.tool_calls):
        yield ToolCallDelta(index=i, id=call.id, name=call.name, arguments=call.arguments)


def _none_chosen(name: str, explanation: str) -> GatewayError:
    return GatewayError(
        502,
        f"model {name!r} chose no answer: {explanation}",
        type="upstream_error",
        code="no_answer",
    )


def _usage(c: Completion | None) -> dict[str, Any]:
    if c is None:
        return {"input_tokens": 0, "output_tokens": 0, "cost_usd": None}
    return {
        "input_tokens": c.usage.input_tokens,
        "output_tokens": c.usage.output_tokens,
        "cost_usd": c.usage.cost,
    }


def _candidates(candidates: Sequence[Any], selection: Any) -> list[dict[str, Any]]:
    out = []
    for c in candidates:
        item: dict[str, Any] = {
            "backend": c.backend,
            "status": c.status,
            "chosen": selection.chosen == c.index,
            "latency": round(c.latency, 6),
            "usage": _usage(c.completion),
        }
        score = selection.scores.get(c.index)
        if score is not None and math.isfinite(score):
            item["score"] = score
        reason = selection.reasons.get(c.index) or selection.rejected.get(c.index)
        if reason:
            item["reason"] = reason
        if c.error is not None:
            item["error"] = f"{type(c.error).__name__}: {c.error.message}"
        out.append(item)
    return out


def _extension(
    model: ServedModel, chosen: Completion, candidates: Sequence[Any], selection: Any
) -> dict[str, Any]:
    return {
        "model": model.name,
        "kind": model.kind,
        "chosen": chosen.backend,
        "method": selection.method,
        "confidence": selection.confidence,
        "explanation": selection.explanation,
        "candidates": _candidates(candidates, selection),
    }


def _outcome(chosen: Completion, ext: dict[str, Any], candidates: Sequence[Any]) -> Outcome:
    inp = out = 0
    cost = 0.0
    for c in candidates:
        if c.completion is not None:
            inp += c.completion.usage.input_tokens
            out += c.completion.usage.output_tokens
            cost += c.completion.usage.cost or 0.0
    ext["usage"] = {"input_tokens": inp, "output_tokens": out, "cost_usd": cost}
    return Outcome(completion=chosen, extension=ext, input_tokens=inp, output_tokens=out, cost=cost)


def _fanout_outcome(model: ServedModel, result: FanOutResult[Any]) -> Outcome:
    chosen = result.chosen
    if chosen is None or chosen.completion is None:
        raise _none_chosen(model.name, result.selection.explanation)
    ext = _extension(model, chosen.completion, result.candidates, result.selection)
    ext["deadline_hit"] = result.deadline_hit
    return _outcome(chosen.completion, ext, result.candidates)


def _single(model: ServedModel, c: Completion) -> Outcome:
    cost = c.usage.cost or 0.0
    usage = _usage(c)
    ext = {
        "model": model.name,
        "kind": model.kind,
        "chosen": c.backend or model.name,
        "method": model.kind,
        "confidence": None,
        "explanation": f"one {model.kind}: {c.backend or model.name} answered",
        "candidates": [
            {
                "backend": c.backend or model.name,
                "status": "ok",
                "chosen": True,
                "latency": round(c.latency, 6),
                "usage": usage,
            }
        ],
        "usage": {**usage, "cost_usd": cost},
    }
    return Outcome(
        completion=c,
        extension=ext,
        input_tokens=c.usage.input_tokens,
        output_tokens=c.usage.output_tokens,
        cost=cost,
    )


def build_models(
    config: GenfanConfig, settings: ServeSettings, into: dict[str, ServedModel] | None = None
) -> dict[str, ServedModel]:
    """Every model the configuration describes (or those ``serve.models`` names), built
    (guarded) and ready to serve.

    Raises:
        ConfigurationError: a backend, fan-out or cascade cannot be built, or ``serve.models``
            names none of them. The models built so far are in ``into``, for the caller to
            close.
    """
    config = _with_transport(config, settings.transport)
    names: list[str] = list(config.backends)
    if any(b.enabled for b in config.backends.values()) and settings.fanout_model not in names:
        names.append(settings.fanout_model)
    names += [*settings.fanouts, *settings.cascades]
    if settings.models is not None:
        unknown = [m for m in settings.models if m not in names]
        if unknown:
            raise ConfigurationError(
                f"serve.models names {unknown}, which are neither backends nor fan-outs nor "
                f"cascades; defined: {sorted(names)}"
            )
        names = list(settings.models)
    models: dict[str, ServedModel] = {} if into is None else into
    for name in names:
        models[name] = _build_one(config, settings, name)
    return models


def _with_transport(config: GenfanConfig, transport: str) -> GenfanConfig:
    """``config`` with ``options.transport`` set on every backend that takes one and has none."""
    if transport == "httpx":
        return config
    if transport == "auto":
        import importlib.util

        if importlib.util.find_spec("aiohttp") is None:
            return config
    backends = {}
    for name, b in config.backends.items():
        if b.type not in ("pool", "fallback") and "transport" not in b.options:
            try:
                valid = backend_options(f"{b.type}:{b.model or ''}")
            except ConfigurationError:
                valid = None
            if valid is not None and "transport" in valid:
                b = b.model_copy(update={"options": {**b.options, "transport": transport}})
        backends[name] = b
    return config.model_copy(update={"backends": backends})


def _build_one(config: GenfanConfig, settings: ServeSettings, name: str) -> ServedModel:
    cfg = config.backends.get(name)
    if cfg is not None:
        kind: Kind = (
            "pool" if cfg.type == "pool" else "fallback" if cfg.type == "fallback" else "backend"
        )
        return ServedModel(name=name, kind=kind, backend=config.build_backend(name))
    if name in settings.fanouts:
        f = settings.fanouts[name]
        fan = config.build_fanout(
            backends=f.backends,
            select=f.select,
            mode=f.mode,
            quorum=f.quorum,
            deadline=f.deadline,
            early_exit=f.early_exit,
            judge=f.judge,
        )
        return ServedModel(name=name, kind="fanout", backend=fan)
    if name in settings.cascades:
        c = settings.cascades[name]
        owned: list[Backend] = []
        tiers = []
        for i, tier in enumerate(c.tiers, 1):
            targets = config.build_targets(tier)
            owned += [t.backend for t in targets]
            tiers.append(Tier(backends=targets, name=f"tier{i}"))
        from ..select import selector_from_name

        cascade = Cascade(
            tiers,
            selector=selector_from_name(c.select),
            threshold=c.threshold,
            carry=c.carry,
            name=name,
        )
        return ServedModel(name=name, kind="cascade", backend=cascade, owned=owned)
    return ServedModel(name=name, kind="fanout", backend=config.build_fanout())
