"""OpenAI-compatible chat completions over httpx: OpenAI, vLLM, Ollama, llama.cpp, OpenRouter...

Any server that speaks ``POST {base_url}/chat/completions`` works: set ``base_url`` (it includes
the version path, e.g. ``http://localhost:8000/v1``), the key (or none, for local servers) and any
extra headers. See docs/providers.md for each server.

``OPENAI_API_KEY`` is sent only to OpenAI (``api.openai.com``), or to ``OPENAI_BASE_URL`` when
that too comes from the environment (as the official SDK does); another ``base_url`` gets a key
only when one is named (``api_key=``, ``api_key_env=``).

```python
from genfan_providers.openai import OpenAIBackend

async with OpenAIBackend("gpt-4o-mini") as gpt:          # key from $OPENAI_API_KEY
    completion = await gpt.complete(ChatRequest.from_prompt("Hi"))
```
"""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Literal, TypeAlias

import httpx
from pydantic import SecretStr

from genfan import (
    ChatRequest,
    Completion,
    ConfigurationError,
    FinishReason,
    HTTPStatusError,
    MalformedResponseError,
    Message,
    RateLimitError,
    RateLimitInfo,
    StreamEnd,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    Usage,
    merge_tool_call_deltas,
    telemetry,
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
    parse_duration,
    parse_int,
    prefixed_headers,
    text_field,
    token_count,
    usage_field,
)

__all__ = ["MaxTokensField", "OpenAIBackend", "UnsupportedParams"]

#: Which body field carries ``ChatRequest.max_tokens`` (see :class:`OpenAIBackend`).
MaxTokensField: TypeAlias = Literal["auto", "max_tokens", "max_completion_tokens"]
_MAX_TOKENS_FIELDS = ("auto", "max_tokens", "max_completion_tokens")
#: OpenAI's reasoning models, which reject ``max_tokens``: o1, o3, o4-mini, gpt-5 and their
#: dated or sized variants (``o3-mini``, ``gpt-5.1``, ``gpt-5-mini-2025-08-07``).
_REASONING_MODEL = re.compile(r"(?:o[134]|gpt-5)(?:$|[-.:_])", re.IGNORECASE)
#: What to do with sampling parameters a reasoning model rejects (see :class:`OpenAIBackend`).
UnsupportedParams: TypeAlias = Literal["drop", "error", "send"]
_UNSUPPORTED_PARAMS = ("drop", "error", "send")

_FINISH: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "eos": "stop",
    "stop_sequence": "stop",
}


def _check_choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigurationError(f"{option} must be one of {allowed}, got {value!r}")


class OpenAIBackend(HTTPBackend):
    """A backend for any OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: the default model (a request's ``model`` overrides it). When neither is set, no
            ``model`` field is sent (llama.cpp's server does not need one).
        name: the backend's name (default ``"openai:<model>"``).
        base_url: the API root including ``/v1``. ``None`` (default): ``$OPENAI_BASE_URL`` when
            it is set (as the official SDK reads it), else ``https://api.openai.com/v1``.
        api_key: the key (a ``str`` or ``pydantic.SecretStr``); takes precedence over
            ``api_key_env``, and is sent to whatever ``base_url`` is. Local servers need none.
        api_key_env: the environment variable holding the key, sent to whatever ``base_url``
            is; it must be set (``None`` or ``""``: do not look). By default
            ``OPENAI_API_KEY``, read only for ``api.openai.com`` or an ``OPENAI_BASE_URL`` from
            the environment: another ``base_url`` (a local server, a gateway) gets no key unless
            one is named.
        headers: extra headers for every request.
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
        max_tokens_field: the body field that carries ``ChatRequest.max_tokens``. OpenAI
            deprecated ``max_tokens`` for chat completions and its reasoning models reject it
            for ``max_completion_tokens``; OpenAI-compatible servers (vLLM, Ollama, llama.cpp,
            Together, OpenRouter) read ``max_tokens``. ``"auto"`` sends
            ``max_completion_tokens`` when ``base_url`` is ``api.openai.com`` or the request's
            model is an OpenAI reasoning model (``o1``, ``o3``, ``o4``, ``gpt-5`` and their
            variants), and ``max_tokens`` otherwise.
        unsupported_params: what to do with the sampling parameters that OpenAI's reasoning
            models (the same ``o1``, ``o3``, ``o4``, ``gpt-5`` names as above, by the request's
            model) reject with a 400: ``temperature`` other than 1 and ``top_p``. ``"drop"``
            leaves them out of the body and logs an ``openai_unsupported_params_dropped``
            warning naming them; ``"error"`` raises :class:`~genfan.ConfigurationError`
            before sending; ``"send"`` sends them as given (for a compatible server that reuses
            those model names and accepts them). Other models always get them.

    Raises:
        ConfigurationError: a bad ``base_url``, ``timeout``, ``max_concurrency``, ``price``,
            ``max_tokens_field`` or ``unsupported_params``; ``api.openai.com`` without a key
            (``OPENAI_API_KEY is not set; pass api_key=... or set it``); an ``api_key_env``
            that is not set.
    """

    provider = "openai"
    _default_base_url = "https://api.openai.com/v1"
    _key_env = "OPENAI_API_KEY"
    _base_url_env = "OPENAI_BASE_URL"

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
        max_tokens_field: MaxTokensField = "auto",
        unsupported_params: UnsupportedParams = "drop",
    ) -> None:
        _check_choice("max_tokens_field", max_tokens_field, _MAX_TOKENS_FIELDS)
        self.max_tokens_field: MaxTokensField = max_tokens_field
        _check_choice("unsupported_params", unsupported_params, _UNSUPPORTED_PARAMS)
        self.unsupported_params: UnsupportedParams = unsupported_params
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
        self._chat_url = self.base_url + "/chat/completions"
        self._embed_url = self.base_url + "/embeddings"
        self._is_openai = httpx.URL(self.base_url).host == "api.openai.com"

    def _openai_usage(self, usage: Mapping[str, Any], model: str | None) -> Usage:
        """``Usage`` from an OpenAI usage object: cached prompt tokens
        (``prompt_tokens_details.cached_tokens``) and reasoning tokens
        (``completion_tokens_details.reasoning_tokens``) included, priced.

        Raises:
            TypeError, ValueError: a count that is no count.
        """
        prompt = usage_field(usage, "prompt_tokens_details", ("cached_tokens",))
        completion = usage_field(usage, "completion_tokens_details", ("reasoning_tokens",))
        return self._usage(
            token_count(usage, "prompt_tokens"),
            token_count(usage, "completion_tokens"),
            model=model,
            cache_read=token_count(prompt, "cached_tokens"),
            reasoning=token_count(completion, "reasoning_tokens"),
        )

    def _max_tokens_key(self, model: str | None) -> str:
        """The body field for ``max_tokens`` when calling ``model``."""
        field = self.max_tokens_field
        if field != "auto":
            return field
        if self._is_openai or (model is not None and _REASONING_MODEL.match(model)):
            return "max_completion_tokens"
        return "max_tokens"

    def _sampling_params(self, request: ChatRequest, model: str | None) -> dict[str, Any]:
        """The sampling fields of the body for ``request``: all of them, except those a
        reasoning ``model`` rejects when ``unsupported_params`` is ``"drop"``.

        Raises:
            ConfigurationError: ``unsupported_params="error"`` and the request sets some.
        """
        params: dict[str, Any] = {}
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.top_p is not None:
            params["top_p"] = request.top_p
        if (
            not params
            or self.unsupported_params == "send"
            or model is None
            or not _REASONING_MODEL.match(model)
        ):
            return params
        # Reasoning models accept only the default temperature, 1, and no top_p.
        rejected = {k: v for k, v in params.items() if not (k == "temperature" and v == 1)}
        if not rejected:
            return params
        names = ", ".join(f"{k}={v!r}" for k, v in rejected.items())
        if self.unsupported_params == "error":
            raise ConfigurationError(
                f"{model!r} is an OpenAI reasoning model, which rejects {names} with a 400; "
                "remove them from the request, or build the backend with "
                "unsupported_params='drop' to leave them out (or 'send' if your server "
                "accepts them for this model)"
            )
        telemetry.event(
            "openai_unsupported_params_dropped",
            level="warning",
            backend=self.name,
            model=model,
            params=sorted(rejected),
        )
        return {k: v for k, v in params.items() if k not in rejected}

    # -- requests ------------------------------------------------------------------------------

    def build_body(self, request: ChatRequest, *, stream: bool = False) -> dict[str, Any]:
        """The JSON body sent for ``request`` (public so that tests and tools can inspect it).

        Raises:
            ConfigurationError: the request sets sampling parameters that its reasoning model
                rejects, and ``unsupported_params`` is ``"error"``.
        """
        body: dict[str, Any] = {"messages": [_message(m) for m in request.messages]}
        model = request.model or self.model
        if model:
            body["model"] = model
        body.update(self._sampling_params(request, model))
        if request.max_tokens is not None:
            body[self._max_tokens_key(model)] = request.max_tokens
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        if request.logprobs:
            body["logprobs"] = True
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in request.tools
            ]
        choice = request.tool_choice
        if choice is not None:
            body["tool_choice"] = (
                choice
                if choice in ("auto", "none", "required")
                else {"type": "function", "function": {"name": choice}}
            )
        fmt = request.response_format
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_object":
                body["response_format"] = {"type": "json_object"}
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {
                        "name": fmt.name,
                        "schema": fmt.json_schema or {"type": "object"},
                        "strict": fmt.strict,
                    },
                }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def complete(self, request: ChatRequest) -> Completion:
        """Answer ``request`` with one non-streaming call.

        Raises:
            ConfigurationError: see :meth:`build_body`; nothing was sent.
            HTTPStatusError: an error status (``RateLimitError`` for 429, with ``retry_after``),
                with the ``x-ratelimit-*`` headers as ``rate_limit``.
            BackendTimeoutError: the call timed out.
            BackendConnectionError: the server could not be reached or broke the connection.
            MalformedResponseError: the answer is not a chat completion.
        """
        body = self.build_body(request)
        url = self._chat_url
        start = time.perf_counter()
        data, response = await self._post_json(url, body, request.timeout)
        latency = time.perf_counter() - start
        try:
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content")
            raw_calls = message.get("tool_calls")
            usage = usage_field(data, "usage", _USAGE_COUNTS)
            text = content if isinstance(content, str) else _join_parts(content)
            calls = _tool_calls(raw_calls) if raw_calls else ()
            finish = _FINISH.get(choice.get("finish_reason"), "unknown")
            return Completion(
                text=text,
                tool_calls=calls,
                finish_reason=finish,
                usage=self._openai_usage(usage, body.get("model")),
                model=data.get("model") or body.get("model") or "",
                backend=self.name,
                latency=latency,
                rate_limit=self._rate_limit_info(response.headers),
                logprobs=_logprobs(choice.get("logprobs")) if request.logprobs else None,
            )
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            raise self._not_a("a chat completion", url, response, exc) from exc

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Stream the answer: text and tool-call pieces, then a :class:`StreamEnd`.

        Usage comes from the last chunk (``stream_options.include_usage``). A stream that ends
        before ``[DONE]`` or without a finish reason raises :class:`MalformedResponseError`
        (retryable) before any piece was passed on, :class:`~genfan.StreamInterruptedError`
        (with ``partial_text``) after; so does a connection that breaks.
        """
        body = self.build_body(request, stream=True)
        url = self._chat_url
        start = time.perf_counter()
        ttft: float | None = None
        parts: list[str] = []
        deltas: list[ToolCallDelta] = []
        logprobs: list[TokenLogprob] = []
        finish: str | None = None
        usage: Mapping[str, Any] | None = None
        model = ""
        done = False
        response: httpx.Response | None = None
        progress = StreamProgress(parts, deltas)
        sse = self._stream_sse(url, body, request.timeout, progress=progress)
        async with aclosing(sse) as events:
            async for _event, data, resp in events:
                response = resp
                if done:
                    continue
                if data == "[DONE]":
                    done = progress.ended = True
                    continue
                try:
                    chunk = json.loads(data)
                    if not isinstance(chunk, dict):
                        raise TypeError(
                            f"a chunk must be a JSON object, got {type(chunk).__name__}"
                        )
                    if chunk.get("error") is not None:
                        self._raise_stream_error(chunk, url, resp)
                    model = text_field(chunk, "model") or model
                    if chunk.get("usage"):
                        usage = usage_field(chunk, "usage", _USAGE_COUNTS)
                    out: list[StreamEvent] = []
                    for choice in chunk.get("choices") or ():
                        if choice.get("index", 0) != 0:
                            continue
                        delta = choice.get("delta") or _NO_USAGE
                        content = text_field(delta, "content")
                        if content:
                            parts.append(content)
                            out.append(TextDelta(text=content))
                        for tc in delta.get("tool_calls") or ():
                            fn = tc.get("function") or _NO_USAGE
                            args = fn.get("arguments") or ""
                            d = ToolCallDelta(
                                index=tc.get("index", 0),
                                id=tc.get("id"),
                                name=fn.get("name"),
                                arguments=args if isinstance(args, str) else json.dumps(args),
                            )
                            deltas.append(d)
                            out.append(d)
                        if choice.get("finish_reason"):
                            finish = text_field(choice, "finish_reason")
                        if request.logprobs:
                            logprobs.extend(_logprobs(choice.get("logprobs")) or ())
                except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
                    raise self._unreadable("chunk", url, data, exc) from exc
                if out and ttft is None:
                    ttft = time.perf_counter() - start
                for ev in out:
                    yield ev
        if not done or finish is None:
            missing = "[DONE]" if not done else "a finish reason"
            raise self._cut_short(url, missing, parts, deltas)
        u = usage or _NO_USAGE
        yield StreamEnd(
            completion=Completion(
                text="".join(parts),
                tool_calls=merge_tool_call_deltas(deltas),
                finish_reason=_FINISH.get(finish, "unknown"),
                usage=self._openai_usage(u, body.get("model")),
                model=model or body.get("model") or "",
                backend=self.name,
                latency=time.perf_counter() - start,
                ttft=ttft,
                rate_limit=None if response is None else self._rate_limit_info(response.headers),
                logprobs=tuple(logprobs) if request.logprobs and logprobs else None,
            )
        )

    def _raise_stream_error(
        self, chunk: Mapping[str, Any], url: str, response: httpx.Response
    ) -> None:
        error = chunk["error"]
        message = self._error_message(chunk) or str(error)
        code = error.get("code") if isinstance(error, dict) else None
        kind = error.get("type") if isinstance(error, dict) else None
        status = code if isinstance(code, int) and code >= 400 else 500
        text = f"error event in the stream from {url}: {self._redact(message)[:300]}"
        # The quota the stream's response reported when it began.
        rate_limit = self._rate_limit_info(response.headers)
        if (
            status == 429
            or kind in ("rate_limit_exceeded", "rate_limit_error")
            or code == ("rate_limit_exceeded")
        ):
            raise RateLimitError(text, backend=self.name, rate_limit=rate_limit)
        raise HTTPStatusError(text, backend=self.name, status_code=status, rate_limit=rate_limit)

    async def embed(self, texts: Sequence[str], *, model: str | None = None) -> list[list[float]]:
        """Embed ``texts`` with ``POST {base_url}/embeddings``, one vector per text, in order.

        Raises:
            BackendError: as :meth:`complete`; ``MalformedResponseError`` when the answer does
                not hold one vector per text.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return []
        body: dict[str, Any] = {"input": list(texts)}
        chosen = model or self.model
        if chosen:
            body["model"] = chosen
        url = self._embed_url
        data, response = await self._post_json(url, body, None)
        try:
            items = sorted(data["data"], key=lambda d: d.get("index", 0))
            vectors = [[float(x) for x in item["embedding"]] for item in items]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise MalformedResponseError(
                f"answer from {url} is not an embeddings list: {self._snippet(response.content)}",
                backend=self.name,
            ) from exc
        if len(vectors) != len(texts):
            raise MalformedResponseError(
                f"{url} returned {len(vectors)} embeddings for {len(texts)} inputs",
                backend=self.name,
            )
        return vectors

    def _read_rate_limit(self, headers: httpx.Headers) -> RateLimitInfo | None:
        found = prefixed_headers(headers, _RL_PREFIX)
        if found is None:
            return None
        return RateLimitInfo(
            limit_requests=parse_int(found.get(b"limit-requests")),
            limit_tokens=parse_int(found.get(b"limit-tokens")),
            remaining_requests=parse_int(found.get(b"remaining-requests")),
            remaining_tokens=parse_int(found.get(b"remaining-tokens")),
            reset_requests=parse_duration(found.get(b"reset-requests")),
            reset_tokens=parse_duration(found.get(b"reset-tokens")),
        )


_NO_USAGE: Mapping[str, Any] = {}
_USAGE_COUNTS = ("prompt_tokens", "completion_tokens")
_RL_PREFIX = b"x-ratelimit-"


def _message(m: Message) -> dict[str, Any]:
    role = m.role
    if role == "assistant":
        d: dict[str, Any] = {"role": "assistant", "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in m.tool_calls
            ]
    elif role == "tool":
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content or ""}
    else:
        d = {"role": role, "content": m.content or ""}
    if m.name:
        d["name"] = m.name
    return d


def _join_parts(content: Any) -> str:
    """Text of a ``content`` that is ``None`` or a list of parts (some servers send parts)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    raise TypeError(f"message content must be a string or a list, got {type(content).__name__}")


def _tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    calls = []
    for i, c in enumerate(raw):
        fn = c["function"]
        args = fn.get("arguments")
        if args is None:
            args = "{}"
        elif not isinstance(args, str):  # Ollama and others may send an object
            args = json.dumps(args)
        calls.append(ToolCall(id=c.get("id") or f"call_{i}", name=fn["name"], arguments=args))
    return tuple(calls)


def _logprobs(raw: Any) -> tuple[TokenLogprob, ...] | None:
    """The tokens and log-probabilities of a choice's ``logprobs`` (``{"content": [...]}``)."""
    if not isinstance(raw, Mapping):
        return None
    content = raw.get("content")
    if not isinstance(content, list):
        return None
    return tuple(
        TokenLogprob(token=str(t.get("token", "")), logprob=float(t["logprob"]))
        for t in content
        if isinstance(t, Mapping) and t.get("logprob") is not None
    )
