"""Three OS processes share one budget, on a real SQLite file, a real PostgreSQL and a real
Redis, calling priced backends against a real HTTP server (genfan.testserver's FakeLLMServer)
until the budget refuses them: the budget is never passed by more than the calls in flight,
every admitted call is recorded at its cost, and no refused call reaches the server. Each
process uses its budget as ``async with``, so it takes leases (room for several calls at once,
settled in one step); one run turns leases off (a step with the store per reservation).

PostgreSQL (127.0.0.1:5432, db ``test``) and Redis (127.0.0.1:6379) runs are skipped without
them (failed when GENFAN_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from genfan_providers.openai import OpenAIBackend

from genfan import ChatRequest
from genfan.cost import Budget, BudgetStatus
from genfan.testserver import FakeLLMServer
from tests._services import port_open, require_service

ROOT = Path(__file__).resolve().parents[1]
PRICE = (1000.0, 2000.0)  # USD per million tokens: a call costs a few cents
CONCURRENCY = 4  # calls in flight per process
PROCESSES = 3

WORKER = textwrap.dedent(
    """
    import json, sys
    import anyio
    from genfan import BudgetExceededError, ChatRequest
    from genfan.cost import Budget, budgeted
    from genfan_providers.openai import OpenAIBackend

    STORE, SCOPE, SERVER, BACKEND, RESERVE, LIMIT, CONCURRENCY, LEASE = sys.argv[1:9]

    async def main():
        request = ChatRequest.from_prompt("how much is this call")
        async with Budget(
            float(LIMIT), store=STORE, per_call_reserve=float(RESERVE), lease=int(LEASE)
        ) as budget:
            async with OpenAIBackend(
                "m", base_url=SERVER, api_key="sk-local", price=(1000.0, 2000.0)
            ) as provider:
                backend = budgeted(provider, budget, scope=SCOPE)
                done = []
                # open (store connected, client ready): wait for the others, start together
                print("ready", flush=True)
                await anyio.to_thread.run_sync(sys.stdin.readline)

                async def loop():
                    while True:
                        try:
                            completion = await backend.complete(request)
                        except BudgetExceededError:
                            return
                        done.append(completion.usage.cost)

                async with anyio.create_task_group() as tg:
                    for _ in range(int(CONCURRENCY)):
                        tg.start_soon(loop)
        print(json.dumps({"costs": done}), flush=True)

    anyio.run(main, backend=BACKEND)
    """
)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    # 0.2 s a call: the budget lasts several rounds of calls, so a process that wakes up late
    # after the start signal still finds room (every process must get calls through)
    with FakeLLMServer(latency=0.2) as srv:
        yield srv


def store_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'budgets.db'}"
    if kind == "postgres":
        require_service("PostgreSQL", port_open("127.0.0.1", 5432), "nothing on 5432")
        return "postgresql://postgres@127.0.0.1:5432/test"
    require_service("Redis", port_open("127.0.0.1", 6379), "nothing on 6379")
    return "redis://127.0.0.1:6379/0"


async def call_cost(url: str) -> float:
    async with OpenAIBackend("m", base_url=url, api_key="sk-local", price=PRICE) as b:
        completion = await b.complete(ChatRequest.from_prompt("how much is this call"))
    assert completion.usage.cost is not None
    return completion.usage.cost


@pytest.mark.parametrize(
    ("kind", "reserve_share", "lease"),
    [
        ("sqlite", 0.5, 32),
        ("postgres", 0.5, 32),
        ("redis", 0.5, 32),
        ("sqlite", 1.0, 32),
        ("redis", 1.0, 32),
        ("sqlite", 0.5, 0),
    ],
)
def test_three_processes_never_overspend_by_more_than_the_calls_in_flight(
    kind: str, reserve_share: float, lease: int, tmp_path: Path, server: FakeLLMServer
) -> None:
    url = store_url(kind, tmp_path)
    scope = f"app-{uuid.uuid4().hex}"  # a fresh ledger in the shared database
    cost = anyio.run(call_cost, server.url)
    limit = 25 * cost + cost / 3  # room for 25 calls and a third
    # below the real cost, the budget can be passed (boundedly); at the cost, never
    reserve = cost * reserve_share
    server.reset()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    settings = [repr(reserve), repr(limit), str(CONCURRENCY), str(lease)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, scope, server.url, backend, *settings],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for backend in ("asyncio", "trio", "asyncio")
    ]
    try:
        for p in procs:  # every process open (store, client) and ready: start together
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    costs = [c for r in results for c in r["costs"]]
    status = anyio.run(ledger, url, scope, limit)
    # every admitted call was recorded at its real cost, and nothing is left reserved
    assert status.spent == pytest.approx(sum(costs)) and status.reserved == 0.0
    # no refused call was sent
    assert server.count("/v1/chat/completions") == len(costs)
    in_flight = PROCESSES * CONCURRENCY
    # the promise: passed by no more than the calls in flight...
    assert status.spent <= limit + in_flight * cost + 1e-9
    # ...and, precisely, by no more than what they cost beyond their reserve (with a reserve
    # as large as the cost: never passed)
    assert status.spent <= limit + in_flight * (cost - reserve) + 1e-9
    # the budget was used, not refused early: another call would not have fit
    assert status.spent + reserve > limit
    assert all(r["costs"] for r in results)  # every process got calls through


async def ledger(url: str, scope: str, limit: float) -> BudgetStatus:
    async with Budget(limit, store=url) as budget:
        status = await budget.status(scope)
        await budget.reset(scope)  # the test's scope, gone from the shared database
        return status
