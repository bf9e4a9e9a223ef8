"""Embeddings from a local model: vLLM's pooling runner, over the prepared chat model by default.

vLLM 0.32 turns a causal language model into an embedding model with ``runner="pooling"`` (its
``convert="auto"`` resolves to ``"embed"``) and a pooler config: each text's hidden states are
pooled (mean by default) and L2-normalised; a sentence-embedding model folder (all-MiniLM-L6-v2,
...) runs as it is. The pooling runner cannot generate, so the embedder runs its own engine, next to
a `VLLMBackend`'s if both are used: on the CPU that is one more engine process with its own copy of
the weights and its own KV cache (``kv_cache_gb``). Embedders with the same options share one
engine, started lazily on the first `VLLMEmbedder.embed` and shut down when the last one closes.

Example:
    ```python
    from genfan.cost import SemanticCache
    from genfan_providers.vllm import VLLMEmbedder

    async with VLLMEmbedder() as embedder:  # the prepared default model
        cache = SemanticCache(embedder, threshold=0.9)
    ```
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import anyio

from genfan import BackendTimeoutError, ConfigurationError, telemetry

from ._backend import EngineStats, VLLMBackend, _Engine
from ._errors import EngineRequestError, LocalEngineError
from ._prepare import DEFAULT_MODEL_NAME
from ._progress import ProgressLike

__all__ = ["VLLMEmbedder"]

Pooling = Literal["mean", "last", "cls"]
_POOLING: Final[dict[str, str]] = {"mean": "MEAN", "last": "LAST", "cls": "CLS"}


class VLLMEmbedder:
    """Embeds texts with a local model on vLLM's pooling runner, inside this process.

    It satisfies genfan's ``Embedder`` protocol (``async embed(texts) -> vectors``), so it can
    back a ``SemanticCache`` or a ``BatchingEmbedder``. Every text of one call is submitted to the
    engine at once, and vLLM batches them. Vectors are L2-normalised; their length is the model's
    hidden size (576 for the default SmolLM2-135M-Instruct, a chat model: it tells a paraphrase from
    an unrelated text, not from a near miss; see docs/caching.md). Use it as an async context manager, or
    call `aclose` when done. Like `VLLMBackend`, it needs asyncio.

    Args:
        model: a model folder or model id; default: the prepared default model
            (``genfan local prepare``).
        name: for errors and events (default ``vllm-embed:<model>``).
        pooling: how a text's token states become one vector: ``"mean"`` (default), ``"last"``
            (the last token's state) or ``"cls"`` (the first token's). For an embedding model,
            the pooling it was trained with (all-MiniLM-L6-v2: mean; BGE: cls).
        dtype: the weights' dtype, as for `VLLMBackend`.
        max_model_len: the longest text in tokens; a longer text is cut to its first
            ``max_model_len`` tokens.
        kv_cache_gb: GiB reserved for the engine's KV cache (``VLLM_CPU_KVCACHE_SPACE`` overrides
            it on CPUs).
        enforce_eager: skip torch.compile/CUDA graphs (start-up in seconds instead of minutes).
        timeout: seconds one `embed` call may take once the engine runs (``None``: no limit).
        progress: report the engine start (see ``ProgressEvent``).
        engine_options: further ``vllm.AsyncEngineArgs`` fields.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        name: str | None = None,
        pooling: Pooling = "mean",
        dtype: str = "auto",
        max_model_len: int = 2048,
        kv_cache_gb: float | None = 0.5,
        enforce_eager: bool = True,
        timeout: float | None = None,
        progress: ProgressLike = False,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        if pooling not in _POOLING:
            raise ConfigurationError(f"pooling must be one of {sorted(_POOLING)}, got {pooling!r}")
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        options = dict(engine_options or {})
        for key in ("runner", "pooler_config"):
            if key in options:
                raise ConfigurationError(
                    f"VLLMEmbedder sets the engine option {key!r} itself; choose the pooling "
                    "with pooling= instead"
                )
        # The engine, its environment, its start and its errors are VLLMBackend's own; only the
        # runner differs, so this engine is shared between embedders, never with a chat backend.
        label = str(model or DEFAULT_MODEL_NAME)
        self._engine = VLLMBackend(
            model,
            name=name or f"vllm-embed:{Path(label).name or label}",
            dtype=dtype,
            max_model_len=max_model_len,
            kv_cache_gb=kv_cache_gb,
            enforce_eager=enforce_eager,
            progress=progress,
            engine_options={
                **options,
                "runner": "pooling",  # a causal LM is converted to embed (convert="auto")
                "pooler_config": {"pooling_type": _POOLING[pooling]},
            },
        )
        self.name: str = self._engine.name
        self.model: str = self._engine.model
        self.model_name: str = self._engine.model_name
        self.pooling: Pooling = pooling
        self.max_model_len = max_model_len
        self._timeout = timeout

    def __repr__(self) -> str:
        return (
            f"VLLMEmbedder(name={self.name!r}, model={self.model_name!r}, pooling={self.pooling!r})"
        )

    async def start(self) -> EngineStats:
        """Start (or join) the pooling engine now instead of on the first `embed`."""
        return await self._engine.start()

    def stats(self) -> EngineStats | None:
        """The pooling engine's state, or ``None`` before this embedder first used it."""
        return self._engine.stats()

    async def aclose(self) -> None:
        """Stop using the pooling engine; the last embedder to close shuts it down."""
        await self._engine.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One L2-normalised vector per text, in the texts' order.

        Raises:
            EngineRequestError: a text is empty or not a string.
            ConfigurationError: not running on asyncio.
            LocalEngineError: the engine failed (or could not start: ``EngineStartError``).
            BackendTimeoutError: ``timeout`` passed.
        """
        if isinstance(texts, str):
            raise EngineRequestError(
                "embed() takes a sequence of texts, not one string: embed([text])",
                backend=self.name,
            )
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise EngineRequestError(
                    f"cannot embed text {i}: expected a non-empty string, got {text!r:.40}",
                    backend=self.name,
                )
        if not texts:
            return []
        shared = await self._engine._acquire()
        if self._timeout is None:
            return await self._embed_all(shared, texts)
        try:
            with anyio.fail_after(self._timeout):
                return await self._embed_all(shared, texts)
        except TimeoutError as exc:
            raise BackendTimeoutError(
                f"no embeddings within {self._timeout:g}s", backend=self.name
            ) from exc

    async def _embed_all(self, shared: _Engine, texts: list[str]) -> list[list[float]]:
        tasks = [asyncio.ensure_future(self._embed_one(shared, text)) for text in texts]
        try:
            vectors = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one failed (or the caller gave up): abort the rest
                task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(*tasks, return_exceptions=True)
            raise
        telemetry.event("vllm_embedded", backend=self.name, texts=len(texts))
        return vectors

    async def _embed_one(self, shared: _Engine, text: str) -> list[float]:
        from vllm import PoolingParams

        ids = list(shared.tokenizer.encode(text))[: self.max_model_len]
        request_id = f"genfan-embed-{uuid.uuid4().hex}"
        outputs = shared.engine.encode(
            {"type": "token", "prompt_token_ids": ids}, PoolingParams(task="embed"), request_id
        )
        last: Any = None
        drain = self._engine._engine_outputs(shared, outputs, request_id)
        async with contextlib.aclosing(drain) as outs:
            async for out in outs:
                last = out
        data = getattr(getattr(last, "outputs", None), "data", None)
        if data is None:
            raise LocalEngineError("the pooling engine returned no embedding", backend=self.name)
        return [float(x) for x in data.tolist()]
