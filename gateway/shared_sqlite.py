"""An SQLite file that every worker of one gateway shares (``serve`` with ``workers`` > 1), or
the same database in one process's memory (``:memory:``).

The files live in the run's temporary folder and are made again at every start, so they are
written without fsync (WAL, ``synchronous = OFF``). Each change is one short ``BEGIN IMMEDIATE``
transaction: the workers take turns. A lock makes one connection safe for the event loop and
the threads the admin API reads in. An SQLite failure is a StoreError naming the file.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from arbitrage.errors import StoreError


class SharedSQLite:
    """One connection to a shared file; ``what`` names it in errors ("the workers' shared limits")."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._lock = threading.Lock()
        with self._errors():
            self.db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = OFF")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, rolled back if the block raises."""
        with self.reading() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextlib.contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, held by this thread alone for the block."""
        with self._lock, self._errors():
            yield self.db

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"{self.what} ({self.path}) failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self.db.close()
