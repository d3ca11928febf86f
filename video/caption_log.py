"""The caption log: a JSONL file with exactly one record per video, safe against crashes.

Guarantees (what ``vtr caption`` builds its resume semantics on):

* **Atomic appends.** :class:`RecordWriter` writes each record as one ``os.write`` of a full line on an
  ``O_APPEND`` descriptor, then ``fsync``. A crash can leave at most one torn (newline-less) last line.
* **Torn tail repaired.** :func:`read_log` ignores a torn last line and reports its size; a malformed
  *complete* line is not something a crash produces, so it raises instead of silently dropping data.
* **Compaction by rename.** :func:`rewrite_log` writes the whole file to a temporary file in the same folder,
  ``fsync``s it and ``os.replace``s it over the log: a crash leaves either the old or the new file, never a
  mix. ``vtr caption`` compacts at the start of a run when the log has a torn tail, duplicate paths, or error
  records that ``--retry-errors`` is about to redo, so every video has at most one record when appending
  starts, and it only appends records of videos that have none.
* **One writer.** :class:`RecordWriter` holds an exclusive ``flock`` on ``<log>.lock`` (kept next to the
  log) for the whole run; a second run on the same log fails at once instead of duplicating work. The kernel
  drops the lock when the process dies, also on ``kill -9``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LogBusyError", "LogState", "RecordWriter", "encode_record", "read_log", "rewrite_log"]


class LogBusyError(ValueError):
    """Another process holds the log's lock (another ``vtr caption`` run writes the same file)."""


@dataclass
class LogState:
    """What :func:`read_log` found.

    Attributes:
        records: the last record of every path, in first-seen order.
        lines: complete lines read.
        duplicates: complete lines whose path already had a record (superseded by the later one).
        torn_bytes: size of a torn last line (0 when the file ends with a newline).
    """

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    lines: int = 0
    duplicates: int = 0
    torn_bytes: int = 0

    @property
    def needs_compaction(self) -> bool:
        return self.torn_bytes > 0 or self.duplicates > 0


def encode_record(record: dict[str, Any]) -> bytes:
    """One JSONL line (UTF-8, newline-terminated); NaN/inf are refused so every line is strict JSON."""
    if not isinstance(record.get("path"), str):
        raise ValueError(f"a caption record needs a 'path' string, got {record.get('path')!r}")
    text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))
    return (text + "\n").encode("utf-8")


def read_log(path: str | os.PathLike) -> LogState:
    """Read the records of a caption log (an absent or empty file has none).

    Raises:
        ValueError: a complete line that is not a JSON object with a ``path`` string (names the file and the
            line number): the file is not a caption log, or was edited by hand.
    """
    p = Path(path)
    state = LogState()
    if not p.exists():
        return state
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes after the last newline are a torn line from a crash
    state.torn_bytes = len(data) - end
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{p}:{number}: not a JSON line ({exc}); this file is not a vtr caption log or was edited — "
                "fix or remove that line, or write to another --out"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise ValueError(f"{p}:{number}: a caption record must be a JSON object with a 'path' string")
        state.lines += 1
        if record["path"] in state.records:
            state.duplicates += 1
            del state.records[record["path"]]  # keep the latest, at its latest position
        state.records[record["path"]] = record
    return state


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_log(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Replace the log with exactly ``records``, atomically (temporary file + ``fsync`` + ``os.replace``)."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for record in records:
                f.write(encode_record(record))
            f.flush()
            os.fsync(f.fileno())
        if p.exists():
            os.chmod(tmp, p.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RecordWriter:
    """Appends records to a caption log, one durable line per call; holds the log's lock until closed.

    Use as a context manager. Creating it takes the lock (:class:`LogBusyError` when another run holds it);
    :meth:`rewrite` compacts the log under that lock; :meth:`write` returns only once the line is on disk
    (``fsync``), so a written record survives ``kill -9`` and power loss.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_fd = _acquire_lock(self.path)
        self._fd = -1
        self.written = 0

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the log with ``records`` atomically (see :func:`rewrite_log`); later writes append to it."""
        self._close_log()
        rewrite_log(self.path, records)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line (one ``write`` call for the whole line) and ``fsync`` it."""
        if self._lock_fd < 0:
            raise ValueError(f"RecordWriter for {self.path} is closed")
        line = memoryview(encode_record(record))
        if self._fd < 0:
            # Opened on first use, so a rewrite before it never leaves us appending to the replaced file.
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        n = os.write(self._fd, line)
        while n < len(line):  # regular files take the whole line at once; loop only on a short write
            line = line[n:]
            n = os.write(self._fd, line)
        os.fsync(self._fd)
        self.written += 1

    def _close_log(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Close the log and release the lock (idempotent)."""
        self._close_log()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _acquire_lock(log: Path) -> int:
    """An exclusive, non-blocking ``flock`` on ``<log>.lock``; returns its descriptor."""
    lock_path = Path(f"{log}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, one run at a time is up to the user
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LogBusyError(
            f"another vtr caption run is writing {log} (it holds {lock_path}); "
            "wait for it to finish or write to another --out"
        ) from None
    return fd
