"""Adaptive sampling: samples of one model, drawn in waves until the answer is settled.

[`Sampling`][genfan.Sampling] is a [`FanOut`][genfan.FanOut] of ``samples`` targets on one backend, called in
[`Waves`][genfan.select.Waves]: a first wave, then more only while the stopping rule
(Adaptive-Consistency's Beta criterion by default) says the leading answer is not settled. Where
the backend can draw several samples in one request (a ``sample(request, n)`` method, as the
local vLLM engine's), a wave is one request with ``n`` samples: the prompt is processed once and
its prefix shared. Elsewhere a wave is ``n`` concurrent calls.

Because it is a fan-out, it nests anywhere one does: as a cascade tier, a fan-out target, an
agent's model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from . import telemetry
from ._backend import Backend
from ._errors import BackendError, ConfigurationError
from ._fanout import FanOut, Target
from ._types import ChatRequest, Completion
from .select import AutoSelect, Candidate, Majority, SelectorLike, Waves

if TYPE_CHECKING:
    from ._fanout import _RaceState

__all__ = ["MultiSampleBackend", "Sampling"]

#: `Sampling`'s default schedule: 2 samples, then 2 at a time while no answer holds a majority
#: of at least 2 unweighted votes and the calibrated P(right) is below 0.5 (chosen on the
#: selection benchmark's dev splits: the fewest tokens at all 9 samples' accuracy; see
#: docs/benchmarks.md, selection).
DEFAULT_WAVES = Waves(
    first=2,
    size=2,
    stop=Majority(),
    counter=AutoSelect(weight="none", keep=1.0, name="auto-votes"),
    confident=0.5,
)


@runtime_checkable
class MultiSampleBackend(Protocol):
    """A backend that can draw ``n`` samples in one request (sharing the prompt's prefix)."""

    async def sample(self, request: ChatRequest, n: int) -> Sequence[Completion]: ...


class Sampling(FanOut):
    """Up to ``samples`` answers of one backend, drawn in waves until the answer is settled.

    Args:
        backend: the model to sample.
        samples: the most samples to draw.
        waves: the wave schedule and stopping rule (a [`Waves`][genfan.select.Waves], or a wave
            size); ``None``: every sample at once (one request where the backend can). The
            default draws 2 at a time while no answer holds a majority of at least 2 votes
            ([`Majority`][genfan.select.Majority] on unweighted votes) and the calibrated
            probability that the pick is right is below 0.5: chosen on the selection
            benchmark's dev split, where it drew about 4-5 samples of 9 at the accuracy of all
            9 (each wave is a request that pays the prompt again: see docs/benchmarks.md).
        temperature: the sampling temperature (default: the request's, else the backend's).
            The selection benchmark samples its small model at 0.4, chosen on its dev split
            over 0.25 and 0.7.
        max_tokens: per sample (default: the request's).
        logprobs: ask for token log-probabilities, so that the selector and the stopping rule
            can weigh each answer by the model's confidence.
        select: picks the answer (default: the ``auto`` selector).
        deadline: seconds for the whole draw.
        name: the backend name (default ``"sampling(<backend>)"``).

    Example:
        ```python
        sampler = Sampling(local, samples=9, temperature=0.4)
        result = await sampler.run("What is 17 * 3?")  # 2 samples, 2 more while they split
        print(result.text, len(result.successes), result.selection.confidence)
        ```
    """

    def __init__(
        self,
        backend: Backend,
        samples: int = 9,
        *,
        waves: Waves | int | None = DEFAULT_WAVES,
        temperature: float | None = None,
        max_tokens: int | None = None,
        logprobs: bool = True,
        select: SelectorLike | None = None,
        deadline: float | None = None,
        name: str | None = None,
    ) -> None:
        if samples < 1:
            raise ConfigurationError(f"samples must be >= 1, got {samples!r}")
        if select is None:
            select = AutoSelect()
        self.backend = backend
        overrides = {"logprobs": True} if logprobs else {}
        targets = [
            Target(
                backend=backend,
                name=f"{backend.name}#s{i + 1}",
                temperature=temperature,
                max_tokens=max_tokens,
                overrides=overrides,
            )
            for i in range(samples)
        ]
        super().__init__(
            targets,
            mode="all",
            deadline=deadline,
            select=select,
            name=name or f"sampling({backend.name})",
            waves=Waves(size=samples) if waves is None else waves,
        )

    async def _wave(
        self,
        indices: range,
        request: ChatRequest,
        slots: list[Candidate | None],
        started_at: list[float],
        state: _RaceState,
        t0: float,
    ) -> None:
        """One wave: one request with ``n`` samples where the backend can, else ``n`` calls."""
        backend = self.backend
        if len(indices) == 1 or not isinstance(backend, MultiSampleBackend):
            await super()._wave(indices, request, slots, started_at, state, t0)
            return
        prepared = self.targets[indices[0]].prepare(request)
        start = time.perf_counter()
        for i in indices:
            started_at[i] = start - t0
        with telemetry.span(
            f"chat {prepared.model or backend.name}",
            **{
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": prepared.model,
                "gen_ai.request.temperature": prepared.temperature,
                "genfan.backend": backend.name,
                "genfan.samples": len(indices),
            },
        ):
            try:
                completions = list(await backend.sample(prepared, len(indices)))
            except BackendError as exc:
                error: BackendError = exc
            except Exception as exc:  # a backend bug must still end as one typed error
                error = BackendError(f"unexpected {type(exc).__name__}: {exc}", backend=self.name)
                error.__cause__ = exc
            else:
                latency = time.perf_counter() - start
                for i, completion in zip(indices, completions, strict=False):
                    slots[i] = Candidate(
                        index=i,
                        backend=self.targets[i].name or backend.name,
                        status="ok",
                        completion=completion,
                        started=started_at[i],
                        latency=latency,
                        finished_order=state.next_order(),
                    )
                    state.success(completion)
                return
            latency = time.perf_counter() - start
            for i in indices:
                slots[i] = Candidate(
                    index=i,
                    backend=self.targets[i].name or backend.name,
                    status="failed",
                    error=error,
                    started=started_at[i],
                    latency=latency,
                    finished_order=state.next_order(),
                )
