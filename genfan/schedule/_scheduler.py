"""The scheduler: fires schedules on time, runs each fire time once, survives failure.

One loop per scheduler: turn due fire times into runs (misfire grace and coalescing), claim
due runs (overlap policy, leases), start them in a task group (timeout, retries), renew leases
while they run, record outcomes in batches. Then sleep until the next thing is due: a fire time,
a jittered start, another replica's lease expiry, or (with several replicas) the poll interval.
Every wait goes through the :class:`~genfan.schedule.Clock`.
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
from ._records import (
    BackfillResult,
    Claim,
    Conflict,
    RunKey,
    RunRecord,
    RunStatus,
    ScheduleInfo,
)
from ._sqlite import SQLiteStore
from ._store import Store
from ._triggers import Trigger
from ._url import store_from_url

__all__ = ["Scheduler"]


@dataclass
class _Local:
    """A run executing in this scheduler."""

    claim: Claim
    scope: anyio.CancelScope
    reason: str | None = None  # why it was cancelled: "cancel_old" or "lease_lost"
    finishing: bool = False


@dataclass
class _Finish:
    key: RunKey
    status: RunStatus
    when: datetime
    error: str | None
    attempts: int
    done: anyio.Event = field(default_factory=anyio.Event)
    recorded: bool = False


class Scheduler:
    """Runs schedules from a store; embed it or run it as a process (``genfan schedule run``).

    Args:
        store: a :class:`Store`, a URL (``sqlite:///file.db``, ``postgresql://host/db``) or a path;
            default ``genfan-schedules.db`` in the working directory.
        clock: wall time and waiting (default :class:`AnyioClock`).
        identity: this replica's name in leases and history (default ``host:pid:random``).
        max_concurrent_runs: runs this scheduler executes at once; due runs beyond it wait.
        lease_time: seconds a claimed run is held without renewal; renewed every third of it.
            A replica that dies loses its runs to another after this long.
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
            if batch:
                await self.store.finish_many(
                    self.identity, [(f.key, f.status, f.when, f.error, f.attempts) for f in batch]
                )
            keys = [k for k, v in self._running.items() if not v.finishing]
            self._running.clear()
            if keys:
                await self.store.release(self.identity, keys)
                telemetry.event("schedule_runs_released", identity=self.identity, runs=len(keys))

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
                :class:`ContentJob`. A callable without an import path (a closure) runs only in
                this scheduler.
            trigger: when it fires.
            id: the schedule's id (default: the import path, or a random id).
            args, kwargs: JSON-able arguments for the callable.
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
        if local is not None:
            self._local_jobs[sid] = local
        info = await self.store.put_schedule(
            id=sid,
            trigger=trigger,
            job=spec,
            policy=policy or SchedulePolicy(),
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
            start, end: the window, timezone-aware; ``end`` not after now.
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

    async def _main_loop(self) -> None:
        while True:
            self._wake = anyio.Event()
            now = self._now()
            free = self.max_concurrent_runs - len(self._running)
            due, res, nxt = await self.store.cycle(
                self.identity, now, self.lease_time, max(0, free), self.batch_size
            )
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
                self._start(claim, now)
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

    def _start(self, claim: Claim, now: datetime) -> None:
        assert self._tg is not None
        local = _Local(claim=claim, scope=anyio.CancelScope())
        self._running[claim.run.key] = local
        self._runs_changed.set()
        self._tg.start_soon(self._run_one, local, now)

    # -- one run ----------------------------------------------------------------------------------

    async def _run_one(self, local: _Local, claimed_at: datetime) -> None:
        claim = local.claim
        run = claim.run
        sid = run.schedule_id
        drift = (claimed_at - run.run_at).total_seconds()
        attrs = {"genfan.schedule.id": sid}
        if not (claim.takeover or run.backfill):  # a backfill run's wait is not drift
            telemetry.instruments().schedule_drift.record(drift, attrs)
        telemetry.event(
            "schedule_run_started",
            schedule=sid,
            fire_time=run.fire_time.isoformat(),
            attempt=run.attempts,
            drift=round(drift, 6),
            takeover=claim.takeover,
            backfill=run.backfill,
            identity=self.identity,
        )
        status: RunStatus = "failed"
        error: str | None = None
        attempts = run.attempts
        with telemetry.span(
            "genfan.schedule.run",
            **{
                "genfan.schedule.id": sid,
                "genfan.schedule.fire_time": run.fire_time.isoformat(),
                "genfan.schedule.attempt": run.attempts,
                "genfan.schedule.drift": drift,
                "genfan.schedule.takeover": claim.takeover,
                "genfan.schedule.backfill": run.backfill,
            },
        ) as span:
            with local.scope:
                status, error, attempts = await self._execute(claim)
            if local.scope.cancelled_caught:
                if local.reason == "lease_lost":
                    telemetry.event(
                        "schedule_lease_lost",
                        level="warning",
                        schedule=sid,
                        fire_time=run.fire_time.isoformat(),
                        identity=self.identity,
                    )
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
        item = _Finish(key=run.key, status=status, when=self._now(), error=error, attempts=attempts)
        self._finishes.append(item)
        self._finish_ready.set()
        # If the scheduler stops now, the outcome is still written (see _release_held).
        await item.done.wait()
        self._count(sid, status)
        telemetry.event(
            "schedule_run_finished",
            level="info" if status == "succeeded" else "warning",
            schedule=sid,
            fire_time=run.fire_time.isoformat(),
            outcome=status,
            attempts=attempts,
            error=error,
            recorded=item.recorded,
        )

    def _forget(self, key: RunKey) -> None:
        self._running.pop(key, None)
        self._runs_changed.set()
        self._wake.set()

    async def _finish_loop(self) -> None:
        while True:
            await self._finish_ready.wait()
            self._finish_ready = anyio.Event()
            batch, self._finishes = self._finishes, []
            if not batch:
                continue
            with anyio.CancelScope(shield=True):
                results = await self.store.finish_many(
                    self.identity,
                    [(f.key, f.status, f.when, f.error, f.attempts) for f in batch],
                )
            for f, ok in zip(batch, results, strict=True):
                f.recorded = ok
                self._forget(f.key)
                f.done.set()

    def _resolve(self, claim: Claim) -> tuple[Callable[[RunContext], Any], bool]:
        """The job as ``ctx -> awaitable``, and whether it reads the context."""
        job = claim.job
        sid = claim.run.schedule_id
        if job.get("kind") == "content":
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
            if fn is None:
                raise ConfigurationError(
                    f"schedule {sid!r} runs a local callable registered in another process; "
                    "schedule an import path ('pkg.mod:func') to run it on every replica"
                )
        else:
            fn = self._jobs.get(ref) or resolve_callable(ref)
        args, kwargs = job.get("args", []), job.get("kwargs", {})

        async def call_run(ctx: RunContext) -> Any:
            return await call_job(fn, args, kwargs, ctx)

        return call_run, takes_context(fn)

    async def _execute(self, claim: Claim) -> tuple[RunStatus, str | None, int]:
        """Run the job, retried as the schedule's policy says (genfan's one retry engine).

        Returns the outcome, its error and the attempts made (counting those made before, by
        a replica that died).
        """
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

        async def attempt_once() -> Any:
            ctx = RunContext(
                schedule_id=run.schedule_id,
                fire_time=run.fire_time,
                scheduled_at=run.run_at,
                attempt=attempt,
                previous_success=previous,
                manual=run.manual,
                backfill=run.backfill,
            )
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
            await self.store.record_attempt(run.key, self.identity, attempt)

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
        interval = self.lease_time / 3
        while True:
            if not self._running:
                self._runs_changed = anyio.Event()
                await self._runs_changed.wait()
                continue
            await self.clock.sleep_until(self._now() + timedelta(seconds=interval))
            if not self._running:
                continue
            watched = {k for k, v in self._running.items() if not v.finishing}
            hb = await self.store.heartbeat(self.identity, self._now(), self.lease_time)
            for key in watched:
                local = self._running.get(key)
                if local is None or local.finishing:
                    continue
                if key in hb.cancel:
                    local.reason = "cancel_old"
                    local.scope.cancel()
                elif key not in hb.held:
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
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
