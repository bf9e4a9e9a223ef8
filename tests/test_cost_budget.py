"""Budgets: a spend limit per scope over a period, reserved before each call and settled with
the call's cost; the same ledger semantics on every store (memory, a real SQLite file, a real
PostgreSQL and Redis), period windows on an injected clock, streams, failures, cancellation,
the guard stack, and misuse.

PostgreSQL (127.0.0.1:5432, db ``test``) and Redis (127.0.0.1:6379) tests are skipped without
them (failed when GENFAN_REQUIRE_SERVICES=1). Each test uses its own table prefix or key prefix.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from genfan import (
    BackendConnectionError,
    BudgetExceededError,
    ChatRequest,
    ConfigurationError,
    GenfanError,
    StreamEnd,
    Usage,
    parse_config,
)
from genfan.cost import (
    Budget,
    BudgetStore,
    CostStoreError,
    MemoryBudgetStore,
    PostgresBudgetStore,
    RedisBudgetStore,
    SQLiteBudgetStore,
    budget_store_from_url,
    budgeted,
)
from genfan.resilience import RetryPolicy, guard
from genfan.testing import Fail, FakeBackend, Reply, capture_events, set_testing
from tests._services import port_open, require_service

PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
REQ = ChatRequest.from_prompt("hi")


def priced(cost: float | None, name: str = "b", **kw: Any) -> FakeBackend:
    text = "one two three"
    return FakeBackend(name, [Reply(text=text, usage=Usage(input_tokens=1, cost=cost), **kw)])


class Clock:
    def __init__(self, t: float = 1_765_000_000.0) -> None:  # 2025-12-06T05:46:40Z
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- the stores ----------------------------------------------------------------------------------


async def make_store(kind: str, tmp_path: Path) -> BudgetStore:
    if kind == "memory":
        return MemoryBudgetStore()
    if kind == "sqlite":
        return SQLiteBudgetStore(tmp_path / "budgets.db")
    if kind == "postgres":
        require_service("PostgreSQL", port_open("127.0.0.1", 5432), "nothing on 5432")
        return PostgresBudgetStore(PG_DSN, prefix=f"t{uuid.uuid4().hex[:12]}_")
    require_service("Redis", port_open("127.0.0.1", 6379), "nothing on 6379")
    return RedisBudgetStore(REDIS_URL, key_prefix=f"genfan-test:{uuid.uuid4().hex}:")


async def drop(store: BudgetStore) -> None:
    if isinstance(store, PostgresBudgetStore):
        await store.drop()
    await store.aclose()


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_every_store_keeps_the_same_ledger(store_kind: str, tmp_path: Path) -> None:
    store = await make_store(store_kind, tmp_path)
    try:
        args = {"limit": 1.0, "now": 100.0, "keep_until": None}
        a = await store.reserve("app", "w", reservation="a", amount=0.4, expires=200.0, **args)
        assert (a.admitted, a.spent, a.reserved) == (True, 0.0, 0.0)
        b = await store.reserve("app", "w", reservation="b", amount=0.4, expires=200.0, **args)
        assert (b.admitted, b.reserved) == (True, pytest.approx(0.4))
        # 0.8 held: another 0.4 would pass the limit
        c = await store.reserve("app", "w", reservation="c", amount=0.4, expires=200.0, **args)
        assert not c.admitted and c.reserved == pytest.approx(0.8)
        # other scopes and windows have their own ledgers
        other = await store.reserve(
            "key-2", "w", reservation="d", amount=0.9, expires=200.0, **args
        )
        assert other.admitted
        assert (
            await store.reserve("app", "w2", reservation="e", amount=0.9, expires=200.0, **args)
        ).admitted
        await store.settle("app", "w", reservation="a", cost=0.25, keep_until=None)
        ledger = await store.ledger("app", "w", now=100.0)
        assert ledger.spent == pytest.approx(0.25) and ledger.reserved == pytest.approx(0.4)
        # a reservation past its expiry (its process died) no longer counts
        assert (await store.ledger("app", "w", now=250.0)).reserved == 0.0
        late = {**args, "now": 250.0}
        d = await store.reserve("app", "w", reservation="f", amount=0.75, expires=400.0, **late)
        assert d.admitted and d.reserved == 0.0 and d.spent == pytest.approx(0.25)
        await store.settle("app", "w", reservation="f", cost=0.75, keep_until=None)
        # spent == limit: even a reserve of 0 is refused
        z = await store.reserve("app", "w", reservation="g", amount=0.0, expires=400.0, **late)
        assert not z.admitted and z.spent == pytest.approx(1.0)
        await store.reset("app", "w")
        assert (await store.ledger("app", "w", now=250.0)).spent == 0.0
        assert (await store.ledger("key-2", "w", now=100.0)).reserved == pytest.approx(0.9)
    finally:
        await drop(store)


# -- charging calls ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_calls_are_charged_until_the_limit_then_refused_unsent() -> None:
    budget = Budget(0.05, store=MemoryBudgetStore(), per_call_reserve=0.01)
    inner = priced(0.01)
    backend = budgeted(inner, budget, scope="app")
    for _ in range(5):
        await backend.complete(REQ)
    with capture_events() as events, pytest.raises(BudgetExceededError) as info:
        await backend.complete(REQ)
    assert len(inner.calls) == 5  # the sixth was never sent
    err = info.value
    assert isinstance(err, GenfanError) and err.backend == "b" and err.scope == "app"
    assert (err.limit, err.spent, err.requested) == (0.05, pytest.approx(0.05), 0.01)
    assert err.resets_at is None and err.retry_after is None  # a total budget never resets
    assert not err.retryable and not err.counts_as_failure
    assert "scope 'app'" in str(err) and "never resets" in str(err)
    assert [e["event"] for e in events] == ["budget_exceeded"]
    status = await budget.status("app")
    assert status.spent == pytest.approx(0.05) and status.reserved == 0 and status.remaining == 0
    assert (await budget.status("other")).remaining == 0.05


@pytest.mark.anyio
async def test_failed_calls_release_and_unknown_costs_count_as_the_reserve() -> None:
    budget = Budget(1.0, store=MemoryBudgetStore(), per_call_reserve=0.2)
    failing = budgeted(FakeBackend("f", [Fail(error=BackendConnectionError)]), budget)
    with pytest.raises(BackendConnectionError):
        await failing.complete(REQ)
    assert (await budget.status()).spent == 0.0 and (await budget.status()).reserved == 0.0
    with capture_events() as events:
        await budgeted(priced(None), budget).complete(REQ)  # no price: counted as 0.2
    assert (await budget.status()).spent == pytest.approx(0.2)
    assert events[0]["event"] == "budget_cost_unknown" and events[0]["recorded"] == 0.2


@pytest.mark.anyio
async def test_the_reserve_holds_the_budget_while_calls_are_in_flight() -> None:
    budget = Budget(0.3, store=MemoryBudgetStore(), per_call_reserve=0.1)
    slow = budgeted(priced(0.1, latency=0.2), budget)
    results: list[str] = []

    async def one() -> None:
        try:
            await slow.complete(REQ)
            results.append("ok")
        except BudgetExceededError:
            results.append("refused")

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
        await anyio.sleep(0.05)
        assert (await budget.status()).reserved == pytest.approx(0.3)  # three in flight
    assert sorted(results) == ["ok"] * 3 + ["refused"] * 2
    assert (await budget.status()).spent == pytest.approx(0.3)


@pytest.mark.anyio
async def test_without_a_reserve_the_overshoot_is_bounded_by_the_calls_in_flight() -> None:
    # A reserve of 0 (no price known, nothing seen yet): 4 calls start at once, all admitted,
    # and the limit is passed by at most what those in-flight calls cost.
    budget = Budget(0.15, store=MemoryBudgetStore())
    backend = budgeted(priced(0.1, latency=0.05), budget)
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(backend.complete, REQ)
    spent = (await budget.status()).spent
    assert spent == pytest.approx(0.4) and spent <= 0.15 + 4 * 0.1
    # from now on the largest cost seen is the reserve: nothing more fits
    with pytest.raises(BudgetExceededError):
        await backend.complete(REQ)
    assert budget.estimate(REQ) == 0.1


@pytest.mark.anyio
async def test_the_estimate_comes_from_the_backends_price_and_max_tokens() -> None:
    class PricedBackend(FakeBackend):
        def estimate_cost(self, request: ChatRequest) -> float:
            return (request.max_tokens or 0) * 1e-3

    budget = Budget(1.0, store=MemoryBudgetStore())
    request = ChatRequest.from_prompt("hi", max_tokens=300)
    assert budget.estimate(request, PricedBackend("p")) == pytest.approx(0.3)
    assert budget.estimate(request, guard(PricedBackend("p"))) == pytest.approx(0.3)
    assert Budget(1.0, store=MemoryBudgetStore(), per_call_reserve=0.02).estimate(request) == 0.02


@pytest.mark.anyio
async def test_a_stream_is_settled_with_its_end_and_released_when_it_fails() -> None:
    budget = Budget(1.0, store=MemoryBudgetStore(), per_call_reserve=0.1)
    backend = budgeted(priced(0.03), budget)
    events = [e async for e in backend.stream(REQ)]
    assert isinstance(events[-1], StreamEnd)
    assert (await budget.status()).spent == pytest.approx(0.03)
    failing = budgeted(FakeBackend("f", [Fail(error=BackendConnectionError)]), budget)
    with pytest.raises(BackendConnectionError):
        async for _ in failing.stream(REQ):
            pass
    status = await budget.status()
    assert status.spent == pytest.approx(0.03) and status.reserved == 0.0


@pytest.mark.anyio
async def test_a_stream_left_early_is_charged_and_holds_nothing() -> None:
    budget = Budget(1.0, store=MemoryBudgetStore(), per_call_reserve=0.1)
    backend = budgeted(priced(0.03), budget)
    events = backend.stream(REQ)
    async for _ in events:
        break  # the consumer stops before the end: what was billed is unknown
    await events.aclose()  # type: ignore[attr-defined]
    status = await budget.status()
    assert status.reserved == 0.0 and status.spent == pytest.approx(0.1)


@pytest.mark.anyio
async def test_an_unreachable_postgres_is_a_store_error_without_the_password() -> None:
    budget = Budget(1.0, store=PostgresBudgetStore("postgresql://u:hunter2@127.0.0.1:1/x"))
    with pytest.raises(CostStoreError) as info:
        await budget.reserve("app", 0.1)
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(budget)


@pytest.mark.anyio
async def test_a_cancelled_call_is_charged_its_reserve() -> None:
    budget = Budget(1.0, store=MemoryBudgetStore(), per_call_reserve=0.1)
    backend = budgeted(priced(0.01, latency=5.0), budget)
    with anyio.move_on_after(0.05):
        await backend.complete(REQ)
    status = await budget.status()
    assert status.spent == pytest.approx(0.1) and status.reserved == 0.0


@pytest.mark.anyio
async def test_guard_reserves_once_outside_the_retries() -> None:
    set_testing(True)
    try:
        budget = Budget(1.0, store=MemoryBudgetStore(), per_call_reserve=0.5)
        inner = FakeBackend(
            "b",
            [Fail(error=BackendConnectionError), Reply(text="ok", usage=Usage(cost=0.2))],
        )
        stack = guard(inner, budget=budget, budget_scope="team", retry=RetryPolicy(attempts=3))
        assert stack.budget is not None and stack.budget.scope == "team"
        await stack.complete(REQ)
        assert len(inner.calls) == 2
        status = await budget.status("team")
        assert status.spent == pytest.approx(0.2) and status.reserved == 0.0
        with pytest.raises(ConfigurationError, match=r"genfan\.cost\.Budget"):
            guard(inner, budget=0.5)  # type: ignore[arg-type]
    finally:
        set_testing(False)


# -- periods -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_daily_budget_starts_again_the_next_utc_day() -> None:
    clock = Clock()
    budget = Budget(0.1, period="day", store=MemoryBudgetStore(), per_call_reserve=0.1, clock=clock)
    backend = budgeted(priced(0.1), budget)
    await backend.complete(REQ)
    with pytest.raises(BudgetExceededError) as info:
        await backend.complete(REQ)
    assert info.value.resets_at == 1_765_065_600.0  # 2025-12-07T00:00:00Z
    assert "resets at 2025-12-07T00:00:00Z" in str(info.value)
    clock.t = 1_765_065_600.0
    await backend.complete(REQ)  # a new day, a new ledger
    assert (await budget.status()).window == "2025-12-07"


def test_windows_of_each_period() -> None:
    t = 1_765_000_000.0  # Saturday 2025-12-06T05:46:40Z
    store = MemoryBudgetStore()
    assert Budget(1, period="hour", store=store).window(t) == ("2025-12-06T05", 1_765_000_800.0)
    assert Budget(1, period="week", store=store).window(t) == ("2025-W49", 1_765_152_000.0)
    assert Budget(1, period="month", store=store).window(t) == ("2025-12", 1_767_225_600.0)
    december = Budget(1, period="month", store=store).window(1_767_225_599.0)
    assert december[0] == "2025-12"
    assert Budget(1, period=600, store=store).window(t) == ("600s:2941666", 1_765_000_200.0)
    assert Budget(1, store=store).window(t) == ("total", None)


# -- stores by URL, misuse ---------------------------------------------------------------------


def test_stores_from_urls_and_bad_values(tmp_path: Path) -> None:
    assert isinstance(budget_store_from_url(tmp_path / "b.db"), SQLiteBudgetStore)
    assert isinstance(budget_store_from_url(f"sqlite:///{tmp_path}/b.db"), SQLiteBudgetStore)
    assert isinstance(budget_store_from_url("memory://"), MemoryBudgetStore)
    redis = budget_store_from_url("redis://:hunter2@127.0.0.1:6379/1")
    assert isinstance(redis, RedisBudgetStore) and "hunter2" not in repr(redis)
    pg = budget_store_from_url("postgresql://u:hunter2@127.0.0.1/x")
    assert isinstance(pg, PostgresBudgetStore) and "hunter2" not in repr(pg)
    with pytest.raises(ConfigurationError, match="unknown budget store URL scheme 'mysql'"):
        budget_store_from_url("mysql://u:hunter2@h/db")
    bad: list[tuple[Callable[[], object], str]] = [
        (lambda: Budget(-1), "Budget.limit must be a finite number >= 0"),
        (lambda: Budget(1, period="year"), "Budget.period must be one of"),  # type: ignore[arg-type]
        (lambda: Budget(1, period=0), "Budget.period must be a finite number > 0"),
        (lambda: Budget(1, per_call_reserve=float("nan")), "per_call_reserve"),
        (lambda: Budget(1, store=42), "Budget.store must be a BudgetStore or a URL"),  # type: ignore[arg-type]
        (lambda: SQLiteBudgetStore(":memory:"), "MemoryBudgetStore"),
        (lambda: budgeted(FakeBackend(), 5.0), "takes a Budget"),  # type: ignore[arg-type]
        (lambda: budgeted(FakeBackend(), Budget(1, store="memory://"), scope=""), "scope"),
    ]
    for make, message in bad:
        with pytest.raises(ConfigurationError, match=message):
            make()


@pytest.mark.anyio
async def test_an_unreachable_store_fails_the_call_typed_without_the_password() -> None:
    budget = Budget(1.0, store=RedisBudgetStore("redis://:hunter2@127.0.0.1:1/0"))
    inner = priced(0.01)
    with pytest.raises(CostStoreError) as info:
        await budgeted(inner, budget).complete(REQ)
    assert "hunter2" not in str(info.value) and "connection refused" in str(info.value)
    assert inner.calls == []  # fail closed: a budget that cannot be checked spends nothing
    await budget.aclose()


@pytest.mark.anyio
async def test_an_unwritable_sqlite_file_is_a_store_error(tmp_path: Path) -> None:
    folder = tmp_path / "file-not-folder"
    folder.write_text("x")
    budget = Budget(1.0, store=SQLiteBudgetStore(folder / "b.db"))
    with pytest.raises(CostStoreError, match="SQLite budget store"):
        await budget.reserve("app", 0.1)


@pytest.mark.anyio
async def test_sqlite_budgets_persist_across_store_objects(tmp_path: Path) -> None:
    path = tmp_path / "budgets.db"
    async with Budget(1.0, store=f"sqlite:///{path}") as first:
        await first.settle(await first.reserve("app", 0.5), 0.4)
    async with Budget(1.0, store=path) as second:
        assert (await second.status("app")).spent == pytest.approx(0.4)


# -- TOML ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_config_charges_its_backends_to_a_shared_budget_and_cache(tmp_path: Path) -> None:
    db = tmp_path / "budgets.db"
    config = parse_config(
        {
            "budgets": {
                "team": {"limit": 0.025, "store": f"sqlite:///{db}", "per_call_reserve": 0.01}
            },
            "caches": {"answers": {"store": "memory://", "ttl": 60}},
            "backends": {
                "a": {"type": "fake", "budget": "team", "cache": "answers"},
                "b": {"type": "fake", "budget": "team"},
            },
        }
    )
    fan = config.build_fanout(select="first")
    a, b = (t.backend for t in fan.targets)
    other = ChatRequest.from_prompt("something else")
    try:
        await a.complete(REQ)  # a miss: charged its reserve (the fake backend has no price)
        await a.complete(REQ)  # a cache hit: not charged
        await b.complete(REQ)  # the same scope: 0.02 spent
        with pytest.raises(BudgetExceededError) as info:
            await b.complete(other)
        assert info.value.scope == "team" and info.value.backend == "b"
        assert (await a.complete(REQ)).text == "ok"  # hits still answer
    finally:
        await fan.aclose()
    async with Budget(0.025, store=db) as budget:
        assert (await budget.status("team")).spent == pytest.approx(0.02)


def test_config_mistakes_name_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GENFAN_TEST_BUDGET_URL", raising=False)
    backend = {"type": "fake", "budget": "daily"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"backends": {"x": backend}}, r"backends\.x\.budget names 'daily', which has no"),
        (
            {"budgets": {"daily": {"limit": 1, "period": "year"}}},
            r"budgets\.daily: period",
        ),
        ({"budgets": {"daily": {"period": "day"}}}, r"budgets\.daily: limit"),
        (
            {"budgets": {"daily": {"limit": 1, "store": "a.db", "store_env": "X"}}},
            "not both",
        ),
        (
            {"budgets": {"daily": {"limit": 1, "store": "mysql://u:hunter2@h/db"}}},
            "unknown budget store URL scheme",
        ),
        ({"caches": {"c": {"ttl": -1}}}, r"caches\.c: ttl"),
        ({"backends": {"x": {"type": "fake", "cache": "c"}}}, "which has no \\[caches.c\\]"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigurationError, match=message) as info:
            parse_config(data)
        assert "hunter2" not in str(info.value)
    config = parse_config(
        {"budgets": {"daily": {"limit": 1, "store_env": "GENFAN_TEST_BUDGET_URL"}},
         "backends": {"x": backend}}
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="GENFAN_TEST_BUDGET_URL is not set"):
        config.build_backend("x")
