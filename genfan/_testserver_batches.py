"""The batch APIs of the fake server: OpenAI's Files + Batches and Anthropic's Message Batches.

[`FakeLLMServer`][genfan.testserver.FakeLLMServer] routes these paths here (``server.batches`` is
the `BatchEmulator`):

* OpenAI: ``POST /v1/files`` (multipart/form-data, ``purpose=batch``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``; ``POST /v1/batches``, ``GET /v1/batches`` (the list, with
  each batch's ``metadata``), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.
  A batch goes ``validating`` -> ``in_progress`` -> ``finalizing`` -> ``completed`` (or
  ``failed`` when its input file is invalid, ``expired``, ``cancelling`` -> ``cancelled``);
  its successes are in ``output_file_id``, its failures in ``error_file_id``.
* Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches`` (the list: Anthropic's
  batches carry no metadata), ``GET /v1/messages/batches/{id}``,
  ``POST /v1/messages/batches/{id}/cancel``, ``GET /v1/messages/batches/{id}/results`` (JSONL:
  ``succeeded``, ``errored``, ``canceled``, ``expired``). ``in_progress`` -> ``ended`` (through
  ``canceling`` when cancelled).

Each request of a batch is answered by the server's normal reply logic (handler, scripts, faults
and the echo), so a script or ``set_faults(...)`` makes some rows of a batch fail. Time moves on
every retrieve: a batch's requests are done progressively over ``complete_after(seconds)``
(default 0: all at the second poll), or only by ``advance()`` after ``hold()``. ``creates``
counts the batches created, per API, and `resubmitted` counts the custom ids sent in more than
one batch (a client that pays twice).
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from . import testserver as _ts

if TYPE_CHECKING:
    from .testserver import FakeLLMServer

__all__ = ["BatchEmulator"]

_OPENAI_TERMINAL = ("completed", "failed", "expired", "cancelled")
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
Answer = tuple[int, Any, str]  # status, body (JSON-able or bytes), content type


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
        }


@dataclass
class _Batch:
    api: Literal["openai", "anthropic"]
    id: str
    requests: list[tuple[str, dict[str, Any]]]  # (custom_id, body)
    created: float  # monotonic
    created_at: int  # epoch seconds
    status: str
    input_file_id: str | None = None
    endpoint: str = "/v1/chat/completions"
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    results: dict[str, tuple[bool, Any]] = field(default_factory=dict)  # id -> (ok, payload)
    ended: str | None = None  # why unfinished requests ended: expired / cancelled
    times: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None


class BatchEmulator:
    """The batch endpoints of one fake server (``server.batches``); see the module docstring.

    Attributes:
        creates: batches created, per API (``"openai"``, ``"anthropic"``).
        max_requests, max_bytes: OpenAI's per-batch limits (a larger input file fails validation).
    """

    def __init__(self, server: FakeLLMServer) -> None:
        self.server = server
        self.creates: collections.Counter[str] = collections.Counter()
        self.max_requests = 50_000
        self.max_bytes = 200 * 1024 * 1024
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._ids = itertools.count(1)
        self._complete_after = 0.0
        self._held = False
        self._submitted: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lose_creates = 0
        self._lock = threading.RLock()  # the server's thread and the test's
        #: seconds before answering an upload (``POST /v1/files``) or a download (a file's
        #: content, a batch's results): a window to kill a client in
        self.upload_latency = 0.0
        self.download_latency = 0.0

    # -- controls (from the test's thread) -----------------------------------------------------

    def complete_after(self, seconds: float) -> None:
        """Finish each batch's requests progressively over ``seconds`` after its creation."""
        self._complete_after = max(0.0, seconds)
        self._held = False

    def hold(self) -> None:
        """Stop time: batches stay as they are until `advance`."""
        self._held = True

    def advance(self, batch_id: str | None = None) -> None:
        """Finish every request of every open batch (or of ``batch_id``) now."""
        with self._lock:
            for b in self._open(batch_id):
                if b.status not in ("cancelling", "canceling"):
                    self._process(b, len(b.requests))
                self._finish(b)

    def finish_some(self, n: int, batch_id: str | None = None) -> None:
        """Answer the first ``n`` requests of open batches (or of ``batch_id``) now, leaving the
        batches running."""
        with self._lock:
            for b in self._open(batch_id):
                self._process(b, n)

    def expire(self, batch_id: str | None = None, *, completed: int = 0) -> None:
        """Expire open batches (or ``batch_id``) with only their first ``completed`` requests done."""
        with self._lock:
            for b in self._open(batch_id):
                self._process(b, completed)
                b.ended = "expired"
                self._finish(b)

    def lose_next_create(self, n: int = 1) -> None:
        """Accept the next ``n`` batch creates, then drop the connection before answering (the
        client never learns the id: a kill between the provider's accept and the client's save)."""
        self._lose_creates += n

    def resubmitted(self) -> int:
        """Custom ids sent (per API) in more than one batch: requests paid for twice."""
        return sum(1 for n in self._submitted.values() if n > 1)

    def get(self, batch_id: str) -> dict[str, Any]:
        """A batch as its API shows it."""
        with self._lock:
            b = self._batches[batch_id]
            return self._obj(b)

    @property
    def ids(self) -> list[str]:
        """Every batch id, oldest first."""
        return list(self._batches)

    # -- routing -------------------------------------------------------------------------------

    def latency_for(self, method: str, path: str) -> float:
        """The latency set for this call (`upload_latency`, `download_latency`)."""
        path = path.rstrip("/")
        if method == "POST" and path == "/v1/files":
            return self.upload_latency
        if method == "GET" and path.endswith(("/content", "/results")):
            return self.download_latency
        return 0.0

    @staticmethod
    def handles(path: str) -> bool:
        return path.startswith(("/v1/files", "/v1/batches", "/v1/messages/batches"))

    def lose_this_create(self) -> bool:
        if self._lose_creates > 0:
            self._lose_creates -= 1
            return True
        return False

    def handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        with self._lock:
            return self._route(method, path.rstrip("/"), headers, raw)

    def _route(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        parts = path.split("/")[2:]  # after "/v1"
        if parts[0] == "files":
            if method == "POST" and len(parts) == 1:
                return self._upload(headers, raw)
            if method == "GET" and len(parts) in (2, 3):
                f = self._files.get(parts[1])
                if f is None:
                    return _not_found("openai", f"no file {parts[1]!r}")
                if len(parts) == 3 and parts[2] == "content":
                    return 200, f.data, "application/jsonl"
                return 200, f.obj(), "application/json"
        elif parts[0] == "batches":
            if len(parts) == 1 and method == "POST":
                return self._create_openai(raw)
            if len(parts) == 1 and method == "GET":
                return self._list("openai")
            b = self._batches.get(parts[1])
            if b is None or b.api != "openai":
                return _not_found("openai", f"no batch {parts[1]!r}")
            if len(parts) == 2 and method == "GET":
                self._tick(b)
                return 200, self._obj(b), "application/json"
            if len(parts) == 3 and parts[2] == "cancel" and method == "POST":
                return self._cancel(b)
        elif parts[:2] == ["messages", "batches"]:
            if len(parts) == 2 and method == "POST":
                return self._create_anthropic(raw)
            if len(parts) == 2 and method == "GET":
                return self._list("anthropic")
            b = self._batches.get(parts[2])
            if b is None or b.api != "anthropic":
                return _not_found("anthropic", f"no message batch {parts[2]!r}")
            if len(parts) == 3 and method == "GET":
                self._tick(b)
                return 200, self._obj(b), "application/json"
            if len(parts) == 4 and parts[3] == "cancel" and method == "POST":
                return self._cancel(b)
            if len(parts) == 4 and parts[3] == "results" and method == "GET":
                if b.status != "ended":
                    return _error("anthropic", 400, f"batch {b.id} has not ended yet")
                return 200, self._anthropic_results(b), "application/binary"
        return _not_found("openai", f"no route {method} {path}")

    # -- OpenAI --------------------------------------------------------------------------------

    def _upload(self, headers: dict[str, str], raw: bytes) -> Answer:
        ctype = headers.get("content-type", "")
        m = re.search(r'boundary="?([^";]+)"?', ctype)
        if not ctype.startswith("multipart/form-data") or m is None:
            return _error("openai", 400, "POST /v1/files takes multipart/form-data")
        fields, files = _multipart(raw, m.group(1).encode())
        if fields.get("purpose") != "batch":
            return _error("openai", 400, "purpose must be 'batch'")
        if "file" not in files:
            return _error("openai", 400, "a 'file' part is required")
        name, data = files["file"]
        fid = f"file-{next(self._ids)}"
        self._files[fid] = _File(fid, name, "batch", data, int(time.time()))
        return 200, self._files[fid].obj(), "application/json"

    def _create_openai(self, raw: bytes) -> Answer:
        try:
            body = json.loads(raw)
            fid = body["input_file_id"]
            endpoint = body.get("endpoint")
            window = body.get("completion_window")
        except (ValueError, KeyError, TypeError):
            return _error("openai", 400, "body must have input_file_id, endpoint")
        if endpoint != "/v1/chat/completions":
            return _error("openai", 400, f"unsupported endpoint {endpoint!r}")
        if window != "24h":
            return _error("openai", 400, "completion_window must be '24h'")
        f = self._files.get(fid)
        if f is None:
            return _not_found("openai", f"no file {fid!r}")
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(isinstance(v, str) and len(v) <= 512 for v in metadata.values())
        ):
            return _error("openai", 400, "metadata: up to 16 string values of 512 characters")
        requests, errors = self._read_input(f)
        b = self._new("openai", requests, status="validating")
        b.input_file_id, b.endpoint, b.metadata = fid, endpoint, metadata
        if errors:
            b.status, b.errors = "failed", errors
            b.times["failed_at"] = int(time.time())
        return 200, self._obj(b), "application/json"

    def _read_input(
        self, f: _File
    ) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
        requests: list[tuple[str, dict[str, Any]]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        if len(f.data) > self.max_bytes:
            errors.append({"code": "file_too_large", "message": "the input file is too large"})
        lines = [x for x in f.data.split(b"\n") if x.strip()]
        if len(lines) > self.max_requests:
            errors.append(
                {"code": "too_many_requests", "message": f"more than {self.max_requests}"}
            )
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
                cid, body = item["custom_id"], item["body"]
                if item.get("method") != "POST" or item.get("url") != "/v1/chat/completions":
                    raise ValueError("method/url")
                if not isinstance(cid, str) or not isinstance(body, dict):
                    raise TypeError("custom_id/body")
            except (ValueError, KeyError, TypeError):
                errors.append({"code": "invalid_request", "message": "bad line", "line": n})
                continue
            if cid in seen:
                errors.append(
                    {"code": "duplicate_custom_id", "message": f"{cid!r} twice", "line": n}
                )
            seen.add(cid)
            requests.append((cid, body))
        return requests, errors

    # -- Anthropic -----------------------------------------------------------------------------

    def _create_anthropic(self, raw: bytes) -> Answer:
        try:
            body = json.loads(raw)
            items = body["requests"]
            requests = [(str(r["custom_id"]), dict(r["params"])) for r in items]
        except (ValueError, KeyError, TypeError):
            return _error("anthropic", 400, "requests: a list of {custom_id, params}")
        if set(body) - {"requests"}:
            return _error("anthropic", 400, f"unknown fields {sorted(set(body) - {'requests'})}")
        if not requests or len(requests) > 100_000:
            return _error("anthropic", 400, "a batch holds 1 to 100,000 requests")
        ids = [cid for cid, _ in requests]
        bad = [cid for cid in ids if not _CUSTOM_ID.match(cid)]
        if bad:
            return _error(
                "anthropic", 400, f"custom_id {bad[0]!r} must match ^[a-zA-Z0-9_-]{{1,64}}$"
            )
        if len(set(ids)) != len(ids):
            return _error("anthropic", 400, "custom_id values must be unique within a batch")
        b = self._new("anthropic", requests, status="in_progress")
        return 200, self._obj(b), "application/json"

    def _anthropic_results(self, b: _Batch) -> bytes:
        lines = []
        for cid, _ in b.requests:
            done = b.results.get(cid)
            if done is None:
                result: dict[str, Any] = {
                    "type": "canceled" if b.ended == "cancelled" else "expired"
                }
            elif done[0]:
                result = {"type": "succeeded", "message": done[1]}
            else:
                result = {"type": "errored", "error": done[1][1]}  # the API's error body
            lines.append(json.dumps({"custom_id": cid, "result": result}))
        return ("\n".join(lines) + "\n").encode()

    # -- both ----------------------------------------------------------------------------------

    def _new(
        self, api: Literal["openai", "anthropic"], requests: list[Any], *, status: str
    ) -> _Batch:
        n = next(self._ids)
        bid = f"batch_{n:06d}" if api == "openai" else f"msgbatch_{n:06d}"
        b = _Batch(api, bid, requests, time.monotonic(), int(time.time()), status)
        self._batches[bid] = b
        self.creates[api] += 1
        for cid, _ in requests:
            self._submitted[(api, cid)] += 1
        return b

    def _open(self, batch_id: str | None) -> list[_Batch]:
        return [
            b
            for b in self._batches.values()
            if (batch_id is None or b.id == batch_id) and not self._done(b)
        ]

    @staticmethod
    def _done(b: _Batch) -> bool:
        return b.status in _OPENAI_TERMINAL or b.status == "ended"

    def _tick(self, b: _Batch) -> None:
        """Move time on for ``b`` (on every retrieve)."""
        if self._done(b):
            return
        if b.status in ("cancelling", "canceling"):  # a cancellation ends even when held
            self._finish(b)
            return
        if self._held:
            return
        if b.status == "validating":
            b.status = "in_progress"
            b.times["in_progress_at"] = int(time.time())
            return
        if b.status == "finalizing":
            self._finish(b)
            return
        elapsed = time.monotonic() - b.created
        share = 1.0 if self._complete_after <= 0 else min(1.0, elapsed / self._complete_after)
        self._process(b, int(len(b.requests) * share))
        if len(b.results) == len(b.requests):
            if b.api == "openai":
                b.status = "finalizing"
                b.times["finalizing_at"] = int(time.time())
            else:
                self._finish(b)

    def _process(self, b: _Batch, upto: int) -> None:
        """Answer the requests of ``b`` up to ``upto`` through the server's reply logic."""
        path = "/v1/chat/completions" if b.api == "openai" else "/v1/messages"
        for cid, body in b.requests[:upto]:
            if cid not in b.results:
                b.results[cid] = self._answer(b.api, path, body)

    def _answer(self, api: str, path: str, body: dict[str, Any]) -> tuple[bool, Any]:
        srv = self.server
        fault = srv._pick_fault(path, {})
        reply = None if fault is not None else srv._next_reply(path, body)
        if isinstance(reply, _ts.Fault):
            fault, reply = reply, None
        if fault is not None:
            status = fault.status if fault.kind in ("status", "echo") else 500
            return False, (status, _ts._error_body(api, status))
        if isinstance(reply, _ts.RawReply):
            payload = reply.body
            try:
                data = json.loads(payload) if isinstance(payload, bytes | str) else payload
            except ValueError:
                data = {"error": {"message": str(payload)}}
            if reply.status >= 400:
                return False, (reply.status, data)
            return True, data
        if isinstance(reply, str):
            reply = _ts.TextReply(reply)
        if reply is None:
            reply = _ts.TextReply(_ts._default_text(api, body))
        rid = next(srv._ids)
        if api == "openai":
            return True, _ts._openai_completion(rid, body, reply)
        return True, _ts._anthropic_message(rid, body, reply)

    def _finish(self, b: _Batch) -> None:
        now = int(time.time())
        if b.status in ("cancelling", "canceling"):
            b.ended = "cancelled"
        if b.api == "anthropic":
            b.status = "ended"
            b.times["ended_at"] = now
            return
        if b.ended == "expired":
            b.status, key = "expired", "expired_at"
        elif b.ended == "cancelled":
            b.status, key = "cancelled", "cancelled_at"
        else:
            b.status, key = "completed", "completed_at"
        b.times[key] = now
        out: list[str] = []
        err: list[str] = []
        for n, (cid, _) in enumerate(b.requests):
            done = b.results.get(cid)
            rid = f"batch_req_{b.id}_{n}"
            if done is not None and done[0]:
                out.append(
                    json.dumps(
                        {
                            "id": rid,
                            "custom_id": cid,
                            "response": {"status_code": 200, "request_id": rid, "body": done[1]},
                            "error": None,
                        }
                    )
                )
            elif done is not None:
                status, payload = done[1]
                err.append(
                    json.dumps(
                        {
                            "id": rid,
                            "custom_id": cid,
                            "response": {"status_code": status, "request_id": rid, "body": payload},
                            "error": None,
                        }
                    )
                )
            else:
                code = "batch_expired" if b.ended == "expired" else "batch_cancelled"
                err.append(
                    json.dumps(
                        {
                            "id": rid,
                            "custom_id": cid,
                            "response": None,
                            "error": {"code": code, "message": f"the batch was {b.status}"},
                        }
                    )
                )
        for lines, attr in ((out, "output_file_id"), (err, "error_file_id")):
            if lines:
                fid = f"file-{next(self._ids)}"
                data = ("\n".join(lines) + "\n").encode()
                self._files[fid] = _File(fid, f"{b.id}_{attr}.jsonl", "batch_output", data, now)
                setattr(b, attr, fid)

    def _cancel(self, b: _Batch) -> Answer:
        if self._done(b):
            if b.api == "openai":
                return _error("openai", 400, f"batch {b.id} is {b.status}: it cannot be cancelled")
            return 200, self._obj(b), "application/json"
        if b.status not in ("cancelling", "canceling"):
            b.status = "cancelling" if b.api == "openai" else "canceling"
            key = "cancelling_at" if b.api == "openai" else "cancel_initiated_at"
            b.times[key] = int(time.time())
        return 200, self._obj(b), "application/json"

    def _list(self, api: str) -> Answer:
        data = [self._obj(b) for b in reversed(self._batches.values()) if b.api == api]
        body: dict[str, Any] = {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
        if api == "openai":
            body["object"] = "list"
        return 200, body, "application/json"

    def _obj(self, b: _Batch) -> dict[str, Any]:
        ok = sum(1 for r in b.results.values() if r[0])
        bad = len(b.results) - ok
        if b.api == "openai":
            counts = {"total": len(b.requests), "completed": ok, "failed": bad}
            if b.status in ("expired", "cancelled"):
                counts["failed"] = len(b.requests) - ok
            return {
                "id": b.id,
                "object": "batch",
                "endpoint": b.endpoint,
                "errors": {"object": "list", "data": b.errors} if b.errors else None,
                "input_file_id": b.input_file_id,
                "completion_window": "24h",
                "status": b.status,
                "output_file_id": b.output_file_id,
                "error_file_id": b.error_file_id,
                "created_at": b.created_at,
                "expires_at": b.created_at + 86400,
                **{
                    k: b.times.get(k)
                    for k in (
                        "in_progress_at",
                        "finalizing_at",
                        "completed_at",
                        "failed_at",
                        "expired_at",
                        "cancelling_at",
                        "cancelled_at",
                    )
                },
                "request_counts": counts,
                "metadata": b.metadata,
            }
        ended = b.status == "ended"
        left = len(b.requests) - len(b.results)
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": b.status,
            "request_counts": {
                "processing": 0 if ended else left,
                "succeeded": ok,
                "errored": bad,
                "canceled": left if ended and b.ended == "cancelled" else 0,
                "expired": left if ended and b.ended == "expired" else 0,
            },
            "ended_at": _iso(b.times.get("ended_at")),
            "created_at": _iso(b.created_at),
            "expires_at": _iso(b.created_at + 86400),
            "cancel_initiated_at": _iso(b.times.get("cancel_initiated_at")),
            "results_url": (
                f"{self.server.url}/messages/batches/{b.id}/results" if ended else None
            ),
        }


def _iso(epoch: int | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _error(api: str, status: int, message: str) -> Answer:
    if api == "anthropic":
        etype = "not_found_error" if status == 404 else "invalid_request_error"
        return (
            status,
            {"type": "error", "error": {"type": etype, "message": message}},
            "application/json",
        )
    return (
        status,
        {"error": {"message": message, "type": "invalid_request_error"}},
        "application/json",
    )


def _not_found(api: str, message: str) -> Answer:
    return _error(api, 404, message)


def _multipart(raw: bytes, boundary: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """The fields and files of a multipart/form-data body."""
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in raw.split(b"--" + boundary):
        if not part or part.startswith(b"--"):
            continue
        part = part.removeprefix(b"\r\n")
        head, _, body = part.partition(b"\r\n\r\n")
        body = body.removesuffix(b"\r\n")
        disposition = ""
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value
        name_m = re.search(r'\bname="([^"]*)"', disposition)
        if name_m is None:
            continue
        file_m = re.search(r'\bfilename="([^"]*)"', disposition)
        if file_m is not None:
            files[name_m.group(1)] = (file_m.group(1), body)
        else:
            fields[name_m.group(1)] = body.decode()
    return fields, files
