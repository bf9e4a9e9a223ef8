"""The job's output file: JSON lines appended row by row, durable, resumable and compactable.

Every record is one line ``{"id": ..., "status": "ok" | "failed", ...}`` written with a single
``write`` of the whole line, then flushed and fsync'ed (records that finish together share one
fsync). A process killed at any moment leaves at worst a last line without its newline; it is
cut off on the next start and that row runs again. When a row was written more than once (a
failure, then a successful re-run), the **last** record of an id wins; at the end of a complete
run the file is compacted, atomically, to exactly one record per id in input order.

An output that cannot be written (a folder, a read-only or full file system, a missing or
forbidden location) raises `OutputError`, a ``GenfanError`` and an ``OSError`` at once,
whose one-line message names the file and the fix. A failed write leaves no torn line, and a
failed compaction no temporary file: the output stays as it was, and the same command resumes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._errors import ConfigurationError, GenfanError

__all__ = ["OutputError", "OutputFile", "Record", "read_results", "row_key"]


class OutputError(GenfanError, OSError):
    """The output file cannot be written; the message names the file and what to do."""


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def output_error(path: Path, exc: OSError, doing: str) -> OutputError:
    """One line for an ``OSError`` met while ``doing`` something to the output ``path``."""
    where = exc.filename if isinstance(exc.filename, str) else str(path)
    code = exc.errno
    if code in _FULL:
        why = (
            f"the disk holding {where} is full (or over quota): free some space and run the same "
            "command again; the rows already written are kept and skipped"
        )
    elif code == errno.EROFS:
        why = f"{where} is on a read-only file system: choose a writable location with -o"
    elif code in (errno.EACCES, errno.EPERM):
        why = (
            f"permission denied on {where}: choose a writable location with -o, or fix the "
            "permissions"
        )
    elif code == errno.EISDIR:
        why = f"{where} is a folder: name a file, e.g. -o {Path(where) / 'results.jsonl'}"
    elif code in (errno.ENOTDIR, errno.EEXIST):  # (EEXIST: a folder to create is a file)
        why = (
            f"a part of {where} is a file, not a folder: choose a location whose folders exist "
            "or can be created"
        )
    elif code == errno.ENOENT:
        why = f"{where} does not exist and cannot be created: choose an existing location"
    else:
        why = f"{exc.strerror or exc} ({where}): choose another location with -o"
    error = OutputError(f"cannot {doing} the output {path}: {why}")
    error.errno = code
    return error


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
        self._size = 0  # where the next record goes: the end of the last whole line

    # -- opening and scanning -----------------------------------------------------------------

    def open(self) -> None:
        """Lock the file, cut off a torn last line, index what is there, and open for appends.

        Raises:
            ConfigurationError: another process holds the file (a job is already writing it).
            OutputError: the output cannot be created or written (see `output_error`).
        """
        if self.path.is_dir():
            raise output_error(
                self.path, IsADirectoryError(errno.EISDIR, "is a folder", str(self.path)), "open"
            )
        if self.path.exists() and not self.path.is_file():
            raise OutputError(
                f"cannot open the output {self.path}: it is not a regular file (a device, a "
                "pipe or a socket); a job reads its output back to resume: name a file with -o"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            # A compaction killed or failed before its rename leaves its file: not needed.
            self._compact_path.unlink(missing_ok=True)
            self.path.touch(exist_ok=True)
            self._repair_tail()
            self._scan()
            self._fh = open(self.path, "ab", buffering=0)
        except OSError as exc:
            self.close()
            raise output_error(self.path, exc, "open") from None
        except BaseException:
            self.close()
            raise

    @property
    def _compact_path(self) -> Path:
        return self.path.with_name(self.path.name + ".compact")

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
        self.entries = {}
        self.records_seen = 0
        self.skipped_lines = 0
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
        self._size = offset

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
        """Append ``records`` durably: one write, one fsync (blocking I/O).

        Raises:
            OutputError: the write failed (a full disk...); what it wrote of the records is cut
                off again, so the file ends with a whole line and those rows run next time.
        """
        if not records:
            return
        if self._fh is None:
            raise ConfigurationError(f"{self.path} is not open")
        lines = [_dumps(r) for r in records]
        offset = self._size
        fd = self._fh.fileno()
        try:
            _write_all(fd, b"".join(lines))
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):  # leave no torn line behind
                os.ftruncate(fd, offset)
            raise output_error(self.path, exc, "write") from None
        self._size = offset + sum(len(line) for line in lines)
        for record, line in zip(records, lines, strict=True):
            self.entries[row_key(record["id"])] = _Entry(offset, len(line), record["status"])
            self.records_seen += 1
            offset += len(line)

    def compact(self, order: Iterable[str]) -> None:
        """Rewrite the file with the last record of each id, ids in ``order`` first.

        Atomic: a new file is written, fsync'ed and renamed over the old one, so a kill during
        compaction leaves either the old file (still valid, last record wins) or the new one.
        A compaction that fails (a full disk) removes its temporary file and raises
        `OutputError`; the output is left as it was (valid, only not compacted).
        """
        if self._fh is None:
            raise ConfigurationError(f"{self.path} is not open")
        keys = list(dict.fromkeys(k for k in order if k in self.entries))
        listed = set(keys)
        keys += [k for k in self.entries if k not in listed]
        tmp = self._compact_path
        new_entries: dict[str, _Entry] = {}
        try:
            with open(self.path, "rb") as src, open(tmp, "wb", buffering=0) as dst:
                offset = 0
                out: list[bytes] = []
                pending = 0
                for k in keys:
                    entry = self.entries[k]
                    src.seek(entry.offset)
                    line = src.read(entry.length)
                    out.append(line)
                    pending += len(line)
                    new_entries[k] = _Entry(offset, entry.length, entry.status)
                    offset += entry.length
                    if pending >= 1 << 20:
                        _write_all(dst.fileno(), b"".join(out))
                        out, pending = [], 0
                _write_all(dst.fileno(), b"".join(out))
                os.fsync(dst.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise output_error(self.path, exc, "compact") from None
            raise
        self._fh.close()
        _fsync_dir(self.path.parent)
        self.entries = new_entries
        self.records_seen = len(new_entries)
        self._size = offset
        self._fh = open(self.path, "ab", buffering=0)

    def close(self) -> None:
        """Close the file and release the lock."""
        fh, self._fh = self._fh, None
        lock, self._lock_fh = self._lock_fh, None
        for f in (fh, lock):
            if f is not None:
                with contextlib.suppress(OSError):  # nothing is buffered: writes are unbuffered
                    f.close()


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


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
