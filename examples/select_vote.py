"""Pick the best answer: majority vote, early exit, and a cascade (runs offline).

Five scripted "samplers" stand in for five samples of a small model; swap them for real
backends (or several `Target`s of one local engine at temperature 0.7) and nothing else changes.

    python examples/select_vote.py
"""

from __future__ import annotations

import anyio

from genfan import Cascade, FanOut, Tier, Usage
from genfan.select import MajorityVote, RefusalDetector, Select
from genfan.testing import FakeBackend, Reply

QUESTION = "What is 17 * 3?"


def samplers(answers: list[str]) -> list[FakeBackend]:
    # latency in seconds: sample i answers after i + 1 s (instant here, so the demo is quick)
    return [
        FakeBackend(
            f"sample{i}",
            [Reply(text=t, latency=0.01 * (i + 1), usage=Usage(input_tokens=12, output_tokens=6))],
        )
        for i, t in enumerate(answers)
    ]


async def main() -> None:
    answers = ["17 * 3 = 51", "I'm sorry, but I can't help with that.", "51", "It is 41.", "51."]
    vote = MajorityVote(extract="number")  # the final number; echoes of 17 or 3 cast no vote

    # 1. Vote over every answer, refusals filtered out.
    select = Select(vote, filters=[RefusalDetector()])
    async with FanOut(samplers(answers), select=select) as fan:
        result = await fan.run(QUESTION)
    print(f"vote: {result.text!r} confidence={result.selection.confidence:.2f}")
    print(f"why: {result.selection.explanation}")

    # 2. Early exit: stop as soon as 2 answers agree; the slower calls are cancelled.
    backends = samplers(answers)
    async with FanOut(backends, **vote.early_exit(2)) as fan:
        result = await fan.run(QUESTION)
    statuses = " ".join(c.status for c in result.candidates)
    print(
        f"early exit: {result.text!r} after {sum(c.ok for c in result.candidates)} answers "
        f"[{statuses}]"
    )

    # 3. Cascade: three cheap samples first; the big model only when they disagree.
    big = FakeBackend("big", [Reply(text="51", usage=Usage(input_tokens=12, output_tokens=6))])
    cascade = Cascade(
        [
            Tier(backends=samplers(["51", "51", "The answer is 51"]), name="small"),
            Tier(backends=[big], name="big", cost_per_token=20.0),
        ],
        selector=vote.selector(),
        threshold=0.66,
    )
    outcome = await cascade.run(QUESTION)
    print(
        f"cascade: {outcome.text!r} tiers={outcome.tiers_used} cost={outcome.cost:g} "
        f"saved={outcome.saved:g} ({outcome.saved_fraction:.0%})"
    )


if __name__ == "__main__":
    anyio.run(main)
