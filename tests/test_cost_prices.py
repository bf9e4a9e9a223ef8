"""Prices: usage turned into USD for known models with no configuration (the genai-prices
table), cached input, cache writes and reasoning tokens included; ``price=`` overrides; the CLI
shows the cost per candidate and in total."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import genai_prices
import pytest
from genfan_providers.anthropic import AnthropicBackend
from genfan_providers.openai import OpenAIBackend
from typer.testing import CliRunner

from genfan import ChatRequest, ConfigurationError, FanOut, Usage
from genfan.cli import app
from genfan.cost import (
    DEFAULT_OUTPUT_TOKENS,
    Price,
    backend_price,
    estimate_cost,
    estimate_input_tokens,
    lookup_price,
)
from genfan.testserver import FakeLLMServer, RawReply, TextReply


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    return server


def table_price(usage: Usage, model: str, provider: str) -> float:
    """What genai-prices itself computes for ``usage`` (our oracle)."""
    u = genai_prices.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )
    return float(genai_prices.calc_price(u, model, provider_id=provider).total_price)


# -- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "provider"),
    [("gpt-4o-mini", "openai"), ("claude-3-5-haiku-latest", "anthropic"), ("o3-mini", "openai")],
)
def test_a_known_model_is_priced_as_the_table_prices_it(model: str, provider: str) -> None:
    price = lookup_price(model, provider=provider)
    assert price is not None and price.input > 0 and price.output > 0
    usage = Usage(input_tokens=10_000, output_tokens=2_000, cache_read_tokens=4_000)
    if provider == "anthropic":
        usage = usage.model_copy(update={"cache_write_tokens": 3_000})
    assert price.cost(usage) == pytest.approx(table_price(usage, model, provider), rel=1e-9)
    # cached input is cheaper than fresh input
    fresh = Usage(input_tokens=10_000, output_tokens=2_000)
    assert price.cost(Usage(input_tokens=10_000, output_tokens=2_000, cache_read_tokens=9_000)) < (
        price.cost(fresh)
    )


def test_long_context_tiers_apply_to_the_whole_request() -> None:
    price = lookup_price("claude-sonnet-4-5", provider="anthropic")
    assert price is not None and price.above, "sonnet 4.5 has a 200k-token tier"
    small = Usage(input_tokens=150_000, output_tokens=1_000)
    large = Usage(input_tokens=250_000, output_tokens=1_000)
    assert price.cost(small) == pytest.approx(table_price(small, "claude-sonnet-4-5", "anthropic"))
    assert price.cost(large) == pytest.approx(table_price(large, "claude-sonnet-4-5", "anthropic"))
    assert price.cost(large) / 250_000 > price.cost(small) / 150_000


def test_the_provider_is_found_by_url_and_never_guessed_for_a_local_server() -> None:
    openrouter = lookup_price(
        "meta-llama/llama-3.1-8b-instruct",
        provider="openai",
        base_url="https://openrouter.ai/api/v1",
    )
    assert openrouter is not None  # OpenRouter's own price, found by its URL
    # a local server: only the backend's provider's models are priced, nothing else
    assert lookup_price("llama3.1:8b", provider="openai", base_url="http://127.0.0.1:8/v1") is None
    assert lookup_price("no-such-model-xyz", provider="anthropic") is None
    assert lookup_price("gpt-4o-mini") is None  # no provider, no URL: not guessed


def test_reasoning_tokens_are_output_tokens_at_their_own_price() -> None:
    price = Price(input=1.0, output=4.0, reasoning=2.0)
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, reasoning_tokens=250_000)
    assert price.cost(usage) == pytest.approx(1.0 + 0.75 * 4.0 + 0.25 * 2.0)
    assert Price(input=1.0, output=4.0).cost(usage) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ((1, 2), Price(input=1.0, output=2.0)),
        ([0.5, 0], Price(input=0.5, output=0.0)),
        ({"input": 3, "output": 15, "cache_read": 0.3}, Price(input=3, output=15, cache_read=0.3)),
    ],
)
def test_price_of_takes_what_price_takes(value: Any, expected: Price) -> None:
    assert Price.of(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ((1.0,), r"price must be \(USD per 1M input tokens"),
        ((-1.0, 1.0), "price input must be a finite number"),
        ((1.0, float("nan")), "price output must be a finite number"),
        (("1", 2), "price input must be a number"),
        ({"input": 1}, "needs input and output"),
        ({"input": 1, "output": 2, "cached": 1}, "needs input and output"),
    ],
)
def test_a_bad_price_says_what_to_write(value: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Price.of(value)


def test_usage_adds_up_every_count() -> None:
    a = Usage(input_tokens=10, output_tokens=5, cache_read_tokens=4, reasoning_tokens=2, cost=1.0)
    b = Usage(input_tokens=20, output_tokens=7, cache_write_tokens=6, reasoning_tokens=1)
    total = a + b
    assert total == Usage(
        input_tokens=30,
        output_tokens=12,
        cache_read_tokens=4,
        cache_write_tokens=6,
        reasoning_tokens=3,
        cost=1.0,
    )
    assert (Usage() + Usage()).cost is None


def test_estimates_use_max_tokens_or_the_backends_default() -> None:
    request = ChatRequest.from_prompt("x" * 400, max_tokens=100)
    assert estimate_input_tokens(request) == 100 + 4
    local = "http://127.0.0.1:9/v1"
    claude = AnthropicBackend("claude-3-5-haiku-latest", base_url=local, api_key="k")
    price = lookup_price("claude-3-5-haiku-latest", provider="anthropic")
    assert price is not None
    assert estimate_cost(claude, request) == pytest.approx(price.estimate(104, 100))
    # no max_tokens: the backend's own default (Anthropic's max_tokens=1024)
    open_ended = ChatRequest.from_prompt("x" * 400)
    assert estimate_cost(claude, open_ended) == pytest.approx(price.estimate(104, 1024))
    gpt = OpenAIBackend("gpt-4o-mini", base_url=local, price=(1.0, 1.0))
    assert estimate_cost(gpt, open_ended) == pytest.approx((104 + DEFAULT_OUTPUT_TOKENS) / 1e6)
    assert estimate_cost(OpenAIBackend("llama3", base_url=local), request) is None


def test_the_price_is_found_through_the_guards() -> None:
    from genfan.resilience import guard

    inner = OpenAIBackend("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", price=(2.0, 8.0))
    guarded = guard(inner)
    request = ChatRequest.from_prompt("hi", max_tokens=10)
    assert backend_price(guarded, request) == Price(input=2.0, output=8.0)
    assert estimate_cost(guarded, request) == estimate_cost(inner, request)
    # a request naming another model is priced at that model's price (the table's)
    other = request.model_copy(update={"model": "gpt-4o"})
    bare = OpenAIBackend("gpt-4o-mini", base_url="http://127.0.0.1:9/v1")
    assert backend_price(guard(bare), other) == lookup_price("gpt-4o", provider="openai")


# -- on every completion -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_openai_completions_are_priced_without_configuration(srv: FakeLLMServer) -> None:
    async with OpenAIBackend("gpt-4o-mini", base_url=srv.url) as b:
        c = await b.complete(ChatRequest.from_prompt("one two three four"))
        s = [e async for e in b.stream(ChatRequest.from_prompt("one two three four"))][-1]
    price = lookup_price("gpt-4o-mini", provider="openai")
    assert price is not None
    assert c.usage.cost is not None and c.usage.cost > 0
    assert c.usage.cost == pytest.approx(price.cost(c.usage))
    assert s.completion.usage.cost == pytest.approx(c.usage.cost)  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_openai_cached_and_reasoning_tokens_are_parsed_and_priced(
    srv: FakeLLMServer,
) -> None:
    usage = {
        "prompt_tokens": 2000,
        "completion_tokens": 500,
        "prompt_tokens_details": {"cached_tokens": 1500},
        "completion_tokens_details": {"reasoning_tokens": 300},
    }
    body = {
        "id": "x",
        "model": "o3-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}}],
        "usage": usage,
    }
    srv.script("o3-mini", [RawReply(body=body)])
    async with OpenAIBackend("o3-mini", base_url=srv.url) as b:
        c = await b.complete(ChatRequest.from_prompt("q"))
    assert c.usage.cache_read_tokens == 1500 and c.usage.reasoning_tokens == 300
    assert (c.usage.input_tokens, c.usage.output_tokens) == (2000, 500)
    assert c.usage.cost == pytest.approx(table_price(c.usage, "o3-mini", "openai"))
    uncached = lookup_price("o3-mini", provider="openai")
    assert uncached is not None
    assert c.usage.cost < uncached.estimate(2000, 500)  # the cached part is cheaper


@pytest.mark.anyio
async def test_a_bad_cached_count_is_a_malformed_answer(srv: FakeLLMServer) -> None:
    from genfan import MalformedResponseError

    body = {
        "id": "x",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"}}],
        "usage": {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": "lots"}},
    }
    srv.script("gpt-4o-mini", [RawReply(body=body)])
    async with OpenAIBackend("gpt-4o-mini", base_url=srv.url) as b:
        with pytest.raises(MalformedResponseError, match="cached_tokens"):
            await b.complete(ChatRequest.from_prompt("q"))


@pytest.mark.anyio
async def test_price_overrides_the_table_and_unknown_models_cost_none(srv: FakeLLMServer) -> None:
    srv.script("gpt-4o-mini", [TextReply("a b", usage=(1_000_000, 1_000_000))])
    srv.script("my-local-model", [TextReply("a b", usage=(10, 10))])
    async with (
        OpenAIBackend("gpt-4o-mini", base_url=srv.url, price=(1.0, 2.0)) as priced,
        OpenAIBackend("my-local-model", base_url=srv.url) as unknown,
    ):
        c = await priced.complete(ChatRequest.from_prompt("q"))
        u = await unknown.complete(ChatRequest.from_prompt("q"))
    assert c.usage.cost == pytest.approx(3.0)
    assert u.usage.cost is None and u.usage.input_tokens == 10


@pytest.mark.anyio
async def test_a_fanout_result_shows_cost_per_candidate_and_in_total(srv: FakeLLMServer) -> None:
    async with (
        OpenAIBackend("gpt-4o-mini", base_url=srv.url) as mini,
        AnthropicBackend("claude-3-5-haiku-latest", base_url=srv.url, api_key="k") as haiku,
    ):
        result = await FanOut([mini, haiku]).run("what is two plus two")
    costs = [c.completion.usage.cost for c in result.candidates if c.completion]
    assert len(costs) == 2 and all(c is not None and c > 0 for c in costs)
    assert result.cost == pytest.approx(sum(c for c in costs if c is not None))


# -- the CLI ------------------------------------------------------------------------------------


def test_genfan_ask_shows_the_cost_of_each_candidate_and_the_total(
    srv: FakeLLMServer, tmp_path: Path
) -> None:
    config = tmp_path / "genfan.toml"
    config.write_text(
        f'[backends.mini]\ntype = "openai"\nmodel = "gpt-4o-mini"\nbase_url = "{srv.url}"\n'
        f'[backends.haiku]\ntype = "anthropic"\nmodel = "claude-3-5-haiku-latest"\n'
        f'base_url = "{srv.url}"\napi_key_env = "FAKE_KEY"\n',
        encoding="utf-8",
    )
    env = {"FAKE_KEY": "k", "COLUMNS": "160"}
    out = CliRunner().invoke(app, ["ask", "two plus two", "-c", str(config), "--json"], env=env)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    costs = [c["cost"] for c in data["candidates"]]
    assert all(isinstance(c, float) and c > 0 for c in costs)
    assert data["usage"]["cost"] == pytest.approx(sum(costs))
    table = CliRunner().invoke(app, ["ask", "two plus two", "-c", str(config)], env=env)
    assert table.exit_code == 0, table.output
    assert "cost" in table.stdout and table.stdout.count("$") >= 3  # two rows and the total


def test_the_local_engine_costs_nothing_unless_priced() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # (not imported: a model id loads nothing)
        pytest.skip("the local engine's extra is not installed")
    from genfan_providers.vllm import VLLMBackend

    request = ChatRequest.from_prompt("hi", max_tokens=10)
    free = VLLMBackend("org/some-model")  # a model id: nothing loads until the first call
    assert backend_price(free, request) == Price(input=0.0, output=0.0)
    assert estimate_cost(free, request) == 0.0
    priced = VLLMBackend("org/some-model", price=(0.1, 0.2))
    assert backend_price(priced, request) == Price(input=0.1, output=0.2)
    assert priced.price.cost(Usage(input_tokens=1_000_000, output_tokens=1_000_000)) == (
        pytest.approx(0.3)
    )
    with pytest.raises(ConfigurationError, match="price input must be a finite number"):
        VLLMBackend("org/some-model", price=(-1.0, 0.0))


@pytest.mark.anyio
async def test_warm_looks_the_price_up_before_any_call(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import genfan_providers._http as http

    looked: list[str] = []

    def counting(model: str, **where: Any) -> Price | None:
        looked.append(model)
        return lookup_price(model, **where)

    monkeypatch.setattr(http, "lookup_price", counting)
    async with OpenAIBackend("gpt-4o-mini", base_url=srv.url) as b:
        await b.warm()
        assert looked == ["gpt-4o-mini"]
        for _ in range(2):
            c = await b.complete(ChatRequest.from_prompt("q"))
            assert c.usage.cost is not None
    assert looked == ["gpt-4o-mini"]  # the calls reused it
