"""Rate-limit headers on error responses: the providers put them on the error, the local rate
limiter learns from them (respx, trio's MockClock)."""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import respx
from genfan_providers.anthropic import AnthropicBackend
from genfan_providers.openai import OpenAIBackend
from trio.testing import MockClock

from genfan import ChatRequest, HTTPStatusError, RateLimitError, RateLimitInfo
from genfan.resilience import RateLimiter, RateLimitPolicy
from genfan.testing import Fail, FakeBackend

OPENAI_BASE = "https://llm.test/v1"
OPENAI_URL = OPENAI_BASE + "/chat/completions"
ANTHROPIC_BASE = "https://claude.test/v1"
ANTHROPIC_URL = ANTHROPIC_BASE + "/messages"
KEY = "sk-test-SECRET-0123456789"
REQ = ChatRequest.from_prompt("hi")
MOCK_CLOCK = [("trio", {"clock": MockClock(autojump_threshold=0)})]

OPENAI_429_HEADERS = {
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-limit-tokens": "30000",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-remaining-tokens": "1200",
    "x-ratelimit-reset-requests": "7s",
    "x-ratelimit-reset-tokens": "1m30s",
}


def openai(**kw: Any) -> OpenAIBackend:
    kw.setdefault("api_key", KEY)
    return OpenAIBackend("gpt-test", base_url=OPENAI_BASE, **kw)


def anthropic(**kw: Any) -> AnthropicBackend:
    kw.setdefault("api_key", KEY)
    return AnthropicBackend("claude-test", base_url=ANTHROPIC_BASE, **kw)


def openai_ok() -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }


def rfc3339_in(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def openai_error(
    status: int, headers: dict[str, str], *, stream: bool = False, body: Any = None
) -> HTTPStatusError:
    with respx.mock:
        respx.post(OPENAI_URL).respond(
            status, json=body or {"error": {"message": "slow down"}}, headers=headers
        )
        return await raised_by(openai(), stream=stream)


async def raised_by(backend: Any, *, stream: bool) -> HTTPStatusError:
    """The error ``backend`` raises for ``REQ`` (read as a stream, or completed)."""
    async with backend as b:
        with pytest.raises(HTTPStatusError) as info:
            if stream:
                async for _ in b.stream(REQ):
                    pass
            else:
                await b.complete(REQ)
    return info.value


# -- the providers put the headers on the error ------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_openai_429_carries_retry_after_and_parsed_headers(stream: bool) -> None:
    err = await openai_error(429, {**OPENAI_429_HEADERS, "retry-after": "2"}, stream=stream)
    assert type(err) is RateLimitError
    assert err.retry_after == 2.0
    assert err.rate_limit == RateLimitInfo(
        limit_requests=500,
        limit_tokens=30000,
        remaining_requests=0,
        remaining_tokens=1200,
        reset_requests=7.0,
        reset_tokens=90.0,
    )


@pytest.mark.anyio
async def test_other_statuses_carry_headers_and_none_when_absent() -> None:
    err = await openai_error(
        503, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "250ms"}
    )
    assert type(err) is HTTPStatusError and err.status_code == 503
    assert err.rate_limit == RateLimitInfo(remaining_tokens=0, reset_tokens=0.25)

    bare = await openai_error(429, {"retry-after": "1"})
    assert isinstance(bare, RateLimitError)
    assert bare.rate_limit is None and bare.retry_after == 1.0


@pytest.mark.anyio
async def test_openai_error_event_in_a_stream_carries_the_stream_headers() -> None:
    body = b'data: {"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}}\n\n'
    with respx.mock:
        respx.post(OPENAI_URL).respond(
            200,
            content=body,
            headers={"content-type": "text/event-stream", **OPENAI_429_HEADERS},
        )
        async with openai() as b:
            with pytest.raises(RateLimitError) as info:
                async for _ in b.stream(REQ):
                    pass
    rl = info.value.rate_limit
    assert rl is not None and rl.remaining_requests == 0 and rl.reset_requests == 7.0


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_429_and_529_carry_parsed_headers(stream: bool) -> None:
    headers = {
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": rfc3339_in(30),
        "anthropic-ratelimit-tokens-limit": "8000",
        "anthropic-ratelimit-tokens-remaining": "6000",
        "retry-after": "12",
    }
    for status, etype in ((429, "rate_limit_error"), (529, "overloaded_error")):
        with respx.mock:
            respx.post(ANTHROPIC_URL).respond(
                status,
                json={"type": "error", "error": {"type": etype, "message": "busy"}},
                headers=headers,
            )
            err = await raised_by(anthropic(), stream=stream)
        assert err.status_code == status
        assert isinstance(err, RateLimitError) == (status == 429)
        rl = err.rate_limit
        assert rl is not None
        assert (rl.limit_requests, rl.remaining_requests) == (50, 0)
        assert (rl.limit_tokens, rl.remaining_tokens) == (8000, 6000)
        assert rl.reset_requests is not None and 20 < rl.reset_requests <= 30
        assert rl.reset_tokens is None
        if isinstance(err, RateLimitError):
            assert err.retry_after == 12.0


@pytest.mark.anyio
async def test_anthropic_error_event_in_a_stream_carries_the_stream_headers() -> None:
    events = [
        {"type": "message_start", "message": {"model": "claude-test", "usage": {}}},
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}},
    ]
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()
    with respx.mock:
        respx.post(ANTHROPIC_URL).respond(
            200,
            content=body,
            headers={
                "content-type": "text/event-stream",
                "anthropic-ratelimit-tokens-remaining": "10",
            },
        )
        async with anthropic() as b:
            with pytest.raises(RateLimitError) as info:
                async for _ in b.stream(REQ):
                    pass
    assert info.value.rate_limit == RateLimitInfo(remaining_tokens=10)


@pytest.mark.anyio
async def test_key_never_in_str_or_repr_of_a_rate_limit_error() -> None:
    # a server that echoes the key back in its message and in a header
    err = await openai_error(
        429,
        {**OPENAI_429_HEADERS, "x-ratelimit-echo": KEY},
        body={"error": {"message": f"Rate limit for key {KEY}"}},
    )
    assert isinstance(err, RateLimitError) and err.rate_limit is not None
    for text in (str(err), repr(err), repr(err.rate_limit), str(err.rate_limit)):
        assert KEY not in text
    assert "***" in str(err)
    # and it survives pickling (Ray workers, multiprocessing) with its quota
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is RateLimitError and copy.rate_limit == err.rate_limit
    assert KEY not in repr(copy)


def test_errors_default_to_no_rate_limit_info() -> None:
    assert RateLimitError("slow").rate_limit is None
    assert HTTPStatusError("bad", status_code=500).rate_limit is None
    info = RateLimitInfo(remaining_requests=3)
    assert RateLimitError("slow", rate_limit=info, retry_after=1.0).rate_limit is info
    assert HTTPStatusError("bad", status_code=500, rate_limit=info).rate_limit is info


# -- the rate limiter learns from them ---------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", MOCK_CLOCK)
async def test_limiter_stops_until_reset_reported_by_a_429(anyio_backend: Any) -> None:
    info = RateLimitInfo(remaining_requests=0, reset_requests=5.0)
    limiter = RateLimiter(
        FakeBackend("b", [Fail(error=RateLimitError("429", rate_limit=info)), "ok"])
    )
    with pytest.raises(RateLimitError):
        await limiter.complete(REQ)
    blocked = limiter.statistics().blocked_until
    assert blocked is not None and blocked - anyio.current_time() == pytest.approx(5.0)
    start = anyio.current_time()
    await limiter.complete(REQ)
    assert anyio.current_time() - start == pytest.approx(5.0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", MOCK_CLOCK)
async def test_limiter_waits_for_the_longer_of_retry_after_and_reset(anyio_backend: Any) -> None:
    for retry_after, reset, waited in ((2.0, 9.0, 9.0), (8.0, 3.0, 8.0)):
        info = RateLimitInfo(remaining_tokens=0, reset_tokens=reset)
        err = RateLimitError("429", retry_after=retry_after, rate_limit=info)
        limiter = RateLimiter(FakeBackend("b", [Fail(error=err), "ok"]))
        with pytest.raises(RateLimitError):
            await limiter.complete(REQ)
        start = anyio.current_time()
        await limiter.complete(REQ)
        assert anyio.current_time() - start == pytest.approx(waited)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", MOCK_CLOCK)
async def test_limiter_lowers_its_buckets_from_any_status_error(anyio_backend: Any) -> None:
    info = RateLimitInfo(remaining_requests=1, remaining_tokens=100)
    err = HTTPStatusError("503", status_code=503, rate_limit=info)
    limiter = RateLimiter(
        FakeBackend("b", [Fail(error=err)]),
        RateLimitPolicy(requests_per_minute=600, tokens_per_minute=60_000),
    )
    with pytest.raises(HTTPStatusError):
        await limiter.complete(REQ)
    assert limiter.requests is not None and limiter.tokens is not None
    assert limiter.requests.level == pytest.approx(1.0)
    assert limiter.tokens.level == pytest.approx(100.0)
    assert limiter.statistics().blocked_until is None  # quota left: not blocked


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", MOCK_CLOCK)
async def test_limiter_with_learn_off_ignores_error_headers(anyio_backend: Any) -> None:
    info = RateLimitInfo(remaining_requests=0, reset_requests=5.0)
    limiter = RateLimiter(
        FakeBackend("b", [Fail(error=RateLimitError("429", rate_limit=info)), "ok"]),
        RateLimitPolicy(learn=False),
    )
    with pytest.raises(RateLimitError):
        await limiter.complete(REQ)
    start = anyio.current_time()
    await limiter.complete(REQ)
    assert anyio.current_time() == start
    assert limiter.statistics().blocked_until is None


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", MOCK_CLOCK)
async def test_limiter_over_openai_learns_from_a_429_without_retry_after(
    anyio_backend: Any,
) -> None:
    with respx.mock:
        route = respx.post(OPENAI_URL)
        route.side_effect = [
            respx.MockResponse(
                429, json={"error": {"message": "slow"}}, headers=OPENAI_429_HEADERS
            ),
            respx.MockResponse(200, json=openai_ok()),
        ]
        async with openai() as b:
            limiter = RateLimiter(b)
            with pytest.raises(RateLimitError) as info:
                await limiter.complete(REQ)
            assert info.value.retry_after is None
            start = anyio.current_time()
            completion = await limiter.complete(REQ)
            assert anyio.current_time() - start == pytest.approx(7.0)
    assert completion.text == "ok"
    assert route.call_count == 2
