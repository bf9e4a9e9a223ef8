"""Sampling parameters that OpenAI's reasoning models reject: dropped, refused or sent (respx).

o1, o3, o4 and gpt-5 answer 400 to a ``temperature`` other than 1 and to ``top_p``;
``OpenAIBackend(unsupported_params=...)`` decides what happens to them before the request leaves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import respx
from genfan_providers.openai import OpenAIBackend

from genfan import ChatRequest, ConfigurationError, collect_stream, create_backend, load_config
from genfan.testing import capture_events

from ._openai_bodies import KEY, LOCAL, OPENAI, completion_body, sent_body

DROPPED = "openai_unsupported_params_dropped"


def sampling(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k in ("temperature", "top_p")}


def dropped(events: list[Any]) -> list[Any]:
    return [e for e in events if e["event"] == DROPPED]


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("base_url", "model"),
    [
        (OPENAI, "o1"),
        (OPENAI, "o3-mini"),
        (OPENAI, "o4-mini-2025-04-16"),
        (OPENAI, "gpt-5"),
        (OPENAI, "gpt-5.1"),
        (LOCAL, "gpt-5-mini"),  # a proxy in front of OpenAI: the model name decides
    ],
)
async def test_drop_is_the_default_and_leaves_them_out_with_one_warning(
    base_url: str, model: str, stream: bool
) -> None:
    b = OpenAIBackend(model, base_url=base_url, api_key=KEY)
    assert b.unsupported_params == "drop"
    req = ChatRequest.from_prompt("hi", temperature=0.2, top_p=0.9, max_tokens=7, seed=3)
    with capture_events() as events:
        body = await sent_body(b, req, stream=stream)
    assert body["model"] == model
    assert sampling(body) == {}
    # everything else is still sent
    assert body["max_completion_tokens"] == 7 and body["seed"] == 3
    [warning] = dropped(events)
    assert warning["log_level"] == "warning"
    assert warning["params"] == ["temperature", "top_p"]
    assert warning["model"] == model and warning["backend"] == f"openai:{model}"


@pytest.mark.anyio
async def test_drop_keeps_temperature_1_which_reasoning_models_accept() -> None:
    def b() -> OpenAIBackend:
        return OpenAIBackend("o3", base_url=OPENAI, api_key=KEY)

    with capture_events() as events:
        body = await sent_body(b(), ChatRequest.from_prompt("hi", temperature=1.0, top_p=0.5))
    assert sampling(body) == {"temperature": 1.0}
    assert [e["params"] for e in dropped(events)] == [["top_p"]]
    with capture_events() as events:
        body = await sent_body(b(), ChatRequest.from_prompt("hi", temperature=1.0))
    assert sampling(body) == {"temperature": 1.0}
    assert dropped(events) == []


@pytest.mark.anyio
async def test_drop_warns_on_every_call_that_drops_and_only_then() -> None:
    b = OpenAIBackend("o3", base_url=OPENAI, api_key=KEY)
    with capture_events() as events, respx.mock:
        respx.post(OPENAI + "/chat/completions").respond(json=completion_body())
        async with b:
            await b.complete(ChatRequest.from_prompt("a", temperature=0.0))
            await b.complete(ChatRequest.from_prompt("b"))
            await b.complete(ChatRequest.from_prompt("c", top_p=0.1))
    assert [e["params"] for e in dropped(events)] == [["temperature"], ["top_p"]]


@pytest.mark.anyio
@pytest.mark.parametrize("setting", ["drop", "error", "send"])
@pytest.mark.parametrize(
    ("base_url", "model"),
    [
        (OPENAI, "gpt-4o-mini"),
        (OPENAI, "gpt-4.1"),
        (LOCAL, "Qwen/Qwen2.5-0.5B-Instruct"),
        (LOCAL, "gpt-oss-20b"),
        (LOCAL, "o1x-custom"),
        ("https://openrouter.ai/api/v1", "openai/o3-mini"),  # OpenRouter adapts params itself
        (LOCAL, None),  # llama.cpp: no model at all
    ],
)
async def test_other_models_always_get_them(base_url: str, model: str | None, setting: str) -> None:
    b = OpenAIBackend(model, base_url=base_url, api_key=KEY, unsupported_params=setting)  # type: ignore[arg-type]
    with capture_events() as events:
        body = await sent_body(b, ChatRequest.from_prompt("hi", temperature=0.2, top_p=0.9))
    assert sampling(body) == {"temperature": 0.2, "top_p": 0.9}
    assert dropped(events) == []


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_error_refuses_before_sending_and_says_how_to_fix(stream: bool) -> None:
    b = OpenAIBackend("o4-mini", base_url=OPENAI, api_key=KEY, unsupported_params="error")
    req = ChatRequest.from_prompt("hi", temperature=0.2, top_p=0.9)
    with respx.mock:
        route = respx.post(OPENAI + "/chat/completions").respond(json=completion_body())
        async with b:
            with pytest.raises(ConfigurationError) as info:
                if stream:
                    await collect_stream(b.stream(req))
                else:
                    await b.complete(req)
    assert not route.called
    message = str(info.value)
    assert "'o4-mini' is an OpenAI reasoning model" in message
    assert "temperature=0.2, top_p=0.9" in message
    assert "remove them from the request" in message
    assert "unsupported_params='drop'" in message and "'send'" in message
    assert KEY not in message


@pytest.mark.anyio
async def test_error_allows_what_the_model_accepts() -> None:
    def b() -> OpenAIBackend:
        return OpenAIBackend("o3", base_url=OPENAI, api_key=KEY, unsupported_params="error")

    body = await sent_body(b(), ChatRequest.from_prompt("hi", temperature=1, max_tokens=4))
    assert sampling(body) == {"temperature": 1} and body["max_completion_tokens"] == 4
    assert sampling(await sent_body(b(), ChatRequest.from_prompt("hi"))) == {}


@pytest.mark.anyio
async def test_error_follows_the_request_model() -> None:
    b = OpenAIBackend("gpt-4o-mini", base_url=OPENAI, api_key=KEY, unsupported_params="error")
    assert sampling(b.build_body(ChatRequest.from_prompt("hi", top_p=0.5))) == {"top_p": 0.5}
    with pytest.raises(ConfigurationError, match=r"'o1' is an OpenAI reasoning model.*top_p=0.5"):
        b.build_body(ChatRequest.from_prompt("hi", top_p=0.5, model="o1"))


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_send_sends_them_as_given(stream: bool) -> None:
    # a compatible server that serves its own model under an OpenAI reasoning model's name
    b = OpenAIBackend("o3-mini", base_url=LOCAL, api_key_env=None, unsupported_params="send")
    req = ChatRequest.from_prompt("hi", temperature=0.2, top_p=0.9)
    with capture_events() as events:
        body = await sent_body(b, req, stream=stream)
    assert sampling(body) == {"temperature": 0.2, "top_p": 0.9}
    assert dropped(events) == []


@pytest.mark.parametrize("bad", ["ignore", "", None, "DROP", True])
def test_bad_unsupported_params_is_a_configuration_error(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="unsupported_params must be one of") as info:
        OpenAIBackend("o3", api_key=KEY, unsupported_params=bad)
    assert "'drop', 'error', 'send'" in str(info.value)
    assert repr(bad) in str(info.value)


def test_registry_passes_unsupported_params() -> None:
    b = create_backend("openai:o3", api_key=KEY, unsupported_params="error", guards=False)
    assert isinstance(b, OpenAIBackend)
    assert b.unsupported_params == "error"


@pytest.mark.anyio
async def test_toml_options_pass_unsupported_params_through(tmp_path: Path) -> None:
    path = tmp_path / "genfan.toml"
    path.write_text(
        f"""
[backends.strict]
type = "openai"
model = "o3"
base_url = "{LOCAL}"
[backends.strict.options]
unsupported_params = "error"
""",
        encoding="utf-8",
    )
    b = load_config(path).build_backend("strict")  # wrapped in the default guards
    with respx.mock:
        route = respx.post(LOCAL + "/chat/completions").respond(json=completion_body())
        try:
            with pytest.raises(ConfigurationError, match="unsupported_params='drop'"):
                await b.complete(ChatRequest.from_prompt("hi", temperature=0.5))
        finally:
            await b.aclose()
    assert not route.called  # and not retried: a misuse is not a backend failure
