"""Budget leases: a budget in use on a shared store holds room for several calls in one
reservation, hands the calls' reservations out in memory, and settles their costs in one step;
the store's `lease` step (real SQLite, PostgreSQL, Redis), refills, what remains granted, the
return on close, the timer flush, expiry after SIGKILL, and the path with leases off.

PostgreSQL (127.0.0.1:5432, db ``test``) and Redis (127.0.0.1:6379) tests are skipped without
them (failed when GENFAN_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from genfan import (
    BackendConnectionError,
    BudgetExceededError,
    ChatRequest,
    ConfigurationError,
    Usage,
)
from genfan.cost import (
    Budget,
    BudgetStore,
    Ledger,
    PostgresBudgetStore,
    RedisBudgetStore,
    SQLiteBudgetStore,
    budgeted,
)
from genfan.testing import Fail, FakeBackend, Reply
from tests._services import port_open, require_service

ROOT = Path(__file__).resolve().parents[1]
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgres", "redis"])
def shared_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def store_for(kind: str, tmp_path: Path, tag: str) -> Any:
    if kind == "sqlite":
        return SQLiteBudgetStore(tmp_path / "budgets.db")
    if kind == "postgres":
        require_service("PostgreSQL", port_open("127.0.0.1", 5432), "nothing on 5432")
        return PostgresBudgetStore(PG_DSN, prefix=f"t{tag}_")
    require_service("Redis", port_open("127.0.0.1", 6379), "nothing on 6379")
    return RedisBudgetStore("redis://127.0.0.1:6379/0", key_prefix=f"genfan-test:{tag}:")


def url_for(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'budgets.db'}"
    if kind == "postgres":
        require_service("PostgreSQL", port_open("127.0.0.1", 5432), "nothing on 5432")
        return PG_DSN
    require_service("Redis", port_open("127.0.0.1", 6379), "nothing on 6379")
    return "redis://127.0.0.1:6379/0"


async def drop(store: BudgetStore) -> None:
    if isinstance(store, PostgresBudgetStore):
        await store.drop()
    await store.aclose()


class Counting(SQLiteBudgetStore):
    """A real SQLite store that counts its steps."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.steps: dict[str, int] = {"reserve": 0, "settle": 0, "lease": 0}

    async def reserve(self, scope: str, window: str, **kw: Any) -> Ledger:
        self.steps["reserve"] += 1
        return await super().reserve(scope, window, **kw)

    async def settle(self, scope: str, window: str, **kw: Any) -> None:
        self.steps["settle"] += 1
        await super().settle(scope, window, **kw)

    async def lease(self, scope: str, window: str, **kw: Any) -> Ledger:
        self.steps["lease"] += 1
        return await super().lease(scope, window, **kw)


# -- the store's lease step ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_shared_store_leases_the_same_way(shared_kind: str, tmp_path: Path) -> None:
    store = store_for(shared_kind, tmp_path, uuid.uuid4().hex[:12])
    args: dict[str, Any] = {"limit": 1.0, "now": 100.0, "expires": 200.0, "keep_until": None}
    try:
        # a full lease when there is room: 0.1 in flight + 0.3 free
        a = await store.lease(
            "app", "w", lease="A", cost=0.0, hold=0.1, want=0.3, least=0.1, **args
        )
        assert (a.admitted, a.granted, a.spent, a.reserved) == (
            True,
            pytest.approx(0.3),
            0.0,
            pytest.approx(0.1),
        )
        other = await store.reserve("app", "w", reservation="r", amount=0.2, **args)
        assert other.reserved == pytest.approx(0.4)  # the lease counts as reserved for others
        # A settles 0.1 and asks again: its own old lease is not counted against it
        a = await store.lease(
            "app", "w", lease="A", cost=0.1, hold=0.0, want=0.5, least=0.1, **args
        )
        assert (a.admitted, a.spent, a.granted) == (True, pytest.approx(0.1), pytest.approx(0.5))
        # B gets what remains (1 - 0.1 spent - 0.2 - 0.5 = 0.2), less than it wanted
        b = await store.lease(
            "app", "w", lease="B", cost=0.0, hold=0.0, want=0.4, least=0.1, **args
        )
        assert (b.admitted, b.granted, b.reserved) == (True, pytest.approx(0.2), pytest.approx(0.7))
        # nothing left: a call that needs 0.1 is refused, and the refused lease holds nothing
        c = await store.lease(
            "app", "w", lease="C", cost=0.0, hold=0.0, want=0.4, least=0.1, **args
        )
        assert (c.admitted, c.granted) == (False, 0.0)
        ledger = await store.ledger("app", "w", now=100.0)
        assert ledger.spent == pytest.approx(0.1) and ledger.reserved == pytest.approx(0.9)
        # a flush (no call waiting) gives A's lease back: want 0, nothing in flight
        a = await store.lease(
            "app", "w", lease="A", cost=0.25, hold=0.0, want=0.0, least=None, **args
        )
        assert a.admitted and a.granted == 0.0
        ledger = await store.ledger("app", "w", now=100.0)
        assert ledger.spent == pytest.approx(0.35) and ledger.reserved == pytest.approx(0.4)
        # a lease not renewed by its expiry (its process died) no longer counts
        assert (await store.ledger("app", "w", now=250.0)).reserved == 0.0
        late = {**args, "now": 250.0, "expires": 300.0}
        d = await store.lease(
            "app", "w", lease="D", cost=0.0, hold=0.0, want=0.6, least=0.1, **late
        )
        assert d.admitted and d.granted == pytest.approx(0.6) and d.reserved == 0.0
    finally:
        await store.reset("app", "w")
        await drop(store)


# -- a budget in use -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_lease_serves_many_calls_and_refills_in_one_step(tmp_path: Path) -> None:
    store = Counting(tmp_path / "b.db")
    async with Budget(10.0, store=store, per_call_reserve=0.01, lease=8) as budget:
        for _ in range(20):
            hold = await budget.reserve("app")
            assert hold.lease is not None
            await budget.settle(hold, 0.004)
        # 20 calls, no per-call step: refills of 2, 4, 8, 8 calls' reserves
        assert store.steps["reserve"] == store.steps["settle"] == 0
        assert 1 <= store.steps["lease"] <= 6
        status = await budget.status("app")  # sends what was settled in memory first
        assert status.spent == pytest.approx(20 * 0.004)
        assert status.reserved == 0.0  # its own unused lease is not "in flight"
    await store.aclose()


@pytest.mark.anyio
async def test_a_lease_is_returned_on_close_and_its_costs_recorded(
    shared_kind: str, tmp_path: Path
) -> None:
    store = store_for(shared_kind, tmp_path, uuid.uuid4().hex[:12])
    other = Budget(1.0, store=store, lease=None)  # another process's view
    try:
        async with Budget(1.0, store=store, per_call_reserve=0.01, lease=16) as budget:
            for _ in range(3):
                await budget.settle(await budget.reserve("app"), 0.01)
            seen = await other.status("app")
            # the others see the lease held (more than the calls made), spent not yet flushed
            assert seen.spent + seen.reserved >= 0.03 - 1e-9
            assert seen.spent + seen.reserved > 0.03
        seen = await other.status("app")
        assert seen.spent == pytest.approx(0.03) and seen.reserved == 0.0
    finally:
        await other.reset("app")
        await drop(store)


@pytest.mark.anyio
@pytest.mark.parametrize("reserve", [0.01, 0.005])
async def test_concurrent_calls_on_one_lease_keep_the_bound(reserve: float, tmp_path: Path) -> None:
    # 10 tasks call until refused; every 5th call fails (released, nothing recorded)
    script: list[Reply | Fail] = [
        Reply(text="ok", usage=Usage(input_tokens=1, cost=0.01), latency=0.002)
    ] * 4 + [Fail(error=BackendConnectionError, latency=0.001)]
    inner = FakeBackend("b", script)
    store = SQLiteBudgetStore(tmp_path / "b.db")
    limit, tasks = 0.5, 10
    async with Budget(limit, store=store, per_call_reserve=reserve, lease=8) as budget:
        backend = budgeted(inner, budget, scope="app")
        costs: list[float] = []

        async def caller() -> None:
            while True:
                try:
                    completion = await backend.complete(ChatRequest.from_prompt("hi"))
                except BackendConnectionError:
                    continue
                except BudgetExceededError:
                    return
                assert completion.usage.cost is not None
                costs.append(completion.usage.cost)

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(caller)
    status = await Budget(limit, store=store, lease=0).status("app")
    assert status.spent == pytest.approx(sum(costs)) and status.reserved == 0.0
    # passed by no more than the calls in flight cost beyond their reserve; at the cost, never
    assert status.spent <= limit + tasks * (0.01 - reserve) + 1e-9
    assert status.spent + reserve > limit  # used up, not refused early
    assert inner.max_in_flight > 1
    await store.aclose()


@pytest.mark.anyio
async def test_the_timer_flush_makes_spend_visible_to_other_processes(tmp_path: Path) -> None:
    store = SQLiteBudgetStore(tmp_path / "b.db")
    other = Budget(1.0, store=store, lease=0)
    async with Budget(1.0, store=store, per_call_reserve=0.05, flush_interval=0.02) as budget:
        await budget.settle(await budget.reserve("app"), 0.02)
        with anyio.fail_after(10):
            # (another process's store: no event to wait on, it is polled)
            while (await other.status("app")).spent != pytest.approx(0.02):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        # and with no call since, the unused lease goes back to the store
        with anyio.fail_after(10):
            while (await other.status("app")).reserved > 0:  # noqa: ASYNC110
                await anyio.sleep(0.01)
    await store.aclose()


@pytest.mark.anyio
async def test_less_than_a_full_lease_is_granted_then_the_call_is_refused(
    tmp_path: Path,
) -> None:
    store = SQLiteBudgetStore(tmp_path / "b.db")
    async with Budget(10.0, store=store, lease=0) as before:  # spent elsewhere, no lease
        await before.settle(await before.reserve("app", 9.65), 9.65)
    async with Budget(10.0, store=store, per_call_reserve=0.1, lease=8) as budget:
        for _ in range(3):  # a lease of 0.2, then 0.15 of the 0.4 wanted: three calls
            await budget.settle(await budget.reserve("app"), 0.1)
        with pytest.raises(BudgetExceededError, match="budget exceeded for scope 'app'") as err:
            await budget.reserve("app")
        assert err.value.spent == pytest.approx(9.95) and err.value.requested == 0.1
    async with Budget(10.0, store=store, lease=0) as after:
        status = await after.status("app")
    assert status.spent == pytest.approx(9.95) and status.reserved == 0.0
    await store.aclose()


@pytest.mark.anyio
async def test_leases_off_or_not_entered_step_with_the_store_per_call(tmp_path: Path) -> None:
    store = Counting(tmp_path / "b.db")
    async with Budget(1.0, store=store, per_call_reserve=0.01, lease=None) as off:
        for _ in range(3):
            await off.settle(await off.reserve("app"), 0.01)
    plain = Budget(1.0, store=store, per_call_reserve=0.01)  # used without `async with`
    for _ in range(2):
        hold = await plain.reserve("app")
        assert hold.lease is None
        await plain.settle(hold, 0.01)
    assert store.steps == {"reserve": 5, "settle": 5, "lease": 0}
    assert (await plain.status("app")).spent == pytest.approx(0.05)
    await store.aclose()


@pytest.mark.anyio
async def test_a_call_in_flight_at_close_is_recorded_when_it_ends(tmp_path: Path) -> None:
    store = SQLiteBudgetStore(tmp_path / "b.db")
    async with Budget(1.0, store=store, per_call_reserve=0.1) as budget:
        hold = await budget.reserve("app")
    other = Budget(1.0, store=store, lease=0)
    assert (await other.status("app")).reserved == pytest.approx(0.1)  # still held
    await budget.settle(hold, 0.07)
    status = await other.status("app")
    assert status.spent == pytest.approx(0.07) and status.reserved == 0.0
    await store.aclose()


def test_bad_lease_settings_name_the_field() -> None:
    for kwargs, field in [
        ({"lease": -1}, "Budget.lease"),
        ({"lease": True}, "Budget.lease"),
        ({"lease_ttl": 0}, "Budget.lease_ttl"),
        ({"flush_interval": -1.0}, "Budget.flush_interval"),
        ({"flush_interval": 6.0, "lease_ttl": 10.0}, "at most half of Budget.lease_ttl"),
    ]:
        with pytest.raises(ConfigurationError, match=field):
            Budget(1.0, store="memory://", **kwargs)


# -- a process killed holding a lease ------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    import anyio
    from genfan.cost import Budget

    async def main():
        async with Budget(1.0, store=sys.argv[1], per_call_reserve=0.05, lease_ttl=5.0) as b:
            await b.reserve(sys.argv[2])  # a call in flight, in a lease of two
            print("leased", flush=True)
            await anyio.sleep(600)

    anyio.run(main)
    """
)


def start_holder(url: str, scope: str) -> subprocess.Popen[str]:
    """A process that takes a lease on ``scope`` (a call in flight) and says so."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, scope],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "leased"
    except BaseException:
        proc.kill()
        raise
    return proc


@pytest.mark.anyio
async def test_a_killed_process_lease_expires_after_its_ttl(
    shared_kind: str, tmp_path: Path
) -> None:
    url = url_for(shared_kind, tmp_path)
    scope = f"app-{uuid.uuid4().hex}"
    async with Budget(1.0, store=url, lease=0) as here:
        await here.settle(await here.reserve(scope, 0.85), 0.85)
        proc = start_holder(url, scope)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # the dead process's lease (0.1) still holds: 0.85 + 0.1 + 0.1 > 1
        with pytest.raises(BudgetExceededError):
            await here.reserve(scope, 0.1)
        assert (await here.status(scope)).reserved == pytest.approx(0.1)
    # past its lease_ttl (5 s), it no longer counts: the others spend it
    later = Budget(1.0, store=url, lease=0, clock=lambda: time.time() + 6.0)
    async with later:
        hold = await later.reserve(scope, 0.1)
        await later.settle(hold, 0.1)
        status = await later.status(scope)
        assert status.spent == pytest.approx(0.95) and status.reserved == 0.0
        await later.reset(scope)
