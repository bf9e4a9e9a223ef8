"""Batching: a micro-batcher for single calls, and resumable batch jobs over data sets.

* [`MicroBatcher`][genfan.batching.MicroBatcher] groups single submissions into batches (size, time, or a preferred
  size at once), takes higher priorities first, with backpressure, load shedding (a full queue,
  a queue timeout), per-item error isolation and statistics; [`BatchingEmbedder`][genfan.batching.BatchingEmbedder] and [`BatchingBackend`][genfan.batching.BatchingBackend] use it for embeddings and
  batch-capable backends.
* [`BatchJob`][genfan.batching.BatchJob] / [`run_batch_job`][genfan.batching.run_batch_job] fan every row of a JSONL file out, write results row
  by row, resume after a kill, and re-run failures; ``executor="ray"`` spreads rows over a Ray
  cluster. ``on_progress=`` receives a [`JobProgress`][genfan.batching.JobProgress] after every row (the library draws
  nothing; ``genfan batch run`` draws a progress bar from it).
* ``via="batch-api"`` sends the rows through OpenAI's or Anthropic's batch endpoint (half the
  price), resumable without paying twice, with a ``deadline`` past which rows go real-time
  ([`BatchAPISettings`][genfan.batching.BatchAPISettings], [`submit_batch`][genfan.batching.submit_batch] /
  [`collect_batch`][genfan.batching.collect_batch] for the scheduler, [`cancel_batch_job`][genfan.batching.cancel_batch_job]);
  ``via="offline"`` sends every row at once to the local engine.
"""

from typing import TYPE_CHECKING

from genfan._facade import lazy

if TYPE_CHECKING:
    from ._batch_jobs import cancel_batch_job as cancel_batch_job
    from ._batch_jobs import collect_batch as collect_batch
    from ._batch_jobs import run_via_batch_api as run_via_batch_api
    from ._batch_jobs import submit_batch as submit_batch
    from ._batch_settings import BatchAPISettings as BatchAPISettings
    from ._batch_settings import Via as Via
    from ._embed import BatchCompleter as BatchCompleter
    from ._embed import BatchingBackend as BatchingBackend
    from ._embed import BatchingEmbedder as BatchingEmbedder
    from ._embed import Embedder as Embedder
    from ._embed import split_unless_outage as split_unless_outage
    from ._job import BatchJob as BatchJob
    from ._job import Executor as Executor
    from ._job import Rerun as Rerun
    from ._job import run_batch_job as run_batch_job
    from ._micro import BatcherStatistics as BatcherStatistics
    from ._micro import BatchHandler as BatchHandler
    from ._micro import MicroBatcher as MicroBatcher
    from ._micro import OnFull as OnFull
    from ._output import OutputError as OutputError
    from ._output import read_results as read_results
    from ._progress import JobProgress as JobProgress
    from ._rows import FanOutFactory as FanOutFactory
    from ._summary import BatchAPISummary as BatchAPISummary
    from ._summary import JobSummary as JobSummary

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
