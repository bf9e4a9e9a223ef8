"""The gateway's key store and spend ledger on real SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from genfan import ConfigurationError
from genfan.serve import KeyStore, KeyStoreError, LedgerEntry

from ._services import port_open, require_service

pytestmark = pytest.mark.anyio

PG = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStore]:
    if request.param == "sqlite":
        async with KeyStore(f"sqlite:///{tmp_path / 'keys.db'}") as s:
            yield s
        return
    require_service("postgres", port_open("127.0.0.1", 5432), "nothing listens on :5432")
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    async with KeyStore(PG, prefix=prefix) as s:
        try:
            yield s
        finally:

            def drop(cur: object) -> None:
                cur.execute(f"DROP TABLE IF EXISTS {prefix}keys, {prefix}spend")  # type: ignore[attr-defined]

            s._run(drop)


async def test_create_authenticate_list_revoke(store: KeyStore) -> None:
    secret, key = await store.create(
        "alice", models=["a", "fanout"], rpm=60, tpm=1000, budget_usd=5
    )
    assert secret.startswith(f"gf-{key.id}-")
    found = await store.authenticate(secret)
    assert found is not None and found.name == "alice"
    assert found.models == ("a", "fanout") and found.rpm == 60 and found.budget_usd == 5
    assert found.allows("a") and not found.allows("b")
    assert await store.authenticate(secret[:-1] + ("x" if secret[-1] != "x" else "y")) is None
    assert await store.authenticate("sk-not-ours") is None
    assert [k.name for k in await store.list()] == ["alice"]
    await store.revoke(key.id)
    assert await store.authenticate(secret) is None
    assert await store.list() == []
    assert [k.name for k in await store.list(include_revoked=True)] == ["alice"]


async def test_ledger_and_spend(store: KeyStore) -> None:
    _, key = await store.create("bob")
    for cost in (0.25, 0.5):
        await store.record(
            LedgerEntry(
                key_id=key.id,
                at=1.0,
                model="a",
                request_id=f"r{cost}",
                input_tokens=10,
                output_tokens=5,
                cost_usd=cost,
            )
        )
    assert await store.spent(key.id) == pytest.approx(0.75)
    entries = await store.ledger(key.id)
    assert [e.request_id for e in entries] == ["r0.5", "r0.25"]
    assert (await store.get(key.id)).spent_usd == pytest.approx(0.75)  # type: ignore[union-attr]


async def test_mistakes_are_named(store: KeyStore) -> None:
    await store.create("carol")
    with pytest.raises(ConfigurationError, match="exists"):
        await store.create("carol")
    with pytest.raises(ConfigurationError, match="key name"):
        await store.create("bad name!")
    with pytest.raises(ConfigurationError, match="rpm"):
        await store.create("dave", rpm=0)
    with pytest.raises(ConfigurationError, match="budget"):
        await store.create("erin", budget_usd=-1)
    with pytest.raises(KeyStoreError, match="no live key"):
        await store.revoke("nobody")


async def test_only_a_hash_is_stored(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    async with KeyStore(db) as store:
        secret, _ = await store.create("alice")
    rows = sqlite3.connect(db).execute("SELECT * FROM genfan_keys").fetchall()
    assert secret not in repr(rows)
    assert any(isinstance(v, str) and v.startswith("sha256:") for v in rows[0])


async def test_an_unreachable_store_is_a_keystoreerror_without_its_password() -> None:
    store = KeyStore("postgresql://user:s3cret@127.0.0.1:1/db")
    with pytest.raises(KeyStoreError) as info:
        await store.list()
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    assert "s3cret" not in repr(store)
    with pytest.raises(ConfigurationError, match="sqlite:///"):
        KeyStore("mysql://host/db")


# -- the gateway's per-key budgets ----------------------------------------------------------------


async def test_the_gateway_leases_key_budgets_and_records_them_on_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    import genfan.cost
    from genfan import parse_config
    from genfan.cost import Budget, Ledger, SQLiteBudgetStore
    from genfan.serve import ServeSettings, create_app
    from genfan.testserver import FakeLLMServer, TextReply

    steps = {"reserve": 0, "settle": 0, "lease": 0}

    class Counting(SQLiteBudgetStore):
        async def reserve(self, scope: str, window: str, **kw: Any) -> Ledger:
            steps["reserve"] += 1
            return await super().reserve(scope, window, **kw)

        async def settle(self, scope: str, window: str, **kw: Any) -> None:
            steps["settle"] += 1
            await super().settle(scope, window, **kw)

        async def lease(self, scope: str, window: str, **kw: Any) -> Ledger:
            steps["lease"] += 1
            return await super().lease(scope, window, **kw)

    db = tmp_path / "budgets.db"
    monkeypatch.setattr(genfan.cost, "budget_store_from_url", lambda url: Counting(db))
    monkeypatch.setenv("GF_TEST_KEY", "sk-local")
    cost = (10 * 1.0 + 5 * 2.0) / 1e6  # each answer: 10 tokens in, 5 out at $1/$2 per million
    with FakeLLMServer() as srv:
        srv.script("m-a", [TextReply("x", usage=(10, 5))] * 8)
        cfg = parse_config(
            {
                "backends": {
                    "a": {
                        "type": "openai",
                        "model": "m-a",
                        "base_url": srv.url,
                        "api_key_env": "GF_TEST_KEY",
                        "price": [1.0, 2.0],
                    }
                }
            }
        )
        keys = KeyStore(tmp_path / "keys.db")
        async with create_app(cfg, ServeSettings(), keys=keys) as app:
            secret, key = await keys.create("alice", budget_usd=1.0)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://g"
            ) as c:
                for _ in range(8):
                    r = await c.post(
                        "/v1/chat/completions",
                        json={
                            "model": "a",
                            "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 100,
                        },
                        headers={"authorization": f"Bearer {secret}"},
                    )
                    assert r.status_code == 200, r.text
            # 8 requests, each within its reserve: leases of 2, 4, 8 reserves, no per-call step
            assert steps["reserve"] == steps["settle"] == 0
            assert 1 <= steps["lease"] <= 5
        # closed: the costs settled in memory reached the store, and the lease was returned
        store = SQLiteBudgetStore(db)
        try:
            status = await Budget(1.0, store=store, lease=None).status(f"key:{key.id}")
        finally:
            await store.aclose()
        assert status.spent == pytest.approx(8 * cost)
        assert status.reserved == 0.0
