"""The gateway's ASGI app in process (httpx's ASGI transport, on asyncio and trio) in front of
the real fake server on 127.0.0.1: every kind of model, streams, tools, errors, keys, limits,
budgets, drain, metrics and spans."""

from __future__ import annotations

import base64
import json
import re
import struct
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from genfan import GenfanConfig, parse_config
from genfan.serve import Gateway, KeyStore, ServeSettings, create_app
from genfan.testserver import FakeLLMServer, Fault, RawReply, TextReply

from ._services import port_open, require_service

pytestmark = pytest.mark.anyio

HI = [{"role": "user", "content": "hi"}]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gateway.toml"
PRICE_A = (1.0, 2.0)  # USD per million tokens in, out


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    server.set_latency(0.0)
    return server


def config(srv: FakeLLMServer) -> GenfanConfig:
    def leaf(model: str, **kw: Any) -> dict[str, Any]:
        return {
            "type": "openai",
            "model": model,
            "base_url": srv.url,
            "api_key_env": "GF_TEST_KEY",
            **kw,
        }

    return parse_config(
        {
            "backends": {
                "a": leaf("m-a", price=list(PRICE_A)),
                "b": leaf("m-b", price=[0.5, 0.5]),
                "limited": leaf("m-limited", enabled=False, guards={"retry": False}),
                "broken": leaf("m-broken", enabled=False, guards={"retry": False}),
                "p": {
                    "type": "pool",
                    "members": ["a", "b"],
                    "strategy": "round_robin",
                    "enabled": False,
                },
                "f": {"type": "fallback", "members": ["broken", "a"], "enabled": False},
            },
            "fanout": {"select": "vote", "backends": ["a", "b"]},
        }
    )


@pytest.fixture(autouse=True)
def _provider_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GF_TEST_KEY", "sk-local")


def settings(**kw: Any) -> ServeSettings:
    base: dict[str, Any] = {
        "fanouts": {"first": {"backends": ["a", "b"], "mode": "first"}},
        "cascades": {"frugal": {"tiers": [["a"], ["b"]], "threshold": 0.5}},
        "embeddings": {"max_wait": 0.05},
    }
    return ServeSettings.model_validate({**base, **kw})


@pytest.fixture
async def client(srv: FakeLLMServer) -> AsyncIterator[httpx.AsyncClient]:
    async with create_app(config(srv), settings()) as app:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://gateway"
        ) as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def events(text: str) -> list[Any]:
    """The JSON events of a server-sent-events body (``[DONE]`` as the string)."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


# -- models and answers --------------------------------------------------------------------------


async def test_every_backend_fanout_and_cascade_is_a_model(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models")
    assert r.status_code == 200
    kinds = {m["id"]: m["genfan"]["kind"] for m in r.json()["data"]}
    assert kinds == {
        "a": "backend",
        "b": "backend",
        "limited": "backend",
        "broken": "backend",
        "p": "pool",
        "f": "fallback",
        "fanout": "fanout",
        "first": "fanout",
        "frugal": "cascade",
    }
    fanout = next(m for m in r.json()["data"] if m["id"] == "fanout")
    assert fanout["genfan"]["backends"] == ["a", "b"]


async def test_backend_answer_usage_cost_and_headers(
    client: httpx.AsyncClient, srv: FakeLLMServer
) -> None:
    srv.script("m-a", [TextReply("Paris.", usage=(1000, 500))])
    r = await client.post("/v1/chat/completions", json={"model": "a", "messages": HI})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Paris.",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    cost = (1000 * PRICE_A[0] + 500 * PRICE_A[1]) / 1e6
    assert body["genfan"]["usage"]["cost_usd"] == pytest.approx(cost)
    assert float(r.headers["x-genfan-cost"]) == pytest.approx(cost)
    assert r.headers["x-genfan-kind"] == "backend"
    assert r.headers["x-request-id"] == body["id"]
    assert srv.last_body("/v1/chat/completions")["model"] == "m-a"


async def test_fanout_explains_its_choice_with_each_candidates_usage_and_cost(
    client: httpx.AsyncClient, srv: FakeLLMServer
) -> None:
    srv.script("m-a", [TextReply("42", usage=(10, 2))])
    srv.script("m-b", [TextReply("41", usage=(10, 4))])
    r = await client.post("/v1/chat/completions", json={"model": "fanout", "messages": HI})
    assert r.status_code == 200
    ext = r.json()["genfan"]
    assert ext["kind"] == "fanout" and ext["method"].startswith("vote")
    assert ext["explanation"]
    by = {c["backend"]: c for c in ext["candidates"]}
    assert set(by) == {"a", "b"}
    assert by["a"]["usage"] == {
        "input_tokens": 10,
        "output_tokens": 2,
        "cost_usd": pytest.approx((10 * 1.0 + 2 * 2.0) / 1e6),
    }
    assert by["b"]["usage"]["cost_usd"] == pytest.approx((10 * 0.5 + 4 * 0.5) / 1e6)
    chosen = [c for c in ext["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["backend"] == ext["chosen"]
    assert r.json()["choices"][0]["message"]["content"] == {"a": "42", "b": "41"}[ext["chosen"]]
    total = by["a"]["usage"]["cost_usd"] + by["b"]["usage"]["cost_usd"]
    assert float(r.headers["x-genfan-cost"]) == pytest.approx(total)
    assert r.json()["usage"]["total_tokens"] == 10 + 2 + 10 + 4  # what every candidate used


async def test_pool_fallback_and_cascade_answer(
    client: httpx.AsyncClient, srv: FakeLLMServer
) -> None:
    srv.script("m-broken", [Fault("status", status=500)])
    r = await client.post("/v1/chat/completions", json={"model": "f", "messages": HI})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: hi"
    assert r.json()["genfan"]["kind"] == "fallback"
    r = await client.post("/v1/chat/completions", json={"model": "p", "messages": HI})
    assert r.status_code == 200 and r.json()["genfan"]["kind"] == "pool"
    r = await client.post("/v1/chat/completions", json={"model": "frugal", "messages": HI})
    assert r.status_code == 200
    ext = r.json()["genfan"]
    assert ext["kind"] == "cascade"
    assert [t["name"] for t in ext["tiers"]] == ["tier1", "tier2"]
    assert ext["tiers"][0]["ran"] and ext["tiers"][0]["accepted"]


async def test_stream_chunks_usage_extension_and_done(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": "fanout",
            "messages": [{"role": "user", "content": "one two three"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: one two three"
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["choices"][0]["finish_reason"] == "stop"
    assert final[0]["genfan"]["kind"] == "fanout" and len(final[0]["genfan"]["candidates"]) == 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


async def test_tools_json_and_stream(client: httpx.AsyncClient, srv: FakeLLMServer) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = {"model": "a", "messages": HI, "tools": tools, "tool_choice": choice}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    choice0 = r.json()["choices"][0]
    assert choice0["finish_reason"] == "tool_calls"
    call = choice0["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"echo": "hi"}
    sent = srv.last_body("/v1/chat/completions")
    assert sent["tools"][0]["function"]["name"] == "get_weather"

    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    deltas = [c["choices"][0]["delta"] for c in events(r.text)[:-1] if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"echo": "hi"}
    assert events(r.text)[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_result_messages_reach_the_backend(
    client: httpx.AsyncClient, srv: FakeLLMServer
) -> None:
    messages = [
        *HI,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = await client.post("/v1/chat/completions", json={"model": "a", "messages": messages})
    assert r.status_code == 200
    sent = srv.last_body("/v1/chat/completions")["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1"
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}


async def test_response_format_n_and_logprobs(
    client: httpx.AsyncClient, srv: FakeLLMServer
) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "a", "messages": HI, "response_format": fmt, "n": 3},
    )
    assert r.status_code == 200
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2]
    assert srv.count("/v1/chat/completions") == 3
    sent = srv.last_body("/v1/chat/completions")["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"]["required"] == ["city"]

    answer = {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m-a",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Hi"},
                "logprobs": {"content": [{"token": "Hi", "logprob": -0.25, "top_logprobs": []}]},
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    srv.script("m-a", [RawReply(body=answer)])
    r = await client.post(
        "/v1/chat/completions", json={"model": "a", "messages": HI, "logprobs": True}
    )
    assert r.status_code == 200
    assert srv.last_body("/v1/chat/completions")["logprobs"] is True
    lp = r.json()["choices"][0]["logprobs"]["content"]
    assert [(t["token"], t["logprob"]) for t in lp] == [("Hi", -0.25)]


async def test_embeddings_float_base64_and_micro_batched(
    client: httpx.AsyncClient, srv: FakeLLMServer
) -> None:
    r = await client.post("/v1/embeddings", json={"model": "a", "input": ["x", "y"]})
    assert r.status_code == 200
    floats = [d["embedding"] for d in r.json()["data"]]
    assert len(floats) == 2 and floats[0] != floats[1]
    r = await client.post(
        "/v1/embeddings", json={"model": "a", "input": "x", "encoding_format": "base64"}
    )
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(floats[0], abs=1e-6)

    srv.reset()
    results: list[int] = []

    async def one(i: int) -> None:
        r = await client.post("/v1/embeddings", json={"model": "a", "input": f"text {i}"})
        results.append(r.status_code)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)
    assert results == [200] * 8
    assert srv.count("/v1/embeddings") < 8  # concurrent requests shared upstream calls
    r = await client.post("/v1/embeddings", json={"model": "fanout", "input": "x"})
    assert r.status_code == 400 and error_of(r)["code"] == "model_cannot_embed"


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "messages": HI}, 404, "model"),
        ({"messages": HI}, 400, "model"),
        ({"model": "a", "messages": []}, 400, "messages"),
        ({"model": "a", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        (
            {
                "model": "a",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                    }
                ],
            },
            400,
            "messages[0].content",
        ),
        ({"model": "a", "messages": HI, "temperature": 9}, 400, "temperature"),
        ({"model": "a", "messages": HI, "n": 0}, 400, "n"),
        ({"model": "a", "messages": HI, "top_logprobs": 3}, 400, "top_logprobs"),
    ],
)
async def test_bad_requests_use_openais_error_shape(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, param: str
) -> None:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == status
    err = error_of(r)
    assert err["param"] == param and err["message"]


async def test_body_json_route_and_method_errors(srv: FakeLLMServer) -> None:
    async with create_app(config(srv), settings(max_body_bytes=2048)) as app:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://g") as c:
            big = {"model": "a", "messages": [{"role": "user", "content": "x" * 5000}]}
            r = await c.post("/v1/chat/completions", json=big)
            assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
            r = await c.post("/v1/chat/completions", content=b"{not json")
            assert r.status_code == 400 and error_of(r)["code"] == "bad_json"
            assert (await c.get("/v2/nothing")).status_code == 404
            assert (await c.get("/v1/chat/completions")).status_code == 405
    assert srv.count("/v1/chat/completions") == 0


async def test_upstream_errors_map_to_statuses(
    client: httpx.AsyncClient, srv: FakeLLMServer
) -> None:
    srv.script("m-limited", [Fault("status", status=429, retry_after=7)])
    r = await client.post("/v1/chat/completions", json={"model": "limited", "messages": HI})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "7"
    assert error_of(r)["type"] == "rate_limit_exceeded"
    srv.script("m-broken", [Fault("status", status=503)])
    r = await client.post("/v1/chat/completions", json={"model": "broken", "messages": HI})
    assert r.status_code == 502 and error_of(r)["type"] == "upstream_error"
    srv.script("m-broken", [Fault("status", status=400)])
    r = await client.post("/v1/chat/completions", json={"model": "broken", "messages": HI})
    assert r.status_code == 400 and error_of(r)["code"] == "upstream_rejected"


async def test_a_stream_that_fails_before_its_first_token_gets_a_status(
    client: httpx.AsyncClient, srv: FakeLLMServer
) -> None:
    srv.script("m-limited", [Fault("status", status=429, retry_after=3)])
    r = await client.post(
        "/v1/chat/completions", json={"model": "limited", "messages": HI, "stream": True}
    )
    assert r.status_code == 429 and r.headers["retry-after"] == "3"


# -- keys, limits, budgets ------------------------------------------------------------------------


@pytest.fixture
async def keyed(
    srv: FakeLLMServer, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, KeyStore]]:
    keys = KeyStore(tmp_path / "keys.db")
    async with create_app(config(srv), settings(key_cache_seconds=0), keys=keys) as app:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://g") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c, keys


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_keys_are_required_checked_and_revocable(
    keyed: tuple[httpx.AsyncClient, KeyStore],
) -> None:
    c, keys = keyed
    r = await c.post("/v1/chat/completions", json={"model": "a", "messages": HI})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    r = await c.get("/v1/models", headers=auth("gf-000000000000-" + "x" * 32))
    assert r.status_code == 401
    secret, _key = await keys.create("alice")
    r = await c.post(
        "/v1/chat/completions", json={"model": "a", "messages": HI}, headers=auth(secret)
    )
    assert r.status_code == 200
    await keys.revoke("alice")
    r = await c.post(
        "/v1/chat/completions", json={"model": "a", "messages": HI}, headers=auth(secret)
    )
    assert r.status_code == 401
    assert secret not in r.text


async def test_model_allow_list(keyed: tuple[httpx.AsyncClient, KeyStore]) -> None:
    c, keys = keyed
    secret, _ = await keys.create("bob", models=["a"])
    ok = await c.post(
        "/v1/chat/completions", json={"model": "a", "messages": HI}, headers=auth(secret)
    )
    assert ok.status_code == 200
    r = await c.post(
        "/v1/chat/completions", json={"model": "b", "messages": HI}, headers=auth(secret)
    )
    assert r.status_code == 403
    assert error_of(r) == {
        "message": "this key may not call model 'b'; it may call: a",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_allowed",
    }


async def test_requests_per_minute_gives_429_with_retry_after(
    keyed: tuple[httpx.AsyncClient, KeyStore], srv: FakeLLMServer
) -> None:
    c, keys = keyed
    secret, _ = await keys.create("carol", rpm=2)
    statuses = []
    for _ in range(4):
        r = await c.post(
            "/v1/chat/completions", json={"model": "a", "messages": HI}, headers=auth(secret)
        )
        statuses.append(r.status_code)
    assert statuses == [200, 200, 429, 429]
    assert int(r.headers["retry-after"]) >= 1
    assert error_of(r)["code"] == "rate_limit_exceeded"
    assert srv.count("/v1/chat/completions") == 2  # refused requests never reached a backend


async def test_budget_and_ledger(
    keyed: tuple[httpx.AsyncClient, KeyStore], srv: FakeLLMServer
) -> None:
    c, keys = keyed
    cost = (1000 * PRICE_A[0] + 1000 * PRICE_A[1]) / 1e6  # 0.003 USD per answer
    secret, key = await keys.create("dave", budget_usd=cost * 1.5)
    srv.script("m-a", [TextReply("x", usage=(1000, 1000))] * 3)
    statuses = []
    # Each request reserves the most it may cost, ~(1 + 100 x 2) / 1e6 USD at max_tokens=100:
    # the second fits beside the first's $0.003; the third would pass the $0.0045.
    body = {"model": "a", "messages": HI, "max_tokens": 100}
    for _ in range(3):
        r = await c.post("/v1/chat/completions", json=body, headers=auth(secret))
        statuses.append(r.status_code)
    assert statuses == [200, 200, 429]
    assert error_of(r)["type"] == "insufficient_quota"
    assert r.headers["x-should-retry"] == "false"  # a total budget never resets
    assert "retry-after" not in r.headers
    await c.app.flush_ledger()  # type: ignore[attr-defined]  # written in batches, off the path
    assert await keys.spent(key.id) == pytest.approx(2 * cost)
    ledger = await keys.ledger(key.id)
    assert [(e.model, e.input_tokens, e.output_tokens) for e in ledger] == [("a", 1000, 1000)] * 2
    assert ledger[0].cost_usd == pytest.approx(cost)


# -- operations -----------------------------------------------------------------------------------


async def test_drain_refuses_new_requests_with_503(client: httpx.AsyncClient) -> None:
    app: Gateway = client.app  # type: ignore[attr-defined]
    assert (await client.get("/ready")).status_code == 200
    app.begin_drain()
    r = await client.post("/v1/chat/completions", json={"model": "a", "messages": HI})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert error_of(r)["code"] == "draining"
    assert (await client.get("/ready")).status_code == 503
    assert (await client.get("/health")).status_code == 200
    assert await app.drained(1.0)


async def test_metrics(client: httpx.AsyncClient, srv: FakeLLMServer) -> None:
    srv.script("m-a", [TextReply("x", usage=(1000, 1000))])
    await client.post("/v1/chat/completions", json={"model": "a", "messages": HI})
    await client.post("/v1/chat/completions", json={"model": "nope", "messages": HI})
    text = (await client.get("/metrics")).text
    assert 'genfan_gateway_requests_total{model="a",route="chat",status="200"} 1.0' in text
    assert 'genfan_gateway_tokens_total{kind="input",model="a"} 1000.0' in text
    assert 'genfan_gateway_cost_usd_total{model="a"} 0.003' in text
    assert 'genfan_gateway_breaker_state{backend="a",state="closed"} 1.0' in text
    assert 'genfan_gateway_queue_depth{backend="a"} 0.0' in text
    assert "genfan_gateway_request_seconds_bucket" in text


async def test_spans_run_through_the_fanout(client: httpx.AsyncClient, spans: Any) -> None:
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = await client.post(
        "/v1/chat/completions",
        json={"model": "fanout", "messages": HI},
        headers={"traceparent": parent},
    )
    assert r.status_code == 200
    done = spans.get_finished_spans()
    gateway = [s for s in done if s.name == "gateway chat fanout"]
    assert len(gateway) == 1
    assert format(gateway[0].context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    inner = [
        s for s in done if s.parent is not None and s.parent.span_id == gateway[0].context.span_id
    ]
    assert inner, [s.name for s in done]
    ids = {s.context.span_id for s in done}
    calls = [s for s in done if s.name.startswith("chat ")]
    assert len(calls) >= 2 and all(c.context.trace_id == gateway[0].context.trace_id for c in calls)
    assert ids


async def test_tokens_per_minute(keyed: tuple[httpx.AsyncClient, KeyStore]) -> None:
    c, keys = keyed
    secret, _ = await keys.create("frank", tpm=300)
    # a request counts its prompt (4 characters a token) and its max_tokens: ~201 tokens here
    body = {"model": "a", "messages": HI, "max_tokens": 200}
    first = await c.post("/v1/chat/completions", json=body, headers=auth(secret))
    second = await c.post("/v1/chat/completions", json=body, headers=auth(secret))
    assert (first.status_code, second.status_code) == (200, 429)
    assert int(second.headers["retry-after"]) >= 1


async def test_n_streams_interleave_their_choices(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": "a",
            "messages": [{"role": "user", "content": "a b c"}],
            "n": 3,
            "stream": True,
        },
    )
    chunks = [c for c in events(r.text)[:-1] if c["choices"]]
    texts: dict[int, str] = {}
    finished = set()
    for ch in chunks:
        choice = ch["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + (
            choice["delta"].get("content") or ""
        )
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert texts == {0: "echo: a b c", 1: "echo: a b c", 2: "echo: a b c"}
    assert finished == {0, 1, 2}


async def test_a_cascade_streams_its_answer(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/chat/completions", json={"model": "frugal", "messages": HI, "stream": True}
    )
    evs = events(r.text)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in evs[:-1] if c["choices"])
    assert text == "echo: hi" and evs[-1] == "[DONE]"
    assert evs[-2]["genfan"]["kind"] == "cascade"


async def test_a_budget_store_that_is_down_gives_503(srv: FakeLLMServer, tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.db")
    down = settings(budget_store="redis://127.0.0.1:1/0")  # nothing listens on port 1
    async with create_app(config(srv), down, keys=keys) as app:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://g") as c:
            secret, _ = await keys.create("grace", budget_usd=1.0)
            r = await c.post(
                "/v1/chat/completions", json={"model": "a", "messages": HI}, headers=auth(secret)
            )
            assert r.status_code == 503 and error_of(r)["code"] == "budget_store_unavailable"
            assert r.headers["retry-after"] == "1"
            unlimited, _ = await keys.create("heidi")  # no budget: the store is not needed
            ok = await c.post(
                "/v1/chat/completions", json={"model": "a", "messages": HI}, headers=auth(unlimited)
            )
            assert ok.status_code == 200
    assert srv.count("/v1/chat/completions") == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_hangs_up_cancels_its_answer(
    client: httpx.AsyncClient, srv: FakeLLMServer, stream: bool
) -> None:
    app: Gateway = client.app  # type: ignore[attr-defined]
    srv.script("m-a", [TextReply("slow", latency=60.0)])
    body = json.dumps({"model": "fanout", "messages": HI, "stream": stream}).encode()
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        # the body, then the client hangs up (while backend a takes its minute)
        return next(messages, {"type": "http.disconnect"})

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    with anyio.fail_after(20):  # a guard against hanging, not a timing assert
        await app(scope, receive, send)
    assert sent == []  # nobody to answer
    assert app.in_flight == 0
    text = (await client.get("/metrics")).text
    assert 'genfan_gateway_requests_total{model="fanout",route="chat",status="499"} 1.0' in text


async def test_the_example_config_serves_its_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "VLLM_API_KEY"):
        monkeypatch.setenv(var, "sk-test")
    monkeypatch.setenv("GENFAN_KEYS_URL", f"sqlite:///{tmp_path / 'keys.db'}")
    monkeypatch.setenv("GENFAN_REDIS_URL", "redis://127.0.0.1:6379/0")
    async with create_app(EXAMPLE) as app:
        assert app.settings.rate_limit_store == "main"
        kinds = {name: m.kind for name, m in app.models.items()}
        assert kinds == {
            "gpt": "backend",
            "claude": "backend",
            "qwen-a": "backend",
            "qwen-b": "backend",
            "qwen": "pool",
            "fanout": "fanout",
            "best": "fanout",
            "frugal": "cascade",
        }
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://g") as c:
            r = await c.get("/v1/models")
            assert r.status_code == 401  # the example has a key store: keys are required


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"prot": 1}, "serve.prot: unknown key"),
        ({"fanouts": {"x": {"backends": ["a", "zz"]}}}, "serve.fanouts.x names ['zz']"),
        ({"cascades": {"c": {"tiers": [["a"], ["nope"]]}}}, "serve.cascades.c names ['nope']"),
        ({"fanouts": {"a": {}}}, "serve.fanouts.a: a backend has this name"),
        ({"rate_limit_store": "main"}, "serve.rate_limit_store names 'main'"),
        ({"keys": "a.db", "keys_env": "X"}, "give keys or keys_env, not both"),
        ({"models": ["a", "ghost"]}, "serve.models names ['ghost']"),
        ({"max_body_bytes": 10}, "serve.max_body_bytes"),
    ],
)
async def test_serve_table_mistakes_are_named(
    srv: FakeLLMServer, table: dict[str, Any], message: str
) -> None:
    from genfan import ConfigurationError

    cfg = config(srv).model_copy(update={"serve": table})
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        async with create_app(cfg):
            pass


async def test_keys_env_must_be_set(srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from genfan import ConfigurationError

    monkeypatch.delenv("GF_NO_SUCH_VAR", raising=False)
    cfg = config(srv).model_copy(update={"serve": {"keys_env": "GF_NO_SUCH_VAR"}})
    with pytest.raises(ConfigurationError, match="GF_NO_SUCH_VAR, which is not set"):
        create_app(cfg)


async def test_a_bug_is_a_500_in_openais_shape(client: httpx.AsyncClient) -> None:
    from genfan import BaseBackend, ChatRequest, Completion
    from genfan.serve._models import ServedModel

    class Buggy(BaseBackend):
        async def complete(self, request: ChatRequest) -> Completion:
            raise RuntimeError("secret detail that must not leak")

    app: Gateway = client.app  # type: ignore[attr-defined]
    app.models["buggy"] = ServedModel(name="buggy", kind="backend", backend=Buggy("buggy"))
    r = await client.post("/v1/chat/completions", json={"model": "buggy", "messages": HI})
    assert r.status_code == 500
    assert error_of(r) == {
        "message": "internal error",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert app.in_flight == 0


async def test_keys_and_budgets_on_postgresql(srv: FakeLLMServer) -> None:
    require_service("postgres", port_open("127.0.0.1", 5432), "nothing listens on :5432")
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    keys = KeyStore("postgresql://postgres@127.0.0.1:5432/test", prefix=prefix)
    cost = (1000 * PRICE_A[0] + 1000 * PRICE_A[1]) / 1e6
    srv.script("m-a", [TextReply("x", usage=(1000, 1000))] * 3)
    try:
        async with create_app(config(srv), settings(), keys=keys) as app:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://g"
            ) as c:
                secret, key = await keys.create("ivan", budget_usd=cost * 1.5)
                body = {"model": "a", "messages": HI, "max_tokens": 100}
                statuses = [
                    (
                        await c.post("/v1/chat/completions", json=body, headers=auth(secret))
                    ).status_code
                    for _ in range(3)
                ]
                assert statuses == [200, 200, 429]
                await app.flush_ledger()
                assert await keys.spent(key.id) == pytest.approx(2 * cost)
    finally:
        async with KeyStore("postgresql://postgres@127.0.0.1:5432/test", prefix=prefix) as k:

            def drop(cur: Any) -> None:
                cur.execute(f"DROP TABLE IF EXISTS {prefix}keys, {prefix}spend")

            await anyio.to_thread.run_sync(k._run, drop)


async def test_a_fanout_whose_backends_all_say_429_says_429(srv: FakeLLMServer) -> None:
    both = settings(fanouts={"limited2": {"backends": ["limited", "broken"]}})
    srv.script("m-limited", [Fault("status", status=429, retry_after=7)])
    srv.script("m-broken", [Fault("status", status=429, retry_after=4)])
    async with create_app(config(srv), both) as app:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://g") as c:
            r = await c.post("/v1/chat/completions", json={"model": "limited2", "messages": HI})
            assert r.status_code == 429
            assert r.headers["retry-after"] == "4"  # the soonest of the two
            assert error_of(r)["message"].startswith("every backend failed")
            srv.script("m-limited", [Fault("status", status=429, retry_after=7)])
            srv.script("m-broken", [Fault("status", status=503)])
            r = await c.post("/v1/chat/completions", json={"model": "limited2", "messages": HI})
            assert r.status_code == 502  # causes that disagree: the backends failed


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "a", "input": [[1, 2, 3]]}, "input"),
        ({"model": "a", "input": []}, "input"),
        ({"model": "a", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x"}, "model"),
    ],
)
async def test_embedding_mistakes(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    r = await client.post("/v1/embeddings", json=body)
    assert r.status_code == 400 and error_of(r)["param"] == param


async def test_a_stream_cut_after_its_first_token_ends_with_an_error_event(
    client: httpx.AsyncClient, srv: FakeLLMServer
) -> None:
    srv.script("m-limited", [Fault("cut", at=400)])  # (limited: no retries in its guards)
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": "limited",
            "stream": True,
            "messages": [{"role": "user", "content": "one two three four five six seven"}],
        },
    )
    assert r.status_code == 200
    evs = events(r.text)
    assert "[DONE]" not in evs
    assert evs[-1]["error"]["type"] == "upstream_error"
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in evs[:-1])


async def test_a_backends_own_budget_is_a_429_insufficient_quota(srv: FakeLLMServer) -> None:
    cfg = parse_config(
        {
            "backends": {
                "a": {
                    "type": "openai",
                    "model": "m-a",
                    "base_url": srv.url,
                    "api_key_env": "GF_TEST_KEY",
                    "price": [1.0, 2.0],
                    "budget": "team",
                },
            },
            "budgets": {"team": {"limit": 0.0, "store": "memory://"}},
        }
    )
    async with create_app(cfg) as app:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://g") as c:
            r = await c.post("/v1/chat/completions", json={"model": "a", "messages": HI})
    assert r.status_code == 429
    assert error_of(r)["code"] == "insufficient_quota"
    assert r.headers["x-should-retry"] == "false"  # a total budget: it never resets
    assert srv.count("/v1/chat/completions") == 0
