"""``serve_local``: vLLM's OpenAI-compatible server for the local model, reached over HTTP.

The server is a second process (~25 s to start), shared by this module's tests. Over HTTP the
model works from trio as well as asyncio.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from genfan_providers.vllm import (
    DEFAULT_MODEL_NAME,
    LocalServer,
    prepare_default_model,
    serve_local,
)

from genfan import ChatRequest, StreamEnd, TextDelta

pytestmark = pytest.mark.engine

providers_openai = pytest.importorskip("genfan_providers.openai")


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    prepare_default_model(progress=False)
    with serve_local(startup_timeout=600) as running:
        yield running
    assert running.process is not None and running.process.poll() is not None


@pytest.mark.anyio
async def test_the_openai_backend_talks_to_the_local_server(server: LocalServer) -> None:
    assert server.model_name == DEFAULT_MODEL_NAME
    backend = providers_openai.OpenAIBackend(
        server.model_name, base_url=server.base_url, api_key="local", name="served"
    )
    async with backend:
        c = await backend.complete(
            ChatRequest.from_prompt(
                "What is the capital of France?", temperature=0.0, max_tokens=32
            )
        )
        assert "Paris" in c.text
        assert c.usage.input_tokens > 0 and c.usage.output_tokens > 0
        events = [
            e
            async for e in backend.stream(
                ChatRequest.from_prompt("Say hello.", temperature=0.0, max_tokens=16)
            )
        ]
        assert isinstance(events[-1], StreamEnd)
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert text == events[-1].completion.text and text


def test_the_server_is_healthy_on_loopback(server: LocalServer) -> None:
    assert server.healthy()
    assert server.base_url.startswith("http://127.0.0.1:")
