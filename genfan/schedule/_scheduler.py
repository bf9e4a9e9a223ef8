"""The scheduler: fires schedules on time, runs each fire time once, survives failure.

One loop per scheduler: turn due fire times into runs (misfire grace and coalescing), claim
due runs (overlap policy, leases on the store's clock, a fencing token per claim), start them in
a task group (timeout, retries), renew leases while they run, record outcomes in batches. Then
sleep until the next thing is due: a fire time, a jittered start, another replica's lease
expiry, or (with several replicas) the poll interval. Every wait goes through the
`Clock`.

A replica knows how long its lease surely holds on its own clock: a lease taken or renewed by a
call sent at ``t`` lasts until at least ``t + lease_time`` (the store read its clock after the
call was sent). Before each attempt of a job it checks that a third of that is left, or renews
first; a run whose lease is lost is never started, and its result is refused by the store.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from anyio.lowlevel import checkpoint
from tenacity import RetryCallState

from .. import telemetry
from .._errors import ConfigurationError
from ..resilience import Retrier
from ._clock import AnyioClock, Clock
from ._jobs import (
    ContentJob,
    FanOutFactory,
    RunContext,
    call_job,
    job_spec,
    resolve_callable,
    takes_context,
)
from ._policy import Overlap, SchedulePolicy
from ._process import JobProcessError, call_in_process
from ._records import (
    BackfillResult,
    Claim,
    Conflict,
    Outcome,
    Renewal,
    RunKey,
    RunRecord,
    RunStatus,
    ScheduleInfo,
)
from ._sqlite import SQLiteStore
from ._store import Store, StoreUnavailableError
from ._triggers import Trigger
from ._url import store_from_url

__all__ = ["Scheduler"]


@dataclass
class _Local:
    """A run executing in this scheduler."""

    claim: Claim
    scope: anyio.CancelScope
    #: the fencing token of the claim it runs under
    token: int
    #: until when, on this scheduler's clock, its lease surely holds
    deadline: datetime
    reason: str | None = None  # why it was cancelled: "cancel_old" or "lease_lost"
    finishing: bool = False
    #: the real start of its job's first attempt here (``None``: not started)
    started: datetime | None = None
    #: that start is in the store (written with a renewal)
    started_written: bool = False

    def unwritten_start(self) -> datetime | None:
        """The real start to write, if this claim holds the run's first start and it is not
        written yet."""
        if self.claim.first_start and not self.started_written:
            return self.started
        return None


@dataclass
class _Finish:
    outcome: Outcome
    done: anyio.Event = field(default_factory=anyio.Event)
    recorded: bool = False

    @property
    def key(self) -> RunKey:
        return self.outcome.key


class Scheduler:
    """Runs schedules from a store; embed it or run it as a process (``genfan schedule run``).

    Args:
        store: a [`Store`][genfan.schedule.Store], a URL (``sqlite:///file.db``, ``postgresql://host/db``) or a path;
            default ``genfan-schedules.db`` in the working directory.
        clock: wall time and waiting (default [`AnyioClock`][genfan.schedule.AnyioClock]).
        identity: this replica's name in leases and history (default ``host:pid:random``).
        max_concurrent_runs: runs this scheduler executes at once; due runs beyond it wait.
        lease_time: seconds a claimed run is held without renewal, on the store's clock;
            renewed every third of it. A replica that dies (or is cut off from the store, or
            frozen) loses its runs to another once the lease has expired and stayed expired
            for half of it more (1.5 lease times after its last renewal, plus a poll).
        poll_interval: seconds between looks at the store for work other replicas created
            (``None``: only when something here is due, for a single scheduler).
        batch_size: schedules processed per store transaction.
        fanout_factory: builds the fan-out of content jobs (``genfan schedule run`` uses the
            config's backends).
        process_runs: ``False`` makes an admin handle (add, pause, history...) that runs nothing.
        jobs: callables by name, for job references that are not import paths.

    Example:
        ```python
        async with Scheduler("sqlite:///schedules.db") as scheduler:
            await scheduler.add_schedule(
                "myapp.jobs:digest", CronTrigger(expr="0 7 * * *", timezone="Europe/Berlin")
            )
            await anyio.sleep_forever()
        ```
    """

    def __init__(
        self,
        store: Store | str | Path | None = None,
        *,
        clock: Clock | None = None,
        identity: str | None = None,
        max_concurrent_runs: int = 100,
        lease_time: float = 30.0,
        poll_interval: float | None = 1.0,
        batch_size: int = 500,
        fanout_factory: FanOutFactory | None = None,
        process_runs: bool = True,
        jobs: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        if not isinstance(max_concurrent_runs, int) or max_concurrent_runs < 1:
            raise ConfigurationError(
                f"Scheduler.max_concurrent_runs must be an int >= 1, got {max_concurrent_runs!r}"
            )
        if not 0.01 <= lease_time <= 86400:
            raise ConfigurationError(
                f"Scheduler.lease_time must be >= 0.01 and <= 86400 seconds, got {lease_time!r}"
            )
        if poll_interval is not None and not 0.001 <= poll_interval <= 3600:
            raise ConfigurationError(
                "Scheduler.poll_interval must be >= 0.001 and <= 3600 seconds (or None), "
                f"got {poll_interval!r}"
            )
        if not 1 <= batch_size <= 100_000:
            raise ConfigurationError(f"Scheduler.batch_size must be 1..100000, got {batch_size!r}")
        if store is None:
            self.store: Store = SQLiteStore()
        elif isinstance(store, Store):
            self.store = store
        else:
            self.store = store_from_url(store)
        self._own_store = not isinstance(store, Store)
        self.clock: Clock = clock or AnyioClock()
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.max_concurrent_runs = max_concurrent_runs
        self.lease_time = float(lease_time)
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.fanout_factory = fanout_factory
        self.process_runs = process_runs
        self._jobs: dict[str, Callable[..., Any]] = dict(jobs or {})
        self._local_jobs: dict[str, Callable[..., Any]] = {}
        self._running: dict[RunKey, _Local] = {}
        self._finishes: list[_Finish] = []
        self._finish_ready = anyio.Event()
        self._wake = anyio.Event()
        self._runs_changed = anyio.Event()
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Scheduler:
        if self._stack is not None:
            raise ConfigurationError("this Scheduler is already running")
        # Fresh events and state for this event loop (a scheduler may be started again later).
        self._finish_ready = anyio.Event()
        self._wake = anyio.Event()
        self._runs_changed = anyio.Event()
        self._finishes = []
        self._running = {}
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await self.store.setup()
            if self._own_store:
                stack.push_async_callback(self.store.aclose)
            stack.push_async_callback(self._release_held)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._begin_stop)
            self._tg = tg
            if self.process_runs:
                tg.start_soon(self._main_loop)
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._finish_loop)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._stopping = False
        telemetry.event("scheduler_started", identity=self.identity, store=repr(self.store))
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        try:
            return await stack.__aexit__(*exc)
        finally:
            telemetry.event("scheduler_stopped", identity=self.identity)

    def _begin_stop(self) -> None:
        self._stopping = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _release_held(self) -> None:
        with anyio.CancelScope(shield=True):
            # Outcomes not yet written are written; runs cut short by shutdown go back to
            # pending, for this or another replica.
            batch, self._finishes = self._finishes, []
            keys = [k for k, v in self._running.items() if not v.finishing]
            self._running.clear()
            try:
                if batch:
                    await self.store.finish_many(self.identity, [f.outcome for f in batch])
                if keys:
                    await self.store.release(self.identity, keys)
                    telemetry.event(
                        "schedule_runs_released", identity=self.identity, runs=len(keys)
                    )
            except StoreUnavailableError as exc:
                # Their leases run out instead, and another replica takes them over.
                telemetry.event(
                    "schedule_store_unavailable",
                    level="warning",
                    identity=self.identity,
                    during="shutdown",
                    unwritten=len(batch),
                    unreleased=len(keys),
                    error=str(exc),
                )

    async def run_until_stopped(self) -> None:
        """Run until cancelled (Ctrl-C / SIGTERM in ``genfan schedule run``)."""
        await anyio.sleep_forever()

    # -- the admin API --------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self.clock.now()

    async def add_schedule(
        self,
        func: Callable[..., Any] | str | ContentJob,
        trigger: Trigger,
        *,
        id: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        policy: SchedulePolicy | None = None,
        paused: bool = False,
        conflict: Conflict = "replace",
    ) -> ScheduleInfo:
        """Add (or update) a schedule.

        Args:
            func: an async or sync callable, an import path ``"pkg.mod:func"``, or a
                [`ContentJob`][genfan.schedule.ContentJob]. A callable without an import path (a closure) runs only in
                this scheduler.
            trigger: when it fires.
            id: the schedule's id (default: the import path, or a random id).
            args: JSON-able positional arguments for the callable.
            kwargs: JSON-able keyword arguments for the callable.
            policy: misfire grace, coalescing, overlap, timeout, retries, jitter.
            paused: add it paused.
            conflict: if the id exists: ``replace`` (keeps its place in time when the trigger is
                unchanged, so restarts resume), ``keep``, or ``error``.
        """
        if not isinstance(trigger, Trigger):
            raise ConfigurationError(f"trigger must be a Trigger, got {trigger!r}")
        spec, local = job_spec(func, args, kwargs or {})
        try:
            import json

            json.dumps(spec)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"job args/kwargs must be JSON-able: {exc}") from None
        sid = id or (spec.get("func") if spec["kind"] == "call" else None) or uuid.uuid4().hex
        policy = policy or SchedulePolicy()
        if policy.isolation == "process" and (spec["kind"] != "call" or spec["func"] is None):
            raise ConfigurationError(
                f"schedule {sid!r}: isolation='process' runs a job by its import path in a "
                "child process; a content job or a callable without an import path (a closure, "
                "a lambda) cannot run there: schedule 'package.module:function', or use "
                "isolation='thread'"
            )
        if local is not None:
            self._local_jobs[sid] = local
        info = await self.store.put_schedule(
            id=sid,
            trigger=trigger,
            job=spec,
            policy=policy,
            now=self._now(),
            paused=paused,
            conflict=conflict,
        )
        telemetry.event(
            "schedule_added", schedule=sid, trigger=str(info.trigger), next_fire=info.next_fire
        )
        self._wake.set()
        return info

    async def get_schedule(self, id: str) -> ScheduleInfo | None:
        return await self.store.get_schedule(id)

    async def list_schedules(self) -> list[ScheduleInfo]:
        return await self.store.list_schedules()

    async def remove_schedule(self, id: str) -> bool:
        """Remove a schedule and its pending runs (its history stays)."""
        self._local_jobs.pop(id, None)
        return await self.store.remove_schedule(id)

    async def pause(self, id: str) -> bool:
        """Stop creating runs for a schedule (runs already going finish)."""
        ok = await self.store.pause(id)
        telemetry.event("schedule_paused", schedule=id, found=ok)
        return ok

    async def resume(self, id: str) -> bool:
        """Resume a paused schedule from now on (fire times that fell while paused are skipped;
        a one-off date that passed still runs)."""
        ok = await self.store.resume(id, self._now())
        telemetry.event("schedule_resumed", schedule=id, found=ok)
        self._wake.set()
        return ok

    async def trigger(self, id: str) -> RunRecord:
        """Run a schedule now, once, besides its trigger."""
        run = await self.store.add_manual_run(id, self._now())
        self._wake.set()
        return run

    async def backfill(
        self,
        id: str,
        start: datetime,
        end: datetime,
        *,
        overlap: Overlap | None = None,
        max_fires: int = 1000,
    ) -> BackfillResult:
        """Run the fire times the schedule's trigger had in a past window (Temporal's backfill).

        Each fire time in ``[start, end)`` becomes a run with that nominal fire time, queued
        now and executed by any running scheduler (this one, or another replica) like the
        trigger's own runs: the job's timeout, retries and concurrency limits apply, the misfire
        grace time does not. A fire time already in the history (run, skipped or missed before,
        or queued by an earlier backfill) is not run again, so a backfill can be repeated; with
        history limits, a fire time pruned from the history would run again.

        Args:
            id: the schedule.
            start: the window's first instant (included), timezone-aware.
            end: the window's end (excluded), timezone-aware, not after now.
            overlap: how the backfill's runs overlap each other and the schedule's runs
                (default: the schedule's policy). The default ``skip`` runs the first and skips
                the rest while it goes; ``buffer_all`` runs them one after another, in order;
                ``allow`` all at once.
            max_fires: the most fire times the window may hold.

        Returns:
            The window's fire times, and which of them were queued or already in the history.

        Raises:
            ConfigurationError: a naive datetime, an empty or future window, more than
                ``max_fires`` fire times, a bad ``overlap``, or no such schedule.
        """
        result = await self.store.backfill(
            id, start=start, end=end, now=self._now(), overlap=overlap, max_fires=max_fires
        )
        telemetry.event(
            "schedule_backfill",
            schedule=id,
            start=start.isoformat(),
            end=end.isoformat(),
            fires=len(result.fire_times),
            queued=len(result.queued),
            existing=len(result.existing),
            overlap=overlap,
        )
        self._wake.set()
        return result

    async def history(
        self,
        id: str | None = None,
        *,
        limit: int = 100,
        statuses: Sequence[RunStatus] | None = None,
    ) -> list[RunRecord]:
        """Runs, newest first (pending and running ones included unless ``statuses`` says)."""
        return await self.store.history(id, limit=limit, statuses=statuses)

    # -- the loop -------------------------------------------------------------------------------

    def _store_pause(self, failures: int) -> float:
        """How long to wait before using a store that failed ``failures`` times in a row."""
        return min(0.5 * failures, 5.0, max(self.lease_time / 3, 0.01))

    def _store_failed(self, exc: StoreUnavailableError, during: str, failures: int) -> float:
        pause = self._store_pause(failures)
        telemetry.event(
            "schedule_store_unavailable",
            level="warning",
            identity=self.identity,
            during=during,
            failures=failures,
            retry_in=pause,
            error=str(exc),
        )
        return pause

    async def _main_loop(self) -> None:
        failures = 0
        while True:
            self._wake = anyio.Event()
            now = self._now()
            free = self.max_concurrent_runs - len(self._running)
            mine = {k: v.token for k, v in self._running.items()}
            try:
                due, res, nxt = await self.store.cycle(
                    self.identity, now, self.lease_time, max(0, free), self.batch_size, mine=mine
                )
            except StoreUnavailableError as exc:
                failures += 1
                pause = self._store_failed(exc, "cycle", failures)
                await self._wait(self._now() + timedelta(seconds=pause))
                continue
            failures = 0
            # The claim was sent at ``now``: the store read its clock after that, so the new
            # leases hold at least until ``now + lease_time`` here.
            deadline = now + timedelta(seconds=self.lease_time)
            for key in res.renewed:
                local = self._running.get(key)
                if local is not None:
                    local.deadline = max(local.deadline, deadline)
            for sid, n in due.missed.items():
                telemetry.event("schedule_fires_missed", level="warning", schedule=sid, fires=n)
                self._count(sid, "missed", n)
            for sid, n in due.dropped.items():
                telemetry.event("schedule_fires_coalesced", schedule=sid, dropped=n)
            for run in res.ended:
                self._ended(run)
            for key in res.cancel:
                local = self._running.get(key)
                if local is not None and not local.finishing:
                    local.reason = "cancel_old"
                    local.scope.cancel()
            for claim in res.claimed:
                self._start(claim, deadline)
            if due.more:
                continue
            if self.poll_interval is not None:
                poll = now + timedelta(seconds=self.poll_interval)
                nxt = poll if nxt is None else min(nxt, poll)
            await self._wait(nxt)

    async def _wait(self, until: datetime | None) -> None:
        wake = self._wake
        if until is None:
            await wake.wait()
            return
        if until <= self._now():
            return
        async with anyio.create_task_group() as tg:

            async def sleeper() -> None:
                await self.clock.sleep_until(until)
                tg.cancel_scope.cancel()

            async def waker() -> None:
                await wake.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(sleeper)
            tg.start_soon(waker)

    def _start(self, claim: Claim, deadline: datetime) -> None:
        assert self._tg is not None
        key = claim.run.key
        token = claim.run.fencing_token
        assert token is not None
        running = self._running.get(key)
        if running is not None:
            # This scheduler runs it already (its lease had run out, and the store handed it
            # to the same replica again): one replica never runs a fire time twice. The run
            # goes on under the new claim's token.
            telemetry.event(
                "schedule_run_reclaimed",
                level="warning",
                schedule=key[0],
                fire_time=claim.run.fire_time.isoformat(),
                token=token,
                identity=self.identity,
            )
            running.token = token
            running.deadline = deadline
            return
        local = _Local(claim=claim, scope=anyio.CancelScope(), token=token, deadline=deadline)
        self._running[key] = local
        self._runs_changed.set()
        self._tg.start_soon(self._run_one, local)

    async def _holds(self, local: _Local) -> bool:
        """Whether this scheduler surely still holds ``local``'s lease: a third of it is left
        on this scheduler's clock, or a renewal says so (renewed until it is fresh, however
        long the store takes to answer)."""
        margin = timedelta(seconds=self.lease_time / 3)
        failures = 0
        while self._now() >= local.deadline - margin:
            sent = self._now()
            item = Renewal(key=local.claim.run.key, token=local.token)
            try:
                hb = await self.store.renew(self.identity, sent, self.lease_time, [item])
            except StoreUnavailableError as exc:
                failures += 1
                await anyio.sleep(self._store_pause(failures))
                if failures == 1:
                    self._store_failed(exc, "lease check", failures)
                continue
            if item.key not in hb.held:
                return False
            local.deadline = max(local.deadline, sent + timedelta(seconds=self.lease_time))
        return True

    # -- one run ----------------------------------------------------------------------------------

    async def _run_one(self, local: _Local) -> None:
        claim = local.claim
        run = claim.run
        sid = run.schedule_id
        status: RunStatus = "failed"
        error: str | None = None
        attempts = run.attempts
        with telemetry.span(
            "genfan.schedule.run",
            **{
                "genfan.schedule.id": sid,
                "genfan.schedule.fire_time": run.fire_time.isoformat(),
                "genfan.schedule.attempt": run.attempts,
                "genfan.schedule.token": local.token,
                "genfan.schedule.takeover": claim.takeover,
                "genfan.schedule.backfill": run.backfill,
            },
        ) as span:
            with local.scope:
                status, error, attempts = await self._execute(local, span)
            if local.scope.cancelled_caught:
                if local.reason == "lease_lost":
                    telemetry.event(
                        "schedule_lease_lost",
                        level="warning",
                        schedule=sid,
                        fire_time=run.fire_time.isoformat(),
                        token=local.token,
                        started=local.started is not None,
                        identity=self.identity,
                    )
                    self._count(sid, "lease_lost")
                    self._forget(run.key)
                    span.set_attribute("genfan.schedule.outcome", "lease_lost")
                    return
                status, error = (
                    "cancelled",
                    "cancelled: a newer run replaced it (overlap=cancel_old)",
                )
            span.set_attribute("genfan.schedule.outcome", status)
            span.set_attribute("genfan.schedule.attempts", attempts)
        local.finishing = True
        item = _Finish(
            Outcome(
                key=run.key,
                status=status,
                ended=self._now(),
                error=error,
                attempts=attempts,
                token=local.token,
                started=local.unwritten_start(),
            )
        )
        self._finishes.append(item)
        self._finish_ready.set()
        # If the scheduler stops now, the outcome is still written (see _release_held).
        await item.done.wait()
        if not item.recorded:
            # Another replica took the run over after this one lost its lease (a freeze, a
            # cut from the store): the store refused this result, the newer claim's counts.
            self._count(sid, "lease_lost")
            telemetry.event(
                "schedule_run_refused",
                level="warning",
                schedule=sid,
                fire_time=run.fire_time.isoformat(),
                outcome=status,
                token=local.token,
                identity=self.identity,
                reason="this replica lost the run's lease and another claimed it: the result "
                "was not recorded",
            )
            return
        self._count(sid, status)
        telemetry.event(
            "schedule_run_finished",
            level="info" if status == "succeeded" else "warning",
            schedule=sid,
            fire_time=run.fire_time.isoformat(),
            outcome=status,
            attempts=attempts,
            token=local.token,
            error=error,
        )

    def _forget(self, key: RunKey) -> None:
        self._running.pop(key, None)
        self._runs_changed.set()
        self._wake.set()

    async def _finish_loop(self) -> None:
        failures = 0
        while True:
            await self._finish_ready.wait()
            self._finish_ready = anyio.Event()
            batch, self._finishes = self._finishes, []
            if not batch:
                continue
            try:
                with anyio.CancelScope(shield=True):
                    results = await self.store.finish_many(
                        self.identity, [f.outcome for f in batch]
                    )
            except StoreUnavailableError as exc:
                # Kept, and written when the store answers again (or at shutdown).
                failures += 1
                self._finishes[:0] = batch
                self._finish_ready.set()
                await anyio.sleep(self._store_failed(exc, "finish", failures))
                continue
            failures = 0
            for f, ok in zip(batch, results, strict=True):
                f.recorded = ok
                self._forget(f.key)
                f.done.set()

    def _resolve(self, claim: Claim) -> tuple[Callable[[RunContext], Any], bool]:
        """The job as ``ctx -> awaitable``, and whether it reads the context."""
        job = claim.job
        sid = claim.run.schedule_id
        process = claim.policy.isolation == "process"
        if job.get("kind") == "content":
            if process:
                raise ConfigurationError(
                    f"schedule {sid!r} is a content job: isolation='process' runs jobs by "
                    "import path only; use isolation='thread'"
                )
            content = ContentJob.from_dict(job)
            factory = self.fanout_factory
            if factory is None:
                raise ConfigurationError(
                    f"schedule {sid!r} is a content job but this scheduler has no fan-out: "
                    "pass Scheduler(fanout_factory=...) or run `genfan schedule run --config`"
                )

            async def content_run(ctx: RunContext) -> Any:
                return await content.run(sid, ctx, factory)

            return content_run, True
        ref = job.get("func")
        if ref is None:
            fn = self._local_jobs.get(sid)
            if fn is None or process:
                raise ConfigurationError(
                    f"schedule {sid!r} runs a local callable "
                    + (
                        "registered in another process; "
                        if fn is None
                        else "that a child process cannot import (isolation='process'); "
                    )
                    + "schedule an import path ('pkg.mod:func') to run it on every replica"
                )
        else:
            fn = self._jobs.get(ref) or resolve_callable(ref)
        args, kwargs = job.get("args", []), job.get("kwargs", {})
        if process:
            assert ref is not None

            async def process_run(ctx: RunContext) -> Any:
                await call_in_process(ref, args, kwargs, ctx)

            return process_run, takes_context(fn)

        async def call_run(ctx: RunContext) -> Any:
            return await call_job(fn, args, kwargs, ctx)

        return call_run, takes_context(fn)

    async def _execute(self, local: _Local, span: Any) -> tuple[RunStatus, str | None, int]:
        """Run the job, retried as the schedule's policy says (genfan's one retry engine).

        Each attempt starts only while this scheduler surely holds the run's lease; a lost one
        cancels ``local.scope`` (reason ``lease_lost``). Returns the outcome, its error and the
        attempts made (counting those made before, by a replica that died).
        """
        claim = local.claim
        run = claim.run
        policy = claim.policy
        attempt = run.attempts  # the claim counted this attempt already
        try:
            job, needs_context = self._resolve(claim)
        except ConfigurationError as exc:
            return "failed", f"ConfigurationError: {exc}", attempt
        previous: datetime | None = None
        if needs_context:
            last = await self.store.last_success(run.schedule_id, before=run.fire_time)
            previous = None if last is None else last.fire_time

        def began() -> None:
            """The job starts now: its real start, the drift measured at it."""
            if local.started is not None:
                return
            local.started = self._now()
            drift = (local.started - run.run_at).total_seconds()
            span.set_attribute("genfan.schedule.drift", drift)
            if claim.first_start and not (claim.takeover or run.backfill):
                # (a backfill run's wait is not drift, nor is a takeover's)
                telemetry.instruments().schedule_drift.record(
                    drift, {"genfan.schedule.id": run.schedule_id}
                )
            telemetry.event(
                "schedule_run_started",
                schedule=run.schedule_id,
                fire_time=run.fire_time.isoformat(),
                attempt=attempt,
                drift=round(drift, 6),
                token=local.token,
                takeover=claim.takeover,
                backfill=run.backfill,
                identity=self.identity,
            )

        async def attempt_once() -> Any:
            if not await self._holds(local):
                local.reason = "lease_lost"
                local.scope.cancel()
                await checkpoint()
            ctx = RunContext(
                schedule_id=run.schedule_id,
                fire_time=run.fire_time,
                scheduled_at=run.run_at,
                attempt=attempt,
                previous_success=previous,
                manual=run.manual,
                backfill=run.backfill,
                fencing_token=local.token,
            )
            began()
            if policy.timeout is not None:
                with anyio.fail_after(policy.timeout):
                    return await job(ctx)
            return await job(ctx)

        async def next_attempt(error: BaseException | None, delay: float) -> None:
            nonlocal attempt
            telemetry.event(
                "schedule_run_retry",
                level="warning",
                schedule=run.schedule_id,
                fire_time=run.fire_time.isoformat(),
                attempt=attempt,
                delay=delay,
                error=_describe(error),
            )
            attempt += 1
            self._count(run.schedule_id, "retry")
            try:
                await self.store.record_attempt(run.key, self.identity, attempt, token=local.token)
            except StoreUnavailableError as exc:  # counted with the outcome instead
                self._store_failed(exc, "record attempt", 1)

        async def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            await next_attempt(error, state.upcoming_sleep)

        cut_short: list[float] = []  # the wait a deadline around the scheduler would cut short

        def gave_up(reason: str, /, **fields: Any) -> None:
            if reason == "deadline":
                cut_short.append(fields["backoff"])

        retrier = Retrier(
            policy.retry,
            name=run.schedule_id,
            kind="schedule",
            first_attempt=attempt,
            on_retry=before_sleep,
            on_give_up=gave_up,
        )
        try:
            try:
                await retrier(attempt_once)
            except Exception as exc:
                if cut_short:
                    # The scheduler is stopped (a deadline around it) before the wait would
                    # end: wait anyway, as for any retry, so that the stop hands the run back
                    # unfinished, its failed attempt counted, instead of failing it.
                    await next_attempt(exc, cut_short[0])
                    await anyio.sleep(cut_short[0])
                raise
        except TimeoutError:
            return (
                "timeout",
                f"TimeoutError: the run took longer than {policy.timeout}s",
                attempt,
            )
        except Exception as exc:
            return "failed", _describe(exc), attempt
        return "succeeded", None, attempt

    # -- leases ---------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = timedelta(seconds=self.lease_time / 3)
        lease = timedelta(seconds=self.lease_time)
        failures = 0
        while True:
            if not self._running:
                self._runs_changed = anyio.Event()
                await self._runs_changed.wait()
                continue
            await self.clock.sleep_until(self._now() + interval)
            if not self._running:
                continue
            held = list(self._running.items())
            items = [Renewal(key=k, token=v.token, started=v.unwritten_start()) for k, v in held]
            sent = self._now()
            try:
                hb = await self.store.renew(self.identity, sent, self.lease_time, items)
            except StoreUnavailableError as exc:
                # The leases are not lost for that: a claim only suspects an expired lease,
                # and takes it over only if it stays expired after the store answers again.
                failures += 1
                self._store_failed(exc, "lease renewal", failures)
                continue
            failures = 0
            for (key, local), item in zip(held, items, strict=True):
                if self._running.get(key) is not local:
                    continue
                if key in hb.held:
                    local.deadline = max(local.deadline, sent + lease)
                    if item.started is not None:
                        local.started_written = True
                    if key in hb.cancel and not local.finishing:
                        local.reason = "cancel_old"
                        local.scope.cancel()
                elif not local.finishing:
                    local.reason = "lease_lost"
                    local.scope.cancel()

    # -- telemetry --------------------------------------------------------------------------------

    def _count(self, sid: str, outcome: str, n: int = 1) -> None:
        telemetry.instruments().schedule_runs.add(
            n, {"genfan.schedule.id": sid, "genfan.schedule.outcome": outcome}
        )

    def _ended(self, run: RunRecord) -> None:
        self._count(run.schedule_id, run.status)
        telemetry.event(
            f"schedule_run_{run.status}",
            level="warning",
            schedule=run.schedule_id,
            fire_time=run.fire_time.isoformat(),
            error=run.error,
        )

    def __repr__(self) -> str:
        return f"Scheduler(store={self.store!r}, identity={self.identity!r})"


def _describe(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    text = str(exc)
    if isinstance(exc, JobProcessError):  # already "Type: message" of the job's own error
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
