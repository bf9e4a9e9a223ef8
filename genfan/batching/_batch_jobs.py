"""The batch API's public entry points besides ``run_batch_job``: one phase of a job (submit,
collect), the scheduler's two halves, and cancelling (see ``genfan.batching._batch_api``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from ._batch_api import cancel_batches
from ._batch_settings import BatchAPISettings
from ._job import BatchJob, resolve_via, run_via
from ._summary import BatchAPISummary

__all__ = ["cancel_batch_job", "collect_batch", "run_via_batch_api", "submit_batch"]


async def run_via_batch_api(
    job: BatchJob,
    *,
    mode: Literal["all", "submit", "collect"] = "all",
    progress: bool = False,
) -> BatchAPISummary:
    """Run ``job`` through its provider's batch API, whatever its ``via`` says.

    Args:
        job: the job; its ``deadline`` and ``batch_api`` apply (or the config's ``[batch]``).
        mode: ``all`` submits the missing rows, waits for the batches (up to the deadline,
            then real time) and collects them (``run_batch_job`` with ``via="batch-api"``);
            ``submit`` submits and returns; ``collect`` polls each batch once, writes the
            results of those that ended, and returns (``batches_pending``: the rest).
        progress: plain progress lines on stderr for the real-time part.

    Raises:
        ConfigurationError: the job cannot go through a batch API (a ``fanout=`` factory, several
            backends and none named, a backend with no batch API); ``collect`` with nothing
            submitted.
        BackendError: the batch API refused a call (``HTTPStatusError``, with the provider's
            message) or could not be reached (``BackendConnectionError``) after its retries.
    """
    if job.via in (None, "realtime"):
        job = resolve_via(job)
        if job.via == "realtime":
            from dataclasses import replace

            job = replace(job, via="batch-api")
    return await run_via(job, mode=mode, progress=progress)


async def cancel_batch_job(job: BatchJob) -> int:
    """Cancel every batch of ``job`` still open at its provider; the number cancelled.

    The next run collects what they finished; the rest is recorded as failed
    (``BatchCancelledError``), for ``rerun="failed"``.

    Raises:
        ConfigurationError: no batch was ever submitted for the job's output.
    """
    return await cancel_batches(resolve_via(job))


def _job_from(kwargs: Mapping[str, Any]) -> BatchJob:
    options = dict(kwargs)
    api = options.pop("batch_api", None)
    if isinstance(api, Mapping):
        options["batch_api"] = BatchAPISettings(**api)
    options.setdefault("via", "batch-api")
    return BatchJob(**options)


async def submit_batch(**job: Any) -> dict[str, Any]:
    """A scheduler job: submit the job's missing rows as batches and return (the summary, as a
    dict). ``job``: `BatchJob` fields, JSON-able (paths as strings, ``batch_api`` a table);
    see docs/batch-api.md for a nightly submit and a morning collect."""
    summary = await run_via_batch_api(_job_from(job), mode="submit")
    return summary.to_dict()


async def collect_batch(**job: Any) -> dict[str, Any]:
    """A scheduler job: poll the job's batches once, write the results of those that ended, and
    return the summary as a dict (``batches_pending``: still running, for a later fire)."""
    summary = await run_via_batch_api(_job_from(job), mode="collect")
    return summary.to_dict()
