"""Quickstart: fan one prompt out to three backends, one of them failing, and pick an answer.

Runs offline with genfan's fake backends; swap them for real ones, e.g.
``create_backend("openai:gpt-4o-mini")`` or ``create_backend("anthropic:claude-3-5-haiku-latest")``.
"""

from __future__ import annotations

import anyio

from genfan import FanOut, HTTPStatusError, Target
from genfan.testing import Fail, FakeBackend


async def main() -> None:
    fast = FakeBackend("fast-model", ["Paris is the capital of France."], latency=0.05)
    slow = FakeBackend("slow-model", ["The capital of France is Paris."], latency=0.3)
    broken = FakeBackend(
        "broken-model", [Fail(error=HTTPStatusError("service unavailable", status_code=503))]
    )
    targets = [Target(backend=fast, temperature=0.0), slow, broken]
    async with FanOut(targets, mode="all", deadline=5.0) as fan:
        result = await fan.run("What is the capital of France?")
    for c in result.candidates:
        outcome = c.text if c.ok else f"{type(c.error).__name__}: {c.error}"
        print(f"{c.backend:13} {c.status:9} {c.latency * 1000:6.0f} ms  {outcome}")
    print(f"chosen: {result.chosen.backend if result.chosen else None}: {result.text}")


if __name__ == "__main__":
    anyio.run(main)
