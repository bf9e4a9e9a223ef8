"""The fan-out: one request to N backends at once, every answer back, one chosen.

Concurrency is structured: each backend call runs in a task of one task group, and the losers of
a race (``first``, ``quorum``, agreement, deadline) are cancelled, never left running; a provider
that is cancelled closes its HTTP stream or aborts its engine request.

A fan-out is itself a :class:`~genfan.Backend`: :meth:`FanOut.complete` and
:meth:`FanOut.stream` give the chosen answer (and raise :class:`~genfan.NoAnswerError`), so it
nests in another fan-out, a cascade, a pool, a guard stack or an agent; :meth:`FanOut.run` keeps
every candidate.

Whoever creates a backend owns it: closing a fan-out closes only what it owns (nothing, unless it
was made with ``owns_backends=True``), so backends made once serve any number of fan-outs.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from . import telemetry
from ._backend import Backend, BaseBackend, aclose_all
from ._errors import (
    AllBackendsFailedError,
    BackendError,
    BackendTimeoutError,
    CallCancelledError,
    ConfigurationError,
    NoAnswerError,
)
from ._sync import clip, not_awaited, run_sync
from ._types import ChatRequest, Completion, StreamEvent, Usage
from .select import Candidate, Selection, SelectorLike, as_selector

__all__ = ["FanOut", "FanOutResult", "Mode", "Target"]

Mode = Literal["all", "first", "quorum"]


@dataclass(frozen=True, kw_only=True)
class Target:
    """A backend in a fan-out, with optional per-backend overrides of the request.

    The same backend may appear several times with different overrides (for instance one local
    engine under several temperatures); give each a distinct ``name``, or genfan numbers them.
    """

    backend: Backend
    name: str | None = None
    model: str | None = None
    temperature: float | None = None
    system: str | None = None
    max_tokens: int | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def prepare(self, request: ChatRequest) -> ChatRequest:
        """The request this target sends."""
        changes = {
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.overrides,
        }
        if any(v is not None for v in changes.values()):
            request = request.with_overrides(**changes)
        if self.system is not None:
            request = request.with_system(self.system)
        return request


@dataclass(frozen=True, kw_only=True)
class FanOutResult:
    """Everything a fan-out produced.

    Attributes:
        candidates: one per target, in target order: answers and typed failures.
        selection: the selector's decision and explanation.
        elapsed: wall seconds for the whole fan-out (selection included).
        deadline_hit: the deadline passed and unfinished calls were cancelled.
        quorum_met: the mode's condition was met (always true for ``all``).
    """

    request: ChatRequest
    candidates: tuple[Candidate, ...]
    selection: Selection
    elapsed: float
    mode: Mode
    deadline_hit: bool = False
    quorum_met: bool = True
    request_id: str = ""

    @property
    def chosen(self) -> Candidate | None:
        i = self.selection.chosen
        return None if i is None else self.candidates[i]

    @property
    def completion(self) -> Completion:
        """The chosen completion.

        Raises:
            ValueError: nothing was chosen.
        """
        chosen = self.chosen
        if chosen is None or chosen.completion is None:
            raise ValueError(f"no candidate was chosen: {self.selection.explanation}")
        return chosen.completion

    @property
    def text(self) -> str:
        """The chosen answer's text."""
        return self.completion.text

    @property
    def successes(self) -> list[Candidate]:
        return [c for c in self.candidates if c.ok]

    @property
    def usage(self) -> Usage:
        """Tokens (and cost) over every candidate that reported usage."""
        total = Usage()
        for c in self.candidates:
            if c.completion is not None:
                total = total + c.completion.usage
        return total

    def __repr__(self) -> str:
        chosen = self.chosen
        text = clip(chosen.text) if chosen is not None else None
        late = ", deadline_hit=True" if self.deadline_hit else ""
        return (
            f"FanOutResult(chosen={chosen.backend if chosen else None!r}, text={text!r}, "
            f"ok={len(self.successes)}/{len(self.candidates)}, mode={self.mode!r}, "
            f"elapsed={self.elapsed:.3f}s{late})"
        )


class FanOut(BaseBackend):
    """Send one request to several backends concurrently and pick one answer.

    A fan-out is a :class:`~genfan.Backend` too: :meth:`complete` returns the chosen
    completion, so fan-outs nest (in fan-outs, cascades, pools, guards, agents); :meth:`run`
    returns every candidate.

    Args:
        targets: backends (or :class:`Target` s with per-backend overrides).
        mode: ``all`` waits for every backend; ``first`` returns on the first success and cancels
            the rest; ``quorum`` returns once ``quorum`` backends succeeded (or, with ``agree``,
            once ``quorum`` answers agree) and cancels the rest.
        quorum: the k of ``quorum`` mode.
        agree: maps a completion to a key; with ``quorum``, k answers with equal keys decide.
            A key object with a ``for_request(request)`` method is bound to each request first
            (``MajorityVote(...).agreement_key`` is one).
        deadline: seconds for the whole fan-out; unfinished calls are then cancelled and the best
            answer so far is returned. Guards inside spend only what is left of it.
        select: picks the answer (default: the first success).
        name: the fan-out's backend name (default ``"fanout(a,b,...)"``).
        owns_backends: closing the fan-out also closes the backends passed in (for backends
            made for this fan-out alone, as a config's ``build_fanout()`` does). By default it
            closes none of them: whoever creates a backend owns it, and one backend may serve
            any number of fan-outs.

    Example:
        ```python
        async with FanOut([openai, anthropic], mode="all", deadline=10) as fan:
            result = await fan.run("Name three prime numbers.")
            print(result.text)

        # from sync code (a script, a notebook cell):
        print(FanOut([openai, anthropic]).run_sync("Name three prime numbers.").text)
        ```
    """

    def __init__(
        self,
        targets: Sequence[Backend | Target],
        *,
        mode: Mode = "all",
        quorum: int | None = None,
        agree: Callable[[Completion], Hashable | None] | None = None,
        deadline: float | None = None,
        select: SelectorLike | None = None,
        name: str | None = None,
        owns_backends: bool = False,
    ) -> None:
        not_awaited(targets, "FanOut()")
        if not targets:
            raise ConfigurationError("FanOut needs at least one backend")
        if mode not in ("all", "first", "quorum"):
            raise ConfigurationError(f"mode must be 'all', 'first' or 'quorum', got {mode!r}")
        if mode == "quorum":
            if quorum is None or not 1 <= quorum <= len(targets):
                raise ConfigurationError(
                    f"quorum mode needs 1 <= quorum <= {len(targets)} (the number of backends), "
                    f"got quorum={quorum!r}"
                )
        elif quorum is not None:
            raise ConfigurationError("quorum= is only meaningful with mode='quorum'")
        if deadline is not None and not (deadline > 0 and math.isfinite(deadline)):
            raise ConfigurationError(
                f"deadline must be a positive number of seconds, got {deadline!r}"
            )
        self.targets: tuple[Target, ...] = _name_targets(targets)
        self.mode: Mode = mode
        self.quorum = 1 if mode == "first" else (quorum or len(self.targets))
        self.agree = agree
        self.deadline = deadline
        self.selector = as_selector(select)
        self.owns_backends = owns_backends
        super().__init__(name or "fanout(" + ",".join(self.names) + ")")

    @property
    def names(self) -> list[str]:
        return [t.name or t.backend.name for t in self.targets]

    async def complete(self, request: ChatRequest) -> Completion:
        """Fan ``request`` out and return the chosen completion (the Backend protocol):
        ``completion = await fan.complete(request)``.

        Raises:
            NoAnswerError: every backend failed, or the selector chose none.
        """
        try:
            result = await self.run(request)
        except AllBackendsFailedError as exc:
            raise no_answer(exc, backend=self.name) from exc
        return chosen_completion(result.chosen, result.candidates, result.selection, self.name)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Stream the chosen answer: its text, its tool calls, then one ``StreamEnd``.

        For now the fan-out is decided first (as :meth:`complete`) and the chosen completion is
        replayed as events; this method is the one place to change to stream tokens live.

        Raises:
            NoAnswerError: every backend failed, or the selector chose none.
        """
        return super().stream(request)

    async def aclose(self) -> None:
        """Close what the fan-out owns: its backends with ``owns_backends=True``, else nothing
        (the backends passed in stay open for their owner and for other fan-outs)."""
        if self.owns_backends:
            await aclose_all(t.backend for t in self.targets)

    async def run(
        self, request: ChatRequest | str, *, deadline: float | None = None
    ) -> FanOutResult:
        """Fan ``request`` out and return every candidate and the chosen answer:
        ``result = await fan.run("...")`` (from sync code: :meth:`run_sync`).

        Args:
            request: a request, or a prompt string.
            deadline: overrides the fan-out's deadline for this call.

        Raises:
            AllBackendsFailedError: no backend answered (an ``ExceptionGroup`` of their errors).
        """
        not_awaited(request, "FanOut.run()")
        req = ChatRequest.from_prompt(request) if isinstance(request, str) else request
        limit = deadline if deadline is not None else self.deadline
        request_id = os.urandom(8).hex()
        n = len(self.targets)
        slots: list[Candidate | None] = [None] * n
        started_at = [0.0] * n
        agree = self.agree
        bind = getattr(agree, "for_request", None)
        if callable(bind):  # a key that needs the question (e.g. a vote ignoring echoes)
            agree = bind(req)
        state = _RaceState(self.quorum if self.mode != "all" else n + 1, agree)
        t0 = time.perf_counter()

        with (
            telemetry.bound(request_id=request_id),
            telemetry.span(
                "genfan.fanout",
                **{
                    "genfan.mode": self.mode,
                    "genfan.backends": n,
                    "genfan.request_id": request_id,
                },
            ) as fan_span,
        ):
            # A cancel scope only when there is a deadline: it costs ~10 µs per fan-out.
            with (
                anyio.move_on_after(limit) if limit is not None else _NO_DEADLINE as deadline_scope
            ):
                if n == 1:
                    # One call needs no task group: it runs in this task, under the same
                    # deadline and cancellation (~40 µs less per fan-out).
                    await self._call_one(
                        0, self.targets[0], req, slots, started_at, state, None, t0
                    )
                else:
                    async with anyio.create_task_group() as tg:
                        for i, target in enumerate(self.targets):
                            tg.start_soon(
                                self._call_one,
                                i,
                                target,
                                req,
                                slots,
                                started_at,
                                state,
                                tg.cancel_scope,
                                t0,
                            )
            deadline_hit = deadline_scope is not None and deadline_scope.cancelled_caught
            now = time.perf_counter()
            candidates: list[Candidate] = []
            for i, slot in enumerate(slots):
                if slot is None:
                    name = self.targets[i].name or self.targets[i].backend.name
                    why = "deadline reached" if deadline_hit else "fan-out already decided"
                    err: BackendError = (
                        BackendTimeoutError(f"cancelled: {why} after {limit}s", backend=name)
                        if deadline_hit
                        else CallCancelledError(f"cancelled: {why}", backend=name)
                    )
                    slot = Candidate(
                        index=i,
                        backend=name,
                        status="cancelled",
                        error=err,
                        started=started_at[i],
                        latency=now - t0 - started_at[i],
                    )
                candidates.append(slot)

            if not any(c.ok for c in candidates):
                errors = [c.error for c in candidates if c.error is not None]
                fan_span.set_attribute("genfan.outcome", "all_failed")
                telemetry.event("fanout_all_failed", level="warning", backends=n)
                raise AllBackendsFailedError(
                    f"all {n} backends failed: "
                    + "; ".join(f"{c.backend}: {type(c.error).__name__}" for c in candidates),
                    errors,
                )
            selection = await self.selector.select(req, candidates)
            chosen = selection.chosen
            fan_span.set_attribute("genfan.successes", sum(c.ok for c in candidates))
            if chosen is not None:
                fan_span.set_attribute("genfan.chosen", candidates[chosen].backend)
            fan_span.set_attribute("genfan.deadline_hit", deadline_hit)
            if selection.method:
                fan_span.set_attribute("genfan.select.method", selection.method)
            telemetry.event(
                "fanout_finished",
                mode=self.mode,
                successes=sum(c.ok for c in candidates),
                chosen=None if chosen is None else candidates[chosen].backend,
                deadline_hit=deadline_hit,
            )
            return FanOutResult(
                request=req,
                candidates=tuple(candidates),
                selection=selection,
                elapsed=time.perf_counter() - t0,
                mode=self.mode,
                deadline_hit=deadline_hit,
                quorum_met=self.mode == "all" or state.met,
                request_id=request_id,
            )

    def run_sync(
        self, request: ChatRequest | str, *, deadline: float | None = None
    ) -> FanOutResult:
        """:meth:`run` for sync code: ``result = fan.run_sync("...")``.

        It blocks until the fan-out is decided. It works in a plain script and inside a running
        event loop (a notebook), whose loop it blocks meanwhile, as a sync HTTP client would: in
        async code, ``await fan.run(...)`` instead. Every sync call runs on one event loop genfan
        keeps for the process, so backends made once serve them all.

        Raises:
            AllBackendsFailedError: no backend answered.
        """
        return run_sync(self.run, request, deadline=deadline)

    async def _call_one(
        self,
        i: int,
        target: Target,
        request: ChatRequest,
        slots: list[Candidate | None],
        started_at: list[float],
        state: _RaceState,
        group: anyio.CancelScope | None,
        t0: float,
    ) -> None:
        name = target.name or target.backend.name
        prepared = target.prepare(request)
        start = time.perf_counter()
        started_at[i] = start - t0
        with telemetry.span(
            f"chat {prepared.model or name}",
            **{
                "gen_ai.operation.name": "chat",
                "gen_ai.system": name.split(":", 1)[0],
                "gen_ai.request.model": prepared.model,
                "gen_ai.request.temperature": prepared.temperature,
                "gen_ai.request.max_tokens": prepared.max_tokens,
                "genfan.backend": name,
            },
        ) as call_span:
            try:
                completion = await target.backend.complete(prepared)
            except BackendError as exc:
                error: BackendError = exc
            except Exception as exc:  # a backend bug must still end as one typed error
                error = BackendError(f"unexpected {type(exc).__name__}: {exc}", backend=name)
                error.__cause__ = exc
            else:
                latency = time.perf_counter() - start
                slots[i] = Candidate(
                    index=i,
                    backend=name,
                    status="ok",
                    completion=completion,
                    started=started_at[i],
                    latency=latency,
                    finished_order=state.next_order(),
                )
                usage = completion.usage
                call_span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
                call_span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
                call_span.set_attribute(
                    "gen_ai.response.finish_reasons", (completion.finish_reason,)
                )
                if completion.model:
                    call_span.set_attribute("gen_ai.response.model", completion.model)
                telemetry.event(
                    "backend_call_finished",
                    backend=name,
                    latency=round(latency, 6),
                    output_tokens=usage.output_tokens,
                )
                if state.success(completion) and group is not None:
                    group.cancel()
                return
            latency = time.perf_counter() - start
            slots[i] = Candidate(
                index=i,
                backend=name,
                status="failed",
                error=error,
                started=started_at[i],
                latency=latency,
                finished_order=state.next_order(),
            )
            call_span.set_attribute("error.type", type(error).__name__)
            telemetry.event(
                "backend_call_failed",
                level="info",
                backend=name,
                error=type(error).__name__,
                detail=error.message,
            )

    async def map(
        self,
        requests: Iterable[ChatRequest | str],
        *,
        max_in_flight: int = 16,
    ) -> list[FanOutResult | AllBackendsFailedError]:
        """Fan out many requests, at most ``max_in_flight`` at a time.

        Returns one entry per request, in input order: its result, or the
        :class:`AllBackendsFailedError` it ended with.
        """
        if max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be >= 1, got {max_in_flight}")
        not_awaited(requests, "FanOut.map()")
        items = list(requests)
        for item in items:
            not_awaited(item, "FanOut.map()")
        out: list[FanOutResult | AllBackendsFailedError | None] = [None] * len(items)
        limiter = anyio.CapacityLimiter(max_in_flight)

        async def one(i: int, req: ChatRequest | str) -> None:
            async with limiter:
                try:
                    out[i] = await self.run(req)
                except AllBackendsFailedError as exc:
                    out[i] = exc

        async with anyio.create_task_group() as tg:
            for i, req in enumerate(items):
                tg.start_soon(one, i, req)
        return [r for r in out if r is not None]


_NO_DEADLINE: AbstractContextManager[None] = nullcontext()


def no_answer(exc: AllBackendsFailedError, *, backend: str) -> NoAnswerError:
    """The :class:`NoAnswerError` a composite's ``complete()`` raises where ``run()`` raised
    ``exc`` (raise it ``from exc``)."""
    return NoAnswerError(exc.message, backend=backend, errors=exc.exceptions)


def chosen_completion(
    chosen: Candidate | None,
    candidates: Sequence[Candidate],
    selection: Selection,
    backend: str,
) -> Completion:
    """The chosen candidate's completion, or a :class:`NoAnswerError` saying why there is none."""
    if chosen is not None and chosen.completion is not None:
        return chosen.completion
    raise NoAnswerError(
        f"no candidate was chosen: {selection.explanation}",
        backend=backend,
        errors=[c.error for c in candidates if c.error is not None],
        explanation=selection.explanation,
    )


class _RaceState:
    """Counts successes (and agreeing answers) and says when the race is decided."""

    __slots__ = ("_agree", "_groups", "_k", "_order", "_successes", "met")

    def __init__(self, k: int, agree: Callable[[Completion], Hashable | None] | None) -> None:
        self._k = k
        self._agree = agree
        self._groups: Counter[Hashable] = Counter()
        self._successes = 0
        self._order = 0
        self.met = False

    def next_order(self) -> int:
        self._order += 1
        return self._order - 1

    def success(self, completion: Completion) -> bool:
        if self._agree is None:
            self._successes += 1
            reached = self._successes >= self._k
        else:
            key = self._agree(completion)
            if key is None:
                return False
            self._groups[key] += 1
            reached = self._groups[key] >= self._k
        if reached:
            self.met = True
        return reached


def _name_targets(targets: Sequence[Backend | Target]) -> tuple[Target, ...]:
    named: list[Target] = []
    seen: Counter[str] = Counter()
    for t in targets:
        target = t if isinstance(t, Target) else Target(backend=t)
        base = target.name or target.backend.name
        seen[base] += 1
        if seen[base] > 1:
            if target.name is not None:
                raise ConfigurationError(
                    f"two fan-out targets are both named {base!r}; names must be unique"
                )
            target = Target(**{**target.__dict__, "name": f"{base}#{seen[base]}"})
        named.append(target)
    return tuple(named)
