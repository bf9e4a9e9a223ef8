"""The fan-out: one request to N backends at once, every answer back, one chosen.

Concurrency is structured: each backend call runs in a task of one task group, and the losers of
a race (``first``, ``quorum``, agreement, deadline) are cancelled, never left running; a provider
that is cancelled closes its HTTP stream or aborts its engine request.

A fan-out is itself a [`Backend`][genfan.Backend]: `FanOut.complete` and
`FanOut.stream` give the chosen answer (and raise [`NoAnswerError`][genfan.NoAnswerError]), so it
nests in another fan-out, a cascade, a pool, a guard stack or an agent; `FanOut.run` keeps
every candidate.

Whoever creates a backend owns it: closing a fan-out closes only what it owns (nothing, unless it
was made with ``owns_backends=True``), so backends made once serve any number of fan-outs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Callable,
    Hashable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractContextManager, aclosing, contextmanager, nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Literal, TypeAlias, cast, overload

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from typing_extensions import TypeVar

from . import telemetry
from ._backend import Backend, BaseBackend, aclose_all
from ._errors import (
    AllBackendsFailedError,
    AnswerRejectedError,
    BackendError,
    BackendTimeoutError,
    CallCancelledError,
    ConfigurationError,
    MalformedResponseError,
    NoAnswerError,
)
from ._output import AnswerValidator, OutputSpec, ValidateLike, answer_validator, output_spec
from ._sync import clip, not_awaited, run_sync
from ._types import ChatRequest, Completion, StreamEnd, StreamEvent, TextDelta, ToolCallDelta, Usage
from .cost import MaxCostError, Price, backend_price, estimate_cost, estimate_input_tokens
from .select import Candidate, Selection, SelectorLike, Waves, as_selector

__all__ = [
    "AnswerChosen",
    "CandidateDelta",
    "CandidateFinished",
    "Cut",
    "FanOut",
    "FanOutEvent",
    "FanOutFinished",
    "FanOutResult",
    "FanOutStream",
    "Mode",
    "PromptCache",
    "Target",
]

Mode = Literal["all", "first", "quorum"]
#: How a fan-out uses providers' prompt caches (see `FanOut`'s ``prompt_cache``).
PromptCache = Literal["warm-first"]

#: The type of a fan-out's typed output (``str``, the chosen text, when none is asked for).
OutputT = TypeVar("OutputT", default=str)
#: An output type given for one call.
T = TypeVar("T")


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Cut:
    """A candidate a fan-out cut to stay within its ``max_cost``.

    Attributes:
        index: the target's position.
        backend: the target's name.
        action: ``"skipped"`` (never started: its estimate would have passed the cap) or
            ``"cancelled"`` (stopped while running, once the spend passed the cap).
        reason: why: ``"max_cost"``.
        estimate: the call's estimated cost in USD before it started.
    """

    index: int
    backend: str
    action: Literal["skipped", "cancelled"]
    reason: Literal["max_cost"] = "max_cost"
    estimate: float | None = None


@dataclass(frozen=True, kw_only=True)
class FanOutResult(Generic[OutputT]):
    """Everything a fan-out produced.

    Attributes:
        candidates: one per target, in target order: answers and typed failures (an answer
            that is not a valid ``output_type`` is a failed candidate, with an
            [`OutputValidationError`][genfan.OutputValidationError] and its completion kept).
        selection: the selector's decision and explanation.
        elapsed: wall seconds for the whole fan-out (selection included).
        deadline_hit: the deadline passed and unfinished calls were cancelled.
        quorum_met: the mode's condition was met (always true for ``all``).
        output_type: the type the answers were validated into (``None``: none, text).
        outputs: each candidate's validated output by index (answers that asked for tools
            have none).
        cut: the candidates cut to stay within ``max_cost`` (skipped before they started, or
            cancelled while running), in target order; each is also a cancelled candidate
            whose error is a [`MaxCostError`][genfan.cost.MaxCostError].
        max_cost: the fan-out's cap in USD (``None``: none).
    """

    request: ChatRequest
    candidates: tuple[Candidate, ...]
    selection: Selection
    elapsed: float
    mode: Mode
    deadline_hit: bool = False
    quorum_met: bool = True
    request_id: str = ""
    output_type: Any = None
    outputs: Mapping[int, Any] = field(default_factory=dict)
    cut: tuple[Cut, ...] = ()
    max_cost: float | None = None

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
    def output(self) -> OutputT:
        """The chosen answer as the requested ``output_type``: a validated instance (a
        pydantic model, a ``list[City]``...); without an output type, the chosen text.

        Raises:
            ValueError: nothing was chosen, or the chosen answer asked for tools instead.
        """
        completion = self.completion
        if self.output_type is None or self.output_type is str:
            return completion.text  # type: ignore[return-value]  # OutputT is str here
        i = self.selection.chosen
        if i is None or i not in self.outputs:
            raise ValueError("the chosen answer asked for tools: it has no output")
        output: OutputT = self.outputs[i]
        return output

    def dump_output(self) -> Any:
        """The chosen output as JSON-able data (a model's ``model_dump(mode="json")``), or
        ``None`` when the fan-out had no ``output_type`` or nothing was chosen."""
        spec = output_spec(self.output_type)
        i = self.selection.chosen
        if spec is None or spec.is_text or i is None or i not in self.outputs:
            return None
        return spec.dump(self.outputs[i])

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

    @property
    def cost(self) -> float | None:
        """USD over every candidate that answered (``None``: no answer had a known price);
        each candidate's own is ``candidate.completion.usage.cost``."""
        return self.usage.cost

    def __repr__(self) -> str:
        chosen = self.chosen
        text = clip(chosen.text) if chosen is not None else None
        late = ", deadline_hit=True" if self.deadline_hit else ""
        return (
            f"FanOutResult(chosen={chosen.backend if chosen else None!r}, text={text!r}, "
            f"ok={len(self.successes)}/{len(self.candidates)}, mode={self.mode!r}, "
            f"elapsed={self.elapsed:.3f}s{late})"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class CandidateDelta:
    """A piece of one candidate's answer, as it streams (see `FanOut.run_stream`).

    Attributes:
        index: the candidate's index (its target's position in the fan-out).
        backend: the candidate's (target's) name.
        delta: the piece: a [`TextDelta`][genfan.TextDelta] or a [`ToolCallDelta`][genfan.ToolCallDelta].
    """

    index: int
    backend: str
    delta: TextDelta | ToolCallDelta
    type: Literal["delta"] = "delta"

    @property
    def text(self) -> str:
        """The piece's text ('' for a tool-call piece)."""
        return self.delta.text if isinstance(self.delta, TextDelta) else ""


@dataclass(frozen=True, kw_only=True, slots=True)
class CandidateFinished:
    """One candidate ended: it answered (``candidate.ok``), failed (``candidate.error``: a
    backend error, mid-stream ones included, or an [`OutputValidationError`][genfan.OutputValidationError]), or
    was cancelled (the fan-out was decided, or its deadline passed)."""

    candidate: Candidate
    type: Literal["candidate"] = "candidate"

    @property
    def index(self) -> int:
        return self.candidate.index

    @property
    def backend(self) -> str:
        return self.candidate.backend


@dataclass(frozen=True, kw_only=True, slots=True)
class AnswerChosen:
    """The selector decided, once every candidate had finished: ``index`` is the chosen
    candidate (``None``: it chose none), ``selection`` says why."""

    index: int | None
    backend: str | None
    selection: Selection
    type: Literal["chosen"] = "chosen"


@dataclass(frozen=True, kw_only=True, slots=True)
class FanOutFinished(Generic[OutputT]):
    """The last event: the whole [`FanOutResult`][genfan.FanOutResult] (``result.output`` when typed)."""

    result: FanOutResult[OutputT]
    type: Literal["final"] = "final"


#: What `FanOut.run_stream` yields; ``event.type`` tells them apart.
FanOutEvent: TypeAlias = CandidateDelta | CandidateFinished | AnswerChosen | FanOutFinished[Any]
#: The events of a stream whose result is a ``FanOutResult[OutputT]``.
_Event: TypeAlias = CandidateDelta | CandidateFinished | AnswerChosen | FanOutFinished[OutputT]


class FanOut(BaseBackend, Generic[OutputT]):
    """Send one request to several backends concurrently and pick one answer.

    A fan-out is a [`Backend`][genfan.Backend] too: `complete` returns the chosen
    completion, so fan-outs nest (in fan-outs, cascades, pools, guards, agents); `run`
    returns every candidate; `run_stream` streams every candidate's tokens, tagged, as
    they arrive.

    Args:
        targets: backends (or [`Target`][genfan.Target] s with per-backend overrides).
        mode: ``all`` waits for every backend; ``first`` returns on the first success and cancels
            the rest; ``quorum`` returns once ``quorum`` backends succeeded (or, with ``agree``,
            once ``quorum`` answers agree) and cancels the rest.
        quorum: the k of ``quorum`` mode.
        agree: maps a completion to a key; with ``quorum``, k answers with equal keys decide.
            A key object with a ``for_request(request)`` method is bound to each request first
            (``MajorityVote(...).agreement_key`` is one).
        deadline: seconds for the whole fan-out; unfinished calls are then cancelled and the best
            answer so far is returned. Guards inside spend only what is left of it.
        select: picks the answer. Default: the ``auto`` selector wherever the fan-out compares
            several answers (``all`` mode or a ``quorum`` of 2 or more, over 2 or more targets;
            and with ``waves``); the first success in a race (``first`` mode, ``quorum=1``) and
            with one target, where there is nothing to compare.
        waves: call the targets in waves (a [`Waves`][genfan.select.Waves], or a wave size)
            and stop once its stopping rule says the leading answer is settled (adaptive
            sampling); the targets never called end as cancelled candidates.
        name: the fan-out's backend name (default ``"fanout(a,b,...)"``).
        owns_backends: closing the fan-out also closes the backends passed in (for backends
            made for this fan-out alone, as a config's ``build_fanout()`` does). By default it
            closes none of them: whoever creates a backend owns it, and one backend may serve
            any number of fan-outs.
        output_type: validate every answer into this type (a pydantic model class, or any
            type pydantic's ``TypeAdapter`` takes) and ask for its JSON schema; an answer that
            does not validate is a failed candidate, so the selector chooses among valid ones,
            and ``result.output`` is the chosen instance. ``run(..., output_type=)`` overrides
            it per call.
        validate: what a good answer is, beyond its type (see `ValidateLike`: a
            function ``(completion) -> None | reason``, an object with a ``check`` method, a
            per-answer scorer such as ``RefusalDetector()``, a type, or a list of these). An
            answer it rejects is a failed candidate (an [`AnswerRejectedError`][genfan.AnswerRejectedError],
            its completion kept), as an invalid ``output_type`` is: the selector chooses among
            the others, and ``first`` mode races on to the first answer that passes.
        validate_streams: when streaming in ``first`` mode (or one target), decide at the
            first answer that ends and passes, not at the first token: `stream` then
            passes the chosen answer on once it is known (buffered), and `run_stream`
            streams every candidate until then. By default the first token wins and its
            answer, passed on live, is checked only at its end (if it fails, the fan-out does).
        max_cost: a cap in USD on what one run may spend. Before a call starts, its cost is
            estimated (prompt tokens x input price + ``max_tokens`` x output price, see
            [`estimate_cost`][genfan.cost.estimate_cost]); a call that would take the spend
            and the calls running past the cap is not started. While calls run, the spend is
            tracked (answers' usage; streams' tokens as they arrive); once it passes the cap,
            the calls still running are cancelled (all of them when an answer is in, else all
            but the one furthest along). `FanOutResult.cut` lists what was cut. Every backend
            needs a known price (the genai-prices table, or ``price=``), else `run` raises
            [`ConfigurationError`][genfan.ConfigurationError]. ``run(..., max_cost=)``
            overrides it per call.
        prompt_cache: ``"warm-first"``: targets that share a provider's prompt cache (the same
            backend and model) do not all start at once: the first goes alone and writes the
            cache, the others start when its answer (its first token, when streaming) is in,
            and read the cached prefix at a tenth of the input price instead of each paying
            the cache write. Worth it for a long shared prefix (a system prompt, documents)
            marked with ``Message(cache_control=...)``; it adds the first call's latency.

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
        waves: Waves | int | None = None,
        output_type: type[OutputT] | None = None,
        validate: ValidateLike | None = None,
        validate_streams: bool = False,
        max_cost: float | None = None,
        prompt_cache: PromptCache | None = None,
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
        check_max_cost(max_cost)
        if prompt_cache not in (None, "warm-first"):
            raise ConfigurationError(
                f"prompt_cache must be None or 'warm-first', got {prompt_cache!r}"
            )
        self.targets: tuple[Target, ...] = _name_targets(targets)
        self.max_cost = max_cost
        self.prompt_cache: PromptCache | None = prompt_cache
        self.mode: Mode = mode
        self.quorum = 1 if mode == "first" else (quorum or len(self.targets))
        self.agree = agree
        self.deadline = deadline
        self.waves = Waves(size=waves) if isinstance(waves, int) else waves
        if select is None and (self.waves is not None or self.quorum > 1):
            from .select import AutoSelect

            select = AutoSelect()
        self.selector = as_selector(select)
        self.owns_backends = owns_backends
        self.output_type = output_type
        self.output_spec: OutputSpec[Any] | None = output_spec(output_type)
        self.validator: AnswerValidator | None = answer_validator(validate)
        self.validate_streams = validate_streams
        super().__init__(name or "fanout(" + ",".join(self.names) + ")")

    @property
    def names(self) -> list[str]:
        return [t.name or t.backend.name for t in self.targets]

    async def complete(self, request: ChatRequest, *, output_type: Any = None) -> Completion:
        """Fan ``request`` out and return the chosen completion (the Backend protocol):
        ``completion = await fan.complete(request)``.

        ``output_type`` (default: the fan-out's) validates the candidates as in `run`:
        the chosen completion is a valid one.

        Raises:
            NoAnswerError: every backend failed (its ``errors`` say how: every answer invalid
                is one way), or the selector chose none.
        """
        try:
            result = await self.run(request, output_type=output_type)
        except AllBackendsFailedError as exc:
            raise no_answer(exc, backend=self.name) from exc
        return chosen_completion(result.chosen, result.candidates, result.selection, self.name)

    async def stream(
        self, request: ChatRequest, *, output_type: Any = None
    ) -> AsyncIterator[StreamEvent]:
        """Stream the chosen answer: its text, its tool calls, then one ``StreamEnd`` (the
        Backend protocol; `run_stream` streams every candidate). ``output_type``
        (default: the fan-out's) validates each candidate when its stream ends, as in
        `run`.

        Every candidate is streamed, so the mode's early exits and the deadline work as in
        `run`. In ``first`` mode (and in a one-target fan-out) the first candidate to
        produce a token wins, the others are cancelled, and its tokens are passed on live. In
        ``all`` and ``quorum`` modes the answer is known only once the selector chose: the
        chosen candidate's pieces are then passed on as they arrived.

        Close it when you stop early (``async with aclosing(fan.stream(request)) as events:``),
        so that the calls still running are cancelled at once.

        Raises:
            NoAnswerError: every candidate failed (a winner failing mid-stream included), or
                the selector chose none.
        """
        live = (self.mode == "first" or len(self.targets) == 1) and not self.validate_streams
        held: dict[int, list[TextDelta | ToolCallDelta]] = {}
        result: FanOutResult[Any] | None = None
        try:
            async with self.run_stream(request, output_type=output_type) as events:
                async for event in events:
                    if isinstance(event, CandidateDelta):
                        if live:
                            yield event.delta
                        else:
                            held.setdefault(event.index, []).append(event.delta)
                    elif isinstance(event, FanOutFinished):
                        result = event.result
        except AllBackendsFailedError as exc:
            raise no_answer(exc, backend=self.name) from exc
        assert result is not None  # the stream ends with FanOutFinished or raises
        completion = chosen_completion(
            result.chosen, result.candidates, result.selection, self.name
        )
        if not live and result.selection.chosen is not None:
            for delta in held.get(result.selection.chosen, ()):
                yield delta
        yield StreamEnd(completion=completion)

    @overload
    def run_stream(
        self,
        request: ChatRequest | str,
        *,
        deadline: float | None = None,
        output_type: None = None,
    ) -> FanOutStream[OutputT]: ...
    @overload
    def run_stream(
        self, request: ChatRequest | str, *, deadline: float | None = None, output_type: type[T]
    ) -> FanOutStream[T]: ...
    @overload
    def run_stream(
        self, request: ChatRequest | str, *, deadline: float | None = None, output_type: Any
    ) -> FanOutStream[Any]: ...
    def run_stream(
        self,
        request: ChatRequest | str,
        *,
        deadline: float | None = None,
        output_type: Any = None,
    ) -> FanOutStream[Any]:
        """Fan ``request`` out, streaming every candidate: its pieces tagged with its index
        and backend as they arrive, its end, then the selector's choice and the result.

        Use it as ``async with fan.run_stream(request) as events: async for ev in events:``.
        Events (``ev.type``): [`CandidateDelta`][genfan.CandidateDelta] (``"delta"``), [`CandidateFinished`][genfan.CandidateFinished]
        (``"candidate"``: answered, failed or cancelled), [`AnswerChosen`][genfan.AnswerChosen] (``"chosen"``)
        and, last, [`FanOutFinished`][genfan.FanOutFinished] (``"final"``, with the [`FanOutResult`][genfan.FanOutResult]).

        The modes work as in `run`: ``all`` streams every candidate; ``first`` passes on
        only the first candidate to produce a token, and cancels the others at that token;
        ``quorum`` (with ``agree``) cancels the rest once k answers agree. Cancelled calls have
        their streams closed at once, and end as cancelled candidates. Leaving the block early
        cancels the whole fan-out.

        Args:
            request: a request, or a prompt string.
            deadline: overrides the fan-out's deadline for this call.
            output_type: as in `run`; each answer is validated when its stream ends.

        Raises:
            AllBackendsFailedError: from the iteration, when no candidate answered.
        """
        not_awaited(request, "FanOut.run_stream()")
        req, spec, limit = self._prepare(request, deadline, output_type)
        return FanOutStream(self, req, spec, limit)

    async def _stream_race(
        self,
        req: ChatRequest,
        spec: OutputSpec[Any] | None,
        limit: float | None,
        emit: Callable[[FanOutEvent], None],
    ) -> FanOutResult[Any]:
        """`run` over the targets' streams, every event passed to ``emit``."""
        request_id = os.urandom(8).hex()
        n = len(self.targets)
        slots: list[Candidate | None] = [None] * n
        started_at = [0.0] * n
        state = self._race_state(req, spec)
        race = _StreamRace(first=self.mode == "first" and not self.validate_streams)
        t0 = time.perf_counter()
        with (
            telemetry.bound(request_id=request_id),
            telemetry.span(
                "genfan.fanout",
                **{
                    "genfan.fanout.mode": self.mode,
                    "genfan.fanout.backends": n,
                    "genfan.request_id": request_id,
                    "genfan.stream": True,
                },
            ) as fan_span,
        ):
            with (
                anyio.move_on_after(limit) if limit is not None else _NO_DEADLINE as deadline_scope
            ):
                plan = self.waves.plan(n) if self.waves is not None else [n]
                start = 0
                for size in plan:
                    async with anyio.create_task_group() as tg:
                        for i in self._launch(range(start, start + size), slots, state, emit):
                            tg.start_soon(
                                self._stream_one, i, req, slots, started_at, state, race, t0, emit
                            )
                    start += size
                    done = [c for c in slots if c is not None]
                    if (
                        race.decided
                        or state.met
                        or start >= n
                        or (self.waves is not None and self.waves.settled(req, done, n - start))
                    ):
                        break
            deadline_hit = deadline_scope is not None and deadline_scope.cancelled_caught
            now = time.perf_counter() - t0
            for i, slot in enumerate(slots):
                if slot is None:  # stopped by the deadline, or never called (waves)
                    cancelled = self._cancelled(
                        i, started_at[i], now, limit if deadline_hit else None
                    )
                    slots[i] = cancelled
                    emit(CandidateFinished(candidate=cancelled))
            result = await self._conclude(
                req, slots, started_at, state, t0, limit, deadline_hit, fan_span, request_id
            )
            chosen = result.chosen
            emit(
                AnswerChosen(
                    index=result.selection.chosen,
                    backend=None if chosen is None else chosen.backend,
                    selection=result.selection,
                )
            )
            return result

    async def _stream_one(
        self,
        i: int,
        request: ChatRequest,
        slots: list[Candidate | None],
        started_at: list[float],
        state: _RaceState,
        race: _StreamRace,
        t0: float,
        emit: Callable[[FanOutEvent], None],
    ) -> None:
        """Stream target ``i``: its pieces to ``emit``, its end into ``slots``."""
        target = self.targets[i]
        name = target.name or target.backend.name
        prepared = target.prepare(request)
        spend = state.spend
        scope = race.scopes[i] = anyio.CancelScope()
        if spend is not None:
            spend.scopes[i] = scope
        try:
            with scope:
                if state.cache_keys is not None:
                    gate = state.cache_gates.get(i)
                    if gate is not None:  # prompt_cache: the first call writes the cache
                        await gate.wait()
                start = time.perf_counter()
                started_at[i] = start - t0
                if race.decided:
                    scope.cancel()  # decided before this call even started: it ends cancelled
                with _chat_span(name, prepared) as call_span:
                    try:
                        completion = await self._read(
                            i, name, target.backend, prepared, race, emit, state
                        )
                        await state.validate(i, completion, name)
                    except BackendError as exc:
                        error: BackendError = exc
                    except Exception as exc:  # a backend bug must still end as one typed error
                        error = _unexpected(exc, name)
                    else:
                        slot = _succeeded(
                            i, name, completion, started_at[i], start, state, call_span
                        )
                        slots[i] = slot
                        emit(CandidateFinished(candidate=slot))
                        decided = state.success(completion)
                        if spend is not None:
                            spend.settle(i, completion, answered=True)
                        if decided:
                            race.decide(keep=i)
                        return
                    failed = _failed(i, name, error, started_at[i], start, state, call_span)
                    slots[i] = failed
                    emit(CandidateFinished(candidate=failed))
                    if spend is not None:
                        spend.settle(i, getattr(error, "completion", None), answered=False)
                    return
        finally:
            race.scopes.pop(i, None)
            if spend is not None:
                spend.scopes.pop(i, None)
            written = state.cache_written.pop(i, None)
            if written is not None:
                written.set()
        # Only reached when ``scope`` caught its cancellation: the fan-out was decided, or the
        # spend passed max_cost.
        if spend is not None:
            spend.settle(i, None, answered=False)
        cut = spend.cuts.get(i) if spend is not None else None
        cancelled = self._cancelled(i, started_at[i], time.perf_counter() - t0, None, cut)
        slots[i] = cancelled
        emit(CandidateFinished(candidate=cancelled))

    async def _read(
        self,
        i: int,
        name: str,
        backend: Backend,
        request: ChatRequest,
        race: _StreamRace,
        emit: Callable[[FanOutEvent], None],
        state: _RaceState,
    ) -> Completion:
        """Read one backend's stream to its end, passing its pieces on (in ``first`` mode, only
        the winner's: the first candidate to produce one)."""
        start = time.perf_counter()
        ttft: float | None = None
        spend = state.spend
        chars = 0
        events: Any = backend.stream(request)
        async with aclosing(events) if hasattr(events, "aclose") else nullcontext():
            async for event in events:
                if isinstance(event, StreamEnd):
                    c = event.completion
                    return (
                        c
                        if c.ttft is not None or ttft is None
                        else c.model_copy(update={"ttft": ttft})
                    )
                if ttft is None:
                    ttft = time.perf_counter() - start
                    written = state.cache_written.pop(i, None)
                    if written is not None:  # the prompt is processed: its cache is written
                        written.set()
                if spend is not None:
                    chars += len(event.text if isinstance(event, TextDelta) else event.arguments)
                    spend.progress(i, chars)
                if race.first:
                    if race.winner is None and not race.decided:
                        race.winner = i
                        race.decide(keep=i)
                    if race.winner != i:
                        continue  # a loser's piece, in the instant before its cancellation
                emit(CandidateDelta(index=i, backend=name, delta=event))
        raise MalformedResponseError("stream ended without a final event (truncated)", backend=name)

    async def aclose(self) -> None:
        """Close what the fan-out owns: its backends with ``owns_backends=True``, else nothing
        (the backends passed in stay open for their owner and for other fan-outs)."""
        if self.owns_backends:
            await aclose_all(t.backend for t in self.targets)

    @overload
    async def run(
        self,
        request: ChatRequest | str,
        *,
        deadline: float | None = None,
        output_type: None = None,
        max_cost: float | None = None,
    ) -> FanOutResult[OutputT]: ...
    @overload
    async def run(
        self,
        request: ChatRequest | str,
        *,
        deadline: float | None = None,
        output_type: type[T],
        max_cost: float | None = None,
    ) -> FanOutResult[T]: ...
    @overload
    async def run(
        self,
        request: ChatRequest | str,
        *,
        deadline: float | None = None,
        output_type: Any,
        max_cost: float | None = None,
    ) -> FanOutResult[Any]: ...
    async def run(
        self,
        request: ChatRequest | str,
        *,
        deadline: float | None = None,
        output_type: Any = None,
        max_cost: float | None = None,
    ) -> FanOutResult[Any]:
        """Fan ``request`` out and return every candidate and the chosen answer:
        ``result = await fan.run("...")`` (from sync code: `run_sync`).

        Args:
            request: a request, or a prompt string.
            deadline: overrides the fan-out's deadline for this call.
            output_type: overrides the fan-out's ``output_type`` for this call: every answer is
                validated into it (the invalid ones become failed candidates) and
                ``result.output`` is the chosen instance.
            max_cost: overrides the fan-out's ``max_cost`` (USD) for this call.

        Raises:
            AllBackendsFailedError: no backend answered (an ``ExceptionGroup`` of their errors;
                every answer failing validation is one way; so is every call cut by
                ``max_cost``, with a [`MaxCostError`][genfan.cost.MaxCostError] each).
            ConfigurationError: a ``max_cost`` and a backend whose price is unknown.
        """
        not_awaited(request, "FanOut.run()")
        check_max_cost(max_cost)
        req, spec, limit = self._prepare(request, deadline, output_type)
        request_id = os.urandom(8).hex()
        n = len(self.targets)
        slots: list[Candidate | None] = [None] * n
        started_at = [0.0] * n
        state = self._race_state(req, spec, max_cost)
        t0 = time.perf_counter()

        with (
            telemetry.bound(request_id=request_id),
            telemetry.span(
                "genfan.fanout",
                **{
                    "genfan.fanout.mode": self.mode,
                    "genfan.fanout.backends": n,
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
                    if self._launch(range(1), slots, state):
                        await self._call_one(
                            0, self.targets[0], req, slots, started_at, state, None, t0
                        )
                elif self.waves is not None:
                    await self._run_waves(self.waves, req, slots, started_at, state, t0)
                else:
                    async with anyio.create_task_group() as tg:
                        for i in self._launch(range(n), slots, state):
                            tg.start_soon(
                                self._call_one,
                                i,
                                self.targets[i],
                                req,
                                slots,
                                started_at,
                                state,
                                tg.cancel_scope,
                                t0,
                            )
            deadline_hit = deadline_scope is not None and deadline_scope.cancelled_caught
            return await self._conclude(
                req, slots, started_at, state, t0, limit, deadline_hit, fan_span, request_id
            )

    def _prepare(
        self, request: ChatRequest | str, deadline: float | None, output_type: Any
    ) -> tuple[ChatRequest, OutputSpec[Any] | None, float | None]:
        """The request (asking for the output type's JSON), the output spec and the deadline
        of one call."""
        req = ChatRequest.from_prompt(request) if isinstance(request, str) else request
        spec = self.output_spec if output_type is None else output_spec(output_type)
        if spec is not None:
            req = spec.prepare(req)
        return req, spec, deadline if deadline is not None else self.deadline

    def _race_state(
        self, request: ChatRequest, spec: OutputSpec[Any] | None, max_cost: float | None = None
    ) -> _RaceState:
        agree = self.agree
        bind = getattr(agree, "for_request", None)
        if callable(bind):  # a key that needs the question (e.g. a vote ignoring echoes)
            agree = bind(request)
        n = len(self.targets)
        k = self.quorum if self.mode != "all" else n + 1
        state = _RaceState(k, agree, spec, self.validator, request)
        cap = max_cost if max_cost is not None else self.max_cost
        if cap is not None or self.prompt_cache is not None:
            prepared = [t.prepare(request) for t in self.targets]
            if cap is not None:
                state.spend = _Spend(cap, self.targets, self.names, prepared)
            if self.prompt_cache is not None:
                state.cache_keys = [
                    _cache_key(t.backend, r) for t, r in zip(self.targets, prepared, strict=True)
                ]
        return state

    def _launch(
        self,
        indices: Iterable[int],
        slots: list[Candidate | None],
        state: _RaceState,
        emit: Callable[[FanOutEvent], None] | None = None,
    ) -> list[int]:
        """The targets of ``indices`` to call now: those ``max_cost`` admits (the others end
        as skipped candidates); with ``prompt_cache``, those sharing a cache wait for the
        first of them (its gate)."""
        spend = state.spend
        keys = state.cache_keys
        if spend is None and keys is None:
            return list(indices)
        launched: list[int] = []
        for i in indices:
            if spend is not None:
                cut = spend.admit(i)
                if cut is not None:
                    slots[i] = skipped = Candidate(
                        index=i, backend=self.names[i], status="cancelled", error=cut
                    )
                    if emit is not None:
                        emit(CandidateFinished(candidate=skipped))
                    continue
            launched.append(i)
        if keys is not None:
            writers: dict[Hashable, int] = {}
            for i in launched:
                writer = writers.setdefault(keys[i], i)
                if writer != i:
                    gate = state.cache_written.setdefault(writer, anyio.Event())
                    state.cache_gates[i] = gate
        return launched

    def estimate_cost(self, request: ChatRequest) -> float | None:
        """The most this fan-out may spend on ``request``: the sum of its targets' estimates
        (see [`estimate_cost`][genfan.cost.estimate_cost]; its ``max_cost`` when lower);
        ``None`` when a target's price is unknown. A fan-out nested in another (or in a
        cascade) is priced with it."""
        total = 0.0
        for target in self.targets:
            one = estimate_cost(target.backend, target.prepare(request))
            if one is None:
                return None
            total += one
        return total if self.max_cost is None else min(total, self.max_cost)

    async def _conclude(
        self,
        req: ChatRequest,
        slots: Sequence[Candidate | None],
        started_at: Sequence[float],
        state: _RaceState,
        t0: float,
        limit: float | None,
        deadline_hit: bool,
        fan_span: Any,
        request_id: str,
    ) -> FanOutResult[Any]:
        """The race is over: the unfinished calls become cancelled candidates, the answers not
        yet validated are, and the selector chooses."""
        n = len(self.targets)
        now = time.perf_counter()
        candidates: list[Candidate] = []
        for i, slot in enumerate(slots):
            if slot is None:
                slot = self._cancelled(i, started_at[i], now - t0, limit if deadline_hit else None)
            candidates.append(await state.settle(slot))
        spend = state.spend
        cut: tuple[Cut, ...] = ()
        if spend is not None and spend.cuts:
            cut = tuple(
                Cut(index=i, backend=self.names[i], action=e.action, estimate=e.estimate)
                for i, e in sorted(spend.cuts.items())
            )
            fan_span.set_attribute("genfan.fanout.cut", len(cut))
            telemetry.event(
                "fanout_cost_cut",
                max_cost=spend.cap,
                spent=round(spend.spent, 6),
                skipped=[c.backend for c in cut if c.action == "skipped"],
                cancelled=[c.backend for c in cut if c.action == "cancelled"],
            )
        if not any(c.ok for c in candidates):
            errors = [c.error for c in candidates if c.error is not None]
            fan_span.set_attribute("genfan.fanout.outcome", "all_failed")
            telemetry.event("fanout_all_failed", level="warning", backends=n)
            raise AllBackendsFailedError(
                f"all {n} backends failed: "
                + "; ".join(f"{c.backend}: {type(c.error).__name__}" for c in candidates),
                errors,
            )
        selection = await self.selector.select(req, candidates)
        chosen = selection.chosen
        fan_span.set_attribute("genfan.fanout.successes", sum(c.ok for c in candidates))
        if chosen is not None:
            fan_span.set_attribute("genfan.fanout.chosen", candidates[chosen].backend)
        fan_span.set_attribute("genfan.fanout.deadline_hit", deadline_hit)
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
            output_type=None if state.spec is None else state.spec.type,
            outputs=dict(state.outputs),
            cut=cut,
            max_cost=None if spend is None else spend.cap,
        )

    def _cancelled(
        self,
        i: int,
        started: float,
        now: float,
        deadline: float | None,
        error: BackendError | None = None,
    ) -> Candidate:
        """Target ``i``'s candidate when its call was cancelled: by the deadline (``deadline``
        seconds), because the fan-out was decided (``None``), or for ``error`` (``max_cost``)."""
        name = self.targets[i].name or self.targets[i].backend.name
        err: BackendError = (
            error
            if error is not None
            else BackendTimeoutError(f"cancelled: deadline reached after {deadline}s", backend=name)
            if deadline is not None
            else CallCancelledError("cancelled: fan-out already decided", backend=name)
        )
        return Candidate(
            index=i,
            backend=name,
            status="cancelled",
            error=err,
            started=started,
            latency=now - started,
        )

    @overload
    def run_sync(
        self,
        request: ChatRequest | str,
        *,
        deadline: float | None = None,
        output_type: None = None,
    ) -> FanOutResult[OutputT]: ...
    @overload
    def run_sync(
        self, request: ChatRequest | str, *, deadline: float | None = None, output_type: type[T]
    ) -> FanOutResult[T]: ...
    @overload
    def run_sync(
        self, request: ChatRequest | str, *, deadline: float | None = None, output_type: Any
    ) -> FanOutResult[Any]: ...
    def run_sync(
        self,
        request: ChatRequest | str,
        *,
        deadline: float | None = None,
        output_type: Any = None,
    ) -> FanOutResult[Any]:
        """`run` for sync code: ``result = fan.run_sync("...")``.

        It blocks until the fan-out is decided. It works in a plain script and inside a running
        event loop (a notebook), whose loop it blocks meanwhile, as a sync HTTP client would: in
        async code, ``await fan.run(...)`` instead. Every sync call runs on one event loop genfan
        keeps for the process, so backends made once serve them all.

        Raises:
            AllBackendsFailedError: no backend answered.
        """
        return run_sync(self.run, request, deadline=deadline, output_type=output_type)

    async def _run_waves(
        self,
        waves: Waves,
        request: ChatRequest,
        slots: list[Candidate | None],
        started_at: list[float],
        state: _RaceState,
        t0: float,
    ) -> None:
        """Call the targets wave by wave until the waves' stopping rule says it is settled."""
        n, start = len(self.targets), 0
        for size in waves.plan(n):
            await self._wave(range(start, start + size), request, slots, started_at, state, t0)
            start += size
            done = [s for s in slots if s is not None]
            if state.met or waves.settled(request, done, n - start):
                telemetry.event("fanout_waves_settled", drawn=start, budget=n)
                return

    async def _wave(
        self,
        indices: range,
        request: ChatRequest,
        slots: list[Candidate | None],
        started_at: list[float],
        state: _RaceState,
        t0: float,
    ) -> None:
        """Call the targets ``indices`` together (one wave)."""
        async with anyio.create_task_group() as tg:
            for i in self._launch(indices, slots, state):
                tg.start_soon(
                    self._call_one,
                    i,
                    self.targets[i],
                    request,
                    slots,
                    started_at,
                    state,
                    tg.cancel_scope,
                    t0,
                )

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
        spend = state.spend
        try:
            if spend is None:
                await self._start_one(
                    i, name, target, prepared, slots, started_at, state, group, t0
                )
                return
            with spend.running(i) as scope:  # the cap cancels the call (or its wait) by it
                await self._start_one(
                    i, name, target, prepared, slots, started_at, state, group, t0
                )
            if scope.cancelled_caught:  # max_cost: the spend passed the cap
                now = time.perf_counter() - t0
                slots[i] = self._cancelled(i, started_at[i], now, None, spend.cuts.get(i))
        finally:
            written = state.cache_written.pop(i, None)
            if written is not None:
                written.set()

    async def _start_one(
        self,
        i: int,
        name: str,
        target: Target,
        prepared: ChatRequest,
        slots: list[Candidate | None],
        started_at: list[float],
        state: _RaceState,
        group: anyio.CancelScope | None,
        t0: float,
    ) -> None:
        """Call target ``i`` once its prompt-cache gate is open (``prompt_cache``)."""
        if state.cache_keys is not None:
            gate = state.cache_gates.get(i)
            if gate is not None:  # the first call sharing the cache writes it
                await gate.wait()
        start = time.perf_counter()
        started_at[i] = start - t0
        await self._complete_one(
            i, name, target.backend, prepared, slots, started_at[i], start, state, group
        )

    async def _complete_one(
        self,
        i: int,
        name: str,
        backend: Backend,
        prepared: ChatRequest,
        slots: list[Candidate | None],
        started: float,
        start: float,
        state: _RaceState,
        group: anyio.CancelScope | None,
    ) -> None:
        """One ``complete()`` call of ``run``, its candidate put in ``slots[i]`` (``started``:
        seconds from the fan-out's start; ``start``: the clock at the call's)."""
        with _chat_span(name, prepared) as call_span:
            try:
                completion = await backend.complete(prepared)
                await state.validate(i, completion, name)
            except BackendError as exc:
                error: BackendError = exc
            except Exception as exc:  # a backend bug must still end as one typed error
                error = _unexpected(exc, name)
            else:
                slots[i] = _succeeded(i, name, completion, started, start, state, call_span)
                decided = state.success(completion)
                if state.spend is not None:
                    state.spend.settle(i, completion, answered=True)
                if decided and group is not None:
                    group.cancel()
                return
            slots[i] = _failed(i, name, error, started, start, state, call_span)
            if state.spend is not None:
                state.spend.settle(i, getattr(error, "completion", None), answered=False)

    async def map(
        self,
        requests: Iterable[ChatRequest | str],
        *,
        max_in_flight: int = 16,
    ) -> list[FanOutResult[OutputT] | AllBackendsFailedError]:
        """Fan out many requests, at most ``max_in_flight`` at a time.

        Returns one entry per request, in input order: its result, or the
        [`AllBackendsFailedError`][genfan.AllBackendsFailedError] it ended with.
        """
        if max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be >= 1, got {max_in_flight}")
        not_awaited(requests, "FanOut.map()")
        items = list(requests)
        for item in items:
            not_awaited(item, "FanOut.map()")
        out: list[FanOutResult[OutputT] | AllBackendsFailedError | None] = [None] * len(items)
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


class FanOutStream(Generic[OutputT]):
    """The events of one streamed fan-out (see `FanOut.run_stream`).

    Use it as ``async with fan.run_stream(request) as events: async for event in events:``.
    A failure ([`AllBackendsFailedError`][genfan.AllBackendsFailedError]) is raised from the iteration; leaving
    the block early cancels the fan-out.

    Attributes:
        result: the fan-out's result, once [`FanOutFinished`][genfan.FanOutFinished] has been received.
    """

    def __init__(
        self,
        fan: FanOut[Any],
        request: ChatRequest,
        spec: OutputSpec[Any] | None,
        deadline: float | None,
    ) -> None:
        self.fan = fan
        self.request = request
        self.result: FanOutResult[OutputT] | None = None
        self._spec = spec
        self._deadline = deadline
        self._error: BaseException | None = None
        self._tg: TaskGroup | None = None
        self._send: MemoryObjectSendStream[FanOutEvent] | None = None
        self._receive: MemoryObjectReceiveStream[FanOutEvent] | None = None
        self._done = False

    async def __aenter__(self) -> FanOutStream[OutputT]:
        # Unbounded: no call ever waits for a slow reader (pieces are small).
        self._send, self._receive = anyio.create_memory_object_stream[FanOutEvent](math.inf)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._produce, name=f"fanout {self.fan.name}")
        return self

    def _emit(self, event: FanOutEvent) -> None:
        if self._send is not None:
            try:
                self._send.send_nowait(event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the reader left: the fan-out is being cancelled

    async def _produce(self) -> None:
        assert self._send is not None
        try:
            result = await self.fan._stream_race(
                self.request, self._spec, self._deadline, self._emit
            )
            self.result = result
            self._emit(FanOutFinished(result=result))
        except Exception as exc:
            self._error = exc
        finally:
            self._done = True
            self._send.close()

    def __aiter__(self) -> AsyncIterator[_Event[OutputT]]:
        return self

    async def __anext__(self) -> _Event[OutputT]:
        if self._receive is None:
            raise RuntimeError("use `async with fan.run_stream(...) as events:` first")
        try:
            # FanOutFinished carries this stream's OutputT
            return cast(_Event[OutputT], await self._receive.receive())
        except anyio.EndOfStream:
            pass
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopAsyncIteration

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        if not self._done or exc is not None:
            self._tg.cancel_scope.cancel()
        try:
            if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                # The reader's own error (or the fan-out's, raised by the iteration) goes out
                # as it is, not wrapped in the task group's ExceptionGroup.
                await self._tg.__aexit__(None, None, None)
                return None
            return await self._tg.__aexit__(exc_type, exc, tb)
        finally:
            if self._receive is not None:
                self._receive.close()


class _StreamRace:
    """Who won a streamed race, and each running call's cancel scope (to cancel the losers)."""

    __slots__ = ("decided", "first", "scopes", "winner")

    def __init__(self, *, first: bool) -> None:
        self.first = first
        self.winner: int | None = None
        self.decided = False
        self.scopes: dict[int, anyio.CancelScope] = {}

    def decide(self, *, keep: int) -> None:
        """The race is decided: cancel every running call but ``keep``."""
        self.decided = True
        for j, scope in list(self.scopes.items()):
            if j != keep:
                scope.cancel()


_NO_DEADLINE: AbstractContextManager[None] = nullcontext()


def no_answer(exc: AllBackendsFailedError, *, backend: str) -> NoAnswerError:
    """The [`NoAnswerError`][genfan.NoAnswerError] a composite's ``complete()`` raises where ``run()`` raised
    ``exc`` (raise it ``from exc``)."""
    return NoAnswerError(exc.message, backend=backend, errors=exc.exceptions)


def chosen_completion(
    chosen: Candidate | None,
    candidates: Sequence[Candidate],
    selection: Selection,
    backend: str,
) -> Completion:
    """The chosen candidate's completion, or a [`NoAnswerError`][genfan.NoAnswerError] saying why there is none."""
    if chosen is not None and chosen.completion is not None:
        return chosen.completion
    raise NoAnswerError(
        f"no candidate was chosen: {selection.explanation}",
        backend=backend,
        errors=[c.error for c in candidates if c.error is not None],
        explanation=selection.explanation,
    )


def _chat_span(name: str, prepared: ChatRequest) -> AbstractContextManager[Any]:
    """The span of one backend call of a fan-out."""
    return telemetry.span(
        f"chat {prepared.model or name}",
        **{
            "gen_ai.operation.name": "chat",
            "gen_ai.system": name.split(":", 1)[0],
            "gen_ai.request.model": prepared.model,
            "gen_ai.request.temperature": prepared.temperature,
            "gen_ai.request.max_tokens": prepared.max_tokens,
            "genfan.backend": name,
        },
    )


def _unexpected(exc: Exception, name: str) -> BackendError:
    """A backend bug, as one typed error."""
    error = BackendError(f"unexpected {type(exc).__name__}: {exc}", backend=name)
    error.__cause__ = exc
    return error


def _succeeded(
    i: int,
    name: str,
    completion: Completion,
    started: float,
    start: float,
    state: _RaceState,
    call_span: Any,
) -> Candidate:
    """Candidate ``i`` answered: its candidate, its span attributes and its log event."""
    latency = time.perf_counter() - start
    usage = completion.usage
    call_span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
    call_span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    if usage.cost is not None:
        call_span.set_attribute("genfan.usage.cost", usage.cost)
    call_span.set_attribute("gen_ai.response.finish_reasons", (completion.finish_reason,))
    if completion.model:
        call_span.set_attribute("gen_ai.response.model", completion.model)
    telemetry.event(
        "backend_call_finished",
        backend=name,
        latency=round(latency, 6),
        output_tokens=usage.output_tokens,
    )
    telemetry.record_call(
        name,
        seconds=latency,
        response_model=completion.model,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
    )
    return Candidate(
        index=i,
        backend=name,
        status="ok",
        completion=completion,
        started=started,
        latency=latency,
        finished_order=state.next_order(),
    )


def _failed(
    i: int,
    name: str,
    error: BackendError,
    started: float,
    start: float,
    state: _RaceState,
    call_span: Any,
) -> Candidate:
    """Candidate ``i`` failed (an answer that is not a valid output keeps its completion)."""
    latency = time.perf_counter() - start
    call_span.set_attribute("error.type", type(error).__name__)
    telemetry.record_call(name, seconds=latency, error_type=type(error).__name__)
    telemetry.event(
        "backend_call_failed",
        level="info",
        backend=name,
        error=type(error).__name__,
        detail=error.message,
    )
    return Candidate(
        index=i,
        backend=name,
        status="failed",
        completion=error.completion if isinstance(error, AnswerRejectedError) else None,
        error=error,
        started=started,
        latency=latency,
        finished_order=state.next_order(),
    )


class _RaceState:
    """Counts successes (and agreeing answers) and says when the race is decided; validates
    answers into the output type (``spec``) and keeps their outputs by candidate index, and
    checks them with ``validate=`` (``validator``)."""

    __slots__ = (
        "_agree",
        "_groups",
        "_k",
        "_order",
        "_successes",
        "cache_gates",
        "cache_keys",
        "cache_written",
        "checked",
        "met",
        "outputs",
        "request",
        "spec",
        "spend",
        "validator",
    )

    def __init__(
        self,
        k: int,
        agree: Callable[[Completion], Hashable | None] | None,
        spec: OutputSpec[Any] | None = None,
        validator: AnswerValidator | None = None,
        request: ChatRequest | None = None,
    ) -> None:
        self._k = k
        self._agree = agree
        self._groups: Counter[Hashable] = Counter()
        self._successes = 0
        self._order = 0
        self.met = False
        self.spec = spec
        self.validator = validator
        self.request = request
        self.outputs: dict[int, Any] = {}
        self.checked: set[int] = set()
        #: ``max_cost``: the spend of this run (``None``: no cap).
        self.spend: _Spend | None = None
        #: ``prompt_cache``: each target's cache key (``None``: off), the gate each waiting
        #: call waits on, and the event each writing call sets once its prompt is processed.
        self.cache_keys: list[Hashable] | None = None
        self.cache_gates: dict[int, anyio.Event] = {}
        self.cache_written: dict[int, anyio.Event] = {}

    async def validate(self, i: int, completion: Completion, backend: str) -> None:
        """Validate candidate ``i``'s answer into the output type, then check it with
        ``validate=`` (an answer asking for tools has no output yet and is not validated).

        Raises:
            AnswerRejectedError: the answer is not a valid instance
                (an ``OutputValidationError``), or a check rejected it.
        """
        if completion.tool_calls:
            return
        output = None if self.spec is None else self.spec.validate(completion, backend=backend)
        if self.validator is not None and self.request is not None:
            await self.validator(completion, request=self.request, backend=backend)
        if self.spec is not None:
            self.outputs[i] = output
        self.checked.add(i)

    async def settle(self, candidate: Candidate) -> Candidate:
        """``candidate``, validated if it answered and was not validated on the way (a
        subclass's own calls); a failed candidate if its answer is not a valid output or a
        check rejects it."""
        c = candidate.completion
        if not candidate.ok or c is None or candidate.index in self.checked or c.tool_calls:
            return candidate
        if self.spec is None and self.validator is None:
            return candidate
        try:
            await self.validate(candidate.index, c, candidate.backend)
        except AnswerRejectedError as exc:
            return dataclasses.replace(candidate, status="failed", error=exc)
        return candidate

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


class _Spend:
    """What one run of a fan-out spends against its ``max_cost``: the estimates of the calls
    admitted, the cost of those that ended, the live spend of streams, and what was cut."""

    __slots__ = (
        "answered",
        "cap",
        "cuts",
        "estimates",
        "input_cost",
        "live",
        "names",
        "output_price",
        "reserved",
        "scopes",
        "spent",
    )

    def __init__(
        self,
        cap: float,
        targets: Sequence[Target],
        names: Sequence[str],
        prepared: Sequence[ChatRequest],
    ) -> None:
        self.cap = cap
        self.names = names
        self.spent = 0.0
        self.answered = False
        self.reserved: dict[int, float] = {}
        self.live: dict[int, float] = {}
        self.scopes: dict[int, anyio.CancelScope] = {}
        self.cuts: dict[int, MaxCostError] = {}
        self.estimates: list[float] = []
        self.input_cost: list[float] = []
        self.output_price: list[float] = []
        for target, name, request in zip(targets, names, prepared, strict=True):
            estimate = estimate_cost(target.backend, request)
            if estimate is None:
                raise ConfigurationError(
                    f"max_cost needs the price of every backend, and {name!r} has none (its "
                    "model is not in the genai-prices table): give it price=(input, output) "
                    "in USD per 1M tokens (price=(0, 0) for a free one), or drop max_cost"
                )
            price: Price | None = backend_price(target.backend, request)
            self.estimates.append(estimate)
            self.input_cost.append(
                0.0 if price is None else price.estimate(estimate_input_tokens(request), 0)
            )
            self.output_price.append(0.0 if price is None else price.output / 1_000_000)

    def committed(self) -> float:
        """Spent, plus the estimates of the calls running."""
        return self.spent + sum(self.reserved.values())

    def admit(self, i: int) -> MaxCostError | None:
        """Admit call ``i`` (reserving its estimate), or say why not."""
        estimate = self.estimates[i]
        committed = self.committed()
        if committed + estimate > self.cap:
            self.cuts[i] = cut = MaxCostError(
                f"skipped: its estimated ${estimate:.6f} would take the spend "
                f"(${committed:.6f} spent or committed) past max_cost=${self.cap:g}",
                backend=self.names[i],
                action="skipped",
                max_cost=self.cap,
                spent=committed,
                estimate=estimate,
            )
            return cut
        self.reserved[i] = estimate
        return None

    @contextmanager
    def running(self, i: int) -> Iterator[anyio.CancelScope]:
        """The cancel scope of call ``i``, by which the cap cancels it."""
        with anyio.CancelScope() as scope:
            self.scopes[i] = scope
            try:
                yield scope
            finally:
                self.scopes.pop(i, None)
        if scope.cancelled_caught:
            self.settle(i, None, answered=False)

    def progress(self, i: int, chars: int) -> None:
        """Stream ``i`` has produced ``chars`` characters: its live spend, checked."""
        self.live[i] = self.input_cost[i] + -(-chars // 4) * self.output_price[i]
        self._check()

    def settle(self, i: int, completion: Completion | None, *, answered: bool) -> None:
        """Call ``i`` ended: its cost (its answer's, else its live spend) counts as spent."""
        self.scopes.pop(i, None)
        if i not in self.reserved:
            return  # settled already
        estimate = self.reserved.pop(i)
        live = self.live.pop(i, 0.0)
        if completion is not None:
            cost = completion.usage.cost
            self.spent += estimate if cost is None else cost
        else:
            self.spent += live
        if answered:
            self.answered = True
        self._check()

    def _check(self) -> None:
        """Past the cap: cancel the calls running (all of them once an answer is in, else
        all but the one furthest along, which runs on to give an answer)."""
        total = self.spent + sum(self.live.values())
        if total <= self.cap or not self.scopes:
            return
        running = list(self.scopes)
        if not self.answered:
            leader = max(running, key=lambda j: self.live.get(j, 0.0))
            running.remove(leader)
        for j in running:
            if j in self.cuts:
                continue
            self.cuts[j] = MaxCostError(
                f"cancelled: the spend (${total:.6f}) passed max_cost=${self.cap:g}",
                backend=self.names[j],
                action="cancelled",
                max_cost=self.cap,
                spent=total,
                estimate=self.estimates[j],
            )
            self.scopes[j].cancel()


def _cache_key(backend: Backend, request: ChatRequest) -> Hashable:
    """What identifies a provider's prompt cache: the innermost backend (through guards and
    wrappers) and the model."""
    node: Any = backend
    for _ in range(32):
        inner = getattr(node, "provider", None) or getattr(node, "inner", None)
        if inner is None:
            break
        node = inner
    return (id(node), request.model or getattr(node, "model", None))


def check_max_cost(max_cost: float | None) -> None:
    if max_cost is not None and not (
        isinstance(max_cost, int | float)
        and not isinstance(max_cost, bool)
        and max_cost >= 0
        and math.isfinite(max_cost)
    ):
        raise ConfigurationError(f"max_cost must be a finite number of USD >= 0, got {max_cost!r}")


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
