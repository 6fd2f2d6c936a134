"""The capture store of one data directory: journals, background compaction, DuckDB views.

Layout::

    <data_dir>/schema.json                 applied migrations
    <data_dir>/<table>/journal/*.jsonl     records not yet compacted (one writer each)
    <data_dir>/<table>/parquet/*.parquet   compacted records

The DuckDB view of a table reads both, so a record is queryable the moment it
is written.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import duckdb
import pyarrow as pa

from arbitrage.capture import migrations
from arbitrage.capture.compactor import PARQUET_DIR, CompactionResult, compact
from arbitrage.capture.journal import JOURNAL_DIR, SEGMENT_SUFFIX, Journal
from arbitrage.config import CaptureSettings
from arbitrage.errors import StoreError

log = logging.getLogger(__name__)

_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
}


class CaptureStore:
    """Writes records durably and compacts them in the background."""

    def __init__(self, data_dir: Path, settings: CaptureSettings | None = None) -> None:
        self.data_dir = data_dir
        self.settings = settings or CaptureSettings()
        self.journals: dict[str, Journal] = {}
        self.schemas = {t: migrations.table_schema(t) for t in migrations.tables()}

    def open(self) -> list[str]:
        """Migrate the store, compact what earlier processes left, start journals."""
        try:
            applied = migrations.migrate(self.data_dir)
            self.compact()
            for table in self.schemas:
                self.journals[table] = Journal(self.data_dir / table, self.settings)
                self.journals[table].open()
        except OSError as exc:
            raise StoreError(f"cannot open the capture store in {self.data_dir}: {exc}") from exc
        return applied

    def append(self, table: str, record: dict) -> None:
        """Record one row; durable against a process crash when this returns."""
        self.journals[table].append(record)

    def compact(self) -> CompactionResult:
        """Compact every sealed segment of every table now."""
        total = CompactionResult()
        for table, schema in self.schemas.items():
            result = compact(self.data_dir / table, schema)
            total.segments += result.segments
            total.records += result.records
            total.bad_lines += result.bad_lines
        return total

    def backlog(self) -> tuple[int, int]:
        """(segments, bytes) written to journals and not yet compacted, all writers."""
        files = [f for t in self.schemas for f in (self.data_dir / t / JOURNAL_DIR).glob(f"*{SEGMENT_SUFFIX}")]
        return len(files), sum(_size(f) for f in files)

    async def run_background(self, on_pass=None) -> None:
        """Flush, seal and compact forever (cancel to stop)."""
        while True:
            await asyncio.sleep(min(self.settings.compact_interval_s, 1.0))
            try:
                result = await asyncio.to_thread(self._upkeep)
            except Exception:  # keep capturing even if one pass fails; the journal keeps the data
                log.exception("capture compaction failed; will retry")
                continue
            if on_pass:
                on_pass(result, self.backlog())

    def _upkeep(self) -> CompactionResult:
        for journal in self.journals.values():
            journal.tick()
        return self.compact()

    def close(self) -> None:
        """Seal the journals and compact them."""
        for journal in self.journals.values():
            journal.close()
        self.compact()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def connect(data_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per table over the store."""
    if not (data_dir / migrations.SCHEMA_FILE).exists():
        raise StoreError(f"{data_dir} is not an arbitrage data directory (no {migrations.SCHEMA_FILE})")
    con = duckdb.connect()
    for table in migrations.tables():
        _create_view(con, data_dir / table, table, migrations.table_schema(table))
    return con


def _create_view(con: duckdb.DuckDBPyConnection, table_dir: Path, name: str, schema: pa.Schema) -> None:
    con.register(f"_{name}_empty", schema.empty_table())
    parts = [f"SELECT * FROM _{name}_empty"]
    parquet = sorted((table_dir / PARQUET_DIR).glob("*.parquet"))
    compacted = {p.stem for p in parquet}
    journal = [j for j in sorted((table_dir / JOURNAL_DIR).glob(f"*{SEGMENT_SUFFIX}")) if j.stem not in compacted]
    if parquet:
        parts.append(f"SELECT * FROM read_parquet({_sql_list(parquet)}, union_by_name = true)")
    if journal:
        columns = "{" + ", ".join(f"'{f.name}': '{_DUCKDB_TYPES[f.type]}'" for f in schema) + "}"
        parts.append(
            f"SELECT * FROM read_json({_sql_list(journal)}, format = 'newline_delimited', "
            f"columns = {columns}, ignore_errors = true)"
        )
    con.execute(f"CREATE VIEW {name} AS " + " UNION ALL BY NAME ".join(parts))


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"
