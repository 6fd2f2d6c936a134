"""The capture store of one data directory: journals, background compaction, DuckDB views.

Layout::

    <data_dir>/schema.json                 applied migrations
    <data_dir>/<table>/journal/*.jsonl     records not yet compacted (one writer per process)
    <data_dir>/<table>/parquet/*.parquet   compacted records
    s3://<bucket>/<prefix>/<table>/parquet/*.parquet
                                           the same, when gateway.data_dir is an s3:// URL
                                           (``<data_dir>/parquet_location.json`` then says so)

The DuckDB view of a table reads both, so a record is queryable the moment it
is written. Several processes (gateway workers) may share one data folder: each
writes its own journal segments, and one of them at a time runs the background
compaction (the holder of ``<data_dir>/.compaction.lock``; another takes over
when it exits).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

import duckdb
import pyarrow as pa
import stamina

from arbitrage.capture import migrations
from arbitrage.capture.compactor import CompactionResult, compact
from arbitrage.capture.redaction import redactor_for
from arbitrage.capture.journal import JOURNAL_DIR, SEGMENT_SUFFIX, Journal
from arbitrage.capture.location import (LocalParquet, ParquetLocation, S3Parquet, forget_location,
                                        recorded_location)
from arbitrage.config import CaptureSettings
from arbitrage.errors import StoreError

T = TypeVar("T")

log = logging.getLogger(__name__)

RUNNER_LOCK = ".compaction.lock"


class CaptureStore:
    """Writes records durably and compacts them in the background."""

    def __init__(self, data_dir: Path, settings: CaptureSettings | None = None, parquet_url: str | None = None) -> None:
        """``parquet_url``: an ``s3://bucket/prefix`` for the Parquet files; None keeps them under data_dir."""
        self.data_dir = data_dir
        self.settings = settings or CaptureSettings()
        self.redactor = redactor_for(self.settings.redact)
        self.location: ParquetLocation = (S3Parquet.from_settings(parquet_url, self.settings.s3) if parquet_url
                                          else LocalParquet(data_dir))
        self.journals: dict[str, Journal] = {}
        self.schemas = {t: migrations.table_schema(t) for t in migrations.tables()}
        self._pool: ProcessPoolExecutor | None = None
        self._runner_fd = -1

    def open(self) -> list[str]:
        """Migrate the store, compact what earlier processes left, start journals."""
        try:
            applied = migrations.migrate(self.data_dir)
            self.prepare_location()
            self.compact()
            for table in self.schemas:
                self.journals[table] = Journal(self.data_dir / table, self.settings)
                self.journals[table].open()
        except OSError as exc:
            raise StoreError(f"cannot open the capture store in {self.data_dir}: {exc}") from exc
        return applied

    def append(self, table: str, record: dict) -> None:
        """Record one row; durable against a process crash when this returns."""
        self.journals[table].append(self.redactor.record(table, record) if self.redactor else record)

    def prepare_location(self) -> None:
        """Check the Parquet location answers and lay it out; record it for ``connect``."""
        self.location.prepare(self.schemas)
        if isinstance(self.location, S3Parquet):
            self.location.record(self.data_dir)
        else:
            forget_location(self.data_dir)

    def compact(self) -> CompactionResult:
        """Compact every sealed segment of every table now, in this process."""
        return compact_store(self.data_dir, self.schemas, self.location)

    def backlog(self) -> tuple[int, int]:
        """(segments, bytes) written to journals and not yet compacted, all writers."""
        files = [f for t in self.schemas for f in (self.data_dir / t / JOURNAL_DIR).glob(f"[!_]*{SEGMENT_SUFFIX}")]
        return len(files), sum(_size(f) for f in files)

    async def run_background(self, on_pass=None) -> None:
        """Flush, seal and compact forever (cancel to stop).

        Compaction runs in a child process: in a thread it held the GIL for about half a
        second per segment and raised the gateway's p99 latency (bench/RESULTS.md). Of several
        processes sharing the data folder only the compaction runner compacts; the others
        only flush and seal their own journals.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.settings.compact_interval_s, 1.0))
            try:
                await asyncio.to_thread(self._tick)
                result = CompactionResult()
                if self._is_compaction_runner():
                    result = await loop.run_in_executor(self._compactor(), compact_store, self.data_dir,
                                                        self.schemas, self.location)
            except StoreError as exc:  # e.g. the bucket is unreachable for a while: the journal keeps the data
                log.error("capture compaction failed; will retry: %s", exc)
                continue
            except Exception:  # keep capturing even if one pass fails; the journal keeps the data
                log.exception("capture compaction failed; will retry")
                self._close_compactor()
                continue
            if on_pass:
                on_pass(result, self.backlog())

    def _tick(self) -> None:
        for journal in self.journals.values():
            journal.tick()

    def _is_compaction_runner(self) -> bool:
        """Hold the data folder's runner lock (kept once taken; the kernel frees it when this process dies)."""
        if self._runner_fd < 0:
            fd = os.open(self.data_dir / RUNNER_LOCK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._runner_fd = fd
        return True

    def _compactor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=exit_with_parent, initargs=(os.getpid(),))
        return self._pool

    def _close_compactor(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        """Seal the journals and compact them."""
        self._close_compactor()
        for journal in self.journals.values():
            journal.close()
        self.compact()
        if self._runner_fd >= 0:
            os.close(self._runner_fd)
            self._runner_fd = -1


def exit_with_parent(parent_pid: int) -> None:
    """In the compaction child: exit when the gateway is gone, even after a kill -9."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def compact_store(data_dir: Path, schemas: dict[str, pa.Schema],
                  location: ParquetLocation | None = None) -> CompactionResult:
    """Compact every sealed segment of every table (a plain function, so a child process can run it)."""
    total = CompactionResult()
    for table, schema in schemas.items():
        result = compact(data_dir / table, schema, location)
        total.segments += result.segments
        total.records += result.records
        total.bad_lines += result.bad_lines
    return total


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def connect(data_dir: Path, known: tuple[migrations.Migration, ...] = migrations.MIGRATIONS
            ) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table over the store.

    The views find their files at query time, so a long-lived connection keeps seeing new
    records and is not broken by compaction. Parquet in a bucket is read from there (the
    location the gateway recorded in ``data_dir``).
    """
    if not (data_dir / migrations.SCHEMA_FILE).exists():
        raise StoreError(f"{data_dir} is not an arbitrage data directory (no {migrations.SCHEMA_FILE})")
    migrations.check_known(migrations.applied(data_dir), known, data_dir)
    location = recorded_location(data_dir)
    con = duckdb.connect()
    location.register(con)
    for table in migrations.tables(known):
        _create_view(con, data_dir / table, location.glob(table), table, migrations.table_schema(table, known))
    return con


def retrying(run: Callable[[], T], attempts: int = 4) -> T:
    """Run a query over the views, again if a journal segment vanished between DuckDB's glob and
    its read (compacted and removed meanwhile; its records are in Parquet by then, and the next
    evaluation of the view no longer lists it). Any other error is raised at once."""
    for attempt in stamina.retry_context(on=_segment_vanished, attempts=attempts, timeout=None,
                                         wait_initial=0.05, wait_max=0.2, wait_jitter=0.0):
        with attempt:
            return run()
    raise AssertionError("unreachable")  # pragma: no cover - the last failed attempt raises


def _segment_vanished(exc: Exception) -> bool:
    return isinstance(exc, duckdb.IOException) and "No such file" in str(exc)


def _create_view(con: duckdb.DuckDBPyConnection, table_dir: Path, parquet_glob: str, name: str,
                 schema: pa.Schema) -> None:
    """``name`` = typed empty table + Parquet files + journal segments not yet compacted.

    A segment whose Parquet file exists already (the instant between rename and unlink) is
    skipped, so no record is counted twice.
    """
    con.register(f"_{name}_empty", schema.empty_table())
    parquet, journal = _sql_str(parquet_glob), _sql_str(table_dir / JOURNAL_DIR / "*.jsonl")
    types = con.from_arrow(schema.empty_table()).dtypes
    columns = "{" + ", ".join(f"'{f.name}': '{t}'" for f, t in zip(schema, types)) + "}"
    con.execute(f"""
        CREATE VIEW {name} AS
        SELECT * FROM _{name}_empty
        UNION ALL BY NAME
        SELECT * EXCLUDE (filename) FROM read_parquet({parquet}, union_by_name = true, filename = true)
        UNION ALL BY NAME
        SELECT * EXCLUDE (filename) FROM read_json({journal}, format = 'newline_delimited', columns = {columns},
                                                   ignore_errors = true, filename = true)
        WHERE parse_filename(filename, true) NOT IN (SELECT parse_filename(file, true) FROM glob({parquet}))
    """)


def _sql_str(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"
