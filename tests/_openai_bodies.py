"""What the OpenAI backend sends: canned answers for respx, and the request body it posts."""

from __future__ import annotations

import json
from typing import Any

import respx
from genfan_providers.openai import OpenAIBackend

from genfan import ChatRequest, collect_stream

OPENAI = "https://api.openai.com/v1"
LOCAL = "http://127.0.0.1:8000/v1"
KEY = "sk-test-SECRET-0123456789"


def completion_body() -> dict[str, Any]:
    return {
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }


def stream_body() -> bytes:
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
    ]
    return ("".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n").encode()


async def sent_body(b: OpenAIBackend, req: ChatRequest, *, stream: bool = False) -> dict[str, Any]:
    """The JSON body ``b`` sends for ``req`` (through the real request path)."""
    with respx.mock:
        if stream:
            route = respx.post(b.base_url + "/chat/completions").respond(
                content=stream_body(), headers={"content-type": "text/event-stream"}
            )
            async with b:
                await collect_stream(b.stream(req))
        else:
            route = respx.post(b.base_url + "/chat/completions").respond(json=completion_body())
            async with b:
                await b.complete(req)
    body: dict[str, Any] = json.loads(route.calls.last.request.content)
    return body
