"""Batch jobs through the providers' batch endpoints: half the price, resumable, with a deadline.

``BatchJob(..., via="batch-api")`` sends the rows that a run selects (``rerun``) to OpenAI's
Batch API (a JSONL file uploaded to ``/v1/files``, a batch created at ``/v1/batches``, its
``output_file_id`` and ``error_file_id`` downloaded) or to Anthropic's Message Batches
(``/v1/messages/batches``, results read from ``results_url``), split under each provider's limits;
it polls with backoff and writes one record per row to the job's output, as a real-time run does.

**Paying once.** A state file next to the output (``OUTPUT.batches.json``, written atomically:
a temporary file, fsync, rename, fsync of the folder) holds the job's id and, for every chunk,
its rows. A chunk is recorded *before* anything is sent (an intent), its uploaded file id and its
batch id right after the provider gives them. Every batch carries the job and chunk in its
``metadata`` (OpenAI); a run that finds an intent without a batch id lists the provider's batches
and adopts the one carrying them instead of creating another. Anthropic's batches carry no
metadata: there a chunk's custom ids carry its tag (``g<job>c<chunk>-<n>``) and the run adopts
the one batch created after the intent with the chunk's request count (and drops results whose
ids are not the chunk's). So a process killed anywhere resumes polling, never resubmitting what
the provider has.

**The deadline.** At ``deadline`` the open batches are cancelled, what they finished is
collected, and the rows still missing run in real time (the job's real-time path, through the
backend's guards). The summary prices each path: a batch answer costs half its real-time price,
unless the provider reports a cost.

The local engine has no batch API: ``via="batch-api"`` with a ``vllm`` backend (or
``via="offline"`` with any backend) submits every row at once to the unguarded backend, so the
engine batches them all (one engine, many requests in flight).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import httpx

from .. import telemetry
from .._errors import (
    BackendConnectionError,
    ConfigurationError,
    HTTPStatusError,
    MalformedResponseError,
    RateLimitError,
)
from .._types import ChatRequest, Usage
from ._batch_settings import BatchAPISettings, parse_deadline
from ._output import OutputFile, Record
from ._rows import JobRow, build_request, iter_rows, scan_input
from ._summary import BatchAPISummary, JobSummary

if TYPE_CHECKING:
    from .._backend import Backend
    from .._config import GenfanConfig
    from .._fanout import Target
    from ._rows import FanOutFactory

__all__ = ["JobSpec", "Realtime", "cancel_batches", "run_batch_api", "state_path"]


class JobSpec(Protocol):
    """What this module reads of a ``BatchJob`` (``genfan.batching._job`` imports this module,
    so it names the fields, not the class)."""

    @property
    def input(self) -> Path: ...
    @property
    def output(self) -> Path: ...
    @property
    def config(self) -> Path | None: ...
    @property
    def via(self) -> str | None: ...
    @property
    def deadline(self) -> float | str | datetime | None: ...
    @property
    def batch_api(self) -> BatchAPISettings | None: ...
    @property
    def rerun(self) -> str: ...
    @property
    def compact(self) -> bool: ...


#: Runs the job's missing rows through the real-time path with this fan-out factory and
#: ``max_in_flight`` (``None``: the job's): the caller's ``run_batch_job``.
Realtime = Callable[["FanOutFactory", "int | None"], Awaitable[JobSummary]]

#: Per provider: the most requests and bytes (of JSONL) one batch may hold.
LIMITS = {"openai": (50_000, 200 * 1024 * 1024), "anthropic": (100_000, 256 * 1024 * 1024)}
#: A batch answer's price, relative to the same call in real time.
BATCH_DISCOUNT = 0.5
_STATE_VERSION = 1


# -- the state file ----------------------------------------------------------------------------


@dataclass
class _Chunk:
    index: int
    keys: list[str]
    custom_ids: list[str]
    intent_at: float  # epoch seconds, when the intent was written
    state: str = "intent"  # intent | uploaded | submitted | collected | abandoned
    input_file_id: str | None = None
    batch_id: str | None = None
    cancel_requested: bool = False
    #: the rows a cancelled batch did not run: ``failed`` records (a user's cancel), or left
    #: missing for the real-time path (the deadline's cancel)
    unfinished: str = "failed"


@dataclass
class _State:
    path: Path
    job_id: str
    provider: str
    backend: str
    chunks: list[_Chunk] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> _State | None:
        try:
            data = json.loads(path.read_bytes())
            return cls(
                path=path,
                job_id=data["job_id"],
                provider=data["provider"],
                backend=data["backend"],
                chunks=[_Chunk(**c) for c in data["chunks"]],
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"the batch state {path} is unreadable ({exc}); it lists the batches already "
                "submitted: restore it, or remove it to submit the missing rows again"
            ) from None

    def save(self) -> None:
        """Write the state atomically and durably (temporary file, fsync, rename, fsync dir)."""
        data = {
            "version": _STATE_VERSION,
            "job_id": self.job_id,
            "provider": self.provider,
            "backend": self.backend,
            "chunks": [asdict(c) for c in self.chunks],
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(data, separators=(",", ":")).encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def open_chunks(self) -> list[_Chunk]:
        return [c for c in self.chunks if c.state in ("intent", "uploaded", "submitted")]


def state_path(output: Path) -> Path:
    """Where a job's batch state lives: next to its output."""
    return output.with_name(output.name + ".batches.json")


# -- the providers' batch APIs ----------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    """One request's result: ``body`` (the provider's answer) or ``error``."""

    custom_id: str
    body: Mapping[str, Any] | None = None
    error: dict[str, Any] | None = None


class _BatchClient:
    """HTTP calls to one provider's batch API, retried with backoff when retryable."""

    provider: str

    def __init__(self, backend: Backend, settings: BatchAPISettings) -> None:
        self.name = backend.name
        self.base_url = str(getattr(backend, "base_url", "")).rstrip("/")
        client = getattr(backend, "client", None)
        if not self.base_url or not isinstance(client, httpx.AsyncClient):
            raise ConfigurationError(f"backend {backend.name!r} has no HTTP client for a batch API")
        self.http = client
        self.attempts = settings.attempts
        self._secrets = [
            v.removeprefix("Bearer ").strip()
            for k, v in client.headers.items()
            if k.lower() in ("authorization", "x-api-key", "api-key") and v.strip()
        ]

    def _redact(self, text: str) -> str:
        for s in self._secrets:
            if s:
                text = text.replace(s, "***")
        return text

    async def call(
        self, method: str, path: str, *, attempts: int | None = None, **kw: Any
    ) -> httpx.Response:
        """One call, retried (5xx, 408, 429, transport errors) with backoff.

        Raises:
            HTTPStatusError: a refused call (a 4xx), or one still failing after the attempts.
            BackendConnectionError: the API could not be reached.
        """
        url = path if path.startswith("http") else self.base_url + path
        delay = 0.5
        tries = attempts or self.attempts
        for attempt in range(1, tries + 1):
            try:
                response = await self.http.request(method, url, **kw)
            except httpx.HTTPError as exc:
                if attempt == tries:
                    raise BackendConnectionError(
                        f"batch API {method} {url}: {type(exc).__name__}: {self._redact(str(exc))}",
                        backend=self.name,
                    ) from exc
            else:
                status = response.status_code
                if status < 400:
                    return response
                if (status < 500 and status not in (408, 429)) or attempt == tries:
                    raise self._status_error(method, url, response)
                retry_after = response.headers.get("retry-after")
                with contextlib.suppress(ValueError, TypeError):
                    delay = max(delay, min(float(retry_after or 0), 60.0))
            await anyio.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")  # pragma: no cover

    def _status_error(self, method: str, url: str, response: httpx.Response) -> HTTPStatusError:
        try:
            data = response.json()
            err = data.get("error") or {}
            message = err.get("message") or str(data)[:300]
        except (ValueError, AttributeError):
            message = response.text[:300]
        text = self._redact(f"batch API {method} {url}: HTTP {response.status_code}: {message}")
        if response.status_code == 401:
            text += "; check the backend's API key"
        if response.status_code == 429:
            return RateLimitError(text, backend=self.name)
        return HTTPStatusError(text, backend=self.name, status_code=response.status_code)

    async def json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        response = await self.call(method, path, **kw)
        try:
            data = response.json()
        except ValueError as exc:
            raise MalformedResponseError(
                f"batch API {method} {path}: not JSON", backend=self.name
            ) from exc
        if not isinstance(data, dict):
            raise MalformedResponseError(
                f"batch API {method} {path}: not an object", backend=self.name
            )
        return data

    # provider-specific
    def custom_ids(self, chunk: int, keys: Sequence[str], job_id: str) -> list[str]:
        raise NotImplementedError

    def line(self, custom_id: str, body: Mapping[str, Any]) -> bytes:
        raise NotImplementedError

    async def upload(self, data: bytes, filename: str) -> str | None:
        return None

    async def create(self, chunk: _Chunk, lines: list[bytes], job_id: str) -> str:
        raise NotImplementedError

    async def find(self, chunk: _Chunk, job_id: str, known: set[str]) -> str | None:
        raise NotImplementedError

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def ended(self, batch: Mapping[str, Any]) -> bool:
        raise NotImplementedError

    async def cancel(self, batch_id: str) -> None:
        raise NotImplementedError

    def results(self, batch: Mapping[str, Any]) -> AsyncIterator[_Outcome]:
        raise NotImplementedError

    @staticmethod
    def usage(body: Mapping[str, Any]) -> tuple[Usage, float | None]:
        """The answer's token counts, and its cost when the provider reports one."""
        raise NotImplementedError

    @staticmethod
    def text(body: Mapping[str, Any]) -> str:
        raise NotImplementedError


async def _jsonl(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    for line in response.text.splitlines():
        if line.strip():
            item = json.loads(line)
            if isinstance(item, dict):
                yield item


class _OpenAIBatches(_BatchClient):
    provider = "openai"

    def custom_ids(self, chunk: int, keys: Sequence[str], job_id: str) -> list[str]:
        return list(keys)  # the row key itself

    def line(self, custom_id: str, body: Mapping[str, Any]) -> bytes:
        item = {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }
        return (json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    async def upload(self, data: bytes, filename: str) -> str | None:
        out = await self.json(
            "POST",
            "/files",
            data={"purpose": "batch"},
            files={"file": (filename, data, "application/jsonl")},
        )
        return str(out["id"])

    @staticmethod
    def metadata(chunk: _Chunk, job_id: str) -> dict[str, str]:
        return {"genfan_job": job_id, "genfan_chunk": str(chunk.index)}

    async def create(self, chunk: _Chunk, lines: list[bytes], job_id: str) -> str:
        out = await self.json(
            "POST",
            "/batches",
            attempts=1,  # a create is retried by the caller, after looking for it
            json={
                "input_file_id": chunk.input_file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": self.metadata(chunk, job_id),
            },
        )
        return str(out["id"])

    async def find(self, chunk: _Chunk, job_id: str, known: set[str]) -> str | None:
        want = self.metadata(chunk, job_id)
        after: str | None = None
        for _ in range(100):  # pages of 100, newest first: far more than a job's batches
            params = {"limit": "100", **({"after": after} if after else {})}
            page = await self.json("GET", "/batches", params=params)
            for b in page.get("data") or ():
                meta = b.get("metadata") or {}
                if all(meta.get(k) == v for k, v in want.items()):
                    return str(b["id"])
                if float(b.get("created_at") or 0) < chunk.intent_at - 600:
                    return None  # older than the intent: it cannot be there
            if not page.get("has_more") or not page.get("data"):
                return None
            after = str(page["data"][-1]["id"])
        return None

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self.json("GET", f"/batches/{batch_id}")

    def ended(self, batch: Mapping[str, Any]) -> bool:
        return batch.get("status") in ("completed", "failed", "expired", "cancelled")

    async def cancel(self, batch_id: str) -> None:
        try:
            await self.call("POST", f"/batches/{batch_id}/cancel")
        except HTTPStatusError as exc:
            if exc.status_code != 400:  # 400: it has ended already
                raise

    async def results(self, batch: Mapping[str, Any]) -> AsyncIterator[_Outcome]:
        for key in ("output_file_id", "error_file_id"):
            fid = batch.get(key)
            if not fid:
                continue
            response = await self.call("GET", f"/files/{fid}/content")
            async for item in _jsonl(response):
                cid = str(item.get("custom_id"))
                resp = item.get("response") or {}
                status = resp.get("status_code")
                if item.get("error") is None and status == 200:
                    yield _Outcome(cid, body=resp.get("body") or {})
                    continue
                err = item.get("error") or (resp.get("body") or {}).get("error") or {}
                yield _Outcome(cid, error=_error(err, status, self.name))
        if batch.get("status") == "failed":
            errors = (batch.get("errors") or {}).get("data") or []
            message = "; ".join(str(e.get("message")) for e in errors[:3]) or "the batch failed"
            yield _Outcome(
                "*", error={"type": "BatchFailedError", "message": message, "backend": self.name}
            )

    @staticmethod
    def usage(body: Mapping[str, Any]) -> tuple[Usage, float | None]:
        u = body.get("usage") or {}
        cost = u.get("cost")
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
        reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens")
        usage = Usage(
            input_tokens=int(u.get("prompt_tokens") or 0),
            output_tokens=int(u.get("completion_tokens") or 0),
            cache_read_tokens=int(cached or 0),
            reasoning_tokens=int(reasoning or 0),
        )
        return usage, float(cost) if isinstance(cost, int | float) else None

    @staticmethod
    def text(body: Mapping[str, Any]) -> str:
        content = body["choices"][0]["message"].get("content")
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or ""


class _AnthropicBatches(_BatchClient):
    provider = "anthropic"

    @staticmethod
    def tag(job_id: str, chunk: int) -> str:
        return f"g{job_id[:12]}c{chunk}"

    def custom_ids(self, chunk: int, keys: Sequence[str], job_id: str) -> list[str]:
        # Anthropic's custom ids are ^[a-zA-Z0-9_-]{1,64}$: the chunk's tag and a row number.
        tag = self.tag(job_id, chunk)
        return [f"{tag}-{n}" for n in range(len(keys))]

    def line(self, custom_id: str, body: Mapping[str, Any]) -> bytes:
        item = {"custom_id": custom_id, "params": body}
        return (json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    async def create(self, chunk: _Chunk, lines: list[bytes], job_id: str) -> str:
        payload = b'{"requests":[' + b",".join(line.rstrip(b"\n") for line in lines) + b"]}"
        out = await self.json(
            "POST",
            "/messages/batches",
            attempts=1,  # a create is retried by the caller, after looking for it
            content=payload,
            headers={"content-type": "application/json"},
        )
        return str(out["id"])

    async def find(self, chunk: _Chunk, job_id: str, known: set[str]) -> str | None:
        # No metadata: the batch created after the intent with this chunk's request count.
        found: list[str] = []
        after: str | None = None
        for _ in range(100):
            params = {"limit": "100", **({"after_id": after} if after else {})}
            page = await self.json("GET", "/messages/batches", params=params)
            data = page.get("data") or []
            for b in data:
                created = _epoch(b.get("created_at"))
                if created is not None and created < chunk.intent_at - 60:
                    break
                counts = b.get("request_counts") or {}
                if (
                    sum(int(v or 0) for v in counts.values()) == len(chunk.keys)
                    and b["id"] not in known
                ):
                    found.append(str(b["id"]))
            else:
                if page.get("has_more") and data:
                    after = str(page.get("last_id") or data[-1]["id"])
                    continue
            break
        if len(found) > 1:
            telemetry.event("batch_api_adopt_ambiguous", level="warning", candidates=len(found))
        return found[-1] if found else None  # the oldest after the intent

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self.json("GET", f"/messages/batches/{batch_id}")

    def ended(self, batch: Mapping[str, Any]) -> bool:
        return batch.get("processing_status") == "ended"

    async def cancel(self, batch_id: str) -> None:
        await self.call("POST", f"/messages/batches/{batch_id}/cancel")

    async def results(self, batch: Mapping[str, Any]) -> AsyncIterator[_Outcome]:
        url = batch.get("results_url") or f"{self.base_url}/messages/batches/{batch['id']}/results"
        response = await self.call("GET", str(url))
        async for item in _jsonl(response):
            cid = str(item.get("custom_id"))
            result = item.get("result") or {}
            kind = result.get("type")
            if kind == "succeeded":
                yield _Outcome(cid, body=result.get("message") or {})
            elif kind == "errored":
                outer = result.get("error")
                outer = outer if isinstance(outer, dict) else {}
                inner = outer.get("error")
                err = inner if isinstance(inner, dict) else outer
                yield _Outcome(cid, error=_error(err, None, self.name))
            else:
                name = "BatchCancelledError" if kind == "canceled" else "BatchExpiredError"
                message = f"the batch {kind} before this request ran"
                yield _Outcome(cid, error={"type": name, "message": message, "backend": self.name})

    @staticmethod
    def usage(body: Mapping[str, Any]) -> tuple[Usage, float | None]:
        u = body.get("usage") or {}
        read = int(u.get("cache_read_input_tokens") or 0)
        write = int(u.get("cache_creation_input_tokens") or 0)
        usage = Usage(
            input_tokens=int(u.get("input_tokens") or 0) + read + write,  # as OpenAI counts
            output_tokens=int(u.get("output_tokens") or 0),
            cache_read_tokens=read,
            cache_write_tokens=write,
        )
        return usage, None

    @staticmethod
    def text(body: Mapping[str, Any]) -> str:
        return "".join(
            b.get("text", "") for b in body.get("content") or () if b.get("type") == "text"
        )


def _epoch(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _unfinished(record: Record) -> bool:
    """Whether a record is a row its cancelled or expired batch never ran."""
    kind = (record.get("error") or {}).get("type")
    return kind in ("BatchCancelledError", "BatchExpiredError", "BatchMissingResultError")


def _error(err: Mapping[str, Any], status: int | None, backend: str) -> dict[str, Any]:
    code = err.get("code")
    if code == "batch_expired":
        kind = "BatchExpiredError"
    elif code == "batch_cancelled":
        kind = "BatchCancelledError"
    elif status == 429 or err.get("type") in ("rate_limit_error", "rate_limit_exceeded"):
        kind = "RateLimitError"
    else:
        kind = "HTTPStatusError"
    out: dict[str, Any] = {
        "type": kind,
        "message": str(err.get("message") or err.get("type") or "failed in the batch"),
        "backend": backend,
    }
    if status is not None:
        out["status_code"] = status
    return out


# -- resolving the job -------------------------------------------------------------------------


@dataclass
class _Resolved:
    config: GenfanConfig
    name: str
    target: Target  # the unguarded backend with the table's request overrides


def _resolve_backend(job: JobSpec, settings: BatchAPISettings) -> _Resolved:
    from .._backend import build_backend
    from .._config import load_config
    from .._fanout import Target

    if job.config is None:
        raise ConfigurationError(
            f"via={job.via!r} needs config= (a TOML file naming the backend), not fanout=: "
            "the batch goes to one provider's endpoint, built from its [backends.NAME] table"
        )
    cfg = load_config(job.config)
    if settings.backend is not None:
        names = [settings.backend]
        if settings.backend not in cfg.backends:
            raise ConfigurationError(
                f"no backend named {settings.backend!r} in {job.config}; "
                f"defined: {sorted(cfg.backends)}"
            )
    else:
        names = list(cfg.selected_backends())
    if len(names) != 1:
        raise ConfigurationError(
            f"via={job.via!r} sends the rows to one backend and {job.config} selects "
            f"{len(names)} ({', '.join(names) or 'none'}); name one with --backend NAME "
            "(batch_api=BatchAPISettings(backend=...))"
        )
    name = names[0]
    table = cfg.backends[name]
    if table.type in ("pool", "fallback"):
        raise ConfigurationError(
            f"backend {name!r} is a {table.type}; via={job.via!r} needs a provider's backend"
        )
    backend = build_backend(f"{table.type}:{table.model or ''}", **table.constructor_options(name))
    target = Target(
        backend=backend,
        name=name,
        temperature=table.temperature,
        system=table.system,
        max_tokens=table.max_tokens,
        overrides={"top_p": table.top_p} if table.top_p is not None else {},
    )
    return _Resolved(cfg, name, target)


def _client_for(resolved: _Resolved, settings: BatchAPISettings) -> _BatchClient:
    backend = resolved.target.backend
    provider = getattr(backend, "provider", None)
    if provider == "openai":
        return _OpenAIBatches(backend, settings)
    if provider == "anthropic":
        return _AnthropicBatches(backend, settings)
    raise ConfigurationError(
        f"backend {resolved.name!r} ({type(backend).__name__}) has no batch API; use an "
        "'openai' or 'anthropic' backend, via='offline' (every row at once: the local engine's "
        "batching) or via='realtime'"
    )


def _is_local_engine(resolved: _Resolved) -> bool:
    return resolved.config.backends[resolved.name].type == "vllm"


# -- running -----------------------------------------------------------------------------------


@dataclass
class _Tally:
    ok: int = 0
    failed: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None

    def add(self, record: Record) -> None:
        if record["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
            self.failures[str(record.get("error", {}).get("type", "Error"))] += 1
        usage = record.get("usage") or {}
        self.input_tokens += int(usage.get("input_tokens") or 0)
        self.output_tokens += int(usage.get("output_tokens") or 0)
        if usage.get("cost") is not None:
            self.cost = (self.cost or 0.0) + float(usage["cost"])


class _Run:
    """One ``via="batch-api"`` run of a job (``mode``: ``all``, ``submit`` or ``collect``)."""

    def __init__(
        self,
        job: JobSpec,
        settings: BatchAPISettings,
        resolved: _Resolved,
        client: _BatchClient,
        output: OutputFile,
        state: _State,
        *,
        template: str | None,
        system: str | None,
    ) -> None:
        self.job = job
        self.settings = settings
        self.resolved = resolved
        self.client = client
        self.output = output
        self.state = state
        self.tally = _Tally()
        self.created = 0
        self.adopted = 0
        self.rows: dict[str, JobRow] = {}
        self.template = template
        self.system = system

    # -- building and submitting ---------------------------------------------------------------

    def body(self, row: JobRow) -> dict[str, Any]:
        request = build_request(row, template=self.template, system=self.system)
        request = self.resolved.target.prepare(request)
        build_body = getattr(self.resolved.target.backend, "build_body", None)
        if build_body is None:  # pragma: no cover - both providers have it
            raise ConfigurationError(f"backend {self.resolved.name!r} cannot build request bodies")
        body = build_body(request)
        assert isinstance(body, dict)
        return body

    def plan(self, todo: Iterable[str]) -> list[_Chunk]:
        """New chunks (intents) for the rows in ``todo``, under the per-batch limits."""
        provider = self.client.provider
        max_n, max_bytes = LIMITS[provider]
        max_n = min(max_n, self.settings.max_requests or max_n)
        max_bytes = min(max_bytes, self.settings.max_bytes or max_bytes)
        wanted = set(todo)
        chunks: list[_Chunk] = []
        keys: list[str] = []
        size = 0
        start = len(self.state.chunks)
        now = time.time()

        def close() -> None:
            nonlocal keys, size
            if keys:
                index = start + len(chunks)
                ids = self.client.custom_ids(index, keys, self.state.job_id)
                chunks.append(_Chunk(index=index, keys=keys, custom_ids=ids, intent_at=now))
            keys, size = [], 0

        for row in iter_rows(self.job.input):
            if row.key not in wanted:
                continue
            # The line's size with a custom id as long as any this provider uses.
            n = len(self.client.line(row.key + "x" * 24, self.body(row)))
            if n > max_bytes:
                raise ConfigurationError(
                    f"row {row.id!r} alone is {n} bytes, over the {max_bytes}-byte batch limit"
                )
            if keys and (len(keys) >= max_n or size + n > max_bytes):
                close()
            keys.append(row.key)
            size += n
        close()
        return chunks

    def lines(self, chunk: _Chunk) -> list[bytes]:
        want = dict(zip(chunk.keys, chunk.custom_ids, strict=True))
        out: list[bytes] = []
        for row in iter_rows(self.job.input):
            if row.key in want:
                out.append(self.client.line(want[row.key], self.body(row)))
        return out

    async def submit(self, chunk: _Chunk, *, resumed: bool) -> None:
        """Upload and create ``chunk``'s batch, or adopt the one an earlier run created."""
        state = self.state
        lines = self.lines(chunk)
        if chunk.state == "intent" and isinstance(self.client, _OpenAIBatches):
            name = f"genfan-{state.job_id}-{chunk.index}.jsonl"
            chunk.input_file_id = await self.client.upload(b"".join(lines), name)
            chunk.state = "uploaded"
            await anyio.to_thread.run_sync(state.save)
        if resumed:
            known = {c.batch_id for c in state.chunks if c.batch_id}
            found = await self.client.find(chunk, state.job_id, known)
            if found is not None:
                chunk.batch_id, chunk.state = found, "submitted"
                await anyio.to_thread.run_sync(state.save)
                self.adopted += 1
                telemetry.event("batch_api_adopted", level="info", batch=found, chunk=chunk.index)
                return
        # A fresh intent right before the create: on resume, only a batch created after it can
        # be this chunk's (Anthropic's adoption goes by creation time and request count).
        chunk.intent_at = time.time()
        await anyio.to_thread.run_sync(state.save)
        chunk.batch_id = await self.create(chunk, lines)
        chunk.state = "submitted"
        await anyio.to_thread.run_sync(state.save)
        telemetry.event(
            "batch_api_submitted", level="info", batch=chunk.batch_id, rows=len(chunk.keys)
        )

    async def create(self, chunk: _Chunk, lines: list[bytes]) -> str:
        """Create ``chunk``'s batch. A create that may have reached the provider (a broken
        connection, a 5xx, a 429) is never simply sent again: the batches are listed first, and
        one carrying the chunk's identity is adopted."""
        delay = 0.5
        for attempt in range(1, self.settings.attempts + 1):
            try:
                batch_id = await self.client.create(chunk, lines, self.state.job_id)
            except (BackendConnectionError, HTTPStatusError) as exc:
                if isinstance(exc, HTTPStatusError) and not exc.retryable:
                    raise
                known = {c.batch_id for c in self.state.chunks if c.batch_id}
                found = await self.client.find(chunk, self.state.job_id, known)
                if found is not None:
                    self.adopted += 1
                    telemetry.event("batch_api_adopted", level="info", batch=found)
                    return found
                if attempt == self.settings.attempts:
                    raise
                await anyio.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                self.created += 1
                return batch_id
        raise AssertionError("unreachable")  # pragma: no cover

    # -- collecting ----------------------------------------------------------------------------

    def cost(self, body: Mapping[str, Any], usage: Usage, reported: float | None) -> float | None:
        """A batch answer's price: the provider's reported cost, else half what the backend
        charges for the same tokens in real time (its ``price=``, or the price table's)."""
        if reported is not None:
            return reported
        from ..cost import backend_price

        backend = self.resolved.target.backend
        model = body.get("model") or getattr(backend, "model", None)
        request = ChatRequest.from_prompt("", model=model if isinstance(model, str) else None)
        price = backend_price(backend, request)
        return None if price is None else price.cost(usage) * BATCH_DISCOUNT

    def record(self, chunk: _Chunk, key: str, outcome: _Outcome | None) -> Record:
        row_id = json.loads(key)
        base: Record = {"id": row_id, "via": "batch-api", "batch_id": chunk.batch_id}
        if outcome is None:
            return {
                **base,
                "status": "failed",
                "error": {
                    "type": "BatchMissingResultError",
                    "message": "the batch ended without a result for this row",
                    "backend": self.resolved.name,
                },
            }
        if outcome.error is not None:
            return {**base, "status": "failed", "error": outcome.error}
        body = outcome.body or {}
        try:
            text = self.client.text(body)
            usage, reported = self.client.usage(body)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            return {
                **base,
                "status": "failed",
                "error": {
                    "type": "MalformedResponseError",
                    "message": f"unreadable batch answer: {exc!r}",
                    "backend": self.resolved.name,
                },
            }
        return {
            **base,
            "status": "ok",
            "text": text,
            "backend": self.resolved.name,
            "candidates": [
                {"backend": self.resolved.name, "status": "ok", "text": text, "latency": 0.0}
            ],
            "usage": {
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cost": self.cost(body, usage, reported),
            },
            "elapsed": 0.0,
        }

    async def collect(self, chunk: _Chunk, batch: Mapping[str, Any]) -> None:
        """Download ``chunk``'s results and errors; one record per row, then mark it collected."""
        by_id = dict(zip(chunk.custom_ids, chunk.keys, strict=True))
        outcomes: dict[str, _Outcome] = {}
        batch_error: _Outcome | None = None
        async for outcome in self.client.results(batch):
            if outcome.custom_id == "*":
                batch_error = outcome
            elif outcome.custom_id in by_id:  # others: not this chunk's (a wrong adoption)
                outcomes[by_id[outcome.custom_id]] = outcome
        records = [self.record(chunk, k, outcomes.get(k, batch_error)) for k in chunk.keys]
        if chunk.unfinished == "missing":  # the deadline's cancel: these go real-time
            records = [r for r in records if not _unfinished(r)]
        await anyio.to_thread.run_sync(self.output.append, records)
        for r in records:
            self.tally.add(r)
        chunk.state = "collected"
        await anyio.to_thread.run_sync(self.state.save)
        telemetry.event(
            "batch_api_collected",
            level="info",
            batch=chunk.batch_id,
            ok=sum(r["status"] == "ok" for r in records),
            failed=sum(r["status"] != "ok" for r in records),
        )

    async def poll(self, chunks: list[_Chunk], until: float | None, *, wait: bool) -> list[_Chunk]:
        """Poll until every chunk is collected (or ``until``, anyio's clock); the chunks left."""
        delay = self.settings.poll_initial
        pending = [c for c in chunks if c.state == "submitted"]
        while pending:
            still: list[_Chunk] = []
            for chunk in pending:
                assert chunk.batch_id is not None
                batch = await self.client.retrieve(chunk.batch_id)
                if self.client.ended(batch):
                    await self.collect(chunk, batch)
                else:
                    still.append(chunk)
            pending = still
            if not pending or not wait:
                break
            now = anyio.current_time()
            if until is not None and now >= until:
                break
            pause = delay if until is None else min(delay, until - now)
            await anyio.sleep(pause)
            delay = min(delay * self.settings.poll_multiplier, self.settings.poll_max)
        return pending


async def _open(job: JobSpec) -> tuple[OutputFile, list[str]]:
    keys = scan_input(job.input)
    output = OutputFile(job.output)
    output.open()
    return output, keys


def _select(keys: list[str], output: OutputFile, rerun: str) -> list[str]:
    wanted = {"missing": (None,), "failed": ("failed",), "missing+failed": (None, "failed")}[rerun]
    return [k for k in keys if output.status(k) in wanted]


async def run_batch_api(
    job: JobSpec,
    *,
    mode: Literal["all", "submit", "collect"],
    template: str | None,
    system: str | None,
    realtime: Realtime,
) -> BatchAPISummary:
    """Run ``job`` (its ``via``, ``deadline`` and ``batch_api`` resolved) through its provider's
    batch API, or ``offline`` (see the module docstring and ``run_via_batch_api``)."""
    settings = job.batch_api or BatchAPISettings()
    deadline = parse_deadline(job.deadline)
    t0 = time.perf_counter()
    started = anyio.current_time()
    until = None if deadline is None else started + deadline
    resolved = _resolve_backend(job, settings)
    backend = resolved.target.backend
    if job.via == "offline" or _is_local_engine(resolved):
        with contextlib.suppress(Exception):
            await backend.aclose()
        return await _run_offline(job, resolved, realtime)
    client = _client_for(resolved, settings)
    try:
        output, keys = await _open(job)
        spath = state_path(job.output)
        try:
            loaded = _State.load(spath)
            if loaded is not None and (
                loaded.provider != client.provider or loaded.backend != resolved.name
            ):
                raise ConfigurationError(
                    f"{spath} holds batches of backend {loaded.backend!r} ({loaded.provider}), "
                    f"not {resolved.name!r}: use that backend, or another output"
                )
            state = loaded or _State(spath, uuid.uuid4().hex[:16], client.provider, resolved.name)
            run = _Run(
                job, settings, resolved, client, output, state, template=template, system=system
            )
            already = {k for c in state.open_chunks() for k in c.keys}
            todo = [k for k in _select(keys, output, job.rerun) if k not in already]
            resumed = list(state.open_chunks())
            telemetry.event(
                "batch_api_started",
                level="info",
                rows=len(keys),
                todo=len(todo),
                open_batches=len(resumed),
                provider=client.provider,
                mode=mode,
            )
            if mode == "collect" and not state.chunks:
                raise ConfigurationError(
                    f"nothing to collect: no batch was submitted for {job.output} "
                    "(run the submit first)"
                )
            fresh: list[_Chunk] = []
            past_deadline = mode == "all" and deadline is not None and deadline <= 0
            if mode != "collect" and todo and not past_deadline:  # (past it: all real time)
                fresh = run.plan(todo)
                state.chunks.extend(fresh)
                await anyio.to_thread.run_sync(state.save)  # the intents, before any send
            if mode != "collect":
                for chunk in resumed + fresh:
                    if chunk.state in ("intent", "uploaded"):
                        await run.submit(chunk, resumed=chunk in resumed)
            pending: list[_Chunk] = []
            if mode != "submit":
                pending = await run.poll(state.open_chunks(), until, wait=mode == "all")
                if pending and mode == "all" and until is not None:
                    pending = await _cancel_and_collect(run, pending)
            else:
                pending = state.open_chunks()
            if job.compact:
                await anyio.to_thread.run_sync(output.compact, keys)
        finally:
            output.close()
    finally:
        with contextlib.suppress(Exception):
            await backend.aclose()
    late: JobSummary | None = None
    if mode == "all" and until is not None and any(_missing(job, keys)):
        config, name = resolved.config, resolved.name
        late = await realtime(lambda: config.build_fanout(backends=[name]), None)
    return _summary(job, keys, run, late, pending, time.perf_counter() - t0)


def _missing(job: JobSpec, keys: list[str]) -> list[str]:
    output = OutputFile(job.output)
    output.open()
    try:
        return [k for k in keys if output.status(k) is None]
    finally:
        output.close()


async def _cancel_and_collect(run: _Run, pending: list[_Chunk]) -> list[_Chunk]:
    """The deadline: cancel the open batches, collect what they finished (within
    ``cancel_wait``); batches that do not end in time are abandoned (their rows go real-time)."""
    for chunk in pending:
        assert chunk.batch_id is not None
        chunk.cancel_requested, chunk.unfinished = True, "missing"
    await anyio.to_thread.run_sync(run.state.save)  # before the cancels: "missing" is durable
    for chunk in pending:
        assert chunk.batch_id is not None
        await run.client.cancel(chunk.batch_id)
    left = await run.poll(pending, anyio.current_time() + run.settings.cancel_wait, wait=True)
    for chunk in left:
        chunk.state = "abandoned"
    if left:
        await anyio.to_thread.run_sync(run.state.save)
    telemetry.event("batch_api_deadline", level="info", cancelled=len(pending), abandoned=len(left))
    return []


async def _run_offline(job: JobSpec, resolved: _Resolved, realtime: Realtime) -> BatchAPISummary:
    """Every selected row at once to the unguarded backend (the local engine batches them)."""
    from .._backend import build_backend
    from .._fanout import FanOut

    config, name = resolved.config, resolved.name
    table = config.backends[name]
    target = resolved.target

    def factory() -> FanOut:
        backend = build_backend(
            f"{table.type}:{table.model or ''}", **table.constructor_options(name)
        )
        return FanOut([replace(target, backend=backend)], owns_backends=True)

    keys = scan_input(job.input)
    summary = await realtime(factory, max(1, len(keys)))
    return BatchAPISummary(**{**_fields(summary), "via": "offline"})


def _fields(summary: JobSummary) -> dict[str, Any]:
    return {f: getattr(summary, f) for f in JobSummary.__dataclass_fields__}


def _summary(
    job: JobSpec,
    keys: list[str],
    run: _Run,
    realtime: JobSummary | None,
    pending: list[_Chunk],
    wall: float,
) -> BatchAPISummary:
    output = OutputFile(job.output)
    output.open()
    try:
        statuses = Counter(output.status(k) for k in keys)
    finally:
        output.close()
    t = run.tally
    failures = Counter(t.failures)
    ok, failed, inp, out = t.ok, t.failed, t.input_tokens, t.output_tokens
    costs = [c for c in (t.cost, realtime.cost if realtime else None) if c is not None]
    if realtime is not None:
        ok += realtime.ok
        failed += realtime.failed
        failures.update(realtime.failures_by_type)
        inp += realtime.input_tokens
        out += realtime.output_tokens
    ran = ok + failed
    return BatchAPISummary(
        rows=len(keys),
        skipped=len(keys) - ran,
        ran=ran,
        ok=ok,
        failed=failed,
        failures_by_type=dict(failures),
        input_tokens=inp,
        output_tokens=out,
        cost=sum(costs) if costs else None,
        wall=wall,
        throughput=ran / wall if wall > 0 else 0.0,
        done_ok=statuses["ok"],
        done_failed=statuses["failed"],
        missing=statuses[None],
        output=job.output,
        via="batch-api",
        batches_created=run.created,
        batches_adopted=run.adopted,
        batches_pending=len(pending),
        batch_rows=t.ok + t.failed,
        batch_cost=t.cost,
        realtime_rows=realtime.ran if realtime else 0,
        realtime_cost=realtime.cost if realtime else None,
    )


# -- cancelling, and the scheduler's two halves -----------------------------------------------


async def cancel_batches(job: JobSpec) -> int:
    """Cancel every batch of ``job`` still open at its provider; the number cancelled.

    The next run collects what they finished; the rest is recorded as failed
    (``BatchCancelledError``), for ``rerun="failed"``.
    """
    settings = job.batch_api or BatchAPISettings()
    spath = state_path(job.output)
    state = _State.load(spath)
    if state is None:
        raise ConfigurationError(f"no batches to cancel: {spath} does not exist")
    resolved = _resolve_backend(job, replace(settings, backend=settings.backend or state.backend))
    client = _client_for(resolved, settings)
    n = 0
    try:
        for chunk in state.open_chunks():
            if chunk.batch_id is None:
                # Never submitted (or submitted by a killed run: adopt it to cancel it).
                found = await client.find(chunk, state.job_id, set())
                if found is None:
                    chunk.state = "abandoned"
                    continue
                chunk.batch_id, chunk.state = found, "submitted"
            await client.cancel(chunk.batch_id)
            chunk.cancel_requested = True
            n += 1
        state.save()
    finally:
        with contextlib.suppress(Exception):
            await resolved.target.backend.aclose()
    telemetry.event("batch_api_cancelled", level="info", batches=n)
    return n
