"""Builders of candidates for the selection tests."""

from __future__ import annotations

from genfan import BackendError, CallCancelledError, ChatRequest, Completion, Usage
from genfan.select import Candidate


def ok(
    index: int,
    text: str,
    *,
    order: int | None = None,
    latency: float = 1.0,
    usage: Usage | None = None,
    finish: str = "stop",
    backend: str | None = None,
) -> Candidate:
    return Candidate(
        index=index,
        backend=backend or f"b{index}",
        status="ok",
        completion=Completion(
            text=text,
            usage=usage or Usage(),
            finish_reason=finish,  # type: ignore[arg-type]
        ),
        latency=latency,
        finished_order=index if order is None else order,
    )


def failed(index: int) -> Candidate:
    return Candidate(
        index=index,
        backend=f"b{index}",
        status="failed",
        error=BackendError("boom", backend=f"b{index}"),
        finished_order=index,
    )


def cancelled(index: int) -> Candidate:
    return Candidate(
        index=index,
        backend=f"b{index}",
        status="cancelled",
        error=CallCancelledError("cancelled", backend=f"b{index}"),
    )


def texts(*items: str) -> list[Candidate]:
    return [ok(i, t) for i, t in enumerate(items)]


Q = ChatRequest.from_prompt("What is 5 + 7?")
