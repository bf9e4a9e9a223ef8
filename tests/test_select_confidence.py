"""Model confidence (token log-probabilities and their statistics) and calibration math."""

from __future__ import annotations

import math
import random

import pytest

from genfan import ChatRequest, Completion, ConfigurationError, LogprobStats, TokenLogprob
from genfan.select import (
    Calibration,
    answer_confidence,
    answer_logprobs,
    expected_calibration_error,
    reliability_table,
    sequence_confidence,
)


def completion(tokens: list[tuple[str, float]]) -> Completion:
    return Completion(
        text="".join(t for t, _ in tokens),
        logprobs=tuple(TokenLogprob(token=t, logprob=lp) for t, lp in tokens),
    )


def test_a_request_asks_for_logprobs_and_a_completion_carries_them() -> None:
    request = ChatRequest.from_prompt("hi", logprobs=True)
    assert request.logprobs is True
    assert ChatRequest.from_prompt("hi").logprobs is False
    assert "logprobs" not in ChatRequest.from_prompt("hi").model_dump(exclude_defaults=True)
    assert request.with_overrides(temperature=0.5).logprobs is True
    c = completion([("The", -0.5), (" answer", -0.1), (" is", -0.2), (" 4", -1.2)])
    assert c.logprobs is not None and c.logprobs[3].token == " 4"
    assert Completion(text="x").logprobs is None and Completion(text="x").logprob_stats is None


def test_logprob_statistics() -> None:
    values = [-0.5, -0.1, -0.2, -1.2, -0.0, -0.3, -0.4, -0.6, -0.7, -0.9, -2.0, -0.05]
    stats = LogprobStats.of(values)
    assert stats is not None
    assert stats.tokens == 12
    assert stats.total == pytest.approx(sum(values))
    assert stats.mean == pytest.approx(sum(values) / 12)
    assert stats.min == -2.0
    assert stats.tail_mean == pytest.approx(-2.0)  # the least likely 10%: one token of 12
    assert stats.probability == pytest.approx(math.exp(stats.mean))
    assert stats.perplexity == pytest.approx(math.exp(-stats.mean))
    assert LogprobStats.of([]) is None
    assert LogprobStats.of([float("-inf")]).min == -100.0  # type: ignore[union-attr]
    c = completion([("a", -1.0), ("b", -3.0)])
    assert c.logprob_stats is not None and c.logprob_stats.mean == -2.0


def test_answer_confidence_reads_the_tokens_of_the_answer_only() -> None:
    c = completion([("The", -2.0), (" answer", -2.0), (" is", -2.0), (" 4", -0.1), ("2", -0.3)])
    start = c.text.index("42")
    assert answer_logprobs(c, start, start + 2) == [-0.1, -0.3]
    assert answer_confidence(c, start, start + 2) == pytest.approx(math.exp(-0.2))
    assert sequence_confidence(c) == pytest.approx(math.exp(-6.4 / 5))
    assert answer_confidence(Completion(text="42"), 0, 2) is None
    # tokens that do not spell the text: no answer confidence rather than a wrong one
    odd = Completion(text="42", logprobs=(TokenLogprob(token="forty", logprob=-1.0),))
    assert answer_logprobs(odd, 0, 2) is None
    # a text the backend stripped is found inside its tokens
    stripped = Completion(
        text="42",
        logprobs=(TokenLogprob(token=" ", logprob=-0.5), TokenLogprob(token="42", logprob=-0.2)),
    )
    assert answer_logprobs(stripped, 0, 2) == [-0.2]


def test_calibration_probability_is_a_logistic_map() -> None:
    cal = Calibration(weights={"share": 2.0}, intercept=-1.0, defaults={"answer_conf": 0.5})
    assert cal.probability({"share": 0.5}) == pytest.approx(0.5)
    assert cal.probability({"share": 1.0}) == pytest.approx(1 / (1 + math.exp(-1.0)))
    cal2 = Calibration(weights={"answer_conf": 2.0}, intercept=-1.0, defaults={"answer_conf": 0.5})
    assert cal2.probability({}) == pytest.approx(0.5)  # a missing feature takes its default


def test_calibration_fit_recovers_a_known_logistic_model() -> None:
    rng = random.Random(0)
    rows = []
    for _ in range(3000):
        share = rng.random()
        p = 1 / (1 + math.exp(-(-2.0 + 4.0 * share)))
        rows.append(({"share": share}, rng.random() < p))
    cal = Calibration.fit(rows, l2=0.0)
    assert cal.weights["share"] == pytest.approx(4.0, abs=0.5)
    assert cal.intercept == pytest.approx(-2.0, abs=0.3)
    pairs = [(cal.probability(f), y) for f, y in rows]
    assert expected_calibration_error(pairs) < 0.05


def test_calibration_fit_needs_both_labels() -> None:
    with pytest.raises(ConfigurationError):
        Calibration.fit([])
    with pytest.raises(ConfigurationError):
        Calibration.fit([({"share": 1.0}, True), ({"share": 0.5}, True)])


def test_reliability_table_and_ece() -> None:
    pairs = [(0.95, True)] * 9 + [(0.95, False)] + [(0.15, False)] * 8 + [(0.15, True)] * 2
    table = reliability_table(pairs, bins=10)
    assert len(table) == 10
    top = table[9]
    assert top.count == 10 and top.accuracy == pytest.approx(0.9)
    assert top.confidence == pytest.approx(0.95)
    low = table[1]
    assert low.count == 10 and low.accuracy == pytest.approx(0.2)
    assert table[5].count == 0 and table[5].accuracy is None
    # ECE: (10 * |0.95 - 0.9| + 10 * |0.15 - 0.2|) / 20
    assert expected_calibration_error(pairs) == pytest.approx(0.05)
    assert expected_calibration_error([]) == 0.0
    # a confidence of exactly 1 lands in the last bin
    assert reliability_table([(1.0, True)], bins=4)[3].count == 1
    with pytest.raises(ConfigurationError):
        reliability_table(pairs, bins=0)


@pytest.mark.anyio
async def test_the_openai_backend_asks_for_and_parses_logprobs() -> None:
    httpx = pytest.importorskip("httpx")
    from genfan_providers.openai import OpenAIBackend

    bodies: list[dict[str, object]] = []

    def answer(request: object) -> object:
        import json as _json

        body = _json.loads(request.content)  # type: ignore[attr-defined]
        bodies.append(body)
        logprobs = (
            {
                "content": [
                    {"token": "4", "logprob": -0.1, "top_logprobs": []},
                    {"token": "2", "logprob": -0.3, "top_logprobs": []},
                ]
            }
            if body.get("logprobs")
            else None
        )
        return httpx.Response(
            200,
            json={
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "42"},
                        "finish_reason": "stop",
                        "logprobs": logprobs,
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2},
            },
        )

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    backend = OpenAIBackend("m", base_url="http://test/v1", api_key="k", client=client)
    asked = await backend.complete(ChatRequest.from_prompt("6*7?", logprobs=True))
    plain = await backend.complete(ChatRequest.from_prompt("6*7?"))
    await client.aclose()
    assert bodies[0]["logprobs"] is True and "logprobs" not in bodies[1]
    assert asked.logprobs == (
        TokenLogprob(token="4", logprob=-0.1),
        TokenLogprob(token="2", logprob=-0.3),
    )
    assert asked.logprob_stats is not None and asked.logprob_stats.tokens == 2
    assert plain.logprobs is None


def test_calibration_fit_row_weights_count_a_row_that_many_times() -> None:
    rng = random.Random(1)
    rows = []
    for _ in range(400):
        share = rng.random()
        rows.append(({"share": share}, rng.random() < share))
    doubled = Calibration.fit(rows + rows[:100])
    weighted = Calibration.fit(rows, row_weights=[2.0] * 100 + [1.0] * 300)
    assert weighted.intercept == pytest.approx(doubled.intercept, abs=1e-6)
    assert weighted.weights["share"] == pytest.approx(doubled.weights["share"], abs=1e-6)
    plain = Calibration.fit(rows)
    assert weighted.intercept != pytest.approx(plain.intercept, abs=1e-3)
    # a weight of 0 leaves a row out
    dropped = Calibration.fit(rows, row_weights=[0.0] * 100 + [1.0] * 300)
    assert dropped.intercept == pytest.approx(Calibration.fit(rows[100:]).intercept, abs=1e-6)


@pytest.mark.parametrize(
    ("row_weights", "message"),
    [
        ([1.0], "one weight per row"),
        ([1.0, -1.0, 1.0], "finite and >= 0"),
        ([1.0, float("nan"), 1.0], "finite and >= 0"),
        ([0.0, 0.0, 0.0], "not all 0"),
        ([1.0, 0.0, 1.0], "both right and wrong"),  # the one wrong row weighs nothing
    ],
)
def test_calibration_fit_refuses_bad_row_weights(row_weights: list[float], message: str) -> None:
    rows = [({"share": 1.0}, True), ({"share": 0.2}, False), ({"share": 0.9}, True)]
    with pytest.raises(ConfigurationError, match=message):
        Calibration.fit(rows, row_weights=row_weights)


def test_the_default_calibration_is_the_benchmarks_fit_on_its_dev_splits() -> None:
    """What a user gets by default is what docs/benchmarks.md measured: the calibration the
    benchmark fits on the pooled dev splits of the committed samples (never on test)."""
    import anyio

    from benchmarks import selection as bench
    from genfan.select import DEFAULT_CALIBRATION

    async def rows() -> list[tuple[dict[str, float], bool, int, str]]:
        out = []
        for draw in bench.CAL_DRAWS:
            cache = bench.read_samples(bench.frozen_path(draw))
            out += await bench.calibration_rows(bench.questions(bench.load_items("dev"), cache))
        return out

    fitted = bench.fit_rows(anyio.run(rows))
    assert set(DEFAULT_CALIBRATION.weights) == set(bench.CAL_FEATURES) == set(fitted.weights)
    for name, weight in fitted.weights.items():
        assert DEFAULT_CALIBRATION.weights[name] == pytest.approx(weight, abs=1e-3), name
    assert DEFAULT_CALIBRATION.intercept == pytest.approx(fitted.intercept, abs=1e-3)
    assert DEFAULT_CALIBRATION.defaults == fitted.defaults
