"""The Ray executor: the same batch job, its rows spread over the actors of a Ray cluster.

Each actor builds its own fan-out (its own backends, connections and guards) once, and runs the
chunks of rows it is given with genfan's async fan-out, ``max_in_flight`` rows at a time. The
driver streams finished chunks back with ``ray.wait`` and writes them to the same resumable
output as the local executor, so a killed driver resumes exactly like a local job.

It knows a job only by its `ResolvedJob` (the job module imports
this one, never the other way round). Ray is imported here only, on first use
(``pip install 'genfan[ray]'``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import anyio

from .._errors import MissingExtraError
from .._fanout import FanOut
from ._output import Record
from ._rows import Emit, JobRow, ResolvedJob, RowRunner, failure_record, make_fanout, process_row

__all__ = ["BatchWorker", "prepare_ray"]

#: chunks queued per actor (one running, one ready), so actors never wait for the driver.
_CHUNKS_PER_ACTOR = 2


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtraError("ray", "ray", reason="needed for executor='ray'") from None
    return ray


class BatchWorker:
    """A Ray actor's state: one fan-out per actor, reused for every chunk it runs."""

    def __init__(self, settings: ResolvedJob) -> None:
        self.settings = settings
        self._fan: FanOut | None = None
        self._ready: anyio.Event | None = None
        self._slots: anyio.Semaphore | None = None

    async def _fanout(self) -> FanOut:
        if self._ready is None:
            self._ready = anyio.Event()
            self._slots = anyio.Semaphore(self.settings.max_in_flight)
            try:
                self._fan = await make_fanout(self.settings)
            finally:
                self._ready.set()
        else:
            await self._ready.wait()
        if self._fan is None:
            self._ready = None  # the factory failed: let the next chunk try again
            return await self._fanout()
        return self._fan

    async def run_chunk(self, rows: list[JobRow]) -> list[Record]:
        """Fan every row of the chunk out; one record per row, in the chunk's order."""
        fan = await self._fanout()
        assert self._slots is not None
        slots = self._slots
        records: list[Record | None] = [None] * len(rows)

        async def one(i: int, row: JobRow) -> None:
            async with slots:
                records[i] = await process_row(
                    fan, row, template=self.settings.template, system=self.settings.system
                )

        async with anyio.create_task_group() as tg:
            for i, row in enumerate(rows):
                tg.start_soon(one, i, row)
        return [r for r in records if r is not None]

    async def close(self) -> None:
        if self._fan is not None:
            await self._fan.aclose()


def _chunks(rows: Iterator[JobRow], size: int) -> Iterator[list[JobRow]]:
    chunk: list[JobRow] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def prepare_ray(
    settings: ResolvedJob, *, address: str | None, workers: int | None, chunk_size: int
) -> RowRunner:
    """Join (or start) the Ray cluster; the runner spreads rows over its actors.

    Args:
        settings: the job's settings, sent to every actor (each builds its own fan-out).
        address: the cluster to join (``None``: the running one, or a new local one).
        workers: actors to start (``None``: one per CPU of the cluster).
        chunk_size: rows per Ray task.

    Raises:
        MissingExtraError: Ray is not installed.
    """
    ray = _import_ray()
    if not ray.is_initialized():
        await anyio.to_thread.run_sync(
            lambda: ray.init(address=address, include_dashboard=False, log_to_driver=False)
        )

    async def run(rows: Iterator[JobRow], emit: Emit) -> None:
        await _run_on_ray(ray, settings, rows, emit, workers=workers, chunk_size=chunk_size)

    return run


async def _run_on_ray(
    ray: Any,
    settings: ResolvedJob,
    rows: Iterator[JobRow],
    emit: Emit,
    *,
    workers: int | None,
    chunk_size: int,
) -> None:
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    actor_cls = ray.remote(num_cpus=0.5)(BatchWorker)
    actors = [actor_cls.remote(settings) for _ in range(workers)]
    load = [0] * workers
    in_flight: dict[Any, tuple[int, list[JobRow]]] = {}
    chunks = _chunks(rows, chunk_size)
    exhausted = False
    try:
        while True:
            while not exhausted and min(load) < _CHUNKS_PER_ACTOR:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                i = load.index(min(load))
                in_flight[actors[i].run_chunk.remote(chunk)] = (i, chunk)
                load[i] += 1
            if not in_flight:
                break
            refs = list(in_flight)
            ready, _ = await anyio.to_thread.run_sync(
                functools.partial(ray.wait, refs, num_returns=1)
            )
            for ref in ready:
                i, chunk = in_flight.pop(ref)
                load[i] -= 1
                try:
                    records: list[Record] = await anyio.to_thread.run_sync(ray.get, ref)
                except Exception as exc:  # the actor died or the chunk could not run
                    records = [failure_record(row, exc, 0.0) for row in chunk]
                for record in records:
                    await emit(record)
    finally:
        with anyio.CancelScope(shield=True):
            for ref in in_flight:
                ray.cancel(ref)
            closing = [a.close.remote() for a in actors]
            with anyio.move_on_after(10):
                await anyio.to_thread.run_sync(
                    lambda: ray.wait(closing, num_returns=len(closing), timeout=10)
                )
            for a in actors:
                ray.kill(a)
