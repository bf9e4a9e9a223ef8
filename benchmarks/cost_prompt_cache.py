"""Issue 17's figures for prices and prompt caching.

Run: ``.venv/bin/python -m benchmarks.cost_prompt_cache [--quick]``.

(a) Prompt caching on a 5-way fan-out (five samples of one Anthropic model, temperatures 0.0
    to 0.8) with a 2,000-token shared prefix marked with ``cache_control``, against the
    ``FakeLLMServer``'s Anthropic endpoint, which bills the cache as Anthropic does (a prefix is
    written on first sight, and read by requests that arrive once the writing request's answer
    has started). The server answers after 200 ms (a time to first token) with 100 tokens.
    Three ways, interleaved, each round with a fresh prefix (nothing carries over):
    ``no cache`` (no ``cache_control``: every call pays full input), ``plain`` (marked, all 5
    start together: each finds the cache empty and pays the write), ``warm-first``
    (``prompt_cache="warm-first"``: one writes, four read). Tokens billed at each rate, USD at
    genai-prices' rates for claude-3-5-haiku and claude-sonnet-4-5, and the fan-out's wall time;
    for ``run`` and for ``run_stream``.
(b) The CPU cost of pricing: microseconds per completion priced, measured as what a provider
    does per completion (its ``_usage``: the usage from the counts) for a known model minus the
    same for a model the table does not know (no cost); its parts (``Price.cost_of``, the
    per-process lookup cache hit); and genai-prices' own ``calc_price`` per call, for
    comparison; against the client CPU of one ``OpenAIBackend.complete`` call through the fake
    server running in another process (so its CPU does not count), which includes that
    pricing. Best of 5 (calls: best of 3) by ``time.process_time``.

Prints tables and writes JSON to ``benchmarks/results/cost_prompt_cache.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import anyio

RESULTS = Path(__file__).parent / "results"
PREFIX_TOKENS = 2000
FANOUT = 5
OUTPUT_TOKENS = 100
LATENCY = 0.2
MODELS = ("claude-3-5-haiku-latest", "claude-sonnet-4-5")


# -- (a) prompt caching ------------------------------------------------------------------------


def _request(round_: int, *, marked: bool) -> Any:
    from genfan import ChatRequest, Message

    # A fresh prefix each round (its first word differs): nothing is cached from before.
    prefix = " ".join([f"r{round_}"] + [f"w{i}" for i in range(PREFIX_TOKENS - 1)])
    return ChatRequest(
        messages=(
            Message.system(prefix, cache_control="5m" if marked else None),
            Message.user("Summarize the document in one paragraph."),
        ),
        max_tokens=OUTPUT_TOKENS,
    )


async def _fanout_once(url: str, way: str, round_: int, stream: bool) -> dict[str, Any]:
    from genfan_providers.anthropic import AnthropicBackend

    from genfan import FanOut, Target

    async with AnthropicBackend(MODELS[0], base_url=url, api_key="bench") as claude:
        await claude.warm()
        targets = [Target(backend=claude, name=f"s{i}", temperature=i / 5) for i in range(FANOUT)]
        fan = FanOut(targets, prompt_cache="warm-first" if way == "warm-first" else None)
        request = _request(round_, marked=way != "no cache")
        start = time.perf_counter()
        if stream:
            async with fan.run_stream(request) as events:
                async for _ in events:
                    pass
            result = events.result
            assert result is not None
        else:
            result = await fan.run(request)
        wall = time.perf_counter() - start
    usage = result.usage
    assert len(result.successes) == FANOUT
    return {
        "input_tokens": usage.input_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "output_tokens": usage.output_tokens,
        "usage": usage,
        "wall_s": wall,
    }


def bench_prompt_cache(rounds: int) -> dict[str, Any]:
    from genfan.cost import lookup_price
    from genfan.testserver import FakeLLMServer, TextReply

    ways = ("no cache", "plain", "warm-first")
    reply = TextReply(" ".join(["word"] * OUTPUT_TOKENS))
    prices = {m: lookup_price(m, provider="anthropic") for m in MODELS}
    out: dict[str, Any] = {}
    with FakeLLMServer(latency=LATENCY) as srv:
        for stream in (False, True):
            runs: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
            for r in range(rounds):
                order = ways if r % 2 == 0 else tuple(reversed(ways))
                for way in order:
                    srv.script(MODELS[0], [reply] * FANOUT)
                    key = r * 10 + ways.index(way) + (1000 if stream else 0)
                    runs[way].append(anyio.run(_fanout_once, srv.url, way, key, stream))
            section: dict[str, Any] = {}
            for way in ways:
                first = runs[way][0]
                # billing is the same every round (asserted): report one, with the median wall
                for other in runs[way][1:]:
                    assert other["cache_write_tokens"] == first["cache_write_tokens"], way
                    assert other["cache_read_tokens"] == first["cache_read_tokens"], way
                usd = {}
                for model, price in prices.items():
                    assert price is not None
                    usd[model] = price.cost(first["usage"])
                section[way] = {
                    "input_tokens": first["input_tokens"],
                    "uncached_input_tokens": first["input_tokens"]
                    - first["cache_write_tokens"]
                    - first["cache_read_tokens"],
                    "cache_write_tokens": first["cache_write_tokens"],
                    "cache_read_tokens": first["cache_read_tokens"],
                    "output_tokens": first["output_tokens"],
                    "usd": usd,
                    "wall_s_median": statistics.median(x["wall_s"] for x in runs[way]),
                }
            out["stream" if stream else "run"] = section
    return out


# -- (b) the CPU cost of pricing ---------------------------------------------------------------


def bench_pricing(n_price: int, n_calls: int) -> dict[str, Any]:
    import genai_prices

    from genfan.cost import lookup_price

    price = lookup_price("gpt-4o-mini", provider="openai")
    assert price is not None

    def per_call(fn: Any, n: int) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.process_time()
            for _ in range(n):
                fn()
            best = min(best, (time.process_time() - t) / n)
        return best * 1e6

    cost_of_us = per_call(
        lambda: price.cost_of(1234, 321, cache_read_tokens=1024, reasoning_tokens=64), n_price
    )
    lookup_us = per_call(
        lambda: lookup_price("gpt-4o-mini", provider="openai", base_url="http://127.0.0.1:1/v1"),
        n_price,
    )
    # What a provider does per completion: usage from the counts, priced (a known model) or
    # not (a model the table does not know): the difference is the whole cost of pricing.
    from genfan_providers.openai import OpenAIBackend

    known = OpenAIBackend("gpt-4o-mini", base_url="http://127.0.0.1:1/v1")
    unknown = OpenAIBackend("my-local-model", base_url="http://127.0.0.1:1/v1")
    counts = {"cache_read": 1024, "reasoning": 64}
    usage_priced_us = per_call(lambda: known._usage(1234, 321, **counts), n_price)
    usage_unpriced_us = per_call(lambda: unknown._usage(1234, 321, **counts), n_price)
    assert known._usage(1, 1).cost is not None and unknown._usage(1, 1).cost is None
    raw = genai_prices.Usage(input_tokens=1234, output_tokens=321, cache_read_tokens=1024)
    table_us = per_call(
        lambda: genai_prices.calc_price(raw, "gpt-4o-mini", provider_id="openai"), n_price // 20
    )
    call_us = anyio.run(_call_cpu, n_calls)
    marginal = max(usage_priced_us - usage_unpriced_us, 0.0)
    return {
        "price_cost_of_us": cost_of_us,
        "lookup_cached_us": lookup_us,
        "provider_usage_priced_us": usage_priced_us,
        "provider_usage_unpriced_us": usage_unpriced_us,
        "pricing_per_completion_us": marginal,
        "genai_prices_calc_price_us": table_us,
        "complete_call_cpu_us": call_us,
        "pricing_share_of_call": marginal / call_us,
    }


async def _call_cpu(n: int) -> float:
    """Client CPU (µs) per ``OpenAIBackend.complete`` through a fake server in another process."""
    from genfan_providers.openai import OpenAIBackend

    from genfan import ChatRequest
    from genfan.testserver import ServerProcess

    request = ChatRequest.from_prompt("Say hello to the bench.", max_tokens=20)
    with ServerProcess(latency=0.0) as proc:
        async with OpenAIBackend("gpt-4o-mini", base_url=proc.url) as b:
            for _ in range(200):
                await b.complete(request)
            best = float("inf")
            for _ in range(3):
                t = time.process_time()
                for _ in range(n):
                    c = await b.complete(request)
                best = min(best, (time.process_time() - t) / n)
            assert c.usage.cost is not None and c.usage.cost > 0
    return best * 1e6


# -- report ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and calls")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    cache = bench_prompt_cache(rounds)
    pricing = bench_pricing(2_000 if args.quick else 20_000, 300 if args.quick else 2_000)

    print(f"(a) 5-way fan-out, {PREFIX_TOKENS}-token shared prefix, {OUTPUT_TOKENS} output tokens")
    for kind, section in cache.items():
        print(f"\n  {kind}")
        head = f"  {'way':<11} {'uncached':>9} {'written':>8} {'read':>7}"
        head += "".join(f" {m[:20]:>21}" for m in MODELS) + f" {'wall':>7}"
        print(head)
        for way, row in section.items():
            line = f"  {way:<11} {row['uncached_input_tokens']:>9} {row['cache_write_tokens']:>8}"
            line += f" {row['cache_read_tokens']:>7}"
            line += "".join(f" ${row['usd'][m]:>20.6f}" for m in MODELS)
            line += f" {row['wall_s_median']:>6.3f}s"
            print(line)
        plain, warm = section["plain"], section["warm-first"]
        for m in MODELS:
            saved = plain["usd"][m] - warm["usd"][m]
            print(
                f"  warm-first saves ${saved:.6f} per fan-out on {m} "
                f"({saved / plain['usd'][m]:.0%} of plain; "
                f"{1 - warm['usd'][m] / section['no cache']['usd'][m]:.0%} below no cache)"
            )
    print("\n(b) the CPU cost of pricing")
    for key, value in pricing.items():
        print(f"  {key:<30} {value:>10.3f}" + ("" if key.endswith("share_of_call") else " µs"))
    RESULTS.mkdir(exist_ok=True)
    for section in cache.values():
        for row in section.values():
            row.pop("usage", None)
    data = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "rounds": rounds,
        "prefix_tokens": PREFIX_TOKENS,
        "fanout": FANOUT,
        "server_latency_s": LATENCY,
        "prompt_cache": cache,
        "pricing": pricing,
    }
    path = RESULTS / "cost_prompt_cache.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
