"""Batching: a micro-batcher for single calls, and resumable batch jobs over data sets.

* :class:`MicroBatcher` groups single submissions into batches (size or time), with backpressure,
  per-item error isolation and statistics; :class:`BatchingEmbedder` and
  :class:`BatchingBackend` use it for embeddings and batch-capable backends.
* :class:`BatchJob` / :func:`run_batch_job` fan every row of a JSONL file out, write results row
  by row, resume after a kill, and re-run failures; ``executor="ray"`` spreads rows over a Ray
  cluster.
"""

from ._embed import BatchCompleter as BatchCompleter
from ._embed import BatchingBackend as BatchingBackend
from ._embed import BatchingEmbedder as BatchingEmbedder
from ._embed import Embedder as Embedder
from ._micro import BatcherStatistics as BatcherStatistics
from ._micro import BatchHandler as BatchHandler
from ._micro import MicroBatcher as MicroBatcher
from ._micro import OnFull as OnFull

__all__ = [
    "BatchCompleter",
    "BatchHandler",
    "BatcherStatistics",
    "BatchingBackend",
    "BatchingEmbedder",
    "Embedder",
    "MicroBatcher",
    "OnFull",
]
