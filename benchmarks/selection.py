"""Does selection beat one greedy call? Greedy, one sample, vote, auto, adaptive sampling, oracle.

The benchmark (``benchmarks/data/selection_bench.jsonl``, written by
``benchmarks.data.make_selection_bench``): 390 short questions in six families (arithmetic,
number facts, number sequences, capitals, word facts, multiple choice), every third item of each
family in the ``dev`` split (every setting was tuned on it), the rest in ``test``.

Two phases, so that the engine runs once:

1. ``generate``: end to end through :class:`~genfan.FanOut` on the local model (SmolLM2-135M in
   the in-process vLLM engine): per question one greedy answer (temperature 0) and 9 samples at
   temperature 0.7 drawn by :class:`~genfan.Sampling` as one engine request with ``n=9``, all
   with token log-probabilities; cached in ``benchmarks/results/selection-samples.jsonl``
   (questions already there are skipped).
2. ``evaluate`` (offline, seconds): every selector over the cached samples; adaptive sampling
   replayed wave by wave on them (waves of 3 drawn from the 9: the samples are independent, so a
   prefix is a draw of that size); Wilson intervals for accuracies, paired bootstrap intervals
   for differences; the reliability table and expected calibration error of
   ``Selection.confidence``.

``waves`` measures, on the engine, one request with ``n`` samples against ``n`` separate
requests, and the real adaptive :class:`~genfan.Sampling` end to end.

A question counts as right when the chosen answer, read for the question's known form, is one of
the expected answers (see :func:`is_right`); the selectors never see the form.

    .venv/bin/python -m benchmarks.selection generate            # ~15-30 min on 2 CPU cores
    .venv/bin/python -m benchmarks.selection evaluate
    .venv/bin/python -m benchmarks.selection waves --limit 60
    .venv/bin/python -m benchmarks.selection evaluate --fake     # the pipeline, no engine
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from genfan import (
    AllBackendsFailedError,
    Backend,
    ChatRequest,
    Completion,
    FanOut,
    Sampling,
    Target,
    TokenLogprob,
    Usage,
)
from genfan.select import (
    AdaptiveConsistency,
    AutoSelect,
    Calibration,
    Candidate,
    Consensus,
    FinalNumber,
    FirstSuccess,
    MajorityVote,
    Select,
    Selection,
    Selector,
    Waves,
    expected_calibration_error,
    reliability_table,
)

HERE = Path(__file__).resolve().parent
BENCH = HERE / "data" / "selection_bench.jsonl"
RESULTS = HERE / "results"
SAMPLES = RESULTS / "selection-samples.jsonl"  # temperature 0.7; others: -t<T>.jsonl
MAX_TOKENS = 40
TEMPERATURE = 0.7
K = 9
IN_FLIGHT = 48  # engine sequences in flight


def load_items(split: str | None = None) -> list[dict[str, Any]]:
    items = [json.loads(line) for line in BENCH.read_text().splitlines() if line.strip()]
    return [i for i in items if split in (None, "all", i["split"])]


def request_for(item: dict[str, Any]) -> ChatRequest:
    return ChatRequest.from_prompt(item["question"], max_tokens=MAX_TOKENS, logprobs=True)


# -- generation ------------------------------------------------------------------------------


def _dump(c: Candidate | Completion | None) -> dict[str, Any] | None:
    completion = c.completion if isinstance(c, Candidate) else c
    if completion is None:
        return None
    return {
        "text": completion.text,
        "finish": completion.finish_reason,
        "in": completion.usage.input_tokens,
        "out": completion.usage.output_tokens,
        "tokens": [t.token for t in completion.logprobs or ()],
        "logprobs": [round(t.logprob, 5) for t in completion.logprobs or ()],
    }


def completion_of(row: dict[str, Any] | None) -> Completion | None:
    """A cached answer as a :class:`Completion` again (logprobs included)."""
    if row is None:
        return None
    tokens = [
        TokenLogprob(token=t, logprob=lp)
        for t, lp in zip(row["tokens"], row["logprobs"], strict=True)
    ]
    # As the backend now does: tokens past the text (the end-of-turn token) are not the answer's.
    joined = sum(len(t.token) for t in tokens)
    while tokens and joined - len(tokens[-1].token) >= len(row["text"]):
        joined -= len(tokens.pop().token)
    return Completion(
        text=row["text"],
        finish_reason=row["finish"],
        usage=Usage(input_tokens=row["in"], output_tokens=row["out"]),
        logprobs=tuple(tokens) or None,
    )


def samples_path(temperature: float | None = None) -> Path:
    t = TEMPERATURE if temperature is None else temperature
    return SAMPLES if t == 0.7 else SAMPLES.with_name(f"selection-samples-t{t:g}.jsonl")


def load_cache(temperature: float | None = None) -> dict[str, dict[str, Any]]:
    path = samples_path(temperature)
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


async def generate(backend: Backend, items: Sequence[dict[str, Any]], chunk: int = 48) -> None:
    """Greedy + ``K`` samples per question, through FanOut / Sampling, appended to the cache."""
    cached = load_cache()
    greedy_done = load_cache(0.7)  # greedy answers do not depend on the sampling temperature
    todo = [i for i in items if i["id"] not in cached]
    print(f"{len(items) - len(todo)} cached, {len(todo)} to generate")
    greedy = FanOut([Target(backend=backend, name="greedy", temperature=0.0)])
    sampler = Sampling(
        backend, K, waves=None, temperature=TEMPERATURE, select=FirstSuccess(), name="samples"
    )
    RESULTS.mkdir(exist_ok=True)
    t_all = time.perf_counter()
    for lo in range(0, len(todo), chunk):
        part = todo[lo : lo + chunk]
        requests = [request_for(i) for i in part]
        t0 = time.perf_counter()
        reuse = all(i["id"] in greedy_done for i in part) and TEMPERATURE != 0.7
        g: list[Any] = (
            [greedy_done[i["id"]]["greedy"] for i in part]
            if reuse
            else await greedy.map(requests, max_in_flight=IN_FLIGHT)
        )
        t1 = time.perf_counter()
        s = await sampler.map(requests, max_in_flight=max(1, IN_FLIGHT // K))
        t2 = time.perf_counter()
        with samples_path().open("a") as f:
            for item, gr, sr in zip(part, g, s, strict=True):
                if reuse:
                    greedy_row = gr
                elif isinstance(gr, AllBackendsFailedError):
                    greedy_row = None
                else:
                    greedy_row = _dump(gr.chosen)
                row = {
                    "id": item["id"],
                    "greedy": greedy_row,
                    "samples": []
                    if isinstance(sr, AllBackendsFailedError)
                    else [_dump(c) for c in sr.candidates],
                    "wall": {"greedy": t1 - t0, "samples": t2 - t1, "questions": len(part)},
                }
                f.write(json.dumps(row) + "\n")
        out_tokens = sum(
            c.completion.usage.output_tokens
            for r in s
            if not isinstance(r, AllBackendsFailedError)
            for c in r.candidates
            if c.completion is not None
        )
        print(
            f"{lo + len(part)}/{len(todo)}: greedy {t1 - t0:.1f}s, samples {t2 - t1:.1f}s "
            f"({out_tokens / (t2 - t1):.0f} output tok/s), total {time.perf_counter() - t_all:.0f}s",
            flush=True,
        )


async def run_generate(split: str, limit: int | None) -> None:
    from genfan_providers.vllm import VLLMBackend

    items = load_items(split)[: limit or None]
    backend = VLLMBackend()
    t0 = time.perf_counter()
    await backend.start()
    print(f"engine ready in {time.perf_counter() - t0:.1f}s")
    try:
        await generate(backend, items)
    finally:
        await backend.aclose()


# -- grading ---------------------------------------------------------------------------------

FORMS = {
    "arithmetic": "number",
    "number_facts": "number",
    "sequences": "number",
    "capitals": "short",
    "word_facts": "short",
    "multiple_choice": "choice",
}


def _fold(text: str) -> str:
    import unicodedata

    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


_CHOICE_MARKED = re.compile(r"\b(?i:answer|option|choice)\b[^A-Za-z]{0,12}\(?([A-D])\b(?![\w'])")
_CHOICE_LEAD = re.compile(r"^\W{0,3}\(?([A-D])(?:\)|\.|:|\s*$|\s*\n)")


def grade_choice(text: str, item: dict[str, Any]) -> str | None:
    """The letter a reply gives: one named as the answer (``answer is B``), else the letter it
    starts with (``B``, ``(B)``, ``B) ...``, ``B. ...``), else the one option whose text it
    names; ``None`` when it gives none."""
    m = _CHOICE_MARKED.search(text) or _CHOICE_LEAD.search(text.strip())
    if m:
        return m.group(1)
    folded = _fold(text)
    named = [
        letter
        for letter, option in zip("ABCD", item["options"], strict=False)
        if re.search(rf"(?<!\w){re.escape(_fold(option))}(?!\w)", folded)
    ]
    return named[0] if len(named) == 1 else None


_LAST_NUMBER = FinalNumber()
_LAST_NUMBER_WORDS = FinalNumber(words=True)


def is_right(text: str, item: dict[str, Any], request: ChatRequest) -> bool:
    """The benchmark's grader, fixed before any tuning and independent of the selectors' own
    answer reading. Numbers: the reply's last number is the expected one (numbers echoed from
    the question ignored; numbers in words only when it has no digit: ``FinalNumber``). Choices:
    :func:`grade_choice` gives the expected letter. Short answers: an accepted answer appears,
    as whole words, in the reply's first 150 characters."""
    if not text:
        return False
    kind = FORMS[item["family"]]
    if kind == "number":
        found = _LAST_NUMBER(text, request) or _LAST_NUMBER_WORDS(text, request)
        return found == item["answers"][0]
    if kind == "choice":
        return grade_choice(text, item) == item["answers"][0]
    head = _fold(text[:150])
    return any(re.search(rf"(?<!\w){re.escape(_fold(a))}(?!\w)", head) for a in item["answers"])


# -- statistics ------------------------------------------------------------------------------


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95%) of a proportion."""
    if n == 0:
        return (0.0, 0.0)
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(
    a: Sequence[bool], b: Sequence[bool], rounds: int = 4000, seed: int = 16
) -> tuple[float, float, float]:
    """The difference of accuracies a - b over the same items, with a 95% bootstrap interval."""
    n = len(a)
    rng = random.Random(seed)
    diffs = [int(x) - int(y) for x, y in zip(a, b, strict=True)]
    stats = []
    for _ in range(rounds):
        stats.append(sum(diffs[rng.randrange(n)] for _ in range(n)) / n)
    stats.sort()
    return (sum(diffs) / n, stats[int(0.025 * rounds)], stats[int(0.975 * rounds) - 1])


def mean_ci(
    values: Sequence[float], rounds: int = 4000, seed: int = 16
) -> tuple[float, float, float]:
    """A mean with a 95% bootstrap interval."""
    n = len(values)
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return (sum(values) / n, means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1])


# -- evaluation ------------------------------------------------------------------------------


@dataclasses.dataclass
class Question:
    item: dict[str, Any]
    request: ChatRequest
    greedy: Completion | None
    samples: list[Completion]

    def candidates(self, k: int | None = None, start: int = 0) -> list[Candidate]:
        chosen = self.samples[start : (start + k) if k is not None else None]
        return [
            Candidate(index=i, backend=f"s{i}", status="ok", completion=c, finished_order=i)
            for i, c in enumerate(chosen)
        ]

    def right(self, text: str) -> bool:
        return is_right(text, self.item, self.request)

    def prompt_tokens(self) -> int:
        return self.samples[0].usage.input_tokens if self.samples else 0


def questions(items: Sequence[dict[str, Any]], cache: dict[str, dict[str, Any]]) -> list[Question]:
    out = []
    for item in items:
        row = cache.get(item["id"])
        if row is None:
            continue
        samples = [c for c in (completion_of(r) for r in row["samples"]) if c is not None]
        out.append(Question(item, request_for(item), completion_of(row["greedy"]), samples))
    return out


async def choose(
    selector: Selector, q: Question, cands: Sequence[Candidate]
) -> tuple[str, Selection]:
    sel = await selector.select(q.request, cands)
    return ("" if sel.chosen is None else cands[sel.chosen].text), sel


def wave_tokens(q: Question, drawn: int, waves: int) -> int:
    """Tokens of ``drawn`` samples drawn in ``waves`` engine requests (the prompt once each)."""
    return q.prompt_tokens() * waves + sum(c.usage.output_tokens for c in q.samples[:drawn])


async def adaptive(
    q: Question, selector: AutoSelect, waves: Waves, budget: int = K
) -> tuple[bool, int, int, Selection]:
    """Replay adaptive sampling on the cached samples: (right, tokens with the prompt counted
    once per wave, samples drawn, selection)."""
    drawn, n_waves = 0, 0
    for size in waves.plan(budget):
        drawn += size
        n_waves += 1
        cands = q.candidates(drawn)
        if waves.settled(q.request, cands, budget - drawn):
            break
    text, sel = await choose(selector, q, q.candidates(drawn))
    return q.right(text), wave_tokens(q, drawn, n_waves), drawn, sel


SCHEDULES = {"3+3+3": Waves(size=3), "2+2+...": Waves(size=2), "3+2+2+2": Waves(first=3, size=2)}
THRESHOLDS = (0.8, 0.9, 0.95, 0.99)
CONFIDENT = (0.5, 0.6, 0.7, 0.8)


async def evaluate_split(qs: Sequence[Question]) -> dict[str, Any]:
    """Every method on the questions of one split."""
    auto = AutoSelect()
    variants: dict[str, Selector] = {
        "vote@9 (normalize, the plain default)": Select(MajorityVote()),
        "vote@9 (number)": Select(MajorityVote(extract="number")),
        "consensus@9": Select(Consensus()),
        "auto@9": auto,
        "auto@9, unweighted": AutoSelect(weight="none"),
        "auto@9, sequence-weighted": AutoSelect(weight="sequence"),
        "auto@9, keep 75% most confident": AutoSelect(keep=0.75),
        "auto@9, keep 50% most confident": AutoSelect(keep=0.5),
    }
    hits: dict[str, list[bool]] = {"greedy": [], "one sample": []}
    tokens: dict[str, list[int]] = {"greedy": [], "one sample": []}
    for name in variants:
        hits[name], tokens[name] = [], []
    for k in (1, 3, 5, 7):
        hits[f"auto@{k}"], tokens[f"auto@{k}"] = [], []
    hits["oracle@9"], tokens["oracle@9"] = [], []
    calibration: list[tuple[float, bool]] = []
    forms: dict[str, int] = {}
    agreement: dict[str, dict[int, int]] = {"3": {}, "9": {}}
    for q in qs:
        for k in (3, 9):
            counts = sorted(
                (len(g) for g in auto._analyse(q.request, q.candidates(k)).groups.values()),
                reverse=True,
            )
            top = counts[0] if counts else 0
            agreement[str(k)][top] = agreement[str(k)].get(top, 0) + 1
        g = q.greedy
        hits["greedy"].append(g is not None and q.right(g.text))
        tokens["greedy"].append(g.usage.total_tokens if g else 0)
        hits["one sample"].append(bool(q.samples) and q.right(q.samples[0].text))
        tokens["one sample"].append(wave_tokens(q, 1, 1))
        for name, selector in variants.items():
            text, sel = await choose(selector, q, q.candidates(K))
            hits[name].append(q.right(text))
            tokens[name].append(wave_tokens(q, K, 1))
            if name == "auto@9":
                calibration.append((sel.confidence or 0.0, q.right(text)))
                forms[sel.method] = forms.get(sel.method, 0) + 1
        for k in (1, 3, 5, 7):
            text, _ = await choose(auto, q, q.candidates(k))
            hits[f"auto@{k}"].append(q.right(text))
            tokens[f"auto@{k}"].append(wave_tokens(q, k, 1))
        hits["oracle@9"].append(any(q.right(c.text) for c in q.samples))
        tokens["oracle@9"].append(wave_tokens(q, K, 1))
    n = len(qs)
    table: dict[str, dict[str, Any]] = {}
    for name, h in hits.items():
        lo, hi = wilson(sum(h), n)
        table[name] = {
            "accuracy": sum(h) / n,
            "right": sum(h),
            "ci95": [lo, hi],
            "tokens_per_question": sum(tokens[name]) / n,
        }
    # auto@9's tokens when its 9 samples are 9 separate requests (a FanOut of 9 targets)
    separate = sum(K * q.prompt_tokens() + wave_tokens(q, K, 0) for q in qs) / n
    table["auto@9"]["tokens_as_9_requests"] = separate
    adaptive_rows: dict[str, dict[str, Any]] = {}
    adaptive_hits: dict[str, list[bool]] = {}
    adaptive_calibration: dict[str, list[tuple[float, bool]]] = {}
    rules = [(f"Beta {t:g}", {"stop": AdaptiveConsistency(t)}) for t in THRESHOLDS] + [
        (f"Beta 0.95 or P(right) >= {c:g}", {"stop": AdaptiveConsistency(0.95), "confident": c})
        for c in CONFIDENT
    ]
    for sched, waves in SCHEDULES.items():
        for rule, fields in rules:
            w = dataclasses.replace(waves, **fields)
            name = f"adaptive {sched}, {rule}"
            rs, ts, os_, ds, cal = [], [], [], [], []
            for q in qs:
                right, tok, drawn, sel = await adaptive(q, auto, w)
                rs.append(right)
                ts.append(tok)
                os_.append(wave_tokens(q, drawn, 1))
                ds.append(drawn)
                cal.append((sel.confidence or 0.0, right))
            lo, hi = wilson(sum(rs), n)
            t_mean, t_lo, t_hi = mean_ci([float(t) for t in ts])
            adaptive_rows[name] = {
                "accuracy": sum(rs) / n,
                "right": sum(rs),
                "ci95": [lo, hi],
                "tokens_per_question": t_mean,
                "tokens_ci95": [t_lo, t_hi],
                "tokens_vs_auto9": t_mean / table["auto@9"]["tokens_per_question"],
                "prompt_once_tokens_per_question": sum(os_) / n,
                "prompt_once_vs_auto9": sum(os_) / n / table["auto@9"]["tokens_per_question"],
                "vs_auto9_as_9_requests": t_mean / separate,
                "samples_per_question": sum(ds) / n,
                "ece": expected_calibration_error(cal),
            }
            adaptive_hits[name] = rs
            adaptive_calibration[name] = cal
    auto9 = hits["auto@9"]
    diffs = {
        "auto@9 - greedy": paired_bootstrap(auto9, hits["greedy"]),
        "auto@9 - vote@9 (plain)": paired_bootstrap(
            auto9, hits["vote@9 (normalize, the plain default)"]
        ),
        "auto@9 - vote@9 (number)": paired_bootstrap(auto9, hits["vote@9 (number)"]),
        "auto@9 - one sample": paired_bootstrap(auto9, hits["one sample"]),
    }
    for name, rs in adaptive_hits.items():
        diffs[f"{name} - auto@9"] = paired_bootstrap(rs, auto9)
    by_family: dict[str, dict[str, float]] = {}
    for fam in FORMS:
        idx = [i for i, q in enumerate(qs) if q.item["family"] == fam]
        if idx:
            by_family[fam] = {
                name: sum(hits[name][i] for i in idx) / len(idx)
                for name in (
                    "greedy",
                    "one sample",
                    "vote@9 (normalize, the plain default)",
                    "vote@9 (number)",
                    "consensus@9",
                    "auto@9",
                    "oracle@9",
                )
            }
            by_family[fam]["questions"] = len(idx)
    return {
        "questions": n,
        "methods": table,
        "adaptive": adaptive_rows,
        "differences": {k: {"diff": d, "ci95": [lo, hi]} for k, (d, lo, hi) in diffs.items()},
        "by_family": by_family,
        "forms_inferred": forms,
        "top_votes": {k: dict(sorted(v.items())) for k, v in agreement.items()},
        "calibration": {
            "ece": expected_calibration_error(calibration),
            "reliability": [dataclasses.asdict(b) for b in reliability_table(calibration)],
            "adaptive_ece": {
                k: expected_calibration_error(v) for k, v in adaptive_calibration.items()
            },
        },
    }


async def fit_calibration(qs: Sequence[Question]) -> Calibration:
    """Fit the auto selector's calibration on selections over 1, 3, 5, 7 and 9 samples."""
    auto = AutoSelect()
    rows: list[tuple[dict[str, float], bool]] = []
    for q in qs:
        for k in (1, 3, 5, 7, 9):
            for start in range(0, K - k + 1, max(k, 1)):
                cands = q.candidates(k, start)
                text, _ = await choose(auto, q, cands)
                rows.append((auto.evidence(q.request, cands), q.right(text)))
    return Calibration.fit(
        rows,
        features=["share", "margin", "votes", "log_n", "answer_conf"],
        defaults={"answer_conf": sum(f.get("answer_conf", 0.0) for f, _ in rows) / len(rows)},
        source="benchmarks/selection.py fit on the dev split",
    )


def print_split(name: str, r: dict[str, Any]) -> None:
    print(f"\n== {name}: {r['questions']} questions ==")
    print(f"{'method':<40}{'accuracy':>9}  {'95% CI':<15}{'tokens/q':>9}")
    for m, row in r["methods"].items():
        lo, hi = row["ci95"]
        print(
            f"{m:<40}{row['accuracy']:>8.1%}  [{lo:.1%}, {hi:.1%}]{row['tokens_per_question']:>9.0f}"
        )
    print(
        f"\n{'adaptive sampling (auto selector)':<48}{'accuracy':>9}  {'95% CI':<15}"
        f"{'tokens/q':>9}{'vs auto@9':>10}{'prompt once':>12}{'samples':>8}"
    )
    for m, row in r["adaptive"].items():
        lo, hi = row["ci95"]
        print(
            f"{m:<48}{row['accuracy']:>8.1%}  [{lo:.1%}, {hi:.1%}]{row['tokens_per_question']:>9.0f}"
            f"{row['tokens_vs_auto9']:>9.1%}{row['prompt_once_vs_auto9']:>11.1%}"
            f"{row['samples_per_question']:>8.2f}"
        )
    print("\ndifferences (paired bootstrap, 95%):")
    for m, d in r["differences"].items():
        lo, hi = d["ci95"]
        print(f"  {m:<52}{d['diff']:+.1%}  [{lo:+.1%}, {hi:+.1%}]")
    print("\nby family:", json.dumps(r["by_family"], indent=None))
    print("forms inferred:", r["forms_inferred"])
    print("questions by the leading answer's votes, of 3 and of 9 samples:", r["top_votes"])
    cal = r["calibration"]
    print(f"auto@9 Selection.confidence: ECE {cal['ece']:.3f}")
    for b in cal["reliability"]:
        if b["count"]:
            print(
                f"  [{b['low']:.1f}, {b['high']:.1f}): {b['count']:>4} selections, "
                f"mean confidence {b['confidence']:.2f}, right {b['accuracy']:.2f}"
            )


def fake_cache(items: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A scripted stand-in for the engine's answers (right 40% of the time, else a wrong answer
    or an echo of the question), to run the evaluation without the engine."""
    rng = random.Random(1)

    def reply(item: dict[str, Any], greedy: bool) -> dict[str, Any]:
        right = item["answers"][0]
        roll = rng.random()
        if greedy or roll < 0.4:
            text = f"The answer is {right}."
        elif roll < 0.6:
            text = item["question"].split("\n")[0]
        elif FORMS[item["family"]] == "number":
            text = f"It is {int(right) + rng.randint(1, 3)}."
        else:
            text = f"It is {rng.choice(['Lyon', 'A', 'blue', 'B'])}."
        lp = -0.1 if roll < 0.4 else -1.0
        tokens = [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]
        return {
            "text": text,
            "finish": "stop",
            "in": 30,
            "out": len(tokens),
            "tokens": tokens,
            "logprobs": [lp] * len(tokens),
        }

    return {
        i["id"]: {
            "id": i["id"],
            "greedy": reply(i, True),
            "samples": [reply(i, False) for _ in range(K)],
        }
        for i in items
    }


async def run_evaluate(fit: bool, fake: bool = False) -> dict[str, Any]:
    cache = fake_cache(load_items()) if fake else load_cache()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared",
        "temperature": TEMPERATURE,
        "max_tokens": MAX_TOKENS,
        "samples": K,
    }
    dev = questions(load_items("dev"), cache)
    if fit:
        cal = await fit_calibration(dev)
        print("calibration fitted on dev:", cal)
        report["fitted_calibration"] = {
            "weights": dict(cal.weights),
            "intercept": cal.intercept,
            "defaults": dict(cal.defaults),
        }
    for split in ("dev", "test"):
        qs = dev if split == "dev" else questions(load_items("test"), cache)
        if not qs:
            continue
        report[split] = await evaluate_split(qs)
        print_split(split, report[split])
    return report


# -- n samples in one request against n requests (engine) -------------------------------------


async def run_waves(limit: int) -> dict[str, Any]:
    """On ``limit`` test questions: 9 separate requests, one request with n=9, and the real
    adaptive :class:`~genfan.Sampling` (waves of 3, Beta 0.95), each end to end on the engine."""
    from genfan_providers.vllm import VLLMBackend

    items = load_items("test")[:limit]
    requests = [request_for(i) for i in items]
    backend = VLLMBackend()
    await backend.start()
    out: dict[str, Any] = {"questions": len(items)}
    try:
        separate = FanOut(
            [Target(backend=backend, name=f"s{i}", temperature=TEMPERATURE) for i in range(K)],
            select=AutoSelect(),
        )
        one = Sampling(backend, K, waves=None, temperature=TEMPERATURE)
        waves = Sampling(backend, K, waves=Waves(size=3), temperature=TEMPERATURE)
        for name, fan in (
            ("9 separate requests", separate),
            ("one request, n=9", one),
            ("adaptive, waves of 3 (one request each)", waves),
        ):
            t0 = time.perf_counter()
            results = await fan.map(requests, max_in_flight=max(1, IN_FLIGHT // K))
            wall = time.perf_counter() - t0
            ok = [r for r in results if not isinstance(r, AllBackendsFailedError)]
            usage = [r.usage for r in ok]
            inp = sum(u.input_tokens for u in usage)
            outp = sum(u.output_tokens for u in usage)
            right = sum(
                is_right(r.text if r.chosen else "", item, req)
                for r, item, req in zip(results, items, requests, strict=True)
                if not isinstance(r, AllBackendsFailedError)
            )
            drawn = sum(len(r.successes) for r in ok)
            out[name] = {
                "wall_s": wall,
                "input_tokens": inp,
                "output_tokens": outp,
                "output_tok_per_s": outp / wall,
                "samples": drawn,
                "accuracy": right / len(items),
            }
            print(
                f"{name}: {wall:.1f}s, {inp} prompt + {outp} output tokens "
                f"({outp / wall:.0f} output tok/s), {drawn} samples, {right}/{len(items)} right",
                flush=True,
            )
    finally:
        await backend.aclose()
    return out


def cli(argv: Sequence[str] | None = None) -> None:
    global TEMPERATURE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="draw greedy + 9 samples per question (engine)")
    g.add_argument("--split", default="all", choices=["dev", "test", "all"])
    g.add_argument("--limit", type=int, default=None)
    g.add_argument("--temperature", type=float, default=TEMPERATURE)
    e = sub.add_parser("evaluate", help="every selector over the cached samples (offline)")
    e.add_argument("--fit", action="store_true", help="fit the calibration on dev and print it")
    e.add_argument("--temperature", type=float, default=TEMPERATURE)
    e.add_argument("--fake", action="store_true", help="scripted answers instead of the cache")
    w = sub.add_parser("waves", help="n samples in one request vs n requests (engine)")
    w.add_argument("--limit", type=int, default=60)
    args = parser.parse_args(argv)
    TEMPERATURE = getattr(args, "temperature", TEMPERATURE)
    RESULTS.mkdir(exist_ok=True)
    if args.command == "generate":
        anyio.run(run_generate, args.split, args.limit, backend="asyncio")
        return
    if args.command == "evaluate":
        report = anyio.run(run_evaluate, args.fit, args.fake)
        path = RESULTS / (
            "selection-fake.json"
            if args.fake
            else "selection.json"
            if TEMPERATURE == 0.7
            else f"selection-t{TEMPERATURE:g}.json"
        )
    else:
        report = anyio.run(run_waves, args.limit, backend="asyncio")
        path = RESULTS / "selection-waves.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    cli()
