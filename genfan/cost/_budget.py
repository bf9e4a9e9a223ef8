"""Spend budgets: a limit in USD per scope over a period, checked before each call.

A call first *reserves* an estimate of its cost (`Budget.reserve`); the store admits it only if
what the scope spent in the period, plus the reservations of the calls in flight (in every
process sharing the store), plus this reserve, stays within the limit. After the call, the
reservation is *settled* with the call's actual cost (``Completion.usage.cost``). So the budget
is passed by at most what the calls already in flight when it was reached cost beyond their
reserve.

On a shared store (SQLite, PostgreSQL, Redis), a budget in use (``async with budget:``) takes a
*lease*: one reservation in the store large enough for several calls, from which it hands out
the calls' reservations in memory; their costs go back to the store in one step when the lease
runs out, every ``flush_interval`` seconds, and on close. The store still holds spent + every
lease and reservation <= limit, so the bound is the same; the lease expires in the store
(``lease_ttl``, renewed while in use) if its process dies.
"""

from __future__ import annotations

import calendar
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal, TypeAlias

import anyio
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import telemetry
from .._backend import Backend
from .._errors import BudgetExceededError, ConfigurationError
from .._types import ChatRequest, Completion, StreamEnd, StreamEvent
from ._prices import estimate_cost
from ._store_budget import (
    EPSILON,
    BudgetStore,
    CostStoreError,
    Ledger,
    SQLiteBudgetStore,
    budget_store_from_url,
)
from ._stores import check_store_fields, store_url
from ._wrapper import WrappedBackend

__all__ = [
    "Budget",
    "BudgetConfig",
    "BudgetStatus",
    "BudgetedBackend",
    "Period",
    "Reservation",
    "budgeted",
]

#: A budget's period: a calendar one (UTC), ``"total"`` (never resets), or seconds.
Period: TypeAlias = Literal["hour", "day", "week", "month", "total"] | float

_CALENDAR: Final = ("hour", "day", "week", "month", "total")


@dataclass(frozen=True, slots=True)
class Reservation:
    """A call's hold on a budget, from `Budget.reserve` until `Budget.settle`.

    Attributes:
        id: unique id of the reservation in the store.
        scope: the budget's scope.
        window: the period window it counts in (``"2026-12-06"``, ``"total"``...).
        amount: USD held.
        expires: Unix time after which it no longer counts (a process that died holding it).
        lease: the id of this process's lease it was cut from (settled in memory), or ``None``
            (held in the store on its own).
    """

    id: str
    scope: str
    window: str
    amount: float
    expires: float
    lease: str | None = None


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """Where a scope stands in the current period.

    Attributes:
        scope: the scope.
        window: the current period window.
        limit: USD allowed in the window.
        spent: USD recorded in the window.
        reserved: USD held by calls in flight, and by other processes' leases (their unused
            part included).
        resets_at: Unix time the next window starts (``None`` for ``"total"``).
    """

    scope: str
    window: str
    limit: float
    spent: float
    reserved: float
    resets_at: float | None

    @property
    def remaining(self) -> float:
        """USD still available: limit - spent - reserved (never below 0)."""
        return max(0.0, self.limit - self.spent - self.reserved)


def _number(owner: str, name: str, value: object, *, zero: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value < 0 if zero else value <= 0):  # type: ignore[operator]
        bound = ">= 0" if zero else "> 0"
        raise ConfigurationError(f"{owner}.{name} must be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


class _Lease:
    """This process's lease on one scope's window: ``held`` USD reserved in the store, of which
    ``in_flight`` is cut out for calls in flight and ``unflushed`` was spent by calls since
    the last step with the store; the rest is free for calls."""

    __slots__ = ("busy", "calls", "held", "id", "in_flight", "lock", "renewed", "size", "unflushed")

    def __init__(self, lid: str) -> None:
        self.id = lid
        self.held = 0.0
        self.in_flight = 0.0
        self.unflushed = 0.0
        self.calls = 0  # calls started since the last timer tick
        self.size = 2  # calls the next refill asks for; doubles up to `Budget.lease`
        self.renewed = -math.inf
        self.lock = anyio.Lock()
        self.busy = False  # a step with the store is under way

    @property
    def free(self) -> float:
        return self.held - self.in_flight - self.unflushed

    @property
    def idle(self) -> bool:
        return self.held <= 0 and self.in_flight <= 0 and self.unflushed == 0


class Budget:
    """A spend limit in USD per scope over a period, kept in a store shared by processes.

    ```python
    budget = Budget(5.0, period="day", store="sqlite:///budgets.db", per_call_reserve=0.01)
    backend = budgeted(backend, budget, scope="my-app")   # raises BudgetExceededError past $5/day
    ```

    One `Budget` serves any number of scopes (an application, an API key, a schedule), each
    with its own ledger under the same limit and period; several `Budget` objects with different
    limits may share one store.

    The promise: **a budget never overspends by more than the calls already in flight.** A call
    is admitted only if spent + in-flight reservations + its own reserve fits within the limit,
    in one atomic step of the store; so the limit is passed only by what calls admitted earlier
    cost beyond their reserve. With a reserve at least as large as each call's cost, it is
    never passed.

    **Leases.** Used as ``async with budget:`` on a shared store (SQLite, PostgreSQL, Redis), a
    budget reserves room for up to ``lease`` calls at once (a lease: never more than what
    remains, nor more than a tenth of the limit) and hands the calls' reservations out in
    memory; their costs reach the store in one step when the lease runs out, every
    ``flush_interval`` seconds, and on close. The promise is the same (the store holds every
    lease); the price is that another process may be refused while this one holds unused
    lease (it is returned after a ``flush_interval`` without calls), and that a process killed
    holding one loses, like its calls in flight, the costs of the calls it finished since its
    last flush, and holds the lease until ``lease_ttl`` passes.

    Args:
        limit: USD allowed per period and scope.
        period: ``"hour"``, ``"day"``, ``"week"`` (ISO, from Monday), ``"month"`` (calendar
            periods in UTC), ``"total"`` (never resets), or a number of seconds (fixed windows
            from the Unix epoch).
        store: where the ledger lives: a [`BudgetStore`][genfan.cost.BudgetStore] or a URL
            (``sqlite:///path.db`` or a path, ``postgresql://...``, ``redis://...``,
            ``memory://``). Default: ``SQLiteBudgetStore("genfan-budgets.db")``. A store given
            as an object is closed by whoever made it; one built from a URL by `aclose`.
        per_call_reserve: USD to reserve for each call. Default: the most the call may cost
            when the backend's price is known (prompt tokens and ``max_tokens`` at its price),
            else the largest cost this budget has seen for a call (0 at first).
        reservation_ttl: seconds after which a reservation that was never settled (its process
            died) stops counting; longer than your slowest call.
        lease: calls' reserves a lease holds at most (it starts at 2 and doubles with each
            refill); ``None`` or ``0``: no leases, one step with the store per reservation and
            per settlement. Leases are taken only while the budget is entered (``async
            with``), on a store that has them (not `MemoryBudgetStore`: nothing to save).
        lease_ttl: seconds after which a lease that was not renewed (its process died) stops
            counting; each flush renews it.
        flush_interval: seconds between flushes of the costs settled in memory (and renewals
            of the lease; an unused lease is returned at the next flush).
        clock: the Unix time (``time.time``); tests pass their own.

    Raises:
        ConfigurationError: a bad value; the message names the field.
    """

    def __init__(
        self,
        limit: float,
        *,
        period: Period = "total",
        store: BudgetStore | str | Path | None = None,
        per_call_reserve: float | None = None,
        reservation_ttl: float = 600.0,
        lease: int | None = 32,
        lease_ttl: float = 30.0,
        flush_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = _number("Budget", "limit", limit)
        if isinstance(period, str):
            if period not in _CALENDAR:
                raise ConfigurationError(
                    f"Budget.period must be one of {', '.join(_CALENDAR)} or a number of seconds,"
                    f" got {period!r}"
                )
            self.period: Period = period
        else:
            self.period = _number("Budget", "period", period, zero=False)
        self.per_call_reserve = (
            None
            if per_call_reserve is None
            else _number("Budget", "per_call_reserve", per_call_reserve)
        )
        self.reservation_ttl = _number("Budget", "reservation_ttl", reservation_ttl, zero=False)
        if lease is not None and not (
            isinstance(lease, int) and not isinstance(lease, bool) and 0 <= lease <= 100_000
        ):
            raise ConfigurationError(
                f"Budget.lease must be a number of calls in 0..100000 or None, got {lease!r}"
            )
        self.lease = lease or 0
        self.lease_ttl = _number("Budget", "lease_ttl", lease_ttl, zero=False)
        self.flush_interval = _number("Budget", "flush_interval", flush_interval, zero=False)
        if self.lease and self.flush_interval * 2 > self.lease_ttl:
            raise ConfigurationError(
                f"Budget.flush_interval ({self.flush_interval:g}s) must be at most half of"
                f" Budget.lease_ttl ({self.lease_ttl:g}s): each flush renews the lease"
            )
        self._owns_store = not (store is not None and isinstance(store, BudgetStore))
        if store is None:
            self.store: BudgetStore = SQLiteBudgetStore()
        elif isinstance(store, str | Path):
            self.store = budget_store_from_url(store)
        elif isinstance(store, BudgetStore):
            self.store = store
        else:
            raise ConfigurationError(
                "Budget.store must be a BudgetStore or a URL (sqlite:///path.db,"
                f" postgresql://..., redis://..., memory://), got {type(store).__name__}"
            )
        self.clock = clock
        self._largest = 0.0
        self._holders = 0
        # the current window, kept until it ends (computing one costs a few microseconds)
        self._window: tuple[float, float, str, float | None] = (math.inf, -math.inf, "", None)
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:16]
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._leasing = False  # entered, with a flusher running
        self._entered = 0
        self._flusher: anyio.abc.TaskGroup | None = None

    def __repr__(self) -> str:
        return f"Budget({self.limit:g}, period={self.period!r}, store={self.store!r})"

    # -- windows -----------------------------------------------------------------------------

    def window(self, now: float | None = None) -> tuple[str, float | None]:
        """The period window at ``now`` (default: the clock), and when the next one starts."""
        t = self.clock() if now is None else now
        start, end, name, resets_at = self._window
        if not start <= t < end:
            name, start, resets_at = self._compute_window(t)
            self._window = (start, math.inf if resets_at is None else resets_at, name, resets_at)
        return name, resets_at

    def _compute_window(self, t: float) -> tuple[str, float, float | None]:
        """The window at ``t``: its name, its start, and the next one's start."""
        p = self.period
        if not isinstance(p, str):
            n = math.floor(t / p)
            return f"{p:g}s:{n}", n * p, (n + 1) * p
        if p == "total":
            return "total", -math.inf, None
        g = time.gmtime(t)
        day = float(calendar.timegm((g.tm_year, g.tm_mon, g.tm_mday, 0, 0, 0)))
        if p == "hour":
            start = day + g.tm_hour * 3600
            return time.strftime("%Y-%m-%dT%H", g), start, start + 3600.0
        if p == "day":
            return time.strftime("%Y-%m-%d", g), day, day + 86400.0
        if p == "week":
            start = day - g.tm_wday * 86400
            return time.strftime("%G-W%V", g), start, start + 7 * 86400.0
        year, month = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
        start = float(calendar.timegm((g.tm_year, g.tm_mon, 1, 0, 0, 0)))
        return time.strftime("%Y-%m", g), start, float(calendar.timegm((year, month, 1, 0, 0, 0)))

    def _keep_until(self, resets_at: float | None) -> float | None:
        # A window's records outlive it by a day (for reports), then a store may drop them.
        return None if resets_at is None else resets_at + 86400.0

    # -- the ledger --------------------------------------------------------------------------

    def estimate(self, request: ChatRequest, backend: Backend | None = None) -> float:
        """The USD a call reserves: ``per_call_reserve``; else the most the backend may charge
        for the request when its price is known (`estimate_cost`: estimated prompt tokens and
        ``max_tokens`` at the backend's price); else the largest cost this budget has seen for
        one call."""
        if self.per_call_reserve is not None:
            return self.per_call_reserve
        if backend is not None:
            worst = estimate_cost(backend, request)
            if worst is not None and math.isfinite(worst) and worst >= 0:
                return worst
        return self._largest

    async def reserve(self, scope: str = "default", amount: float | None = None) -> Reservation:
        """Hold ``amount`` USD (default ``per_call_reserve``, or 0) of ``scope``'s budget for a
        call about to start; settle it with `settle` once the call is over.

        Raises:
            BudgetExceededError: spent + in-flight reservations + ``amount`` would pass the
                limit; nothing is held.
            CostStoreError: the store could not be used.
        """
        if amount is None:
            amount = self.per_call_reserve or 0.0
        amount = _number("Budget.reserve", "amount", amount)
        _check_scope(scope)
        now = self.clock()
        window, resets_at = self.window(now)
        if self._leasing:
            return await self._reserve_leased(scope, window, resets_at, amount, now)
        rid = f"{self._id_prefix}{next(self._ids)}"
        expires = now + self.reservation_ttl
        ledger = await self.store.reserve(
            scope,
            window,
            reservation=rid,
            amount=amount,
            limit=self.limit,
            expires=expires,
            now=now,
            keep_until=self._keep_until(resets_at),
        )
        if not ledger.admitted:
            raise self._exceeded(scope, window, resets_at, ledger, amount)
        return Reservation(id=rid, scope=scope, window=window, amount=amount, expires=expires)

    def _exceeded(
        self, scope: str, window: str, resets_at: float | None, ledger: Ledger, amount: float
    ) -> BudgetExceededError:
        telemetry.event(
            "budget_exceeded",
            level="warning",
            scope=scope,
            window=window,
            limit=self.limit,
            spent=ledger.spent,
            reserved=ledger.reserved,
            requested=amount,
        )
        resets = (
            "it never resets (period 'total')"
            if resets_at is None
            else f"it resets at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(resets_at))}"
        )
        return BudgetExceededError(
            f"budget exceeded for scope {scope!r}: spent ${ledger.spent:.6g} + ${ledger.reserved:.6g}"
            f" in flight + ${amount:.6g} for this call > ${self.limit:g} per"
            f" {self._period_text()}; {resets}",
            scope=scope,
            limit=self.limit,
            spent=ledger.spent,
            reserved=ledger.reserved,
            requested=amount,
            period=self._period_text(),
            resets_at=resets_at,
        )

    # -- leases ------------------------------------------------------------------------------

    async def _reserve_leased(
        self, scope: str, window: str, resets_at: float | None, amount: float, now: float
    ) -> Reservation:
        key = (scope, window)
        while True:
            lease = self._leases.get(key)
            if lease is None:
                lease = self._leases[key] = _Lease(f"{self._id_prefix}L{next(self._ids)}")
            if not lease.busy and self._fits(lease, amount):
                break  # the common case: no await
            async with lease.lock:  # one refill at a time; the calls that need it wait
                if self._leases.get(key) is not lease:
                    continue  # given back to the store while this call waited
                if not self._fits(lease, amount):
                    want = min(lease.size * amount, max(amount, self.limit / 10))
                    ledger = await self._step(lease, scope, window, resets_at, want, amount)
                    if not ledger.admitted:
                        raise self._exceeded(scope, window, resets_at, ledger, amount)
                    lease.size = min(lease.size * 2, self.lease)
                break
        lease.in_flight += amount
        lease.calls += 1
        return Reservation(
            id=lease.id, scope=scope, window=window, amount=amount,
            expires=now + self.lease_ttl, lease=lease.id,
        )  # fmt: skip

    @staticmethod
    def _fits(lease: _Lease, amount: float) -> bool:
        free = lease.free
        return free > EPSILON and free - amount >= -EPSILON

    async def _step(
        self,
        lease: _Lease,
        scope: str,
        window: str,
        resets_at: float | None,
        want: float,
        least: float | None,
    ) -> Ledger:
        """One step with the store (the caller holds ``lease.lock``): add the costs settled
        since the last one, hold the lease's calls in flight plus ``want`` free."""
        hold, cost = lease.in_flight, lease.unflushed
        now = self.clock()
        lease.busy = True
        try:
            # shielded: a step cut off after the store took it would count its costs twice
            with anyio.CancelScope(shield=True):
                ledger: Ledger = await self.store.lease(  # type: ignore[attr-defined]
                    scope,
                    window,
                    lease=lease.id,
                    cost=cost,
                    hold=hold,
                    want=want,
                    least=least,
                    limit=self.limit,
                    expires=now + self.lease_ttl,
                    now=now,
                    keep_until=self._keep_until(resets_at),
                )
        finally:
            lease.busy = False
        # calls that ended meanwhile stay in `in_flight - hold` and `unflushed - cost`
        lease.unflushed -= cost
        lease.held = hold + ledger.granted
        lease.renewed = now
        return ledger

    async def _flush(self, *, give_back: bool = False) -> None:
        """Send the costs settled in memory, renew the leases; return those unused since the
        last flush (all of them with ``give_back``)."""
        current, resets_at = self.window()
        for (scope, window), lease in list(self._leases.items()):
            async with lease.lock:
                idle = give_back or window != current or (lease.calls == 0 and lease.in_flight <= 0)
                stale = self.clock() - lease.renewed >= self.lease_ttl / 3
                # (a lease that never got room, its first step refused or failed: nothing)
                if lease.unflushed or (stale and not lease.idle) or (idle and lease.held > 0):
                    want = 0.0 if idle else max(0.0, lease.free)
                    keep = resets_at if window == current else None
                    await self._step(lease, scope, window, keep, want, None)
                    if idle:
                        lease.size = 2
                lease.calls = 0
                if lease.idle:
                    self._leases.pop((scope, window), None)

    async def _flush_every_interval(self) -> None:
        while True:
            await anyio.sleep(self.flush_interval)
            try:
                await self._flush()
            except CostStoreError as exc:  # the next flush tries again; the lease holds the room
                telemetry.event("budget_flush_failed", level="error", error=str(exc))

    async def settle(self, reservation: Reservation, cost: float | None) -> None:
        """Record the call's actual ``cost`` (USD) and drop its reservation.

        ``None`` (the backend knows no price) records the reserved amount instead: an unknown
        cost is counted as its estimate, never as free.

        Raises:
            CostStoreError: the store could not be used (the reservation then expires after
                ``reservation_ttl``).
        """
        if cost is None:
            telemetry.event(
                "budget_cost_unknown", level="warning", scope=reservation.scope,
                recorded=reservation.amount,
            )  # fmt: skip
            cost = reservation.amount
        elif not (math.isfinite(cost) and cost >= 0):
            cost = reservation.amount
        else:
            self._largest = max(self._largest, cost)
        if reservation.lease is not None:
            await self._settle_in_lease(reservation, cost)
            return
        await self.store.settle(
            reservation.scope,
            reservation.window,
            reservation=reservation.id,
            cost=cost,
            keep_until=None,  # the reservation already told the store how long to keep it
        )

    async def release(self, reservation: Reservation) -> None:
        """Drop a reservation without recording any spending (the call was never billed)."""
        if reservation.lease is not None:
            await self._settle_in_lease(reservation, 0.0)
            return
        await self.store.settle(
            reservation.scope, reservation.window, reservation=reservation.id, cost=0.0,
            keep_until=None,
        )  # fmt: skip

    async def _settle_in_lease(self, reservation: Reservation, cost: float) -> None:
        lease = self._leases.get((reservation.scope, reservation.window))
        if lease is None or lease.id != reservation.lease:
            # the lease was forgotten by `reset`: the cost is recorded on its own
            if cost:
                await self.store.settle(
                    reservation.scope, reservation.window, reservation=reservation.id,
                    cost=cost, keep_until=None,
                )  # fmt: skip
            return
        lease.in_flight -= reservation.amount
        lease.unflushed += cost
        # Sent at once: closed while the call was in flight (no flusher left), or a call that
        # cost more than it reserved (its overrun would be hidden from the other processes
        # until the next flush; sent now, only the calls in flight can pass the limit).
        if not self._leasing or cost > reservation.amount + EPSILON:
            async with lease.lock:
                if self._leases.get((reservation.scope, reservation.window)) is not lease:
                    return  # a flush meanwhile sent the cost and dropped the idle lease
                want = max(0.0, lease.free) if self._leasing else 0.0
                await self._step(lease, reservation.scope, reservation.window, None, want, None)
                if lease.idle:
                    self._leases.pop((reservation.scope, reservation.window), None)

    async def status(self, scope: str = "default") -> BudgetStatus:
        """Where ``scope`` stands in the current period (this process's costs settled in memory
        are sent first; its unused lease is not counted as reserved)."""
        _check_scope(scope)
        now = self.clock()
        window, resets_at = self.window(now)
        lease = self._leases.get((scope, window))
        free = 0.0
        if lease is not None:
            async with lease.lock:
                await self._step(lease, scope, window, resets_at, max(0.0, lease.free), None)
                free = max(0.0, lease.free)
        ledger = await self.store.ledger(scope, window, now=now)
        return BudgetStatus(
            scope=scope,
            window=window,
            limit=self.limit,
            spent=ledger.spent,
            reserved=max(0.0, ledger.reserved - free),
            resets_at=resets_at,
        )

    async def reset(self, scope: str = "default") -> None:
        """Forget ``scope``'s spending and reservations in the current period."""
        _check_scope(scope)
        window, _ = self.window()
        self._leases.pop((scope, window), None)
        await self.store.reset(scope, window)

    def _period_text(self) -> str:
        return self.period if isinstance(self.period, str) else f"{self.period:g}s"

    # -- lifetime ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send the costs settled in memory and return the leases, then close the store when
        this budget built it (from a URL or the default)."""
        self._leasing = False
        try:
            if self._leases:
                with anyio.CancelScope(shield=True):
                    await self._flush(give_back=True)
        finally:
            if self._owns_store:
                await self.store.aclose()

    async def __aenter__(self) -> Budget:
        """Start leasing (on a store that has leases, with ``lease`` set): a task flushes
        every ``flush_interval`` until the block ends, which closes the budget (`aclose`).

        Re-entrant: nested blocks share one flusher; the outermost one's end stops it."""
        await self._start_leasing()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        last = self._entered == 1
        try:
            await self._stop_leasing()
        finally:
            if last:
                await self.aclose()

    async def _start_leasing(self) -> None:
        """One more user of leases (a block, or a backend opened); the first starts the
        flusher, in the caller's task (the last `_stop_leasing` must run in that task too)."""
        self._entered += 1
        if self._entered == 1 and self.lease and callable(getattr(self.store, "lease", None)):
            flusher = anyio.create_task_group()
            await flusher.__aenter__()
            flusher.start_soon(self._flush_every_interval)
            self._flusher, self._leasing = flusher, True

    async def _stop_leasing(self) -> bool:
        """A user of leases is done; the last stops the flusher, sends the costs settled in
        memory and returns the leases (the store stays open). Whether it was the last."""
        if self._entered <= 0:
            return False
        self._entered -= 1
        if self._entered > 0:
            return False
        flusher, self._flusher = self._flusher, None
        self._leasing = False
        if flusher is not None:
            flusher.cancel_scope.cancel()
            await flusher.__aexit__(None, None, None)
        if self._leases:
            with anyio.CancelScope(shield=True):
                await self._flush(give_back=True)
        return True

    def _hold(self) -> None:
        """One more backend holds this budget (a budget built from the TOML config)."""
        self._holders += 1

    async def _release(self) -> None:
        """A holder is done; the last one closes the budget."""
        self._holders -= 1
        if self._holders <= 0:
            await self.aclose()


def _check_scope(scope: object) -> None:
    if not isinstance(scope, str) or not scope or len(scope) > 200:
        raise ConfigurationError(
            f"a budget scope must be a non-empty string (<= 200), got {scope!r}"
        )


class BudgetedBackend(WrappedBackend):
    """A backend whose every call is charged to a budget's scope; built by `budgeted`.

    Before a call it reserves the budget's estimate (raising
    [`BudgetExceededError`][genfan.BudgetExceededError], the call not sent, when it does not
    fit); after the call it records the completion's ``usage.cost``. A failed call releases its
    reservation (nothing is recorded); a cancelled one records its reserve, since the provider
    may have billed tokens nobody saw.

    Attributes:
        inner: the wrapped backend.
        budget: the budget.
        scope: the scope charged.
    """

    def __init__(self, inner: Backend, budget: Budget, *, scope: str = "default") -> None:
        if not isinstance(budget, Budget):
            raise ConfigurationError(
                f"budgeted() takes a Budget(limit, period=..., store=...), not {type(budget).__name__}"
            )
        _check_scope(scope)
        self.inner = inner
        self.budget = budget
        self.scope = scope

    async def _reserve(self, request: ChatRequest) -> Reservation:
        try:
            return await self.budget.reserve(self.scope, self.budget.estimate(request, self.inner))
        except BudgetExceededError as exc:
            exc.backend = self.name
            raise

    async def _finish(self, reservation: Reservation, completion: Completion | None) -> None:
        with anyio.CancelScope(shield=True):
            if completion is None:
                await self.budget.release(reservation)
            else:
                await self.budget.settle(reservation, completion.usage.cost)

    async def complete(self, request: ChatRequest) -> Completion:
        reservation = await self._reserve(request)
        try:
            completion = await self.inner.complete(request)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self.budget.settle(reservation, reservation.amount)
            raise
        except BaseException:
            await self._finish(reservation, None)
            raise
        await self._finish(reservation, completion)
        return completion

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        reservation = await self._reserve(request)
        completion: Completion | None = None
        settled = False
        try:
            events = self.inner.stream(request)
            try:
                async for event in events:
                    if isinstance(event, StreamEnd):
                        completion = event.completion
                    yield event
            finally:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()
        except anyio.get_cancelled_exc_class():
            settled = True
            with anyio.CancelScope(shield=True):
                await self.budget.settle(reservation, reservation.amount)
            raise
        except GeneratorExit:
            # The consumer stopped early: the provider billed what it generated, unknown here.
            settled = True
            with anyio.CancelScope(shield=True):
                await self.budget.settle(
                    reservation, completion.usage.cost if completion else reservation.amount
                )
            raise
        finally:
            if not settled:
                await self._finish(reservation, completion)

    async def aclose(self) -> None:
        """Closes nothing: whoever made the backend and the budget closes them."""
        return None

    def __repr__(self) -> str:
        return f"BudgetedBackend({self.inner!r}, {self.budget!r}, scope={self.scope!r})"


def budgeted(backend: Backend, budget: Budget, *, scope: str = "default") -> BudgetedBackend:
    """Charge every call of ``backend`` to ``budget``'s ``scope``.

    Put it outside the guard stack (``guard(backend, budget=...)`` does), so a call is reserved
    once however many attempts its retries make.

    Raises:
        ConfigurationError: ``budget`` is not a [`Budget`][genfan.cost.Budget], or a bad scope.
    """
    return BudgetedBackend(backend, budget, scope=scope)


class BudgetConfig(BaseModel):
    """One ``[budgets.NAME]`` table: a spend budget, built once per configuration build and
    named by every backend charged to it (``budget = "NAME"``).

    Example:
        ```toml
        [budgets.daily]
        limit = 5.0                 # USD per period
        period = "day"              # hour | day | week | month | total | seconds
        store = "sqlite:///genfan-budgets.db"   # or store_env = "GENFAN_BUDGET_URL"
        per_call_reserve = 0.01     # USD held per call in flight
        lease = 32                  # calls' reserves a lease holds (0: no leases)
        lease_ttl = 30.0            # seconds a lease of a dead process still counts
        flush_interval = 1.0        # seconds between flushes of the costs to the store

        [backends.gpt]
        type = "openai"
        budget = "daily"
        ```

    ``scope`` (default: the table's name) is the ledger the backends share. Set ``store_env``
    (an environment variable holding the URL: keeps a password out of the file) or ``store``,
    not both; neither: ``sqlite:///genfan-budgets.db``.

    Leases (``lease``, ``lease_ttl``, ``flush_interval``: see `Budget`) are taken while a
    backend charged to the budget, or the fan-out built with it, is open (``async with``);
    a backend used without being opened makes one store step per reservation and settlement.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    limit: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    period: (
        Literal["hour", "day", "week", "month", "total"]
        | Annotated[float, Field(gt=0, allow_inf_nan=False)]
    ) = "total"
    store: str | None = None
    store_env: Annotated[str, Field(min_length=1)] | None = None
    per_call_reserve: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    reservation_ttl: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 600.0
    scope: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    lease: Annotated[int, Field(ge=0, le=100_000, strict=True)] = 32
    lease_ttl: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 30.0
    flush_interval: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0

    @model_validator(mode="after")
    def _one_store(self) -> BudgetConfig:
        check_store_fields(self.store, self.store_env, budget_store_from_url)
        if self.lease and self.flush_interval * 2 > self.lease_ttl:
            raise ValueError(
                f"flush_interval ({self.flush_interval:g}s) must be at most half of lease_ttl"
                f" ({self.lease_ttl:g}s): each flush renews the lease"
            )
        return self

    def build(self) -> Budget:
        """The budget (no connection is opened until it is used).

        Raises:
            ConfigurationError: ``store_env`` is not set, or holds a bad URL.
        """
        url = store_url(
            self.store,
            self.store_env,
            what="the budget store's URL (sqlite:///..., postgresql://..., redis://...)",
        )
        return Budget(
            self.limit,
            period=self.period,
            store=url,
            per_call_reserve=self.per_call_reserve,
            reservation_ttl=self.reservation_ttl,
            lease=self.lease,
            lease_ttl=self.lease_ttl,
            flush_interval=self.flush_interval,
        )
