"""Does selection beat a single answer? Greedy vs one sample vs vote, consensus, judge, cascade.

One run on the local model (SmolLM2-135M through the in-process vLLM engine, one engine):

1. greedy: one answer per question at temperature 0;
2. samples: 9 answers per question at temperature 0.7, drawn in three rounds (1, +4, +4) so that
   the cost of 1, 5 and 9 samples is each measured, every round many concurrent requests;
3. selection over the same samples: majority vote (final number, echoes of the question
   ignored) over 5 and 9, consensus (ROUGE-L medoid) over 5 and 9, and an LLM judge (the same
   model, pointwise, temperature 0) over 9; "oracle" is whether any of the 9 was right;
4. cascade (FrugalGPT) replayed on the recorded samples with the real :class:`Cascade`: vote over
   3 samples, and only when the vote's share is below the threshold, 6 more (voting over all 9).

A question counts as right when the final number of the chosen answer (echoes ignored) equals
the expected answer. Tokens are prompt + completion tokens as the engine reports them.

    .venv/bin/python -m benchmarks.selection            # ~5-10 min on 2 CPU cores
    .venv/bin/python -m benchmarks.selection --fake     # the pipeline on a scripted backend
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from genfan import (
    AllBackendsFailedError,
    Backend,
    BaseBackend,
    Cascade,
    ChatRequest,
    Completion,
    FanOut,
    Target,
    Tier,
    Usage,
)
from genfan.select import (
    Candidate,
    Consensus,
    FinalNumber,
    LLMJudge,
    MajorityVote,
    Select,
    Selector,
)
from genfan.testing import FakeBackend, FunctionBackend, Reply

HERE = Path(__file__).resolve().parent
TASKS = HERE / "data" / "selection_tasks.jsonl"
RESULTS = HERE / "results"
SUFFIX = "\nAnswer with just the number."
MAX_TOKENS = 48
JUDGE_MAX_TOKENS = 12
TEMPERATURE = 0.7
ROUNDS = (1, 4, 4)  # samples per round: 1, 5 and 9 in total
IN_FLIGHT = 64  # concurrent engine requests
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.8, 1.0)  # a vote share of k of n stops at <= k/n

EXTRACT = FinalNumber()
#: The vote's extractor; ``--number-words`` reads numbers written in words too (and grades so).
VOTE_EXTRACT = "number"


class Metered(BaseBackend):
    """Forwards to a backend and adds up calls and usage (for the judge's cost)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.name)
        self.inner = inner
        self.calls = 0
        self.usage = Usage()

    async def complete(self, request: ChatRequest) -> Completion:
        completion = await self.inner.complete(request)
        self.calls += 1
        self.usage = self.usage + completion.usage
        return completion


def load_tasks(limit: int | None = None) -> list[dict[str, str]]:
    tasks = [json.loads(line) for line in TASKS.read_text().splitlines() if line.strip()]
    return tasks[:limit] if limit else tasks


def request_for(task: dict[str, str]) -> ChatRequest:
    return ChatRequest.from_prompt(task["question"] + SUFFIX, max_tokens=MAX_TOKENS)


def is_right(text: str, task: dict[str, str], request: ChatRequest) -> bool:
    return EXTRACT(text, request) == task["answer"]


async def draw(
    backend: Backend, requests: Sequence[ChatRequest], k: int, temperature: float
) -> tuple[list[list[Candidate]], float]:
    """``k`` answers per request (one fan-out of k targets each); wall seconds for all."""
    targets = [
        Target(backend=backend, name=f"t{i}", temperature=temperature, max_tokens=MAX_TOKENS)
        for i in range(k)
    ]
    fan = FanOut(targets, mode="all")  # not closed here: the engine is shared by every phase
    t0 = time.perf_counter()
    results = await fan.map(requests, max_in_flight=max(1, IN_FLIGHT // k))
    wall = time.perf_counter() - t0
    out: list[list[Candidate]] = []
    for r in results:
        if isinstance(r, AllBackendsFailedError):
            out.append([])
        else:
            out.append(list(r.candidates))
    return out, wall


def tokens(cands: Sequence[Candidate]) -> int:
    return sum(c.completion.usage.total_tokens for c in cands if c.completion is not None)


def reindex(cands: Sequence[Candidate]) -> list[Candidate]:
    return [
        dataclasses.replace(c, index=i, backend=f"s{i}", finished_order=i)
        for i, c in enumerate(cands)
    ]


async def pick(
    selector: Selector, request: ChatRequest, cands: Sequence[Candidate]
) -> tuple[str, float]:
    sel = await selector.select(request, cands)
    if sel.chosen is None:
        return "", 0.0
    return cands[sel.chosen].text, sel.confidence or 0.0


async def run_cascades(
    tasks: Sequence[dict[str, str]],
    requests: Sequence[ChatRequest],
    samples: list[list[Candidate]],
    first: int,
) -> dict[str, dict[str, float]]:
    """Replay the recorded samples through the real Cascade: ``first`` samples, then the rest."""
    out: dict[str, dict[str, float]] = {}
    vote = MajorityVote(extract=VOTE_EXTRACT)
    all_tokens = sum(tokens(s) for s in samples)
    for threshold in THRESHOLDS:
        right, spent, estimated_all, escalated = 0, 0.0, 0.0, 0
        for task, request, cands in zip(tasks, requests, samples, strict=True):
            replies = [
                FakeBackend(
                    f"s{i}",
                    [Reply(text=c.text, usage=c.completion.usage if c.completion else Usage())],
                )
                for i, c in enumerate(cands)
            ]
            if len(replies) < 9:
                continue
            cascade = Cascade(
                [
                    Tier(backends=replies[:first]),
                    Tier(backends=replies[first:]),
                ],
                selector=vote.selector(),
                threshold=threshold,
                carry=True,
            )
            result = await cascade.run(request)
            right += is_right(result.text, task, request)
            spent += result.cost
            estimated_all += result.cost_all_tiers
            escalated += result.escalations
        n = len(tasks)
        out[f"{threshold:g}"] = {
            "accuracy": right / n,
            "tokens_per_question": spent / n,
            "saved_vs_9": 1 - spent / all_tokens if all_tokens else 0.0,
            "saved_estimated_by_cascade": 1 - spent / estimated_all if estimated_all else 0.0,
            "escalated": escalated / n,
        }
    return out


def fake_backend(tasks: Sequence[dict[str, str]]) -> Backend:
    """A scripted stand-in for the model: right 40% of the time, else wrong or an echo."""
    answers = {t["question"] + SUFFIX: t["answer"] for t in tasks}
    rng = random.Random(1)

    def answer(request: ChatRequest) -> Completion:
        if request.messages[0].role == "system":  # judge
            return Completion(
                text=f"Rating: [[{rng.randint(1, 10)}]]", usage=Usage(output_tokens=5)
            )
        right = answers[request.prompt]
        greedy = request.temperature == 0
        roll = rng.random()
        if greedy or roll < 0.4:
            text = f"The answer is {right}."
        elif roll < 0.6:
            text = request.prompt.split("\n")[0]
        else:
            text = str(int(right) + rng.randint(1, 3))
        return Completion(text=text, usage=Usage(input_tokens=20, output_tokens=len(text.split())))

    return FunctionBackend(answer, name="fake")


async def main(fake: bool, limit: int | None, judge_every: int) -> dict[str, Any]:
    tasks = load_tasks(limit)
    requests = [request_for(t) for t in tasks]
    n = len(tasks)
    if fake:
        backend: Backend = fake_backend(tasks)
        model = "scripted"
    else:
        from genfan_providers.vllm import VLLMBackend

        backend = VLLMBackend()
        model = backend.model_name
        t0 = time.perf_counter()
        await backend.start()  # type: ignore[attr-defined]
        print(f"engine ready in {time.perf_counter() - t0:.1f}s")

    try:
        greedy, greedy_wall = await draw(backend, requests, 1, 0.0)
        print(f"greedy: {greedy_wall:.1f}s")
        rounds: list[list[list[Candidate]]] = []
        round_walls: list[float] = []
        for k in ROUNDS:
            got, wall = await draw(backend, requests, k, TEMPERATURE)
            rounds.append(got)
            round_walls.append(wall)
            print(f"{k} samples per question: {wall:.1f}s")
        samples = [reindex([c for r in rounds for c in r[i]]) for i in range(n)]

        judge_backend = Metered(backend)
        judge = LLMJudge(
            judge_backend, max_tokens=JUDGE_MAX_TOKENS, max_concurrency=9, name="judge"
        )
        vote = Select(MajorityVote(extract=VOTE_EXTRACT))
        consensus = Select(Consensus())
        judged = Select(judge)

        rows: dict[str, list[bool]] = {
            k: []
            for k in (
                "greedy",
                "1 sample",
                "vote@5",
                "vote@9",
                "consensus@5",
                "consensus@9",
                "judge@9",
                "oracle@9",
            )
        }
        vote_confidence: list[tuple[float, bool]] = []
        for task, request, g, s in zip(tasks, requests, greedy, samples, strict=True):
            rows["greedy"].append(bool(g) and is_right(g[0].text, task, request))
            rows["1 sample"].append(bool(s) and is_right(s[0].text, task, request))
            for size in (5, 9):
                text, conf = await pick(vote, request, s[:size])
                rows[f"vote@{size}"].append(is_right(text, task, request))
                if size == 9:
                    vote_confidence.append((conf, is_right(text, task, request)))
                text, _ = await pick(consensus, request, s[:size])
                rows[f"consensus@{size}"].append(is_right(text, task, request))
            rows["oracle@9"].append(any(is_right(c.text, task, request) for c in s))

        # The judge costs a call per distinct answer: it runs on every `judge_every`-th question.
        judged_ids = list(range(0, n, judge_every))
        t0 = time.perf_counter()
        picks: dict[int, str] = {}
        limiter = anyio.CapacityLimiter(max(1, IN_FLIGHT // 9))

        async def judge_one(i: int) -> None:
            async with limiter:
                picks[i], _ = await pick(judged, requests[i], samples[i])

        async with anyio.create_task_group() as tg:
            for i in judged_ids:
                tg.start_soon(judge_one, i)
        judge_wall = time.perf_counter() - t0
        judge_rows = {
            name: [rows[name][i] for i in judged_ids]
            for name in ("greedy", "1 sample", "vote@9", "consensus@9", "oracle@9")
        }
        judge_rows["judge@9"] = [is_right(picks[i], tasks[i], requests[i]) for i in judged_ids]
        del rows["judge@9"]
        print(f"judge over 9 on {len(judged_ids)} questions: {judge_wall:.1f}s")

        cascades = {f"{k}+{9 - k}": await run_cascades(tasks, requests, samples, k) for k in (3, 5)}
    finally:
        await backend.aclose()

    tok_greedy = sum(tokens(g) for g in greedy)
    tok_round = [sum(tokens(r[i]) for i in range(n)) for r in rounds]
    tok1, tok5, tok9 = tok_round[0], tok_round[0] + tok_round[1], sum(tok_round)
    wall1, wall5, wall9 = round_walls[0], sum(round_walls[:2]), sum(round_walls)
    judge_stats = judge.statistics()
    cost = {
        "greedy": (tok_greedy, greedy_wall),
        "1 sample": (tok1, wall1),
        "vote@5": (tok5, wall5),
        "vote@9": (tok9, wall9),
        "consensus@5": (tok5, wall5),
        "consensus@9": (tok9, wall9),
        "oracle@9": (tok9, wall9),
    }
    table = {
        name: {
            "accuracy": sum(hits) / n,
            "right": sum(hits),
            "tokens_per_question": cost[name][0] / n,
            "wall_s": cost[name][1],
        }
        for name, hits in rows.items()
    }
    m = len(judged_ids)
    judge_table = {
        name: {"accuracy": sum(hits) / m, "right": sum(hits)} for name, hits in judge_rows.items()
    }
    judge_table["judge@9"]["extra_tokens_per_question"] = judge_backend.usage.total_tokens / m
    judge_table["judge@9"]["extra_wall_s"] = judge_wall
    judge_table["judge@9"]["calls_per_question"] = judge_backend.calls / m
    high = [ok for conf, ok in vote_confidence if conf >= 0.5]
    low = [ok for conf, ok in vote_confidence if conf < 0.5]
    report = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, shared",
        "model": model,
        "questions": n,
        "temperature": TEMPERATURE,
        "max_tokens": MAX_TOKENS,
        "methods": table,
        "judge": {**dataclasses.asdict(judge_stats), "questions": m, "methods": judge_table},
        "vote9_confidence": {
            "share>=0.5": {"n": len(high), "accuracy": sum(high) / len(high) if high else None},
            "share<0.5": {"n": len(low), "accuracy": sum(low) / len(low) if low else None},
        },
        "cascades": cascades,
        "cascade_at_vote9_accuracy": {
            name: _cheapest_at(rows_, table["vote@9"]["accuracy"])
            for name, rows_ in cascades.items()
        },
        "answers": [
            {
                "id": t["id"],
                "expected": t["answer"],
                "greedy": g[0].text if g else None,
                "samples": [c.text for c in smp],
            }
            for t, g, smp in zip(tasks, greedy, samples, strict=True)
        ],
    }
    return report


def _cheapest_at(rows: dict[str, dict[str, float]], target: float) -> dict[str, Any] | None:
    """The threshold with the fewest tokens among those at least as accurate as ``target``."""
    ok = [(r["tokens_per_question"], t, r) for t, r in rows.items() if r["accuracy"] >= target]
    if not ok:
        return None
    _, threshold, row = min(ok)
    return {"threshold": threshold, **row}


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['questions']} questions, model {report['model']}, {report['date']}")
    print(f"{'method':<14}{'accuracy':>10}{'tokens/q':>11}{'wall s':>9}")
    for name, row in report["methods"].items():
        print(
            f"{name:<14}{row['accuracy']:>9.1%} {row['tokens_per_question']:>10.0f}"
            f"{row['wall_s']:>9.1f}"
        )
    j = report["judge"]
    print(
        f"\njudge on {j['questions']} questions ({j['calls']} calls: parsed {j['parsed']}, "
        f"unparsed {j['unparsed']}, failed {j['failed']}):"
    )
    for name, row in j["methods"].items():
        print(f"  {name:<12}{row['accuracy']:>9.1%}")
    jj = j["methods"]["judge@9"]
    print(
        f"  judge extra: {jj['extra_tokens_per_question']:.0f} tokens/q, "
        f"{jj['calls_per_question']:.1f} calls/q, {jj['extra_wall_s']:.1f}s"
    )
    for bucket, v in report["vote9_confidence"].items():
        acc = "-" if v["accuracy"] is None else f"{v['accuracy']:.1%}"
        print(f"vote@9 with {bucket}: {v['n']} questions, accuracy {acc}")
    for name, rows in report["cascades"].items():
        first, rest = name.split("+")
        print(f"\ncascade: vote over {first} samples, {rest} more (carried) when share < threshold")
        print(
            f"{'threshold':<10}{'accuracy':>10}{'tokens/q':>11}{'saved vs 9':>12}{'escalated':>11}"
        )
        for t, row in rows.items():
            print(
                f"{t:<10}{row['accuracy']:>9.1%} {row['tokens_per_question']:>10.0f}"
                f"{row['saved_vs_9']:>11.1%} {row['escalated']:>10.1%}"
            )
        best = report["cascade_at_vote9_accuracy"][name]
        if best is None:
            print("  no threshold reaches vote@9's accuracy")
        else:
            print(
                f"  at vote@9's accuracy: threshold {best['threshold']}, "
                f"saves {best['saved_vs_9']:.1%} of vote@9's tokens"
            )


def cli(argv: Sequence[str] | None = None, run: Callable[..., Any] = anyio.run) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fake", action="store_true", help="scripted backend, no engine")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument(
        "--judge-every", type=int, default=3, help="judge every N-th question (default 3)"
    )
    parser.add_argument(
        "--number-words",
        action="store_true",
        help="vote and grade with numbers written in words read too (extract='number_words')",
    )
    args = parser.parse_args(argv)
    if args.number_words:
        global EXTRACT, VOTE_EXTRACT
        EXTRACT, VOTE_EXTRACT = FinalNumber(words=True), "number_words"
    report = run(main, args.fake, args.limit, args.judge_every, backend="asyncio")
    print_report(report)
    RESULTS.mkdir(exist_ok=True)
    stem = "selection-fake" if args.fake else "selection"
    path = RESULTS / (stem + ("-number-words" if args.number_words else "") + ".json")
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    cli()
