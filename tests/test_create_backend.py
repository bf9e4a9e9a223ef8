"""``create_backend()`` guards what it builds, exactly as the TOML config does: one default.

Before, ``create_backend("openai:...")`` returned the provider unguarded (one request on a 503)
while a config file's backends were guarded (three). Now both end in the same guard stack, and
``guards=False`` is the explicit way out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from genfan_providers.openai import OpenAIBackend

import genfan
from genfan import (
    Backend,
    ChatRequest,
    ConfigurationError,
    HTTPStatusError,
    create_backend,
    parse_config,
    register_backend,
)
from genfan.resilience import (
    BulkheadPolicy,
    GuardedBackend,
    GuardsConfig,
    RetryPolicy,
    TimeoutPolicy,
)
from genfan.testing import FakeBackend, set_testing
from genfan.testserver import FakeLLMServer, Fault

REQ = ChatRequest.from_prompt("hi")


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    return server


@pytest.fixture
def no_backoff() -> Iterator[None]:
    """Retries wait 0 s (test mode), so three attempts take no time."""
    set_testing(True)
    try:
        yield
    finally:
        set_testing(False)


def policies(g: GuardedBackend) -> dict[str, Any]:
    return {
        "hedge": g.hedge.policy if g.hedge else None,
        "bulkhead": g.bulkhead.policy if g.bulkhead else None,
        "retry": g.retry.policy if g.retry else None,
        "rate_limit": g.rate_limiter.policy if g.rate_limiter else None,
        "breaker": g.breaker.policy if g.breaker else None,
        "timeout": g.timeout.policy if g.timeout else None,
    }


def test_the_public_create_backend_is_the_guarded_one() -> None:
    from genfan._create import create_backend as guarded_create

    assert genfan.create_backend is guarded_create
    assert genfan.create_backend.__module__ == "genfan"


def test_create_backend_guards_by_default() -> None:
    g = create_backend("fake:m", name="f")
    assert isinstance(g, GuardedBackend)
    assert isinstance(g.provider, FakeBackend)
    assert g.name == "f"
    assert g.bulkhead and g.retry and g.breaker and g.timeout
    assert g.hedge is None and g.rate_limiter is None
    assert g.bulkhead.policy == BulkheadPolicy()
    assert g.retry.policy == RetryPolicy()
    assert g.timeout.policy == TimeoutPolicy()


def test_code_and_toml_give_the_same_guarded_backend() -> None:
    from genfan.resilience import guard

    in_code = create_backend("fake:m", name="f")
    from_toml = parse_config({"backends": {"f": {"type": "fake", "model": "m"}}}).build_backend("f")
    by_hand = guard(FakeBackend("f"))
    assert isinstance(in_code, GuardedBackend) and isinstance(from_toml, GuardedBackend)
    assert repr(in_code) == repr(from_toml)
    assert policies(in_code) == policies(from_toml) == policies(by_hand)


@pytest.mark.parametrize("off", [False, None])
def test_guards_false_or_none_is_the_provider_itself(off: bool | None) -> None:
    b = create_backend("fake:m", name="f", guards=off)
    assert isinstance(b, FakeBackend) and b.name == "f"


def test_guards_like_a_toml_table_change_some_guards_and_keep_the_rest() -> None:
    g = create_backend(
        "fake:m", guards={"retry": {"attempts": 5}, "hedge": True, "timeout": 30, "breaker": False}
    )
    assert isinstance(g, GuardedBackend)
    assert g.retry is not None and g.retry.policy.attempts == 5
    assert g.retry.policy.initial == RetryPolicy().initial  # the other fields: defaults
    assert g.hedge is not None
    assert g.timeout is not None and g.timeout.policy.timeout == 30.0
    assert g.breaker is None
    assert g.bulkhead is not None and g.bulkhead.policy == BulkheadPolicy()


def test_guards_config_is_accepted() -> None:
    g = create_backend("fake:m", guards=GuardsConfig(bulkhead={"max_concurrent": 4}))
    assert isinstance(g, GuardedBackend)
    assert g.bulkhead is not None and g.bulkhead.policy.max_concurrent == 4


def test_bad_guards_are_refused_before_the_backend_is_built() -> None:
    built: list[str] = []

    def factory(model: str | None = None, **options: Any) -> Backend:
        built.append(model or "")
        return FakeBackend("counted")

    register_backend("counted", factory)
    with pytest.raises(ConfigurationError, match=r"create_backend\(guards=\.\.\.\).*atempts"):
        create_backend("counted:m", guards={"retry": {"atempts": 5}})
    with pytest.raises(ConfigurationError, match=r"BulkheadPolicy.max_concurrent must be"):
        create_backend("counted:m", guards={"bulkhead": {"max_concurrent": 0}})
    with pytest.raises(ConfigurationError, match=r"guard\(create_backend\(spec, guards=False\)"):
        create_backend("counted:m", guards=RetryPolicy())  # type: ignore[arg-type]
    assert built == []  # an engine is never started for a call that cannot be guarded
    create_backend("counted:m")
    assert built == ["m"]


# -- against a real HTTP server: a 503 is retried by default -----------------------------------


@pytest.mark.anyio
async def test_a_503_is_retried_through_create_backend(
    srv: FakeLLMServer, no_backoff: None
) -> None:
    srv.set_faults(Fault("status", status=503))
    async with create_backend("openai:m", base_url=srv.url) as b:
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(REQ)
    assert info.value.status_code == 503
    assert srv.count("/v1/chat/completions") == 3  # the default RetryPolicy: 3 attempts


@pytest.mark.anyio
async def test_guards_false_sends_one_request(srv: FakeLLMServer, no_backoff: None) -> None:
    srv.set_faults(Fault("status", status=503))
    async with create_backend("openai:m", base_url=srv.url, guards=False) as b:
        assert isinstance(b, OpenAIBackend)
        with pytest.raises(HTTPStatusError):
            await b.complete(REQ)
    assert srv.count("/v1/chat/completions") == 1


@pytest.mark.anyio
async def test_a_transient_503_is_answered(srv: FakeLLMServer, no_backoff: None) -> None:
    calls = 0

    def once_then_answer(path: str, body: dict[str, Any]) -> Fault | None:
        nonlocal calls
        calls += 1
        return Fault("status", status=503) if calls == 1 else None

    srv.set_handler(once_then_answer)
    async with create_backend("openai:m", base_url=srv.url) as b:
        c = await b.complete(REQ)
    assert c.text == "echo: hi"
    assert srv.count("/v1/chat/completions") == 2


@pytest.mark.anyio
async def test_toml_backends_are_guarded_the_same_way(srv: FakeLLMServer, no_backoff: None) -> None:
    srv.set_faults(Fault("status", status=503))
    cfg = parse_config({"backends": {"m": {"type": "openai", "model": "m", "base_url": srv.url}}})
    async with cfg.build_backend("m") as b:
        with pytest.raises(HTTPStatusError):
            await b.complete(REQ)
    assert srv.count("/v1/chat/completions") == 3
