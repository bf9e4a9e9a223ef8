"""The job's output file: JSON lines appended row by row, durable, resumable and compactable.

Every record is one line ``{"id": ..., "status": "ok" | "failed", ...}`` written with a single
``write`` of the whole line, then flushed and fsync'ed (records that finish together share one
fsync). A process killed at any moment leaves at worst a last line without its newline; it is
cut off on the next start and that row runs again. When a row was written more than once (a
failure, then a successful re-run), the **last** record of an id wins; at the end of a complete
run the file is compacted, atomically, to exactly one record per id in input order.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._errors import ConfigurationError

__all__ = ["OutputFile", "Record", "read_results", "row_key"]

#: One output record, as written (a JSON object).
Record = dict[str, Any]


def row_key(row_id: object) -> str:
    """The canonical key of a row id (``1`` and ``"1"`` are different ids)."""
    return json.dumps(row_id)


@dataclass(frozen=True, slots=True)
class _Entry:
    offset: int
    length: int
    status: str


class OutputFile:
    """An append-only JSONL output with last-record-wins semantics.

    Args:
        path: the output file (created when missing).

    Attributes:
        entries: for every id key, where its last record lies and its status.
        repaired: bytes of a torn last line that were cut off when the file was opened.
        skipped_lines: unreadable complete lines (ignored; those rows count as not done).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.entries: dict[str, _Entry] = {}
        self.records_seen = 0
        self.repaired = 0
        self.skipped_lines = 0
        self._fh: IO[bytes] | None = None
        self._lock_fh: IO[bytes] | None = None

    # -- opening and scanning -----------------------------------------------------------------

    def open(self) -> None:
        """Lock the file, cut off a torn last line, index what is there, and open for appends.

        Raises:
            ConfigurationError: another process holds the file (a job is already writing it).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.path.touch(exist_ok=True)
        self._repair_tail()
        self._scan()
        self._fh = open(self.path, "ab")

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        fh = open(lock_path, "ab")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ConfigurationError(
                f"{self.path} is being written by another job (lock {lock_path} is held); "
                "wait for it or use another output path"
            ) from None
        self._lock_fh = fh

    def _repair_tail(self) -> None:
        size = self.path.stat().st_size
        if size == 0:
            return
        with open(self.path, "r+b") as fh:
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return
            # A torn last line: find the previous newline and cut there.
            pos = size
            block = 4096
            cut = 0
            while pos > 0:
                start = max(0, pos - block)
                fh.seek(start)
                chunk = fh.read(pos - start)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    cut = start + i + 1
                    break
                pos = start
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())
            self.repaired = size - cut

    def _scan(self) -> None:
        offset = 0
        with open(self.path, "rb") as fh:
            for line in fh:
                length = len(line)
                try:
                    record = json.loads(line)
                    key = row_key(record["id"])
                    status = str(record.get("status", "ok"))
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1
                else:
                    self.entries[key] = _Entry(offset, length, status)
                    self.records_seen += 1
                offset += length

    # -- what is done --------------------------------------------------------------------------

    def status(self, key: str) -> str | None:
        """``"ok"``, ``"failed"`` or ``None`` (no record) for the row with id key ``key``."""
        entry = self.entries.get(key)
        return None if entry is None else entry.status

    @property
    def duplicates(self) -> int:
        """Records that a later record of the same id superseded."""
        return self.records_seen - len(self.entries)

    # -- writing -------------------------------------------------------------------------------

    def append(self, records: Sequence[Record]) -> None:
        """Append ``records`` durably: one write, one flush, one fsync (blocking I/O)."""
        if not records:
            return
        if self._fh is None:
            raise ConfigurationError(f"{self.path} is not open")
        lines = [_dumps(r) for r in records]
        offset = self._fh.tell()
        self._fh.write(b"".join(lines))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for record, line in zip(records, lines, strict=True):
            self.entries[row_key(record["id"])] = _Entry(offset, len(line), record["status"])
            self.records_seen += 1
            offset += len(line)

    def compact(self, order: Iterable[str]) -> None:
        """Rewrite the file with the last record of each id, ids in ``order`` first.

        Atomic: a new file is written, fsync'ed and renamed over the old one, so a kill during
        compaction leaves either the old file (still valid, last record wins) or the new one.
        """
        if self._fh is None:
            raise ConfigurationError(f"{self.path} is not open")
        self._fh.flush()
        keys = list(dict.fromkeys(k for k in order if k in self.entries))
        listed = set(keys)
        keys += [k for k in self.entries if k not in listed]
        tmp = self.path.with_name(self.path.name + ".compact")
        new_entries: dict[str, _Entry] = {}
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            offset = 0
            for k in keys:
                entry = self.entries[k]
                src.seek(entry.offset)
                line = src.read(entry.length)
                dst.write(line)
                new_entries[k] = _Entry(offset, entry.length, entry.status)
                offset += entry.length
            dst.flush()
            os.fsync(dst.fileno())
        self._fh.close()
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self.entries = new_entries
        self.records_seen = len(new_entries)
        self._fh = open(self.path, "ab")

    def close(self) -> None:
        """Close the file and release the lock."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None


def _dumps(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_results(path: str | os.PathLike[str]) -> dict[object, Record]:
    """The output of a batch job as ``{row id: its last record}`` (torn last line ignored)."""
    out: dict[str, Record] = {}
    for record in _iter_records(Path(path)):
        out[row_key(record["id"])] = record
    return {record["id"]: record for record in out.values()}


def _iter_records(path: Path) -> Iterator[Record]:
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                return
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "id" in record:
                yield record
