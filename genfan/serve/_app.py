"""The gateway: a hand-written ASGI app in front of genfan's backends, fan-outs and cascades.

Routes: ``POST /v1/chat/completions`` (JSON and server-sent events), ``GET /v1/models``,
``POST /v1/embeddings`` (micro-batched), ``GET /health``, ``GET /ready``, ``GET /metrics``.
A request passes, in order: the drain check (503 while draining), the body limit (413), the
virtual key (401), the key's model allow-list (403), its requests and tokens per minute (429
with ``Retry-After``), its USD budget (429 ``insufficient_quota``); then the model answers, and
the answer's cost goes to the key's ledger before the response is sent.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream

from .. import telemetry
from .._backend import Backend, BaseBackend
from .._config import GenfanConfig
from .._errors import (
    BudgetExceededError,
    ConfigurationError,
    GenfanError,
    RateLimitExceededError,
)
from .._types import ChatRequest, Completion, TextDelta, ToolCallDelta
from ._errors import GatewayError, from_genfan_error
from ._keys import KeyStore, KeyStoreError, LedgerEntry, VirtualKey, hash_key
from ._metrics import GatewayMetrics
from ._models import Outcome, ServedModel, build_models
from ._openai import (
    ParsedChat,
    chunk,
    completion_json,
    finish_reason,
    parse_chat,
    stream_logprobs,
    usage_json,
)
from ._settings import ServeSettings, load_gateway_config, parse_serve

__all__ = ["Gateway", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class _ClientGone(Exception):
    """The client disconnected while its body was being read."""


class _KeyQuota(BaseBackend):
    """Stands for one virtual key in a rate limiter's guard stack (never called)."""

    async def complete(self, request: ChatRequest) -> Completion:  # pragma: no cover
        raise NotImplementedError


@dataclass(slots=True)
class _Response:
    """What was sent so far (for the metrics and the error path)."""

    status: int = 0
    started: bool = False
    gone: bool = False
    finished: bool = False


class Gateway:
    """An OpenAI-compatible gateway over a genfan configuration, as an ASGI app.

    Use it as an async context manager (``async with Gateway(config) as app:``) to build the
    models and open the key store; an ASGI server does the same through the lifespan protocol.

    Args:
        config: genfan's configuration (backends, the fan-out, guards, quota stores).
        settings: the ``[serve]`` table (default: `ServeSettings()`).
        keys: the key store (default: the one ``settings`` names; none: every request is let in).
    """

    _ledger_idle: anyio.Event
    _budgets_done: anyio.Event
    _watchers: anyio.abc.TaskGroup

    def __init__(
        self,
        config: GenfanConfig,
        settings: ServeSettings | None = None,
        *,
        keys: KeyStore | None = None,
    ) -> None:
        self.config = config
        if settings is None:
            settings = parse_serve(
                config.serve, source=str(config.source or "<config>"), config=config
            )
        self.settings = settings
        url = settings.keys_url()
        self.keys: KeyStore | None = keys if keys is not None else (KeyStore(url) if url else None)
        self.models: dict[str, ServedModel] = {}
        self.draining = False
        self.in_flight = 0
        self.ready = False
        self.metrics = GatewayMetrics(self._probe, lambda: self.in_flight)
        self._stack: AsyncExitStack | None = None
        self._embedders: dict[str, Any] = {}
        self._key_cache: dict[str, tuple[VirtualKey, float]] = {}
        self._limiters: dict[str, Any] = {}
        self._budgets: dict[str, Any] = {}
        self._budget_holders: anyio.abc.TaskGroup | None = None
        self._ledger_in: anyio.abc.ObjectSendStream[LedgerEntry] | None = None
        self._ledger_pending = 0
        self._budget_store: Any = None
        self._quota_store: Any = None
        self._models_body = b""
        self._idle: anyio.Event | None = None
        self._replica = (b"x-genfan-replica", str(os.getpid()).encode())
        self._routes: dict[
            tuple[str, str], Callable[[Scope, Receive, Send, _Response], Awaitable[None]]
        ] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/chat/completions"): self._chat,
            ("GET", "/v1/models"): self._list_models,
            ("GET", "/models"): self._list_models,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/embeddings"): self._embeddings,
            ("GET", "/health"): self._health,
            ("GET", "/ready"): self._ready,
            ("GET", "/metrics"): self._metrics,
        }

    # -- life ---------------------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            stack.push_async_callback(self._close_models)
            build_models(self.config, self.settings, self.models)
            self._watchers = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._watchers.cancel_scope.cancel)  # at exit: stop the watchers
            await self._start_embedders(stack)
            if self.keys is not None:
                await self.keys.setup()
                stack.push_async_callback(self.keys.aclose)
                from ..cost import budget_store_from_url

                self._budget_store = budget_store_from_url(
                    self.settings.budget_store or self.keys.location
                )
                stack.push_async_callback(self._budget_store.aclose)
                # each key's budget is held open (leases) by a task here; at exit, before the
                # store closes, they all send their costs and return their leases
                self._budget_holders = await stack.enter_async_context(anyio.create_task_group())
                self._budgets_done = anyio.Event()
                stack.callback(self._close_budgets)
                writer = await stack.enter_async_context(anyio.create_task_group())
                self._ledger_in, entries = anyio.create_memory_object_stream[LedgerEntry](10_000)
                self._ledger_idle = anyio.Event()
                writer.start_soon(self._ledger_writer, entries)
                stack.push_async_callback(self._ledger_in.aclose)  # the writer then drains
            store = self.settings.rate_limit_store
            if store is not None:
                self._quota_store = self.config.rate_limit_stores[store].build()
                stack.push_async_callback(self._quota_store.aclose)
            stack.push_async_callback(self._close_limiters)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self._replica = (b"x-genfan-replica", str(os.getpid()).encode())
        self._models_body = _dumps(
            {"object": "list", "data": [m.describe() for m in self.models.values()]}
        )
        self.ready = True
        telemetry.event(
            "gateway_started",
            level="info",
            models=list(self.models),
            keys=self.keys is not None,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.ready = False
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _close_models(self) -> None:
        models, self.models = self.models, {}
        for m in models.values():
            with anyio.CancelScope(shield=True):
                await m.backend.aclose()
                for b in m.owned:
                    await b.aclose()

    async def _close_limiters(self) -> None:
        limiters, self._limiters = self._limiters, {}
        for g in limiters.values():
            await g.aclose()

    async def _start_embedders(self, stack: AsyncExitStack) -> None:
        from ..batching import BatchingEmbedder, Embedder

        e = self.settings.embeddings
        for name, model in self.models.items():
            provider = getattr(model.backend, "provider", model.backend)
            if model.kind == "backend" and callable(getattr(provider, "embed", None)):
                self._embedders[name] = await stack.enter_async_context(
                    BatchingEmbedder(
                        cast("Embedder", provider),
                        max_size=e.max_size,
                        max_wait=e.max_wait,
                        max_concurrent_batches=e.max_concurrent_batches,
                        name=name,
                    )
                )

    def begin_drain(self) -> None:
        """Stop taking requests (new ones get 503); those in flight, streams included, go on."""
        if not self.draining:
            self.draining = True
            telemetry.event("gateway_draining", level="info", in_flight=self.in_flight)

    async def drained(self, seconds: float) -> bool:
        """Wait until no request is in flight (at most ``seconds``); whether none is."""
        with anyio.move_on_after(seconds):
            while self.in_flight:
                self._idle = anyio.Event()
                await self._idle.wait()
        return self.in_flight == 0

    def _probe(self) -> Iterable[tuple[str, str | None, int, int]]:
        for name, model in list(self.models.items()):
            for label, b in _guarded(name, model.backend):
                state = b.breaker.statistics().state if b.breaker is not None else None
                running = queued = 0
                if b.bulkhead is not None:
                    s = b.bulkhead.statistics()
                    running, queued = s.running, s.queued
                yield label, state, running, queued
        for name, embedder in list(self._embedders.items()):
            s = embedder.statistics()
            yield f"embed:{name}", None, s.in_flight_batches, s.queued

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        try:
            await self.__aenter__()
        except BaseException as exc:
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            raise
        await send({"type": "lifespan.startup.complete"})
        try:
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            self.begin_drain()
            await self.drained(self.settings.drain_seconds)
        finally:
            with anyio.CancelScope(shield=True):
                await self.__aexit__(None, None, None)
        await send({"type": "lifespan.shutdown.complete"})

    async def _http(self, scope: Scope, receive: Receive, plain_send: Send) -> None:
        path: str = scope["path"]
        route = self._routes.get((scope["method"], path))
        response = _Response()
        replica = self._replica

        async def send(message: Message) -> None:  # every answer says which replica gave it
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], replica]
            elif not message.get("more_body"):
                response.finished = True
            await plain_send(message)

        if route is None:
            known = any(p == path for _, p in self._routes)
            err = GatewayError(
                405 if known else 404,
                f"{scope['method']} {path}: "
                + ("method not allowed" if known else "no such route"),
                type="invalid_request_error",
                code="method_not_allowed" if known else "not_found",
            )
            await _error(send, err, response)
            return
        self.in_flight += 1
        try:
            if self.draining and path not in ("/health", "/metrics"):
                raise GatewayError(
                    503,
                    "the gateway is shutting down; retry on another replica",
                    type="overloaded",
                    code="draining",
                    retry_after=1.0,
                )
            await route(scope, receive, send, response)
        except GatewayError as exc:
            await _error(send, exc, response)
        except _ClientGone:
            pass
        except OSError:
            if not response.started:
                raise  # not the client going away mid-answer
        except GenfanError as exc:
            await _error(send, from_genfan_error(exc), response)
        except Exception as exc:  # a bug: say so in OpenAI's shape, log its type (no data)
            telemetry.event(
                "gateway_internal_error", level="error", path=path, error=type(exc).__name__
            )
            await _error(
                send,
                GatewayError(500, "internal error", type="server_error", code="internal_error"),
                response,
            )
        finally:
            self.in_flight -= 1
            if self._idle is not None and not self.in_flight:
                self._idle.set()

    async def _body(self, scope: Scope, receive: Receive) -> Any:
        limit = self.settings.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise _too_large(limit)
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            data = message.get("body", b"")
            size += len(data)
            if size > limit:
                raise _too_large(limit)
            chunks.append(data)
            if not message.get("more_body"):
                break
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise GatewayError(
                400, "the body is not valid JSON", type="invalid_request_error", code="bad_json"
            ) from None

    # -- keys, limits, budgets ----------------------------------------------------------------

    async def _key(self, scope: Scope) -> VirtualKey | None:
        if self.keys is None:
            return None
        token = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer":
                    token = ""
                break
            if name == b"api-key":
                token = value.decode("latin-1")
                break
        if not token:
            self.metrics.rejected.labels("no_key").inc()
            raise GatewayError(
                401,
                "no API key: send 'Authorization: Bearer gf-...' (make one with "
                "`genfan keys create`)",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        digest = hash_key(token.strip())
        now = anyio.current_time()
        cached = self._key_cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            key = await self.keys.authenticate(token.strip())
        except KeyStoreError as exc:
            raise GatewayError(
                503,
                f"the key store cannot be used: {exc}",
                type="overloaded",
                code="key_store_unavailable",
                retry_after=1.0,
            ) from None
        if key is None:
            self.metrics.rejected.labels("bad_key").inc()
            raise GatewayError(
                401,
                "invalid API key (unknown, malformed or revoked)",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        if len(self._key_cache) > 10_000:
            self._key_cache.clear()
        self._key_cache[digest] = (key, now + self.settings.key_cache_seconds)
        return key

    def _limiter(self, key: VirtualKey) -> Any:
        limiter = self._limiters.get(key.id)
        if limiter is None:
            from ..resilience import RateLimitPolicy, guard

            policy = RateLimitPolicy(
                requests_per_minute=key.rpm,
                tokens_per_minute=key.tpm,
                mode="reject",
                learn=False,
            )
            limiter = guard(
                _KeyQuota(f"key-{key.id}"),
                bulkhead=None,
                breaker=None,
                retry=None,
                timeout=None,
                rate_limit=policy,
                rate_limit_store=self._quota_store,
            )
            self._limiters[key.id] = limiter
        return limiter

    async def _admit(self, key: VirtualKey | None, model: str, tokens: int) -> None:
        if key is None:
            return
        if not key.allows(model):
            self.metrics.rejected.labels("model_not_allowed").inc()
            raise GatewayError(
                403,
                f"this key may not call model {model!r}; it may call: "
                f"{', '.join(key.models or ())}",
                type="invalid_request_error",
                param="model",
                code="model_not_allowed",
            )
        if key.rpm is not None or key.tpm is not None:
            try:
                await self._limiter(key).rate_limiter.acquire(tokens)
            except RateLimitExceededError as exc:
                self.metrics.rejected.labels("rate_limit").inc()
                raise GatewayError(
                    429,
                    f"rate limit of key {key.name!r} reached; retry in {exc.retry_after:.1f}s",
                    type="rate_limit_exceeded",
                    code="rate_limit_exceeded",
                    retry_after=exc.retry_after,
                ) from None

    async def _reserve(
        self, key: VirtualKey | None, model: ServedModel, request: ChatRequest, n: int
    ) -> Any:
        """Hold the key's budget for this request (`genfan.cost.Budget`); ``None``: no budget."""
        if key is None or key.budget_usd is None:
            return None
        budget = self._budgets.get(key.id)
        if budget is None:
            from ..cost import Budget, Period

            budget = Budget(
                key.budget_usd, period=cast("Period", key.budget_period), store=self._budget_store
            )
            self._budgets[key.id] = budget
            if self._budget_holders is not None:
                with anyio.CancelScope(shield=True):  # no I/O: the holder enters it and waits
                    await self._budget_holders.start(self._hold_budget, budget, key.id)
        from ..cost import CostStoreError

        try:
            return await budget.reserve(
                f"key:{key.id}", budget.estimate(request, model.backend) * n
            )
        except CostStoreError as exc:
            raise GatewayError(
                503,
                f"the budget store cannot be used: {exc}",
                type="overloaded",
                code="budget_store_unavailable",
                retry_after=1.0,
            ) from None
        except BudgetExceededError as exc:
            self.metrics.rejected.labels("budget").inc()
            reset = exc.resets_at
            raise GatewayError(
                429,
                f"key {key.name!r} has spent its budget: ${exc.spent:.6g} spent + "
                f"${exc.reserved:.6g} in flight + ${exc.requested:.6g} for this request > "
                f"${exc.limit:g} per {exc.period}; raise the budget or use another key",
                type="insufficient_quota",
                code="insufficient_quota",
                retry_after=None if reset is None else max(1.0, reset - time.time()),
            ) from None

    def _close_budgets(self) -> None:
        """Let the tasks holding the keys' budgets close them (the gateway is closing)."""
        self._budget_holders = None
        self._budgets_done.set()

    async def _hold_budget(
        self,
        budget: Any,
        key_id: str,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a key's budget open (it leases) until the gateway closes; then its costs
        settled in memory reach the store and its leases are returned."""
        from ..cost import CostStoreError

        try:
            async with budget:
                task_status.started()
                await self._budgets_done.wait()
        except CostStoreError as exc:  # the leases expire in the store after `lease_ttl`
            telemetry.event("budget_flush_failed", level="error", key=key_id, error=str(exc))

    async def _settle(
        self, key: VirtualKey | None, hold: Any, cost: float | None, *, unknown: bool = False
    ) -> None:
        """Settle a reservation with the answer's ``cost``; ``None``: nothing was answered
        (release it), or, with ``unknown``, the cost is not known (count the reservation)."""
        if hold is None or key is None:
            return
        budget = self._budgets[key.id]
        try:
            with anyio.CancelScope(shield=True):
                if cost is None and not unknown:
                    await budget.release(hold)
                else:
                    await budget.settle(hold, cost)
        except GenfanError as exc:  # the answer is given; the reservation expires on its own
            telemetry.event("budget_settle_failed", level="error", key=key.id, error=str(exc))

    async def _record(self, key: VirtualKey | None, model: str, rid: str, o: Outcome) -> None:
        if key is None or self._ledger_in is None:
            return
        entry = LedgerEntry(
            key_id=key.id,
            at=time.time(),
            model=model,
            request_id=rid,
            input_tokens=o.input_tokens,
            output_tokens=o.output_tokens,
            cost_usd=o.cost,
        )
        self._ledger_pending += 1
        await self._ledger_in.send(entry)

    async def _ledger_writer(self, entries: MemoryObjectReceiveStream[LedgerEntry]) -> None:
        """Write the ledger in batches: whatever queued while the last batch was written."""
        assert self.keys is not None
        async with entries:
            async for first in entries:
                batch = [first]
                while True:
                    try:
                        batch.append(entries.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                try:
                    with anyio.CancelScope(shield=True):
                        await self.keys.record_many(batch)
                except KeyStoreError as exc:
                    telemetry.event(
                        "ledger_write_failed", level="error", entries=len(batch), error=str(exc)
                    )
                self._ledger_pending -= len(batch)
                if not self._ledger_pending:
                    self._ledger_idle.set()
                    self._ledger_idle = anyio.Event()

    async def flush_ledger(self) -> None:
        """Wait until every answered request's ledger entry is written."""
        while self._ledger_pending:
            await self._ledger_idle.wait()

    # -- routes ---------------------------------------------------------------------------------

    def _model(self, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise GatewayError(
                404,
                f"the model {name!r} does not exist; GET /v1/models lists: "
                f"{', '.join(self.models)}",
                type="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return model

    async def _chat(self, scope: Scope, receive: Receive, send: Send, r: _Response) -> None:
        started = anyio.current_time()
        key = await self._key(scope)
        chat = parse_chat(await self._body(scope, receive))
        model = self._model(chat.model)
        await self._admit(key, chat.model, _estimate_tokens(chat.request) * chat.n)
        hold = await self._reserve(key, model, chat.request, chat.n)
        outcomes: list[Outcome] = []
        failure: BaseException | None = None
        try:
            with anyio.CancelScope() as answering:
                # A watcher (in the gateway's task group: no task group per request) cancels
                # the answer, and the backend calls under it, if the client hangs up: for
                # streams and for answers of several calls. One backend's plain answer is let
                # finish (a watcher costs ~80 us, a tenth of what the gateway adds).
                if chat.stream or chat.n > 1 or model.kind in ("fanout", "cascade"):
                    self._watchers.start_soon(_watch, receive, r, answering)
                try:
                    outcomes = await self._answer(scope, send, r, key, model, chat, started)
                except Exception as exc:  # settled below
                    failure = exc
        except BaseException:
            await self._settle(key, hold, None)
            raise
        if failure is not None:
            await self._settle(key, hold, None)
            raise failure
        if r.gone:
            # Cut off mid-answer: what the backends billed is unknown; the budget counts the
            # reservation (its estimate), never nothing.
            await self._settle(key, hold, None, unknown=True)
            self.metrics.observe("chat", chat.model, 499, anyio.current_time() - started)
            return
        await self._settle(key, hold, sum(o.cost for o in outcomes))

    async def _answer(
        self,
        scope: Scope,
        send: Send,
        r: _Response,
        key: VirtualKey | None,
        model: ServedModel,
        chat: ParsedChat,
        started: float,
    ) -> list[Outcome]:
        rid = "chatcmpl-" + os.urandom(12).hex()
        with (
            _trace_parent(scope),
            telemetry.span(
                f"gateway chat {chat.model}",
                **{
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": chat.model,
                    "genfan.gateway.kind": model.kind,
                    "genfan.gateway.key": key.id if key is not None else None,
                    "genfan.request_id": rid,
                },
            ),
        ):
            try:
                if chat.stream:
                    outcomes = await self._stream(send, r, model, chat, rid)
                else:
                    outcomes = await self._complete(send, r, model, chat, rid, key)
            except GatewayError as exc:
                self.metrics.observe("chat", chat.model, exc.status, anyio.current_time() - started)
                raise
            except GenfanError as exc:
                err = from_genfan_error(exc)
                self.metrics.observe("chat", chat.model, err.status, anyio.current_time() - started)
                raise err from None
        if chat.stream:
            for o in outcomes:
                await self._record(key, chat.model, rid, o)
        self.metrics.observe(
            "chat",
            chat.model,
            r.status,
            anyio.current_time() - started,
            input_tokens=sum(o.input_tokens for o in outcomes),
            output_tokens=sum(o.output_tokens for o in outcomes),
            cost=sum(o.cost for o in outcomes),
        )
        return outcomes

    async def _complete(
        self,
        send: Send,
        r: _Response,
        model: ServedModel,
        chat: ParsedChat,
        rid: str,
        key: VirtualKey | None,
    ) -> list[Outcome]:
        if chat.n == 1:
            outcomes = [await model.answer(chat.request)]
        else:
            outcomes = await _gather([model.answer for _ in range(chat.n)], chat.request)
        extension: dict[str, Any] = (
            outcomes[0].extension
            if chat.n == 1
            else {
                "model": model.name,
                "kind": model.kind,
                "choices": [o.extension for o in outcomes],
            }
        )
        cost = sum(o.cost for o in outcomes)
        inp = sum(o.input_tokens for o in outcomes)
        out = sum(o.output_tokens for o in outcomes)
        body = completion_json(rid, chat.model, [o.completion for o in outcomes], extension)
        body["usage"] = usage_json(inp, out)
        if chat.n > 1:
            extension["usage"] = {"input_tokens": inp, "output_tokens": out, "cost_usd": cost}
        for o in outcomes:
            await self._record(key, chat.model, rid, o)
        payload = _dumps(body)
        chosen = ",".join(o.completion.backend for o in outcomes)
        r.status, r.started = 200, True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    _JSON,
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-request-id", rid.encode()),
                    (b"x-genfan-cost", f"{cost:.8f}".encode()),
                    (b"x-genfan-kind", model.kind.encode()),
                    (b"x-genfan-chosen", chosen.encode("ascii", "replace")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        return outcomes

    async def _stream(
        self, send: Send, r: _Response, model: ServedModel, chat: ParsedChat, rid: str
    ) -> list[Outcome]:
        created = int(time.time())
        outcomes: list[Outcome | None] = [None] * chat.n
        first_piece = [True] * chat.n
        tool_seen: list[set[int]] = [set() for _ in range(chat.n)]

        async def start() -> None:
            r.status, r.started = 200, True
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        *_SSE_HEADERS,
                        (b"x-request-id", rid.encode()),
                        (b"x-genfan-kind", model.kind.encode()),
                    ],
                }
            )

        async def emit(i: int, ev: TextDelta | ToolCallDelta | Outcome) -> None:
            if not r.started:
                await start()
            parts = []
            if first_piece[i]:
                first_piece[i] = False
                parts.append(
                    chunk(
                        rid,
                        chat.model,
                        created,
                        index=i,
                        delta={"role": "assistant", "content": ""},
                    )
                )
            if isinstance(ev, TextDelta):
                parts.append(chunk(rid, chat.model, created, index=i, delta={"content": ev.text}))
            elif isinstance(ev, ToolCallDelta):
                call: dict[str, Any] = {"index": ev.index}
                if ev.index not in tool_seen[i]:
                    tool_seen[i].add(ev.index)
                    call["id"] = ev.id or f"call_{i}_{ev.index}"
                    call["type"] = "function"
                    call["function"] = {"name": ev.name or "", "arguments": ev.arguments}
                else:
                    call["function"] = {"arguments": ev.arguments}
                parts.append(chunk(rid, chat.model, created, index=i, delta={"tool_calls": [call]}))
            else:
                outcomes[i] = ev
                c = ev.completion
                parts.append(
                    chunk(
                        rid,
                        chat.model,
                        created,
                        index=i,
                        finish=finish_reason(c),
                        logprobs=stream_logprobs(c),
                        extension=ev.extension,
                    )
                )
            await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})

        try:
            if chat.n == 1:
                async with aclosing(model.events(chat.request)) as events:
                    async for ev in events:
                        await emit(0, ev)
            else:
                await _merge(model, chat, emit)
        except GenfanError as exc:
            if not r.started:
                raise
            err = exc if isinstance(exc, GatewayError) else from_genfan_error(exc)
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + _dumps(err.body()) + b"\n\n",
                    "more_body": False,
                }
            )
            return [o for o in outcomes if o is not None]
        done = [o for o in outcomes if o is not None]
        tail = b""
        if chat.include_usage:
            tail = chunk(
                rid,
                chat.model,
                created,
                no_choices=True,
                usage=usage_json(
                    sum(o.input_tokens for o in done), sum(o.output_tokens for o in done)
                ),
            )
        if not r.started:
            await start()
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})
        return done

    async def _list_models(self, scope: Scope, receive: Receive, send: Send, r: _Response) -> None:
        await self._key(scope)
        await _send_json(send, r, 200, self._models_body)

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send, r: _Response) -> None:
        started = anyio.current_time()
        key = await self._key(scope)
        body = await self._body(scope, receive)
        if not isinstance(body, dict):
            raise GatewayError(400, "the body must be a JSON object", type="invalid_request_error")
        name = body.get("model")
        if not isinstance(name, str):
            raise GatewayError(
                400, "model is required", type="invalid_request_error", param="model"
            )
        self._model(name)
        embedder = self._embedders.get(name)
        if embedder is None:
            raise GatewayError(
                400,
                f"model {name!r} cannot embed; these can: {', '.join(self._embedders) or 'none'}",
                type="invalid_request_error",
                param="model",
                code="model_cannot_embed",
            )
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
            raise GatewayError(
                400,
                "input must be a string or a non-empty list of strings (token arrays are not "
                "supported)",
                type="invalid_request_error",
                param="input",
            )
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise GatewayError(
                400,
                "encoding_format must be 'float' or 'base64'",
                type="invalid_request_error",
                param="encoding_format",
            )
        tokens = sum(max(1, len(t) // 4) for t in texts)
        await self._admit(key, name, tokens)
        vectors = await embedder.embed(texts)
        data = []
        for i, v in enumerate(vectors):
            value: Any = v
            if fmt == "base64":
                value = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        payload = {
            "object": "list",
            "data": data,
            "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await self._record(
            key,
            name,
            "embd-" + os.urandom(12).hex(),
            Outcome(
                completion=Completion(),
                extension={},
                input_tokens=tokens,
                output_tokens=0,
                cost=0.0,
            ),
        )
        await _send_json(send, r, 200, _dumps(payload))
        self.metrics.observe(
            "embeddings", name, 200, anyio.current_time() - started, input_tokens=tokens
        )

    async def _health(self, scope: Scope, receive: Receive, send: Send, r: _Response) -> None:
        await _send_json(send, r, 200, b'{"status":"ok"}')

    async def _ready(self, scope: Scope, receive: Receive, send: Send, r: _Response) -> None:
        if not self.ready:
            raise GatewayError(503, "starting", type="overloaded", code="starting", retry_after=1)
        await _send_json(send, r, 200, _dumps({"status": "ready", "models": len(self.models)}))

    async def _metrics(self, scope: Scope, receive: Receive, send: Send, r: _Response) -> None:
        body, ctype = self.metrics.render()
        r.status, r.started = 200, True
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", ctype.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _guarded(name: str, backend: Backend) -> Iterable[tuple[str, Any]]:
    """The guard stacks of a served model (itself, or its fan-out's targets)."""
    from ..resilience import GuardedBackend

    if isinstance(backend, GuardedBackend):
        yield name, backend
        return
    for target in getattr(backend, "targets", ()):
        if isinstance(target.backend, GuardedBackend):
            yield f"{name}/{target.name or target.backend.name}", target.backend


def _estimate_tokens(request: ChatRequest) -> int:
    chars = sum(len(m.content or "") for m in request.messages)
    return chars // 4 + 1 + (request.max_tokens or 256)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"the body is larger than {limit} bytes (serve.max_body_bytes)",
        type="invalid_request_error",
        code="request_too_large",
    )


async def _send_json(
    send: Send,
    r: _Response,
    status: int,
    payload: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    r.status, r.started = status, True
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(payload)).encode()), *(headers or ())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _error(send: Send, err: GatewayError, r: _Response) -> None:
    if r.started:
        return  # too late for a status: the stream said so itself, or the client is gone
    headers = err.headers()
    if err.code == "insufficient_quota" and err.retry_after is None:
        headers.append((b"x-should-retry", b"false"))
    await _send_json(send, r, err.status, _dumps(err.body()), headers)


async def _gather(
    calls: list[Callable[[ChatRequest], Awaitable[Outcome]]], request: ChatRequest
) -> list[Outcome]:
    out: list[Outcome | None] = [None] * len(calls)

    async def one(i: int) -> None:
        out[i] = await calls[i](request)

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    return [o for o in out if o is not None]


async def _merge(
    model: ServedModel,
    chat: ParsedChat,
    emit: Callable[[int, TextDelta | ToolCallDelta | Outcome], Awaitable[None]],
) -> None:
    """Stream ``chat.n`` answers at once, their chunks interleaved as they come."""
    send_stream, receive_stream = anyio.create_memory_object_stream[
        tuple[int, TextDelta | ToolCallDelta | Outcome]
    ](16)

    async def produce(i: int, out: anyio.abc.ObjectSendStream[Any]) -> None:
        async with out, aclosing(model.events(chat.request)) as events:
            async for ev in events:
                await out.send((i, ev))

    async with anyio.create_task_group() as tg:
        async with send_stream:
            for i in range(chat.n):
                tg.start_soon(produce, i, send_stream.clone())
        async with receive_stream:
            async for i, ev in receive_stream:
                await emit(i, ev)


async def _watch(receive: Receive, r: _Response, answering: anyio.CancelScope) -> None:
    """Cancel ``answering`` if the client disconnects before its answer is complete."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not r.finished:
        r.gone = True
        answering.cancel()


class _trace_parent:
    """Continue the caller's trace when the request carries a ``traceparent`` header."""

    __slots__ = ("_scope", "_token")

    def __init__(self, scope: Scope) -> None:
        self._scope = scope
        self._token: Any = None

    def __enter__(self) -> None:
        headers = {k: v for k, v in self._scope["headers"] if k in (b"traceparent", b"tracestate")}
        if not headers:
            return
        from opentelemetry import context, propagate

        carrier = {k.decode(): v.decode("latin-1") for k, v in headers.items()}
        self._token = context.attach(propagate.extract(carrier))

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            from opentelemetry import context

            context.detach(self._token)


def create_app(
    config: GenfanConfig | str | Path,
    settings: ServeSettings | None = None,
    *,
    keys: KeyStore | None = None,
) -> Gateway:
    """The gateway as an ASGI app, for a configuration or a ``genfan.toml`` path.

    Raises:
        ConfigurationError: the file or its ``[serve]`` table is invalid.
    """
    if isinstance(config, str | Path):
        config, file_settings = load_gateway_config(config)
        settings = settings or file_settings
    if not isinstance(config, GenfanConfig):
        raise ConfigurationError(
            f"create_app takes a GenfanConfig or a path to genfan.toml, got {type(config).__name__}"
        )
    return Gateway(config, settings, keys=keys)
