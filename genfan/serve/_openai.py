"""OpenAI's wire format, both ways: a ``/v1/chat/completions`` body into a
[`ChatRequest`][genfan.ChatRequest], and completions back into OpenAI's JSON and stream chunks.

Only what genfan can carry is accepted; anything else that changes the answer (image parts,
``top_logprobs``, audio) is refused with a 400 that names the field, never dropped silently.
Fields that do not change the answer (``user``, ``store``, ``service_tier``...) are ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .._types import ChatRequest, Completion, Message, ResponseFormat, ToolCall, ToolSpec
from ._errors import GatewayError

__all__ = ["ParsedChat", "chunk", "completion_json", "parse_chat"]

_FINISH = {"error": "stop", "unknown": "stop"}


class ParsedChat:
    """A chat request as the gateway runs it."""

    __slots__ = ("include_usage", "model", "n", "request", "stream")

    def __init__(
        self, model: str, request: ChatRequest, *, n: int, stream: bool, include_usage: bool
    ) -> None:
        self.model = model
        self.request = request
        self.n = n
        self.stream = stream
        self.include_usage = include_usage


def _bad(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", param=param)


def _text(content: Any, where: str) -> str | None:
    """A message's content: a string, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise _bad(
                    f"{where}.content[{i}] is a {kind!r} part; this gateway takes text parts only",
                    f"{where}.content",
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise _bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _message(raw: Any, i: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(raw, Mapping):
        raise _bad(f"{where} must be an object with a role and content", where)
    role = raw.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant", "tool"):
        raise _bad(
            f"{where}.role must be system, developer, user, assistant or tool, got {role!r}",
            f"{where}.role",
        )
    content = _text(raw.get("content"), where)
    calls: list[ToolCall] = []
    for j, call in enumerate(raw.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise _bad(f"{where}.tool_calls[{j}] needs function.name", f"{where}.tool_calls")
        calls.append(
            ToolCall(
                id=str(call.get("id") or f"call_{j}"),
                name=fn["name"],
                arguments=str(fn.get("arguments") or "{}"),
            )
        )
    try:
        return Message(
            role=role,
            content=content,
            tool_calls=tuple(calls),
            tool_call_id=raw.get("tool_call_id"),
            name=raw.get("name"),
        )
    except ValidationError as exc:
        raise _bad(f"{where}: {exc.errors()[0]['msg']}", where) from None


def _tools(raw: Any) -> tuple[ToolSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _bad("tools must be a list of {type: function, function: {...}}", "tools")
    out = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not fn:
            raise _bad(f"tools[{i}] must be {{type: 'function', function: {{name, ...}}}}", "tools")
        try:
            out.append(
                ToolSpec(
                    name=fn.get("name", ""),
                    description=fn.get("description") or "",
                    parameters=fn.get("parameters") or {"type": "object", "properties": {}},
                )
            )
        except ValidationError as exc:
            raise _bad(f"tools[{i}].function: {exc.errors()[0]['msg']}", "tools") from None
    return tuple(out)


def _tool_choice(raw: Any) -> str | None:
    if raw is None or raw in ("auto", "none", "required"):
        return raw  # type: ignore[no-any-return]
    if isinstance(raw, Mapping) and isinstance(raw.get("function"), Mapping):
        name = raw["function"].get("name")
        if isinstance(name, str) and name:
            return name
    raise _bad(
        "tool_choice must be 'auto', 'none', 'required' or {type: 'function', function: {name}}",
        "tool_choice",
    )


def _response_format(raw: Any) -> ResponseFormat | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat(type="json_object")
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise _bad("response_format.json_schema needs {name, schema}", "response_format")
        return ResponseFormat(
            type="json_schema",
            json_schema=dict(spec.get("schema") or {}),
            name=str(spec.get("name") or "response"),
            strict=bool(spec.get("strict", True)),
        )
    raise _bad(
        "response_format.type must be 'text', 'json_object' or 'json_schema'", "response_format"
    )


def parse_chat(body: Any) -> ParsedChat:
    """A ``/v1/chat/completions`` body as a [`ChatRequest`][genfan.ChatRequest].

    Raises:
        GatewayError: a 400 naming the field to fix.
    """
    if not isinstance(body, Mapping):
        raise _bad("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required: one of the names GET /v1/models lists", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    if body.get("top_logprobs"):
        raise _bad("top_logprobs is not supported: ask for logprobs alone", "top_logprobs")
    n = body.get("n")
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 16:
        raise _bad("n must be an integer from 1 to 16", "n")
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    fields: dict[str, Any] = {
        "messages": tuple(_message(m, i) for i, m in enumerate(messages)),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "max_tokens": max_tokens,
        "stop": stops,
        "seed": body.get("seed"),
        "tools": _tools(body.get("tools")),
        "tool_choice": _tool_choice(body.get("tool_choice")),
        "response_format": _response_format(body.get("response_format")),
        "logprobs": bool(body.get("logprobs")),
    }
    try:
        request = ChatRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise _bad(f"{param}: {err['msg']} (got {err.get('input')!r:.60})", param) from None
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    include_usage = bool(isinstance(options, Mapping) and options.get("include_usage"))
    return ParsedChat(model, request, n=n, stream=stream, include_usage=include_usage)


def _logprobs(completion: Completion) -> dict[str, Any] | None:
    if completion.logprobs is None:
        return None
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode()),
                "top_logprobs": [],
            }
            for t in completion.logprobs
        ],
        "refusal": None,
    }


def _tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def finish_reason(completion: Completion) -> str:
    if completion.tool_calls:
        return "tool_calls"
    return _FINISH.get(completion.finish_reason, completion.finish_reason)


def usage_json(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def completion_json(
    request_id: str,
    model: str,
    completions: list[Completion],
    extension: dict[str, Any],
    created: int | None = None,
) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` object: one choice per completion."""
    choices = []
    inp = out = 0
    for i, c in enumerate(completions):
        message: dict[str, Any] = {"role": "assistant", "content": c.text or None}
        if not c.tool_calls and c.text == "":
            message["content"] = ""
        if c.tool_calls:
            message["tool_calls"] = _tool_calls(c.tool_calls)
        message["refusal"] = None
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": _logprobs(c),
                "finish_reason": finish_reason(c),
            }
        )
        inp += c.usage.input_tokens
        out += c.usage.output_tokens
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_json(inp, out),
        "system_fingerprint": None,
        "genfan": extension,
    }


def chunk(
    request_id: str,
    model: str,
    created: int,
    *,
    index: int = 0,
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    logprobs: dict[str, Any] | None = None,
    usage: dict[str, int] | None = None,
    extension: dict[str, Any] | None = None,
    no_choices: bool = False,
) -> bytes:
    """One server-sent event of a streamed ``chat.completion.chunk``."""
    obj: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if no_choices
        else [
            {"index": index, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
        ],
    }
    if usage is not None:
        obj["usage"] = usage
    if extension is not None:
        obj["genfan"] = extension
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def stream_logprobs(completion: Completion) -> dict[str, Any] | None:
    """The logprobs of a whole streamed answer, sent on its last chunk (genfan's backends report
    them with the completion, not per delta)."""
    return _logprobs(completion)
