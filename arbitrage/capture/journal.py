"""The cheap, durable half of capture: append-only JSON-lines journal segments.

Each writer (one per process) appends one line per record to its own segment
with a single ``write(2)``, so a record is in the OS as soon as ``append``
returns and survives ``kill -9``. A segment is *active* while its writer holds
an exclusive ``flock`` on it; it is *sealed* once the writer moves on, and only
sealed segments are compacted into Parquet (``compactor.py``). A segment is
created under a temporary name and renamed to ``*.jsonl`` only once locked, so
a compactor never mistakes a new segment for a sealed one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import orjson

from arbitrage.config import CaptureSettings
from arbitrage.errors import StoreError

JOURNAL_DIR = "journal"
SEGMENT_SUFFIX = ".jsonl"


class Journal:
    """Appends records of one table to this process's active segment."""

    def __init__(self, table_dir: Path, settings: CaptureSettings) -> None:
        self.dir = table_dir / JOURNAL_DIR
        self.settings = settings
        self._lock = threading.Lock()
        self._fd = -1
        self._path: Path | None = None
        self._records = 0
        self._size = 0
        self._opened_at = 0.0
        self._dirty = False

    @property
    def active_records(self) -> int:
        """Records in the active segment (not yet sealed)."""
        return self._records

    def open(self) -> None:
        """Start a new active segment."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._open_segment()

    def append(self, record: dict) -> None:
        """Write one record; it is safe from a process crash when this returns."""
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)
        with self._lock:
            self._write(line)
            self._records += 1
            self._dirty = True
            if self.settings.fsync == "always":
                os.fsync(self._fd)
            if self._records >= self.settings.segment_max_records:
                self._rotate()

    def _write(self, line: bytes) -> None:
        """Append the whole line or nothing: on a full disk ``write`` can store part of it, and
        the next record would then be glued to that part and lost with it."""
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            written, error = 0, exc.strerror
        else:
            error = f"short write ({written} of {len(line)} bytes)"
        if written == len(line):
            self._size += written
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)
        raise StoreError(f"cannot append to {self._path}: {error}")

    def tick(self) -> None:
        """Periodic upkeep (run off the event loop): flush to disk if asked, seal an old segment."""
        with self._lock:
            if self._fd < 0:
                return
            if self._records and time.monotonic() - self._opened_at >= self.settings.segment_max_age_s:
                self._rotate()
            flush = self._dirty and self.settings.fsync == "interval"
            fd, self._dirty = (os.dup(self._fd) if flush else -1), False
        if fd >= 0:  # fsync outside the lock, so appends never wait for the disk
            os.fsync(fd)
            os.close(fd)

    def close(self) -> None:
        """Seal the active segment (an empty one is removed)."""
        with self._lock:
            self._seal()

    def _rotate(self) -> None:
        old_fd, old_path, old_records = self._fd, self._path, self._records
        self._open_segment()
        self._release(old_fd, old_path, old_records)

    def _open_segment(self) -> None:
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp = self.dir / f".{name}.new"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._path = self.dir / f"{name}{SEGMENT_SUFFIX}"
        os.rename(temp, self._path)
        self._fd, self._records, self._size, self._opened_at, self._dirty = fd, 0, 0, time.monotonic(), False

    def _seal(self) -> None:
        if self._fd >= 0:
            self._release(self._fd, self._path, self._records)
            self._fd, self._path = -1, None

    def _release(self, fd: int, path: Path | None, records: int) -> None:
        if self.settings.fsync != "never" and records:
            os.fsync(fd)
        if not records and path is not None:
            path.unlink(missing_ok=True)
        os.close(fd)
