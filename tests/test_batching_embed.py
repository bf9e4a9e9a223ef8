"""BatchingEmbedder over the OpenAI-compatible /v1/embeddings API of a real local server."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from genfan_providers.openai import OpenAIBackend

from genfan import HTTPStatusError
from genfan.batching import BatchingEmbedder, Embedder
from genfan.testserver import FakeLLMServer, Fault

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


async def test_many_single_calls_become_few_batched_requests(server: FakeLLMServer) -> None:
    server.reset()
    backend = OpenAIBackend("emb", base_url=server.url, api_key_env=None)
    assert isinstance(backend, Embedder)
    texts = [f"text number {i}" for i in range(200)]
    async with backend:
        expected = await backend.embed(texts)  # one direct request: the reference vectors
        got: dict[int, list[float]] = {}
        async with BatchingEmbedder(backend, max_size=50, max_wait=0.05) as embedder:

            async def one(i: int) -> None:
                got[i] = await embedder.embed_one(texts[i])

            async with anyio.create_task_group() as tg:
                for i in range(len(texts)):
                    tg.start_soon(one, i)
            stats = embedder.statistics()
    assert [got[i] for i in range(len(texts))] == expected  # each caller got its own vector
    requests = server.count("/v1/embeddings") - 1
    assert requests == stats.batches and requests <= 8  # 200 calls, a handful of requests
    assert stats.items == 200 and stats.fill_rate >= 0.5


async def test_a_failed_request_fails_its_callers_with_the_typed_error(
    server: FakeLLMServer,
) -> None:
    server.reset()
    server.set_faults(Fault("status", status=503))
    backend = OpenAIBackend("emb", base_url=server.url, api_key_env=None)
    try:
        async with backend, BatchingEmbedder(backend, max_size=4, max_wait=0.01) as embedder:
            with pytest.raises(HTTPStatusError) as info:
                await embedder.embed(["a", "b", "c"])
    finally:
        server.clear_faults()
    assert info.value.status_code == 503
    # an outage is not multiplied: the batch is not split into per-text retries
    assert server.count("/v1/embeddings") == 1


async def test_a_batch_refused_for_its_content_is_split_per_text(server: FakeLLMServer) -> None:
    server.reset()
    server.set_faults(Fault("status", status=400))
    backend = OpenAIBackend("emb", base_url=server.url, api_key_env=None)
    try:
        async with backend, BatchingEmbedder(backend, max_size=4, max_wait=0.01) as embedder:
            with pytest.raises(HTTPStatusError):
                await embedder.embed(["a", "b", "c"])
    finally:
        server.clear_faults()
    assert server.count("/v1/embeddings") == 4  # the batch, then each text alone


async def test_a_preferred_size_is_sent_without_waiting_for_max_wait(
    server: FakeLLMServer,
) -> None:
    server.reset()
    backend = OpenAIBackend("emb", base_url=server.url, api_key_env=None)
    texts = [f"text {i}" for i in range(20)]
    async with (
        backend,
        BatchingEmbedder(backend, max_size=50, max_wait=60.0, preferred_sizes=(10,)) as embedder,
    ):
        with anyio.fail_after(30):  # far below max_wait: only preferred sizes were sent
            vectors = await embedder.embed(texts)
        stats = embedder.statistics()
    assert len(vectors) == 20 and all(vectors)
    assert server.count("/v1/embeddings") == 2  # two requests of exactly 10 texts
    assert (stats.batches, stats.flushed_preferred, stats.items) == (2, 2, 20)
