"""Ordered, named schema migrations of the capture store.

A migration adds columns to a table. The schema of a table is the fold of all
migrations over it; the store records which migrations it has applied in
``schema.json`` (written whole and renamed into place). Parquet files written
under an older schema stay valid: the DuckDB views read them by column name
and show the newer columns as NULL.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from arbitrage.capture.journal import JOURNAL_DIR
from arbitrage.capture.location import PARQUET_DIR, SCHEMA_PARQUET
from arbitrage.errors import MigrationError

SCHEMA_FILE = "schema.json"
EMPTY_JOURNAL = "_empty.jsonl"


@dataclass(frozen=True)
class Migration:
    """One schema step: a table gains columns."""

    name: str
    table: str
    add_columns: tuple[tuple[str, pa.DataType], ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_create_calls",
        "calls",
        (
            ("request_id", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("key_id", pa.string()),
            ("path", pa.string()),
            ("endpoint", pa.string()),
            ("model", pa.string()),
            ("upstream", pa.string()),
            ("response_model", pa.string()),
            ("served_by", pa.string()),
            ("route_reason", pa.string()),
            ("status_code", pa.int32()),
            ("error_type", pa.string()),
            ("stream", pa.bool_()),
            ("prompt_tokens", pa.int64()),
            ("cached_tokens", pa.int64()),
            ("completion_tokens", pa.int64()),
            ("cost_usd", pa.float64()),
            ("counterfactual_cost_usd", pa.float64()),
            ("priced", pa.bool_()),
            ("latency_ms", pa.float64()),
            ("ttft_ms", pa.float64()),
            ("upstream_attempts", pa.int32()),
            ("request", pa.string()),
            ("response", pa.string()),
        ),
    ),
    Migration(
        "0002_calls_local_route",
        "calls",
        (
            ("adapter", pa.string()),          # adapter version that answered or was tried (path/vN)
            ("confidence", pa.float64()),      # the local answer's confidence score, when one was computed
            ("local_latency_ms", pa.float64()),  # time spent on the local model (also when it fell back)
        ),
    ),
    Migration(
        "0003_create_shadow",
        "shadow",
        (
            ("shadow_id", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("request_id", pa.string()),       # the client request this comparison belongs to
            ("path", pa.string()),
            ("adapter", pa.string()),
            ("kind", pa.string()),             # shadow (upstream served, local asked too) | audit (the reverse)
            ("comparator", pa.string()),
            ("upstream_answer", pa.string()),
            ("local_answer", pa.string()),
            ("confidence", pa.float64()),
            ("agreed", pa.bool_()),
            ("cost_usd", pa.float64()),        # what the extra call cost (upstream price for audits)
            ("latency_ms", pa.float64()),
            ("error", pa.string()),            # why no comparison was possible, else NULL
        ),
    ),
    Migration(
        "0004_create_route_changes",
        "route_changes",
        (
            ("change_id", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("path", pa.string()),
            ("actor", pa.string()),            # admin | ramp | ... (who changed the policy)
            ("action", pa.string()),           # set | update | promote | rollback | raise | ...
            ("mode_before", pa.string()),      # NULL when the path had no policy before
            ("mode_after", pa.string()),
            ("share_before", pa.float64()),
            ("share_after", pa.float64()),
            ("threshold_before", pa.float64()),
            ("threshold_after", pa.float64()),
            ("reason", pa.string()),
            ("evidence", pa.string()),         # JSON text (e.g. the ramp's agreement counts and bounds), or NULL
        ),
    ),
    Migration(
        "0005_create_reviews",
        "reviews",
        (
            ("review_id", pa.string()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("shadow_id", pa.string()),        # the shadow or audit comparison a person reviewed
            ("path", pa.string()),
            ("adapter", pa.string()),
            ("verdict", pa.string()),          # upstream_wrong | local_wrong | ambiguous (the latest one counts)
            ("reviewer", pa.string()),         # the admin key's name
            ("note", pa.string()),
        ),
    ),
    Migration(
        "0006_shadow_local_reason",
        "shadow",
        (
            # what the route made of the local answer, as calls.route_reason: confident (served; every audited
            # answer) | low_confidence | invalid_output | local_truncated, or why the local call failed
            ("local_reason", pa.string()),
        ),
    ),
)


def tables(migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """Table names, in the order they were created."""
    return list(dict.fromkeys(m.table for m in migrations))


def table_schema(table: str, migrations: tuple[Migration, ...] = MIGRATIONS) -> pa.Schema:
    """The current schema of one table: every migration's columns, in order."""
    fields = [pa.field(n, t) for m in migrations if m.table == table for n, t in m.add_columns]
    if not fields:
        raise MigrationError(f"no table named {table!r}")
    return pa.schema(fields)


def applied(data_dir: Path) -> list[str]:
    """Names of the migrations this store has applied, in order."""
    path = data_dir / SCHEMA_FILE
    if not path.exists():
        return []
    try:
        return [m["name"] for m in json.loads(path.read_text())["migrations"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise MigrationError(f"{path} is unreadable: {exc}") from None


def migrate(data_dir: Path, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """Apply pending migrations; returns the names applied now. Safe to run concurrently."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".schema.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = applied(data_dir)
        check_known(done, migrations, data_dir)
        pending = [m for m in migrations if m.name not in done]
        for table in tables(migrations):
            ensure_layout(data_dir / table, table_schema(table, migrations))
        if pending:
            _record(data_dir, done + [m.name for m in pending])
        return [m.name for m in pending]


def ensure_layout(table_dir: Path, schema: pa.Schema) -> None:
    """A table's folders, plus two empty files (names starting with "_") that give the views'
    globs a match and the current column types even before the first record."""
    (table_dir / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
    (table_dir / PARQUET_DIR).mkdir(parents=True, exist_ok=True)
    (table_dir / JOURNAL_DIR / EMPTY_JOURNAL).touch()
    sentinel = table_dir / PARQUET_DIR / SCHEMA_PARQUET
    if not sentinel.exists() or not pq.read_schema(sentinel).equals(schema):
        temp = sentinel.with_name(f".{SCHEMA_PARQUET}.{os.getpid()}.tmp")
        pq.write_table(schema.empty_table(), temp)
        os.replace(temp, sentinel)


def check_known(done: list[str], migrations: tuple[Migration, ...], data_dir: Path) -> None:
    """Raise MigrationError unless the applied migrations are a prefix of the known ones."""
    known = [m.name for m in migrations]
    if done != known[: len(done)]:
        raise MigrationError(
            f"{data_dir} has migrations {done}, which this version of arbitrage does not know "
            f"(it knows {known}); was it written by a newer version?"
        )


def _record(data_dir: Path, names: list[str]) -> None:
    now = datetime.now(UTC).isoformat()
    previous = {}
    if (data_dir / SCHEMA_FILE).exists():
        previous = {m["name"]: m["applied_at"] for m in json.loads((data_dir / SCHEMA_FILE).read_text())["migrations"]}
    body = {"migrations": [{"name": n, "applied_at": previous.get(n, now)} for n in names]}
    tmp = data_dir / f".{SCHEMA_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body, indent=2))
    os.replace(tmp, data_dir / SCHEMA_FILE)
