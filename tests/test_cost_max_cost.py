"""A cap per fan-out: ``max_cost`` on FanOut, Cascade and Synthesis (and in the TOML config and
the CLI). Calls whose estimate would pass the cap are not started, running losers are cancelled
once the spend passes it, and the result says what was cut and why."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from genfan_providers.openai import OpenAIBackend
from typer.testing import CliRunner

from genfan import (
    AllBackendsFailedError,
    BaseBackend,
    Cascade,
    ChatRequest,
    Completion,
    ConfigurationError,
    Cut,
    FanOut,
    StreamEnd,
    StreamEvent,
    Synthesis,
    TextDelta,
    Usage,
    aggregate_request,
    load_config,
)
from genfan.cli import app
from genfan.cost import MaxCostError, Price, estimate_cost
from genfan.testing import FakeBackend
from genfan.testserver import FakeLLMServer

pytestmark = pytest.mark.anyio

#: $1 per input and per output token: a 4-character prompt is 1 + 4 (template) = 5 tokens, so
#: with max_tokens=5 a call's estimate is $10.
DOLLAR = Price(input=1_000_000.0, output=1_000_000.0)
REQUEST = ChatRequest.from_prompt("abcd", max_tokens=5)


class Priced(BaseBackend):
    """A scripted backend with a price; its answers cost ``cost`` (default: as priced)."""

    def __init__(
        self,
        name: str,
        *,
        latency: float = 0.0,
        cost: float | None = None,
        chunks: int = 1,
        chunk_delay: float = 0.0,
        price: Price = DOLLAR,
    ) -> None:
        super().__init__(name)
        self.latency = latency
        self.cost = cost
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.price = price
        self.calls = 0
        self.cancelled = 0

    def price_for(self, request: ChatRequest) -> Price:
        return self.price

    def _completion(self, text: str) -> Completion:
        usage = Usage(input_tokens=5, output_tokens=max(1, len(text) // 4))
        cost = self.cost if self.cost is not None else self.price.cost(usage)
        return Completion(
            text=text, backend=self.name, usage=usage.model_copy(update={"cost": cost})
        )

    async def complete(self, request: ChatRequest) -> Completion:
        self.calls += 1
        try:
            await anyio.sleep(self.latency)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        return self._completion(f"answer of {self.name}")

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.calls += 1
        parts: list[str] = []
        try:
            for _ in range(self.chunks):
                await anyio.sleep(self.chunk_delay)
                parts.append("abcd")
                yield TextDelta(text="abcd")
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        yield StreamEnd(completion=self._completion("".join(parts)))


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


async def test_calls_whose_estimate_would_pass_the_cap_are_not_started() -> None:
    backends = [Priced(f"b{i}") for i in range(4)]
    assert estimate_cost(backends[0], REQUEST) == pytest.approx(10.0)
    result = await FanOut(backends, max_cost=25).run(REQUEST)
    assert [c.status for c in result.candidates] == ["ok", "ok", "cancelled", "cancelled"]
    assert [b.calls for b in backends] == [1, 1, 0, 0]
    assert result.cut == (
        Cut(index=2, backend="b2", action="skipped", estimate=10.0),
        Cut(index=3, backend="b3", action="skipped", estimate=10.0),
    )
    assert all(c.reason == "max_cost" for c in result.cut)
    error = result.candidates[2].error
    assert isinstance(error, MaxCostError) and error.action == "skipped"
    assert "max_cost=$25" in str(error)
    assert result.cost is not None and result.cost <= 25
    assert result.max_cost == 25


async def test_run_overrides_the_cap_and_none_fit_means_no_answer() -> None:
    backends = [Priced(f"b{i}") for i in range(3)]
    fan = FanOut(backends, max_cost=100)
    one = await fan.run(REQUEST, max_cost=15)
    assert [c.action for c in one.cut] == ["skipped", "skipped"]
    with pytest.raises(AllBackendsFailedError) as info:
        await fan.run(REQUEST, max_cost=5)
    assert all(isinstance(e, MaxCostError) for e in info.value.exceptions)
    assert sum(b.calls for b in backends) == 1


async def test_running_losers_are_cancelled_once_the_spend_passes_the_cap() -> None:
    spender = Priced("spender", cost=100.0)  # estimated $10, billed $100
    slow = [Priced(f"slow{i}", latency=60) for i in range(2)]
    with anyio.fail_after(20):  # the slow calls would take a minute: they must be cancelled
        result = await FanOut([spender, *slow], max_cost=50).run(REQUEST)
    assert [c.status for c in result.candidates] == ["ok", "cancelled", "cancelled"]
    assert [c.action for c in result.cut] == ["cancelled", "cancelled"]
    assert [c.backend for c in result.cut] == ["slow0", "slow1"]
    assert all(b.cancelled == 1 for b in slow)
    error = result.candidates[1].error
    assert isinstance(error, MaxCostError) and error.spent >= 100


async def test_streams_are_tracked_as_they_arrive_and_the_leader_runs_on() -> None:
    # max_tokens=1: each estimate is small ($6), but the leader writes 80 characters.
    request = ChatRequest.from_prompt("abcd", max_tokens=1)
    output_only = Price(input=0.0, output=1_000_000.0)
    leader = Priced("leader", chunks=20, chunk_delay=0.001, price=output_only)
    laggard = Priced("laggard", chunks=20, chunk_delay=0.5, price=output_only)
    fan = FanOut([leader, laggard], max_cost=10)
    with anyio.fail_after(20):
        async with fan.run_stream(request) as events:
            async for _ in events:
                pass
    result = events.result
    assert result is not None
    assert [c.status for c in result.candidates] == ["ok", "cancelled"]
    assert result.cut == (Cut(index=1, backend="laggard", action="cancelled", estimate=1.0),)
    assert laggard.cancelled == 1 and leader.cancelled == 0
    assert result.text == "abcd" * 20


async def test_a_cap_needs_every_price() -> None:
    fan = FanOut([Priced("p"), FakeBackend("unpriced", ["x"])], max_cost=1.0)
    with pytest.raises(ConfigurationError, match=r"'unpriced' has none.*price=\(input, output\)"):
        await fan.run(REQUEST)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "1", True])
async def test_a_bad_cap_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_cost must be a finite number"):
        FanOut([Priced("p")], max_cost=bad)
    with pytest.raises(ConfigurationError, match="max_cost must be a finite number"):
        await FanOut([Priced("p")]).run(REQUEST, max_cost=bad)
    with pytest.raises(ConfigurationError, match="max_cost must be a finite number"):
        Cascade([Priced("p")], max_cost=bad)


async def test_a_real_http_fanout_priced_from_the_table(server: FakeLLMServer) -> None:
    server.reset()
    request = ChatRequest.from_prompt("What is two plus two?", max_tokens=50)
    async with OpenAIBackend("gpt-4o-mini", base_url=server.url) as mini:
        estimate = estimate_cost(mini, request)
        assert estimate is not None and estimate > 0
        fan = FanOut([mini] * 3, max_cost=estimate * 1.5)
        result = await fan.run(request)
    assert server.count("/v1/chat/completions") == 1
    assert [c.action for c in result.cut] == ["skipped", "skipped"]
    assert result.cost is not None and 0 < result.cost <= estimate


async def test_a_cascade_does_not_run_tiers_past_its_cap() -> None:
    cheap = Priced("cheap", cost=30.0)
    dear = Priced("dear")
    cascade = Cascade([cheap, dear], selector="first", threshold=1.0, max_cost=25)
    result = await cascade.run(REQUEST)
    assert result.text == "answer of cheap"
    assert dear.calls == 0
    assert result.cut == (Cut(index=1, backend="tier2", action="skipped", estimate=10.0),)
    assert result.tiers_used == ["tier1"]
    # with room left, the second tier runs under what is left of the cap
    both = await Cascade(
        [Priced("a", cost=1.0), dear], selector="first", threshold=1.0, max_cost=25
    ).run(REQUEST)
    assert both.tiers_used == ["tier1", "tier2"] and both.cut == ()


async def test_a_cascade_prices_what_a_skipped_tier_would_have_cost() -> None:
    # the first tier answers confidently: the second is not run, and what it would have cost is
    # the tokens per call seen so far at the skipped tier's own prices, in USD
    cheap = Priced("cheap", price=Price(input=0.0, output=0.0))
    dear = Priced("dear", price=Price(input=2.0, output=10.0))
    result = await Cascade([cheap, [dear, dear]], selector="first", threshold=0.0).run(REQUEST)
    assert result.tiers_used == ["tier1"] and dear.calls == 0
    assert result.cost == 0.0
    seen = Usage(input_tokens=5, output_tokens=len("answer of cheap") // 4)
    assert result.saved == pytest.approx(2 * dear.price.cost(seen))
    # a free skipped tier saves nothing
    free = Priced("free", price=Price(input=0.0, output=0.0))
    assert (await Cascade([cheap, free], selector="first", threshold=0.0).run(REQUEST)).saved == 0


async def test_a_cascade_tier_with_no_room_is_cut_and_escalates() -> None:
    tier1 = [Priced("a1", cost=1.0), Priced("a2", cost=1.0)]
    cascade = Cascade([tier1, Priced("b")], selector="first", threshold=1.0, max_cost=15)
    result = await cascade.run(REQUEST)
    # tier1 fits one call ($10 of 15), spends $1; tier2 fits in the $14 left
    assert [c.backend for c in result.cut] == ["tier1/a2"]
    assert result.tiers_used == ["tier1", "tier2"]


async def test_synthesis_reserves_the_aggregator_and_refuses_it_past_the_cap() -> None:
    cent = Price(input=10_000.0, output=10_000.0)  # $0.01 per token
    aggregator = Priced("agg", cost=1.0, price=cent)
    proposers = [Priced(f"p{i}", cost=1.0) for i in range(3)]
    ok = await Synthesis(proposers, aggregator, max_cost=1_000).run(REQUEST)
    assert ok.cost == pytest.approx(4.0) and ok.cut == ()
    # the proposers fit beside the aggregator's reserve, but bill more than estimated:
    # with their answers in its prompt, the aggregator no longer fits
    reserve = estimate_cost(aggregator, aggregate_request(REQUEST, []))
    assert reserve is not None
    dear = [Priced(f"q{i}", cost=10.2) for i in range(3)]
    tight = Synthesis(dear, aggregator, max_cost=30.5 + reserve)
    calls = aggregator.calls
    with pytest.raises(MaxCostError, match="the aggregator was not called") as info:
        await tight.run(REQUEST)
    assert [b.calls for b in dear] == [1, 1, 1]
    assert aggregator.calls == calls
    assert info.value.action == "skipped" and info.value.backend == "agg"


def test_max_cost_and_prompt_cache_in_the_config(tmp_path: Path) -> None:
    base = (
        '[backends.g]\ntype = "openai"\nmodel = "gpt-4o-mini"\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    path = tmp_path / "genfan.toml"
    path.write_text(base + '[fanout]\nmax_cost = 0.5\nprompt_cache = "warm-first"\n')
    fan = load_config(path).build_fanout()
    assert fan.max_cost == 0.5 and fan.prompt_cache == "warm-first"
    assert load_config(path).build_fanout(max_cost=0.1).max_cost == 0.1
    path.write_text(base + "[fanout]\nmax_cost = -1\n")
    with pytest.raises(ConfigurationError, match=r"fanout\.max_cost"):
        load_config(path)
    path.write_text(base + '[fanout]\nprompt_cache = "always"\n')
    with pytest.raises(ConfigurationError, match=r"fanout\.prompt_cache"):
        load_config(path)


def test_the_cli_caps_and_says_what_it_cut(server: FakeLLMServer, tmp_path: Path) -> None:
    server.reset()
    config = tmp_path / "genfan.toml"
    config.write_text(
        "".join(
            f'[backends.m{i}]\ntype = "openai"\nmodel = "gpt-4o-mini"\nbase_url = "{server.url}"\n'
            for i in range(3)
        ),
        encoding="utf-8",
    )
    runner = CliRunner()
    bad = runner.invoke(app, ["ask", "hi", "-c", str(config), "--max-cost", "-1"])
    assert (
        bad.exit_code == 2
        and bad.stderr.strip() == "error: --max-cost must be a number of USD >= 0, got -1"
    )
    # room for one call of 100 tokens at gpt-4o-mini's price, not two
    args = ["ask", "hi", "-c", str(config), "--max-tokens", "100", "--max-cost", "0.0001"]
    out = runner.invoke(app, [*args, "--json"], env={"COLUMNS": "160"})
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["max_cost"] == 0.0001
    assert [(c["backend"], c["action"], c["reason"]) for c in data["cut"]] == [
        ("m1", "skipped", "max_cost"),
        ("m2", "skipped", "max_cost"),
    ]
    table = runner.invoke(app, args, env={"COLUMNS": "160"})
    assert "cut by max_cost ($0.0001): m1 (skipped), m2 (skipped)" in table.stdout
