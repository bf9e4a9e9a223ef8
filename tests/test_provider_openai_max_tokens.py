"""Which body field carries ``max_tokens`` for OpenAI and OpenAI-compatible servers (respx).

OpenAI's reasoning models reject ``max_tokens`` and want ``max_completion_tokens``; vLLM,
Ollama, llama.cpp, Together and OpenRouter read ``max_tokens``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import respx
from genfan_providers.openai import OpenAIBackend

from genfan import ChatRequest, ConfigurationError, create_backend, load_config, parse_config

from ._openai_bodies import KEY, LOCAL, OPENAI, completion_body, sent_body


def limit_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k in ("max_tokens", "max_completion_tokens")}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("base_url", "model", "field"),
    [
        # OpenAI itself: every model takes max_completion_tokens (max_tokens is deprecated)
        (OPENAI, "gpt-4o-mini", "max_completion_tokens"),
        (OPENAI, "o3-mini", "max_completion_tokens"),
        (OPENAI + "/", "gpt-4.1", "max_completion_tokens"),
        # an OpenAI reasoning model behind another base URL (a proxy, Azure-style gateway)
        (LOCAL, "o1", "max_completion_tokens"),
        (LOCAL, "o1-preview", "max_completion_tokens"),
        (LOCAL, "o3", "max_completion_tokens"),
        (LOCAL, "o4-mini", "max_completion_tokens"),
        (LOCAL, "gpt-5", "max_completion_tokens"),
        (LOCAL, "gpt-5.1", "max_completion_tokens"),
        (LOCAL, "gpt-5-mini-2025-08-07", "max_completion_tokens"),
        # OpenAI-compatible servers and their models: max_tokens
        (LOCAL, "Qwen/Qwen2.5-0.5B-Instruct", "max_tokens"),
        (LOCAL, "gpt-4o-mini", "max_tokens"),
        (LOCAL, "gpt-oss-20b", "max_tokens"),
        (LOCAL, "o1x-custom", "max_tokens"),
        ("https://openrouter.ai/api/v1", "openai/o3-mini", "max_tokens"),
        ("https://api.together.xyz/v1", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "max_tokens"),
        ("https://api.openai.com.evil.test/v1", "gpt-4o-mini", "max_tokens"),
        (LOCAL, None, "max_tokens"),  # llama.cpp: no model at all
    ],
)
async def test_auto_picks_the_field_from_base_url_and_model(
    base_url: str, model: str | None, field: str
) -> None:
    b = OpenAIBackend(model, base_url=base_url, api_key=KEY)
    assert b.max_tokens_field == "auto"
    body = await sent_body(b, ChatRequest.from_prompt("hi", max_tokens=64))
    assert limit_fields(body) == {field: 64}


@pytest.mark.anyio
async def test_auto_follows_the_request_model_not_only_the_backend_default() -> None:
    b = OpenAIBackend("llama3.2", base_url=LOCAL, api_key_env=None)
    assert limit_fields(b.build_body(ChatRequest.from_prompt("hi", max_tokens=5))) == {
        "max_tokens": 5
    }
    req = ChatRequest.from_prompt("hi", max_tokens=5, model="o4-mini")
    assert limit_fields(b.build_body(req)) == {"max_completion_tokens": 5}


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("base_url", "model", "setting"),
    [
        (LOCAL, "llama3.2", "max_completion_tokens"),  # forced on a server that wants it
        (OPENAI, "gpt-4o-mini", "max_tokens"),  # forced back for an old-style proxy
        (LOCAL, "o3", "max_tokens"),
    ],
)
async def test_explicit_setting_wins_over_auto(
    base_url: str, model: str, setting: str, stream: bool
) -> None:
    b = OpenAIBackend(model, base_url=base_url, api_key=KEY, max_tokens_field=setting)  # type: ignore[arg-type]
    body = await sent_body(b, ChatRequest.from_prompt("hi", max_tokens=9), stream=stream)
    assert limit_fields(body) == {setting: 9}


@pytest.mark.anyio
@pytest.mark.parametrize("setting", ["auto", "max_tokens", "max_completion_tokens"])
async def test_no_limit_sends_neither_field(setting: str) -> None:
    b = OpenAIBackend("o3", base_url=OPENAI, api_key=KEY, max_tokens_field=setting)  # type: ignore[arg-type]
    body = await sent_body(b, ChatRequest.from_prompt("hi"))
    assert limit_fields(body) == {}


@pytest.mark.parametrize("bad", ["max_output_tokens", "", None, "MAX_TOKENS", 5])
def test_bad_max_tokens_field_is_a_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_tokens_field must be one of") as info:
        OpenAIBackend("gpt-4o-mini", api_key=KEY, max_tokens_field=bad)
    assert "'auto', 'max_tokens', 'max_completion_tokens'" in str(info.value)
    assert repr(bad) in str(info.value)


def test_registry_passes_max_tokens_field() -> None:
    b = create_backend(
        "openai:llama3.2",
        base_url=LOCAL,
        api_key_env=None,
        max_tokens_field="max_completion_tokens",
        guards=False,
    )
    assert isinstance(b, OpenAIBackend)
    assert b.max_tokens_field == "max_completion_tokens"


@pytest.mark.anyio
async def test_toml_options_pass_max_tokens_field_through(tmp_path: Path) -> None:
    path = tmp_path / "genfan.toml"
    path.write_text(
        f"""
[backends.forced]
type = "openai"
model = "llama3.2"
base_url = "{LOCAL}"
[backends.forced.options]
max_tokens_field = "max_completion_tokens"

[backends.plain]
type = "openai"
model = "llama3.2"
base_url = "{LOCAL}"
""",
        encoding="utf-8",
    )
    config = load_config(path)
    req = ChatRequest.from_prompt("hi", max_tokens=3)
    sent = {}
    with respx.mock:
        route = respx.post(LOCAL + "/chat/completions").respond(json=completion_body())
        for name in ("forced", "plain"):
            b = config.build_backend(name)  # wrapped in the default guards
            try:
                await b.complete(req)
            finally:
                await b.aclose()
            sent[name] = limit_fields(json.loads(route.calls.last.request.content))
    assert sent == {"forced": {"max_completion_tokens": 3}, "plain": {"max_tokens": 3}}


def test_toml_bad_max_tokens_field_names_the_field() -> None:
    config = parse_config(
        {
            "backends": {
                "local": {
                    "type": "openai",
                    "base_url": LOCAL,
                    "options": {"max_tokens_field": "max_output_tokens"},
                }
            }
        }
    )
    with pytest.raises(ConfigurationError, match="max_tokens_field"):
        config.build_backend("local")
