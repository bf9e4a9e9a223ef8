"""Where an API key comes from and where it goes (the HTTP providers).

* A hosted provider without a key fails at construction, naming the variable to set.
* The environment's key goes only to its provider's own host: another ``base_url`` (a local
  server, a gateway) gets a key only when one is named (``api_key=``, ``api_key_env=``).
* ``OPENAI_BASE_URL`` / ``ANTHROPIC_BASE_URL`` are honoured as the official SDKs do, and a key
  from the environment goes to a base URL from the environment, as the SDKs send it.
* A 401 says which key was refused (never the key itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx
from genfan_providers.anthropic import AnthropicBackend
from genfan_providers.openai import OpenAIBackend

from genfan import ChatRequest, ConfigurationError, HTTPStatusError, create_backend, load_config
from genfan.testserver import FakeLLMServer, Fault

REQ = ChatRequest.from_prompt("hi")
ENV_KEY = "sk-env-SECRET-0123456789"
ARG_KEY = "sk-arg-SECRET-9876543210"
VARIABLES = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "MY_GATEWAY_KEY",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture
def srv(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    return server


def sent_headers(srv: FakeLLMServer) -> dict[str, str]:
    return dict(srv.requests[-1].headers)


# -- (a) a hosted provider without a key fails at construction ---------------------------------


def test_openai_without_a_key_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match=r"^OPENAI_API_KEY is not set; pass api_key="):
        OpenAIBackend("gpt-4o-mini")
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY is not set"):
        create_backend("openai:gpt-4o-mini")
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY is not set"):
        OpenAIBackend("gpt-4o-mini", base_url="https://api.openai.com/v1/")


def test_anthropic_without_a_key_fails_at_construction() -> None:
    with pytest.raises(
        ConfigurationError, match=r"^ANTHROPIC_API_KEY is not set; pass api_key=\.\.\. or set it"
    ):
        AnthropicBackend("claude-sonnet-4-5")
    with pytest.raises(ConfigurationError, match="ANTHROPIC_API_KEY is not set"):
        create_backend("anthropic:claude-sonnet-4-5")


def test_a_named_variable_that_is_not_set_fails_at_construction() -> None:
    with pytest.raises(ConfigurationError, match=r"^MY_GATEWAY_KEY is not set; pass api_key="):
        OpenAIBackend("m", api_key_env="MY_GATEWAY_KEY")
    with pytest.raises(ConfigurationError, match="MY_GATEWAY_KEY is not set"):
        OpenAIBackend("m", base_url="https://gateway.example/v1", api_key_env="MY_GATEWAY_KEY")
    with pytest.raises(ConfigurationError, match="MY_GATEWAY_KEY is not set"):
        AnthropicBackend("c", api_key_env="MY_GATEWAY_KEY")


def test_the_hosted_api_with_api_key_env_none_needs_a_key() -> None:
    with pytest.raises(ConfigurationError, match=r"needs an API key.*pass api_key="):
        OpenAIBackend("gpt-4o-mini", api_key_env=None)


def test_a_key_passed_or_in_headers_is_enough_for_the_hosted_api() -> None:
    assert OpenAIBackend("gpt-4o-mini", api_key=ARG_KEY).key_source == "argument"
    b = OpenAIBackend("gpt-4o-mini", headers={"Authorization": f"Bearer {ARG_KEY}"})
    assert b.key_source == "headers"
    assert AnthropicBackend("c", headers={"x-api-key": ARG_KEY}).key_source == "headers"
    assert OpenAIBackend("gpt-4o-mini", client=httpx.AsyncClient()).key_source == "client"


def test_no_key_is_fine_for_a_local_server() -> None:
    b = OpenAIBackend("m", base_url="http://127.0.0.1:8000/v1")
    assert not b.has_api_key and b.key_source == "none" and b.api_key_env is None


# -- (b) the environment's key goes only to its provider's own host ----------------------------


@pytest.mark.anyio
async def test_the_openai_key_is_not_sent_to_another_base_url(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    async with OpenAIBackend("m", base_url=srv.url) as b:
        assert not b.has_api_key
        await b.complete(REQ)
    assert "authorization" not in sent_headers(srv)


@pytest.mark.anyio
async def test_the_anthropic_key_is_not_sent_to_another_base_url(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)
    async with AnthropicBackend("c", base_url=srv.url) as b:
        assert not b.has_api_key
        await b.complete(REQ)
    assert "x-api-key" not in sent_headers(srv)


@pytest.mark.anyio
async def test_the_environment_key_goes_to_the_providers_own_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)
    openai_body = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    anthropic_body = {
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    with respx.mock:
        to_openai = respx.post("https://api.openai.com/v1/chat/completions").respond(
            json=openai_body
        )
        to_anthropic = respx.post("https://api.anthropic.com/v1/messages").respond(
            json=anthropic_body
        )
        async with OpenAIBackend("gpt-4o-mini") as gpt, AnthropicBackend("claude-x") as claude:
            assert gpt.api_key_env == "OPENAI_API_KEY" and gpt.key_source == "environment"
            await gpt.complete(REQ)
            await claude.complete(REQ)
    assert to_openai.calls.last.request.headers["authorization"] == f"Bearer {ENV_KEY}"
    assert to_anthropic.calls.last.request.headers["x-api-key"] == ENV_KEY


@pytest.mark.anyio
async def test_a_named_key_goes_to_any_base_url(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    monkeypatch.setenv("MY_GATEWAY_KEY", "sk-gateway")
    async with OpenAIBackend("m", base_url=srv.url, api_key_env="MY_GATEWAY_KEY") as b:
        await b.complete(REQ)
    assert sent_headers(srv)["authorization"] == "Bearer sk-gateway"
    # naming the provider's own variable sends it too: the caller asked for it
    async with OpenAIBackend("m", base_url=srv.url, api_key_env="OPENAI_API_KEY") as b:
        await b.complete(REQ)
    assert sent_headers(srv)["authorization"] == f"Bearer {ENV_KEY}"
    async with AnthropicBackend("c", base_url=srv.url, api_key=ARG_KEY) as c:
        await c.complete(REQ)
    assert sent_headers(srv)["x-api-key"] == ARG_KEY


@pytest.mark.anyio
async def test_toml_sends_the_environment_key_only_where_named(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    path = tmp_path / "genfan.toml"
    path.write_text(
        f"""
[backends.local]
type = "openai"
model = "m"
base_url = "{srv.url}"

[backends.gateway]
type = "openai"
model = "m"
base_url = "{srv.url}"
api_key_env = "OPENAI_API_KEY"
""",
        encoding="utf-8",
    )
    config = load_config(path)
    async with config.build_backend("local") as local:
        await local.complete(REQ)
    assert "authorization" not in sent_headers(srv)
    async with config.build_backend("gateway") as gateway:
        await gateway.complete(REQ)
    assert sent_headers(srv)["authorization"] == f"Bearer {ENV_KEY}"


# -- (c) OPENAI_BASE_URL and ANTHROPIC_BASE_URL, as the official SDKs read them ----------------


@pytest.mark.anyio
async def test_openai_base_url_from_the_environment_gets_the_environment_key(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    async with OpenAIBackend("m") as b:
        assert b.base_url == srv.url
        await b.complete(REQ)
    assert sent_headers(srv)["authorization"] == f"Bearer {ENV_KEY}"  # as the openai SDK does
    # an explicit base_url wins over the variable (and gets no key from the environment)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    async with OpenAIBackend("m", base_url=srv.url) as b:
        await b.complete(REQ)
    assert "authorization" not in sent_headers(srv)


@pytest.mark.anyio
async def test_openai_base_url_from_the_environment_needs_no_key(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", srv.url + "/")
    async with create_backend("openai:m") as b:
        await b.complete(REQ)
    assert "authorization" not in sent_headers(srv)


@pytest.mark.anyio
async def test_anthropic_base_url_from_the_environment_is_read_as_the_sdk_reads_it(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The official SDK's ANTHROPIC_BASE_URL has no version path: it calls {url}/v1/messages.
    monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.root_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ENV_KEY)
    async with AnthropicBackend("c") as b:
        assert b.base_url == srv.url
        await b.complete(REQ)
    assert srv.count("/v1/messages") == 1
    assert sent_headers(srv)["x-api-key"] == ENV_KEY
    monkeypatch.setenv("ANTHROPIC_BASE_URL", srv.url)  # with /v1 already: not doubled
    assert AnthropicBackend("c").base_url == srv.url


def test_a_bad_base_url_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:8000/v1")
    with pytest.raises(ConfigurationError, match=r"base_url .*localhost:8000/v1.*OPENAI_BASE_URL"):
        OpenAIBackend("m")


# -- (d) a 401 says which key was refused, never the key ---------------------------------------


@pytest.mark.anyio
async def test_401_names_the_environment_variable(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)
    srv.set_faults(Fault("status", status=401))
    async with OpenAIBackend("m") as b:
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(REQ)
    message = str(info.value)
    assert info.value.status_code == 401
    assert "the key from OPENAI_API_KEY was refused" in message
    assert ENV_KEY not in message and ENV_KEY not in repr(info.value)


@pytest.mark.anyio
async def test_401_names_the_argument(srv: FakeLLMServer) -> None:
    srv.set_faults(Fault("status", status=401))
    for backend in (
        OpenAIBackend("m", base_url=srv.url, api_key=ARG_KEY),
        AnthropicBackend("c", base_url=srv.url, api_key=ARG_KEY),
    ):
        async with backend as b:
            with pytest.raises(HTTPStatusError) as info:
                await b.complete(REQ)
        name = type(backend).__name__
        assert f"the api_key passed to {name} was refused" in str(info.value)
        assert ARG_KEY not in str(info.value)


@pytest.mark.anyio
async def test_401_without_a_key_says_none_was_sent(
    srv: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", ENV_KEY)  # set, but not for this host
    srv.set_faults(Fault("status", status=401))
    async with OpenAIBackend("m", base_url=srv.url) as b:
        with pytest.raises(HTTPStatusError) as info:
            await b.complete(REQ)
    message = str(info.value)
    assert f"no key was sent to {srv.url}" in message
    assert "api_key_env='OPENAI_API_KEY'" in message  # how to send it here
    assert ENV_KEY not in message


@pytest.mark.anyio
async def test_401_on_a_stream_says_the_same(srv: FakeLLMServer) -> None:
    srv.set_faults(Fault("status", status=401))
    async with AnthropicBackend("c", base_url=srv.url) as b:
        with pytest.raises(HTTPStatusError, match=f"no key was sent to {srv.url}"):
            async for _ in b.stream(REQ):
                pass
