"""Budgets from the config file take leases while their backends are open: the backends sharing
a ``[budgets.NAME]`` start its leases on the first open and flush them on the last close, against
the real fake server on 127.0.0.1 and a real SQLite store (its steps counted); a backend used
without being opened reserves and settles each call in the store; the lease keys of the table;
a call that costs more than its reserve reaches the store at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import genfan.cost._budget as budget_module
from genfan import BudgetExceededError, ChatRequest, ConfigurationError, GenfanConfig, parse_config
from genfan.cost import Budget, Ledger, SQLiteBudgetStore
from genfan.testserver import FakeLLMServer, TextReply

pytestmark = pytest.mark.anyio

PRICE = (1.0, 2.0)  # USD per million tokens in, out
USAGE = (10, 5)  # tokens each answer reports
COST = (USAGE[0] * PRICE[0] + USAGE[1] * PRICE[1]) / 1e6
HI = ChatRequest.from_prompt("hi", max_tokens=100)


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


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    for model in ("m-a", "m-b"):
        server.script(model, [TextReply("x", usage=USAGE)] * 40)
    return server


@pytest.fixture
def stores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Counting]:
    """Every budget store the config builds, counting its steps (the same SQLite file)."""
    made: list[Counting] = []

    def counting(url: str | Path) -> Counting:
        made.append(Counting(tmp_path / "budgets.db"))
        return made[-1]

    monkeypatch.setattr(budget_module, "budget_store_from_url", counting)
    monkeypatch.setenv("GF_TEST_KEY", "sk-local")
    return made


def config(srv: FakeLLMServer, tmp_path: Path, **table: Any) -> GenfanConfig:
    def leaf(model: str) -> dict[str, Any]:
        return {
            "type": "openai",
            "model": model,
            "base_url": srv.url,
            "api_key_env": "GF_TEST_KEY",
            "price": list(PRICE),
            "budget": "x",
            "guards": {"retry": False},
        }

    return parse_config(
        {
            "budgets": {
                "x": {"limit": 1.0, "store": f"sqlite:///{tmp_path / 'budgets.db'}", **table}
            },
            "backends": {"a": leaf("m-a"), "b": leaf("m-b")},
            "fanout": {"select": "first"},
        }
    )


async def recorded(tmp_path: Path, scope: str = "x") -> tuple[float, float]:
    """What a fresh budget on the same store sees: (spent, reserved)."""
    store = SQLiteBudgetStore(tmp_path / "budgets.db")
    try:
        status = await Budget(1.0, store=store, lease=None).status(scope)
    finally:
        await store.aclose()
    return status.spent, status.reserved


async def test_backends_sharing_a_config_budget_lease_it_while_open(
    srv: FakeLLMServer, stores: list[Counting], tmp_path: Path
) -> None:
    a, b = (t.backend for t in config(srv, tmp_path).build_targets())
    budget = a.budget  # type: ignore[attr-defined]
    assert b.budget is budget  # type: ignore[attr-defined]  # one budget per build
    async with a:
        async with b:
            for _ in range(5):
                await a.complete(HI)
                await b.complete(HI)
        # b is closed; a still holds the budget open, so its calls still lease
        await a.complete(HI)
        steps = stores[-1].steps
        assert steps["reserve"] == steps["settle"] == 0  # no per-call step
        assert 1 <= steps["lease"] <= 6  # 11 calls: refills of 2, 4, 8... reserves
        # the costs are held in memory until a flush: the store has the lease
        spent, reserved = await recorded(tmp_path)
        assert spent + reserved >= 11 * COST - 1e-12
    # the last close flushes the costs and returns the lease
    assert await recorded(tmp_path) == (pytest.approx(11 * COST), 0.0)
    assert srv.count("/v1/chat/completions") == 11


async def test_a_config_fanout_leases_its_budgets_while_open(
    srv: FakeLLMServer, stores: list[Counting], tmp_path: Path
) -> None:
    fan = config(srv, tmp_path).build_fanout(mode="all")
    async with fan:
        for _ in range(4):
            await fan.run(HI)
    steps = stores[-1].steps
    assert steps["reserve"] == steps["settle"] == 0
    assert 1 <= steps["lease"] <= 8  # 8 calls, then the return of the lease on close
    assert await recorded(tmp_path) == (pytest.approx(8 * COST), 0.0)


async def test_a_backend_used_without_opening_it_steps_per_call(
    srv: FakeLLMServer, stores: list[Counting], tmp_path: Path
) -> None:
    backend = config(srv, tmp_path).build_backend("a")
    for _ in range(3):
        await backend.complete(HI)
    assert stores[-1].steps == {"reserve": 3, "settle": 3, "lease": 0}
    await backend.aclose()
    assert await recorded(tmp_path) == (pytest.approx(3 * COST), 0.0)


async def test_lease_zero_turns_leases_off(
    srv: FakeLLMServer, stores: list[Counting], tmp_path: Path
) -> None:
    async with config(srv, tmp_path, lease=0).build_backend("a") as backend:
        await backend.complete(HI)
        await backend.complete(HI)
    assert stores[-1].steps == {"reserve": 2, "settle": 2, "lease": 0}
    assert await recorded(tmp_path) == (pytest.approx(2 * COST), 0.0)


async def test_the_limit_still_holds_with_leases(
    srv: FakeLLMServer, stores: list[Counting], tmp_path: Path
) -> None:
    # Each call reserves and costs COST: the 3rd would pass 2.5 x COST and is not sent.
    async with config(srv, tmp_path, limit=2.5 * COST, per_call_reserve=COST).build_backend(
        "a"
    ) as backend:
        await backend.complete(HI)
        await backend.complete(HI)
        with pytest.raises(BudgetExceededError, match="budget exceeded for scope 'x'"):
            await backend.complete(HI)
        assert stores[-1].steps["reserve"] == 0  # refused by a lease step
    assert srv.count("/v1/chat/completions") == 2
    assert await recorded(tmp_path) == (pytest.approx(2 * COST), 0.0)


def test_lease_settings_reach_the_budget(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "budgets": {
                "x": {
                    "limit": 2.0,
                    "store": f"sqlite:///{tmp_path / 'b.db'}",
                    "lease": 4,
                    "lease_ttl": 10.0,
                    "flush_interval": 2.5,
                }
            }
        }
    )
    budget = cfg.budgets["x"].build()
    assert (budget.lease, budget.lease_ttl, budget.flush_interval) == (4, 10.0, 2.5)
    default = parse_config({"budgets": {"y": {"limit": 1.0}}}).budgets["y"].build()
    assert (default.lease, default.lease_ttl, default.flush_interval) == (32, 30.0, 1.0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"lease": -1}, r"budgets\.x: lease"),
        ({"lease": 1.5}, r"budgets\.x: lease"),
        ({"lease": "many"}, r"budgets\.x: lease"),
        ({"lease_ttl": 0}, r"budgets\.x: lease_ttl"),
        ({"flush_interval": float("inf")}, r"budgets\.x: flush_interval"),
        ({"lease_ttl": 10, "flush_interval": 6}, r"flush_interval \(6s\) must be at most half"),
    ],
)
def test_bad_lease_settings_are_named(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_config({"budgets": {"x": {"limit": 1.0, **table}}})


def test_flush_interval_is_free_without_leases() -> None:
    cfg = parse_config({"budgets": {"x": {"limit": 1.0, "lease": 0, "flush_interval": 60}}})
    assert cfg.budgets["x"].build().lease == 0


async def test_a_call_that_costs_more_than_its_reserve_reaches_the_store_at_once(
    tmp_path: Path,
) -> None:
    store = Counting(tmp_path / "b.db")
    other = Budget(1.0, store=store, lease=None)  # another process's view
    try:
        async with Budget(
            1.0, store=store, per_call_reserve=0.01, lease=8, lease_ttl=600, flush_interval=300
        ) as budget:
            await budget.settle(await budget.reserve("app"), 0.004)  # within its reserve
            seen = await other.status("app")
            assert seen.spent == 0.0 and seen.reserved > 0.0  # in memory, under the lease
            await budget.settle(await budget.reserve("app"), 0.05)  # 5x its reserve
            seen = await other.status("app")
            # sent at once (no flush for 300 s): the others see the overrun now
            assert seen.spent == pytest.approx(0.054)
            assert store.steps["reserve"] == store.steps["settle"] == 0
        assert (await other.status("app")).reserved == 0.0
    finally:
        await store.aclose()


async def test_an_unreachable_store_fails_the_call_and_the_backend_still_closes(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from genfan.cost import CostStoreError

    monkeypatch.setenv("GF_TEST_KEY", "sk-local")
    cfg = parse_config(
        {
            "budgets": {"x": {"limit": 1.0, "store": "redis://:s3cret@127.0.0.1:1/0"}},
            "backends": {
                "a": {
                    "type": "openai",
                    "model": "m-a",
                    "base_url": srv.url,
                    "api_key_env": "GF_TEST_KEY",
                    "budget": "x",
                }
            },
        }
    )
    async with cfg.build_backend("a") as backend:
        with pytest.raises(CostStoreError) as info:
            await backend.complete(HI)
        assert "s3cret" not in str(info.value)
    assert srv.count("/v1/chat/completions") == 0  # not sent: its budget could not be checked
