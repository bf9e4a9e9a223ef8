"""Three gateway processes behind one port (``genfan serve --workers 3``) share keys, a requests-
per-minute limit (through Redis) and a USD budget (through the key store)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from genfan.testserver import FakeLLMServer, TextReply

from ._serve_helpers import GatewayProcess, cli, write_config
from ._services import port_open, require_service

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeLLMServer, Path, str]]:
    require_service("redis", port_open("127.0.0.1", 6379), "nothing listens on 127.0.0.1:6379")
    tmp = tmp_path_factory.mktemp("replicas")
    with FakeLLMServer() as srv:
        prefix = f"genfan-test-{uuid.uuid4().hex[:8]}:"
        config = write_config(
            tmp / "genfan.toml",
            srv.url,
            serve=f'keys = "sqlite:///{tmp / "keys.db"}"\nrate_limit_store = "shared"\n'
            "key_cache_seconds = 0\n",
            extra=f'\n[rate_limit_stores.shared]\nurl = "redis://127.0.0.1:6379/0"\n'
            f'key_prefix = "{prefix}"\n',
        )
        with GatewayProcess(config, "--workers", "3") as gw:
            yield srv, config, gw.url


def call(url: str, key: str) -> httpx.Response:
    # A new connection each time, so the kernel hands requests to any of the three workers.
    with httpx.Client(timeout=10) as c:
        return c.post(
            f"{url}/v1/chat/completions",
            json={"model": "a", "messages": HI, "max_tokens": 50},
            headers={"authorization": f"Bearer {key}", "connection": "close"},
        )


def make_key(config: Path, *args: str) -> str:
    made = cli(
        "keys", "create", f"k{uuid.uuid4().hex[:8]}", "--config", str(config), "--json", *args
    )
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["key"])


def test_a_requests_per_minute_limit_holds_across_replicas(
    replicas: tuple[FakeLLMServer, Path, str],
) -> None:
    _srv, config, url = replicas
    key = make_key(config, "--rpm", "5")
    answers = [call(url, key) for _ in range(20)]
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert len(ok) + len(refused) == 20
    # One minute's quota is 5 (and 1 more may refill during the test); each of the three
    # processes counting alone would have let up to 15 through.
    assert 5 <= len(ok) <= 6
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    replicas_seen = {r.headers["x-genfan-replica"] for r in answers}
    assert len(replicas_seen) >= 2, "the requests should have reached several workers"


def test_a_budget_holds_across_replicas(replicas: tuple[FakeLLMServer, Path, str]) -> None:
    srv, config, url = replicas
    cost = (1000 * 1.0 + 1000 * 2.0) / 1e6  # backend a's price, per answer
    key = make_key(config, "--budget", str(cost * 2.5))
    srv.script("m-a", [TextReply("x", usage=(1000, 1000))] * 20)
    answers = [call(url, key) for _ in range(12)]
    statuses = [r.status_code for r in answers]
    assert statuses[:3] == [200, 200, 200], answers[0].text  # spent 0, 1x, 2x: under budget
    assert set(statuses[3:]) == {429}
    assert all(r.json()["error"]["type"] == "insufficient_quota" for r in answers[3:])
    assert len({r.headers["x-genfan-replica"] for r in answers}) >= 2
    # The ledger is written in batches, off the request path: it shows the spend soon after.
    for _ in range(50):
        listed = json.loads(cli("keys", "list", "--config", str(config), "--json").stdout)
        spent = next(k["spent_usd"] for k in listed if key.startswith(f"gf-{k['id']}-"))
        if spent == pytest.approx(3 * cost):
            break
    assert spent == pytest.approx(3 * cost)
