"""`VLLMEmbedder`: the local model as an embedder (vLLM's pooling runner), and the semantic cache
over it.

The first tests need no engine (argument checks, trio, inputs refused before any start). The
``engine`` tests share one pooling engine for the module (it takes ~30 s to start on a CPU).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import pytest
from genfan_providers.vllm import (
    DEFAULT_MODEL_NAME,
    EngineRequestError,
    VLLMEmbedder,
    default_model_dir,
    prepare_default_model,
)

from genfan import BackendTimeoutError, ChatRequest, ConfigurationError
from genfan.batching import Embedder as BatchingEmbedderProtocol
from genfan.cost import Embedder, SemanticCache, cached
from genfan.testing import FakeBackend

pytestmark = pytest.mark.anyio

FRANCE = "What is the capital of France?"
FRANCE_AGAIN = "Which city is the capital of France?"
BREAD = "How do I bake sourdough bread at home?"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


# -- without the engine -----------------------------------------------------------------------


def test_options_are_checked_and_the_name_says_what_it_is() -> None:
    with pytest.raises(ConfigurationError, match="pooling must be one of"):
        VLLMEmbedder("org/some-model", pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="timeout"):
        VLLMEmbedder("org/some-model", timeout=0)
    with pytest.raises(ConfigurationError, match=r"'runner'.*pooling="):
        VLLMEmbedder("org/some-model", engine_options={"runner": "generate"})
    with pytest.raises(ConfigurationError, match="kv_cache_gb"):
        VLLMEmbedder("org/some-model", kv_cache_gb=0)
    embedder = VLLMEmbedder("org/some-model", pooling="last")
    assert embedder.name == "vllm-embed:some-model"
    assert "pooling='last'" in repr(embedder)
    assert embedder.stats() is None  # nothing started by building it
    # What SemanticCache and BatchingEmbedder accept.
    assert isinstance(embedder, Embedder)
    assert isinstance(embedder, BatchingEmbedderProtocol)


async def test_bad_texts_are_refused_before_any_engine_starts() -> None:
    embedder = VLLMEmbedder("org/some-model")  # never loadable: a start would fail loudly
    assert await embedder.embed([]) == []
    with pytest.raises(EngineRequestError, match="text 1: expected a non-empty string"):
        await embedder.embed(["hello", "  "])
    with pytest.raises(EngineRequestError, match=r"not one string: embed\(\[text\]\)"):
        await embedder.embed("hello")
    assert embedder.stats() is None
    await embedder.aclose()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_it_says_it_needs_asyncio() -> None:
    embedder = VLLMEmbedder("org/some-model")
    with pytest.raises(ConfigurationError, match="asyncio-only"):
        await embedder.embed([FRANCE])
    await embedder.aclose()


# -- on the real pooling engine -----------------------------------------------------------------


@pytest.fixture(scope="module")
async def local() -> AsyncIterator[VLLMEmbedder]:
    """The module's pooling engine over the prepared default model."""
    prepare_default_model(progress=False)  # instant when already prepared
    async with VLLMEmbedder() as embedder:
        await embedder.start()
        yield embedder


@pytest.mark.engine
async def test_the_local_model_embeds_and_a_semantic_cache_hits_on_a_paraphrase(
    local: VLLMEmbedder,
) -> None:
    assert local.name == f"vllm-embed:{DEFAULT_MODEL_NAME}"
    hidden = json.loads((Path(default_model_dir()) / "config.json").read_text())["hidden_size"]

    france, again, bread = await local.embed([FRANCE, FRANCE_AGAIN, BREAD])
    assert {len(france), len(again), len(bread)} == {hidden}
    for vector in (france, again, bread):
        assert math.sqrt(math.fsum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-3)
    assert _cosine(france, again) > _cosine(france, bread) + 0.1
    assert _cosine(france, again) > _cosine(again, bread) + 0.1

    # One text at a time gives the same vectors as a batch, in the texts' order.
    (bread_alone,) = await local.embed([BREAD])
    assert _cosine(bread_alone, bread) == pytest.approx(1.0, abs=1e-3)
    # A text longer than the context window is cut, not refused.
    (long,) = await local.embed([BREAD * 2000])
    assert len(long) == hidden

    stats = local.stats()
    assert stats is not None and stats.users == 1 and stats.running_requests == 0

    # A call past its timeout fails typed and leaves nothing running in the shared engine.
    hasty = VLLMEmbedder(timeout=1e-4)
    with pytest.raises(BackendTimeoutError, match="no embeddings within"):
        await hasty.embed([BREAD] * 8)
    assert local.stats().users == 2  # type: ignore[union-attr]  # the same engine, joined
    await hasty.aclose()
    with anyio.fail_after(30):
        while local.stats().running_requests:  # type: ignore[union-attr]  # noqa: ASYNC110
            await anyio.sleep(0.05)
    assert local.stats().users == 1  # type: ignore[union-attr]

    gpt = FakeBackend("gpt", ["Paris.", "Mix flour, water, salt and starter."])
    async with SemanticCache(local, threshold=0.9) as cache:
        backend = cached(gpt, cache)
        first = await backend.complete(ChatRequest.from_prompt(FRANCE))
        second = await backend.complete(ChatRequest.from_prompt(FRANCE_AGAIN))
        other = await backend.complete(ChatRequest.from_prompt(BREAD))
        nearest = await cache.nearest(ChatRequest.from_prompt(FRANCE_AGAIN), "gpt")
    assert (first.text, second.text) == ("Paris.", "Paris.")  # the paraphrase hit
    assert other.text == "Mix flour, water, salt and starter."  # the unrelated text missed
    assert len(gpt.calls) == 2
    assert nearest is not None and nearest.question == FRANCE and nearest.similarity >= 0.9
