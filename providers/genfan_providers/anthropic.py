"""The Anthropic Messages API over httpx (``POST {base_url}/messages``).

genfan's messages map onto Anthropic's shape: system messages become the top-level ``system``
prompt, assistant tool calls become ``tool_use`` blocks, and tool results become ``tool_result``
blocks in a user turn (consecutive results are merged into one turn, as the API requires).

JSON output: a JSON-schema response format (with no other tools in the request) is asked for
with a forced tool whose input schema is the schema, which Anthropic follows reliably; the tool
input becomes the completion's text. A plain JSON-object format is asked for in the system prompt.

``ANTHROPIC_API_KEY`` is sent only to Anthropic (``api.anthropic.com``), or to
``ANTHROPIC_BASE_URL`` when that too comes from the environment (as the official SDK does);
another ``base_url`` gets a key only when one is named (``api_key=``, ``api_key_env=``).

```python
from genfan_providers.anthropic import AnthropicBackend

async with AnthropicBackend("claude-sonnet-4-5") as claude:     # key from $ANTHROPIC_API_KEY
    completion = await claude.complete(ChatRequest.from_prompt("Hi"))
```
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from datetime import datetime
from typing import Any

import httpx
from pydantic import SecretStr

from genfan import (
    ChatRequest,
    Completion,
    FinishReason,
    HTTPStatusError,
    Message,
    RateLimitError,
    RateLimitInfo,
    StreamEnd,
    StreamEvent,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    merge_tool_call_deltas,
)
from genfan.cost import PriceLike

from ._http import (
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_SERVER_WAIT,
    PROVIDER_KEY,
    HTTPBackend,
    StreamProgress,
    Transport,
    _ProviderKey,
    parse_int,
    prefixed_headers,
    text_field,
    token_count,
    usage_field,
)

__all__ = ["ANTHROPIC_VERSION", "AnthropicBackend"]

#: The ``anthropic-version`` header sent by default.
ANTHROPIC_VERSION = "2023-06-01"

_STOP: dict[str | None, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_RL_PREFIX = b"anthropic-ratelimit-"

_JSON_OBJECT_INSTRUCTION = (
    "Respond with a single JSON object and nothing else: no prose, no code fences."
)
_JSON_TOOL = "json_response"

#: Anthropic error types that arrive inside a stream, and the status they stand for.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


class AnthropicBackend(HTTPBackend):
    """A backend for Anthropic's Messages API.

    Args:
        model: the default model (a request's ``model`` overrides it).
        name: the backend's name (default ``"anthropic:<model>"``).
        base_url: the API root including ``/v1``. ``None`` (default): ``$ANTHROPIC_BASE_URL``
            when it is set, read as the official SDK reads it (without the version path, so
            ``/v1`` is added when it does not end with it), else
            ``https://api.anthropic.com/v1``.
        api_key: the key (a ``str`` or ``pydantic.SecretStr``), sent as ``x-api-key``; takes
            precedence over ``api_key_env``, and is sent to whatever ``base_url`` is.
        api_key_env: the environment variable holding the key, sent to whatever ``base_url``
            is; it must be set (``None`` or ``""``: do not look). By default
            ``ANTHROPIC_API_KEY``, read only for ``api.anthropic.com`` or an
            ``ANTHROPIC_BASE_URL`` from the environment: another ``base_url`` gets no key unless
            one is named.
        headers: extra headers for every request (e.g. ``anthropic-beta``).
        timeout: httpx timeout (connect, each read and write) in seconds; a request's own
            ``timeout`` limits the whole call.
        max_concurrency: requests in flight at once (and pool size); more wait in genfan.
            ``None`` (default): no cap of its own; the guard stack's bulkhead is the cap.
        price: the model's price, to fill ``Usage.cost``: ``(input, output)`` USD per
            million tokens or a :class:`~genfan.cost.Price`; ``None`` (default): the
            genai-prices table's (see :class:`~genfan_providers._http.HTTPBackend`).
        client: use this ``httpx.AsyncClient`` (left open by :meth:`aclose`).
        max_response_bytes: the most bytes of one answer held in memory (a JSON body, or one
            event of a stream; default 16 MiB); a larger one fails with
            :class:`~genfan.ResponseTooLargeError`. ``None``: no limit.
        max_server_wait: the longest wait (seconds, default 3600) believed from a server's
            ``Retry-After`` or quota reset; longer ones are cut to it.
        http2: offer HTTP/2 (the ``http2`` extra); a server that takes it carries many calls
            on one connection, and a cancelled call resets its stream instead of dropping the
            connection (see :class:`~genfan_providers._http.HTTPBackend`).
        transport: ``"httpx"`` (default), ``"aiohttp"`` (asyncio only, the ``aiohttp`` extra:
            less client CPU per call) or ``"auto"`` (aiohttp on asyncio, httpx elsewhere).
        verify: ``True`` (default), a CA bundle file or folder, an ``ssl.SSLContext``, or
            ``False`` (no certificate check: testing only).
        max_tokens: sent when a request sets none (the API requires a value).
        anthropic_version: the ``anthropic-version`` header.

    Raises:
        ConfigurationError: a bad ``base_url``, ``timeout``, ``max_concurrency``, ``price`` or
            ``max_tokens``; ``api.anthropic.com`` without a key (``ANTHROPIC_API_KEY is not
            set; pass api_key=... or set it``); an ``api_key_env`` that is not set.

    HTTP 529 (overloaded) is an :class:`~genfan.HTTPStatusError` with
    ``status_code=529``: retryable, and counted by circuit breakers.
    """

    provider = "anthropic"
    _auth_header = "x-api-key"
    _auth_prefix = ""
    _default_base_url = "https://api.anthropic.com/v1"
    _key_env = "ANTHROPIC_API_KEY"
    _base_url_env = "ANTHROPIC_BASE_URL"

    def __init__(
        self,
        model: str | None = None,
        *,
        name: str | None = None,
        base_url: str | None = None,
        api_key: str | SecretStr | None = None,
        api_key_env: str | _ProviderKey | None = PROVIDER_KEY,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        max_concurrency: int | None = None,
        price: PriceLike | None = None,
        client: httpx.AsyncClient | None = None,
        max_response_bytes: int | None = DEFAULT_MAX_RESPONSE_BYTES,
        max_server_wait: float = DEFAULT_MAX_SERVER_WAIT,
        http2: bool = False,
        transport: Transport = "httpx",
        verify: bool | str | ssl.SSLContext = True,
        max_tokens: int = 1024,
        anthropic_version: str = ANTHROPIC_VERSION,
    ) -> None:
        from genfan import ConfigurationError

        if not (isinstance(max_tokens, int) and max_tokens >= 1):
            raise ConfigurationError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        self.anthropic_version = anthropic_version
        self.max_tokens = max_tokens
        super().__init__(
            model,
            name=name,
            base_url=base_url,
            api_key=api_key,
            api_key_env=api_key_env,
            headers=headers,
            timeout=timeout,
            max_concurrency=max_concurrency,
            price=price,
            client=client,
            max_response_bytes=max_response_bytes,
            max_server_wait=max_server_wait,
            http2=http2,
            transport=transport,
            verify=verify,
        )
        self._messages_url = self.base_url + "/messages"

    def _default_headers(self) -> dict[str, str]:
        return {"anthropic-version": self.anthropic_version}

    def _base_url_from_env(self, value: str) -> str:
        # The official SDK's ANTHROPIC_BASE_URL has no version path (it calls /v1/messages).
        value = value.rstrip("/")
        return value if value.endswith("/v1") else value + "/v1"

    # -- requests ------------------------------------------------------------------------------

    def build_body(self, request: ChatRequest, *, stream: bool = False) -> dict[str, Any]:
        """The JSON body sent for ``request`` (public so that tests and tools can inspect it)."""
        system: list[str] = []
        #: system block index -> its cache_control (a message marked to be cached).
        cached_system: dict[int, dict[str, str]] = {}
        turns: list[dict[str, Any]] = []
        for m in request.messages:
            if m.role == "system":
                if m.content:
                    if m.cache_control is not None:
                        cached_system[len(system)] = _cache_control(m.cache_control)
                    system.append(m.content)
                continue
            role, blocks = _blocks(m)
            if m.cache_control is not None:
                if isinstance(blocks, str):
                    blocks = [{"type": "text", "text": blocks}]
                if blocks:
                    blocks[-1] = {**blocks[-1], "cache_control": _cache_control(m.cache_control)}
            if turns and turns[-1]["role"] == role:
                last = turns[-1]
                if isinstance(last["content"], str):
                    last["content"] = [{"type": "text", "text": last["content"]}]
                last["content"].extend(
                    blocks if isinstance(blocks, list) else [{"type": "text", "text": blocks}]
                )
            else:
                turns.append({"role": role, "content": blocks})
        body: dict[str, Any] = {
            "max_tokens": request.max_tokens or self.max_tokens,
            "messages": turns,
        }
        model = request.model or self.model
        if model:
            body["model"] = model
        tools = [
            {"name": t.name, "description": t.description, "input_schema": t.parameters}
            for t in request.tools
        ]
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_schema" and not tools:
            tools = [
                {
                    "name": _JSON_TOOL,
                    "description": "Return the answer as JSON matching the input schema.",
                    "input_schema": fmt.json_schema or {"type": "object"},
                }
            ]
            body["tool_choice"] = {"type": "tool", "name": _JSON_TOOL}
        elif fmt is not None and fmt.type == "json_schema":
            system.append(
                "Respond with a single JSON value matching this JSON schema and nothing else: "
                + json.dumps(fmt.json_schema or {"type": "object"})
            )
        elif fmt is not None and fmt.type == "json_object":
            system.append(_JSON_OBJECT_INSTRUCTION)
        if cached_system:
            # Blocks, so that the cache breakpoint sits where the message marked it.
            body["system"] = [
                {"type": "text", "text": text}
                | ({"cache_control": cached_system[i]} if i in cached_system else {})
                for i, text in enumerate(system)
            ]
        elif system:
            body["system"] = "\n\n".join(system)
        if tools:
            body["tools"] = tools
        choice = request.tool_choice
        if choice is not None and "tool_choice" not in body:
            if choice == "auto":
                body["tool_choice"] = {"type": "auto"}
            elif choice == "required":
                body["tool_choice"] = {"type": "any"}
            elif choice == "none":
                body["tool_choice"] = {"type": "none"}
            else:
                body["tool_choice"] = {"type": "tool", "name": choice}
        if request.temperature is not None:
            # Anthropic's range is 0..1; genfan's is OpenAI's 0..2.
            body["temperature"] = min(request.temperature, 1.0)
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        if stream:
            body["stream"] = True
        return body

    async def complete(self, request: ChatRequest) -> Completion:
        """Answer ``request`` with one non-streaming call.

        Raises:
            HTTPStatusError: an error status (``RateLimitError`` for 429, with ``retry_after``;
                529 when Anthropic is overloaded), with the ``anthropic-ratelimit-*`` headers
                as ``rate_limit``.
            BackendTimeoutError: the call timed out.
            BackendConnectionError: the server could not be reached or broke the connection.
            MalformedResponseError: the answer is not a message.
        """
        body = self.build_body(request)
        url = self._messages_url
        start = time.perf_counter()
        data, response = await self._post_json(url, body, request.timeout)
        latency = time.perf_counter() - start
        json_tool = body.get("tool_choice", {}).get("name") == _JSON_TOOL
        try:
            if data.get("type") == "error":
                self._raise_event_error(data, url, response)
            texts: list[str] = []
            calls: list[ToolCall] = []
            for block in data["content"]:
                kind = block["type"]
                if kind == "text":
                    texts.append(block["text"])
                elif kind == "tool_use":
                    if json_tool and block["name"] == _JSON_TOOL:
                        texts.append(json.dumps(block.get("input", {})))
                    else:
                        calls.append(
                            ToolCall(
                                id=block["id"],
                                name=block["name"],
                                arguments=json.dumps(block.get("input", {})),
                            )
                        )
            usage = usage_field(data, "usage", _USAGE_COUNTS)
            priced = self._anthropic_usage(usage, token_count(usage, "output_tokens"), body)
            stop = text_field(data, "stop_reason")
            finish: FinishReason = (
                "stop"
                if json_tool and not calls and stop == "tool_use"
                else _STOP.get(stop, "unknown")
            )
            return Completion(
                text="".join(texts),
                tool_calls=tuple(calls),
                finish_reason=finish,
                usage=priced,
                model=text_field(data, "model") or body.get("model") or "",
                backend=self.name,
                latency=latency,
                rate_limit=self._rate_limit_info(response.headers),
            )
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise self._not_a("a message", url, response, exc) from exc

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Stream the answer: text and tool-call pieces, then a :class:`StreamEnd`.

        A stream that ends before ``message_stop`` raises :class:`MalformedResponseError`
        (retryable) before any piece was passed on, :class:`~genfan.StreamInterruptedError`
        (with ``partial_text``) after; so does a connection that breaks. An ``error`` event
        raises the matching :class:`HTTPStatusError` (529 when overloaded).
        """
        body = self.build_body(request, stream=True)
        url = self._messages_url
        json_tool = body.get("tool_choice", {}).get("name") == _JSON_TOOL
        start = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        deltas: list[ToolCallDelta] = []
        tool_index: dict[int, int] = {}  # content block index -> tool call index
        json_blocks: set[int] = set()
        output_tokens = 0
        usage_in: Mapping[str, Any] = {}
        stop: str | None = None
        model = ""
        stopped = False
        response: httpx.Response | None = None
        progress = StreamProgress(parts, deltas)
        sse = self._stream_sse(url, body, request.timeout, progress=progress)
        async with aclosing(sse) as events:
            async for event, data, resp in events:
                response = resp
                if stopped:
                    continue
                try:
                    ev = json.loads(data)
                    if not isinstance(ev, dict):
                        raise TypeError(f"an event must be a JSON object, got {type(ev).__name__}")
                    kind = ev.get("type") or event
                    out: list[StreamEvent] = []
                    if kind == "content_block_delta":
                        delta = ev["delta"]
                        dtype = delta.get("type")
                        index = ev.get("index", 0)
                        if dtype == "text_delta":
                            text = text_field(delta, "text")
                            if text:
                                parts.append(text)
                                out.append(TextDelta(text=text))
                        elif dtype == "input_json_delta":
                            piece = text_field(delta, "partial_json") or ""
                            if index in json_blocks:
                                if piece:
                                    parts.append(piece)
                                    out.append(TextDelta(text=piece))
                            elif piece:
                                d = ToolCallDelta(index=tool_index.get(index, 0), arguments=piece)
                                deltas.append(d)
                                out.append(d)
                    elif kind == "content_block_start":
                        block = ev["content_block"]
                        if block.get("type") == "tool_use":
                            index = ev.get("index", 0)
                            if json_tool and block.get("name") == _JSON_TOOL:
                                json_blocks.add(index)
                            else:
                                tool_index[index] = len(tool_index)
                                d = ToolCallDelta(
                                    index=tool_index[index], id=block["id"], name=block["name"]
                                )
                                deltas.append(d)
                                out.append(d)
                    elif kind == "message_start":
                        message = ev["message"]
                        model = text_field(message, "model") or model
                        usage_in = usage_field(message, "usage", _USAGE_COUNTS)
                        output_tokens = token_count(usage_in, "output_tokens")
                    elif kind == "message_delta":
                        stop = text_field(ev.get("delta") or {}, "stop_reason") or stop
                        usage = usage_field(ev, "usage", _USAGE_COUNTS)
                        if usage.get("output_tokens") is not None:
                            output_tokens = token_count(usage, "output_tokens")
                        if usage.get("input_tokens"):
                            usage_in = usage
                    elif kind == "message_stop":
                        stopped = progress.ended = True
                    elif kind == "error":
                        self._raise_event_error(ev, url, resp)
                except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
                    raise self._unreadable("event", url, data, exc) from exc
                if out and ttft is None:
                    ttft = time.perf_counter() - start
                for item in out:
                    yield item
        if not stopped:
            raise self._cut_short(url, "message_stop", parts, deltas)
        calls = merge_tool_call_deltas(deltas)
        finish: FinishReason = (
            "stop" if json_tool and not calls and stop == "tool_use" else _STOP.get(stop, "unknown")
        )
        yield StreamEnd(
            completion=Completion(
                text="".join(parts),
                tool_calls=calls,
                finish_reason=finish,
                usage=self._anthropic_usage(usage_in, output_tokens, body),
                model=model or body.get("model") or "",
                backend=self.name,
                latency=time.perf_counter() - start,
                ttft=ttft,
                rate_limit=None if response is None else self._rate_limit_info(response.headers),
            )
        )

    def _anthropic_usage(
        self, usage: Mapping[str, Any], output_tokens: int, body: Mapping[str, Any]
    ) -> Usage:
        """``Usage`` from Anthropic's counts: its ``input_tokens`` (uncached),
        ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` add up to the input;
        priced at the request's model.

        Raises:
            TypeError, ValueError: a count that is no count.
        """
        return self._usage(
            _tokens_in(usage),
            output_tokens,
            model=body.get("model"),
            cache_read=token_count(usage, "cache_read_input_tokens"),
            cache_write=token_count(usage, "cache_creation_input_tokens"),
        )

    def _raise_event_error(self, ev: Mapping[str, Any], url: str, response: httpx.Response) -> None:
        error = ev.get("error") or {}
        etype = error.get("type") if isinstance(error, dict) else None
        message = self._error_message(ev) or str(etype)
        status = _ERROR_STATUS.get(str(etype), 500)
        text = f"{etype} error from {url}: {self._redact(message)[:300]}"
        if status in (401, 403):
            text += f"; {self._key_hint()}"
        rate_limit = self._rate_limit_info(response.headers)
        if status == 429:
            raise RateLimitError(text, backend=self.name, rate_limit=rate_limit)
        raise HTTPStatusError(text, backend=self.name, status_code=status, rate_limit=rate_limit)

    def _status_hint(self, status: int) -> str:
        if status == 529:
            return "Anthropic is overloaded; retry later or fall back to another backend"
        return super()._status_hint(status)

    def _read_rate_limit(self, headers: httpx.Headers) -> RateLimitInfo | None:
        found = prefixed_headers(headers, _RL_PREFIX)
        if found is None:
            return None
        return RateLimitInfo(
            limit_requests=parse_int(found.get(b"requests-limit")),
            limit_tokens=parse_int(found.get(b"tokens-limit")),
            remaining_requests=parse_int(found.get(b"requests-remaining")),
            remaining_tokens=parse_int(found.get(b"tokens-remaining")),
            reset_requests=_seconds_until(found.get(b"requests-reset")),
            reset_tokens=_seconds_until(found.get(b"tokens-reset")),
        )


_USAGE_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


def _tokens_in(usage: Mapping[str, Any]) -> int:
    """Input tokens, counting prompt-cache reads and writes (Anthropic reports them apart).

    Raises:
        TypeError, ValueError: a count that is no count.
    """
    return (
        token_count(usage, "input_tokens")
        + token_count(usage, "cache_creation_input_tokens")
        + token_count(usage, "cache_read_input_tokens")
    )


def _cache_control(ttl: str) -> dict[str, str]:
    """Anthropic's ``cache_control`` for a TTL (``"5m"`` is its default, left unsaid)."""
    return {"type": "ephemeral"} if ttl == "5m" else {"type": "ephemeral", "ttl": ttl}


def _blocks(m: Message) -> tuple[str, str | list[dict[str, Any]]]:
    """The Anthropic role and content of one genfan message."""
    if m.role == "tool":
        return "user", [
            {"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content or ""}
        ]
    if m.role == "assistant" and m.tool_calls:
        blocks: list[dict[str, Any]] = []
        if m.content:
            blocks.append({"type": "text", "text": m.content})
        for c in m.tool_calls:
            try:
                args = c.parsed_arguments()
            except ValueError:
                args = {"_raw": c.arguments}
            blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": args})
        return "assistant", blocks
    return ("assistant" if m.role == "assistant" else "user"), m.content or ""


def _seconds_until(value: str | None) -> float | None:
    """Seconds from now until an RFC 3339 time (Anthropic's ``*-reset`` headers)."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is None:
            return None
        # An absolute time can only be read against the wall clock.
        return max(when.timestamp() - time.time(), 0.0)
    except (ValueError, OverflowError):
        return None
