"""Issue 8's figures: independent work runs at once, in chains and in the tool loop.

Run: ``.venv/bin/python -m benchmarks.agents_parallel [--runs 7] [--quick]``.

1. **Chain**: 8 independent tool steps of 100 ms each (``anyio.sleep``: an I/O-bound tool) and a
   join. Parallel: as declared (no step depends on another). Sequential: the same steps forced
   one after another with ``after=``, through the same machinery. Target: wall ≈ one step.
2. **Tool loop**: an agent whose model (the OpenAI-compatible provider talking HTTP to the local
   fake server) asks for 5 tool calls of 100 ms per turn, for 3 turns, then answers. Parallel:
   the default (all calls of a turn at once). Sequential: ``max_parallel_tools=1``. Figure: the
   per-turn latency (model call + tools) of each.

Real time on the real event loop (asyncio and trio), median over ``--runs``. Prints a table and
writes JSON to ``benchmarks/results/agents_parallel.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from genfan_providers.openai import OpenAIBackend

from genfan.agents import Agent, Chain, tool
from genfan.testserver import FakeLLMServer, TextReply, ToolCallsReply

RESULTS = Path(__file__).parent / "results"
STEP = 0.100


@tool
async def io_tool(i: int) -> int:
    """An I/O-bound tool: waits 100 ms."""
    await anyio.sleep(STEP)
    return i


def build_chain(n: int, *, sequential: bool) -> Chain:
    chain = Chain("bench")
    refs = []
    for i in range(n):
        after = [refs[-1]] if sequential and refs else []
        refs.append(chain.step(f"t{i}", io_tool, i=i, after=after))
    chain.join("join", *refs)
    chain.compile()
    return chain


async def time_chain(n: int, sequential: bool) -> float:
    chain = build_chain(n, sequential=sequential)
    start = time.perf_counter()
    result = await chain.run()
    wall = time.perf_counter() - start
    assert result.ok and result["join"] == tuple(range(n))
    return wall


def tool_turn(turn: int, calls: int) -> ToolCallsReply:
    return ToolCallsReply([("io_tool", {"i": turn * 10 + k}) for k in range(calls)])


async def time_loop(
    server: FakeLLMServer, *, calls: int, turns: int, parallel: bool
) -> list[float]:
    model = "bench-par" if parallel else "bench-seq"
    server.script(model, [*[tool_turn(t, calls) for t in range(turns)], TextReply("done")])
    async with OpenAIBackend(model, base_url=server.url, api_key="sk-bench") as backend:
        agent = Agent(backend, tools=[io_tool], max_parallel_tools=None if parallel else 1)
        result = await agent.run("go")
    assert result.text == "done" and len(result.tool_calls) == calls * turns
    assert all(r.ok for r in result.tool_calls)
    return [s.elapsed for s in result.steps if s.tool_calls]


async def time_model_only(server: FakeLLMServer, runs: int) -> float:
    async with OpenAIBackend("bench-plain", base_url=server.url, api_key="sk-bench") as backend:
        agent = Agent(backend)
        walls = []
        for _ in range(runs):
            result = await agent.run("hello")
            walls.append(result.steps[0].elapsed)
    return statistics.median(walls)


async def measure(runs: int, server: FakeLLMServer) -> dict[str, Any]:
    async def median(fn: Callable[[], Awaitable[float]]) -> float:
        await fn()  # warm-up
        return statistics.median([await fn() for _ in range(runs)])

    par = await median(lambda: time_chain(8, sequential=False))
    seq = await median(lambda: time_chain(8, sequential=True))

    calls, turns = 5, 3
    await time_loop(server, calls=calls, turns=1, parallel=True)  # warm-up (connection, imports)
    par_turns: list[float] = []
    seq_turns: list[float] = []
    for _ in range(runs):
        par_turns += await time_loop(server, calls=calls, turns=turns, parallel=True)
        seq_turns += await time_loop(server, calls=calls, turns=turns, parallel=False)
    model_call = await time_model_only(server, runs)
    return {
        "chain": {
            "steps": 8,
            "step_seconds": STEP,
            "parallel_wall": par,
            "sequential_wall": seq,
            "speedup_vs_sequential": seq / par,
            "parallel_over_one_step": par / STEP,
        },
        "tool_loop": {
            "calls_per_turn": calls,
            "turns_per_run": turns,
            "tool_seconds": STEP,
            "model_call": model_call,
            "parallel_turn": statistics.median(par_turns),
            "sequential_turn": statistics.median(seq_turns),
            "speedup_vs_sequential": statistics.median(seq_turns) / statistics.median(par_turns),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 runs")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs

    out: dict[str, Any] = {
        "benchmark": "agents_parallel",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, {platform.python_version()}",
        "runs": runs,
        "backends": {},
    }
    with FakeLLMServer() as server:
        for backend in ("asyncio", "trio"):
            out["backends"][backend] = anyio.run(measure, runs, server, backend=backend)

    print(f"{'':8} {'figure':44} {'parallel':>10} {'sequential':>11} {'ratio':>7}")
    for backend, r in out["backends"].items():
        c, t = r["chain"], r["tool_loop"]
        print(
            f"{backend:8} {'chain: 8 x 100 ms tool steps + join (wall)':44} "
            f"{c['parallel_wall'] * 1000:8.1f}ms {c['sequential_wall'] * 1000:9.1f}ms "
            f"{c['speedup_vs_sequential']:6.2f}x"
        )
        print(f"{'':8} {'  parallel wall / one step':44} {c['parallel_over_one_step']:9.3f}x")
        print(
            f"{'':8} {'tool loop: turn of 5 x 100 ms calls (HTTP)':44} "
            f"{t['parallel_turn'] * 1000:8.1f}ms {t['sequential_turn'] * 1000:9.1f}ms "
            f"{t['speedup_vs_sequential']:6.2f}x"
        )
        print(
            f"{'':8} {'  of which one model call (HTTP round trip)':44} {t['model_call'] * 1000:8.1f}ms"
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "agents_parallel.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
