"""The capture store: migrations, journals, compaction into Parquet, and the DuckDB views."""

from __future__ import annotations

import asyncio

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from arbitrage.capture import migrations
from arbitrage.capture.compactor import compact
from arbitrage.capture.journal import JOURNAL_DIR, Journal
from arbitrage.capture.migrations import MIGRATIONS, Migration, applied, migrate, table_schema
from arbitrage.capture.store import CaptureStore, connect
from arbitrage.config import CaptureSettings
from arbitrage.errors import MigrationError, StoreError

CALLS_COLUMNS = [
    "request_id", "ts", "key_id", "path", "endpoint", "model", "upstream", "response_model", "served_by",
    "route_reason", "status_code", "error_type", "stream", "prompt_tokens", "cached_tokens", "completion_tokens",
    "cost_usd", "counterfactual_cost_usd", "priced", "latency_ms", "ttft_ms", "upstream_attempts", "request",
    "response", "adapter", "confidence", "local_latency_ms",
]
DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float64(): "DOUBLE",
                pa.bool_(): "BOOLEAN", pa.timestamp("us", tz="UTC"): "TIMESTAMP WITH TIME ZONE"}
ADD_SCORE = Migration("0099_add_router_score", "calls", (("router_score", pa.float64()),))
SETTINGS = CaptureSettings(fsync="never")


def record(request_id: str, **fields) -> dict:
    base = {"request_id": request_id, "ts": datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
            "model": "gpt-4o-mini", "status_code": 200, "stream": True, "prompt_tokens": 12,
            "cost_usd": 0.0025, "request": '{"model": "gpt-4o-mini"}'}
    return {**base, **fields}


@pytest.fixture
def store(tmp_path) -> CaptureStore:
    store = CaptureStore(tmp_path / "data", SETTINGS)
    store.open()
    yield store
    for journal in store.journals.values():
        journal.close()


def rows(data_dir: Path, columns: str = "request_id") -> list[tuple]:
    return connect(data_dir).execute(f"SELECT {columns} FROM calls ORDER BY request_id").fetchall()


def files(data_dir: Path, pattern: str) -> list[Path]:
    """Data files, without the layout files whose names start with "_"."""
    return sorted(p for p in data_dir.rglob(pattern) if not p.name.startswith("_"))


def sealed_segment(data_dir: Path, content: bytes, name: str = "20240501T000000-host-1-abcd") -> Path:
    """A segment no writer holds: what a crashed or finished process leaves behind."""
    path = data_dir / "calls" / JOURNAL_DIR / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def lines(*records: dict) -> bytes:
    return b"".join(json.dumps(r, default=str).encode() + b"\n" for r in records)


# Migrations


def test_migrating_an_empty_store_records_the_first_migration(tmp_path):
    assert migrate(tmp_path / "data") == [m.name for m in MIGRATIONS]
    assert applied(tmp_path / "data") == [m.name for m in MIGRATIONS]


def test_calls_view_has_exactly_the_schema_columns(tmp_path):
    migrate(tmp_path)
    described = connect(tmp_path).execute("DESCRIBE calls").fetchall()
    assert [c[0] for c in described] == CALLS_COLUMNS
    assert CALLS_COLUMNS == table_schema("calls").names


def test_calls_view_has_the_schema_types(tmp_path):
    migrate(tmp_path)
    described = {c[0]: c[1] for c in connect(tmp_path).execute("DESCRIBE calls").fetchall()}
    assert described == {f.name: DUCKDB_TYPES[f.type] for f in table_schema("calls")}
    assert (described["ts"], described["status_code"], described["prompt_tokens"]) == (
        "TIMESTAMP WITH TIME ZONE", "INTEGER", "BIGINT")


def test_migrate_is_idempotent(tmp_path):
    migrate(tmp_path)
    before = (tmp_path / migrations.SCHEMA_FILE).read_bytes()
    assert migrate(tmp_path) == []
    assert (tmp_path / migrations.SCHEMA_FILE).read_bytes() == before


def test_store_with_an_unknown_migration_is_refused(tmp_path):
    body = {"migrations": [{"name": "0001_create_calls", "applied_at": "x"}, {"name": "0099_future", "applied_at": "x"}]}
    (tmp_path / migrations.SCHEMA_FILE).write_text(json.dumps(body))
    with pytest.raises(MigrationError, match="0099_future"):
        migrate(tmp_path)


def test_unreadable_schema_record_is_a_migration_error(tmp_path):
    (tmp_path / migrations.SCHEMA_FILE).write_text("{oops")
    with pytest.raises(MigrationError, match="unreadable"):
        migrate(tmp_path)


def test_unknown_table_is_a_migration_error():
    with pytest.raises(MigrationError):
        table_schema("nope")


def test_later_migration_applies_in_order_and_keeps_earlier_dates(tmp_path):
    migrate(tmp_path)
    first = json.loads((tmp_path / migrations.SCHEMA_FILE).read_text())["migrations"][0]
    assert migrate(tmp_path, MIGRATIONS + (ADD_SCORE,)) == ["0099_add_router_score"]
    recorded = json.loads((tmp_path / migrations.SCHEMA_FILE).read_text())["migrations"]
    assert [m["name"] for m in recorded] == [m.name for m in MIGRATIONS] + ["0099_add_router_score"]
    assert recorded[0] == first


def test_later_migration_appends_its_columns():
    assert table_schema("calls", MIGRATIONS + (ADD_SCORE,)).names == CALLS_COLUMNS + ["router_score"]


def test_older_version_refuses_a_store_a_newer_one_migrated(tmp_path):
    migrate(tmp_path, MIGRATIONS + (ADD_SCORE,))
    with pytest.raises(MigrationError, match="newer version"):
        migrate(tmp_path)


def test_old_parquet_shows_null_for_a_new_column(tmp_path):
    migrate(tmp_path)
    sealed_segment(tmp_path, lines(record("old")), name="a-old")
    compact(tmp_path / "calls", table_schema("calls"))
    newer = MIGRATIONS + (ADD_SCORE,)
    migrate(tmp_path, newer)
    sealed_segment(tmp_path, lines(record("new", router_score=0.75)), name="b-new")
    compact(tmp_path / "calls", table_schema("calls", newer))
    con = connect(tmp_path, newer)
    assert con.execute("SELECT request_id, router_score FROM calls ORDER BY 1").fetchall() == [
        ("new", 0.75), ("old", None)]


def test_connect_refuses_a_store_a_newer_version_migrated(tmp_path):
    migrate(tmp_path, MIGRATIONS + (ADD_SCORE,))
    with pytest.raises(MigrationError, match="newer version"):
        connect(tmp_path)


# Writing, reading, compacting


def test_appended_record_is_visible_at_once(store):
    store.append("calls", record("r1"))
    assert rows(store.data_dir, "request_id, ts, model, status_code, stream, prompt_tokens, cost_usd") == [
        ("r1", datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC), "gpt-4o-mini", 200, True, 12, 0.0025)]


def test_record_is_the_same_after_compaction(store):
    for i in range(3):
        store.append("calls", record(f"r{i}", ts=datetime(2024, 5, 1, 14, i, tzinfo=timezone(timedelta(hours=2)))))
    before = rows(store.data_dir, "*")
    store.close()
    assert len(files(store.data_dir, "*.parquet")) == 1
    assert rows(store.data_dir, "*") == before


def test_timestamps_come_back_as_aware_utc(store):
    store.append("calls", record("r1", ts=datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))))
    store.close()
    [(ts,)] = rows(store.data_dir, "ts")
    assert ts.utcoffset() is not None
    assert ts == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_unknown_record_fields_are_ignored(store):
    store.append("calls", record("r1", not_a_column={"x": 1}))
    store.close()
    assert rows(store.data_dir) == [("r1",)]


def test_active_segment_is_not_compacted(store):
    store.append("calls", record("r1"))
    assert store.compact().segments == 0
    assert len(files(store.data_dir / "calls", "*.jsonl")) == 1
    assert files(store.data_dir, "*.parquet") == []
    assert rows(store.data_dir) == [("r1",)]


def test_compaction_removes_segments_and_leaves_no_temp_files(store):
    store.append("calls", record("r1"))
    store.close()
    assert files(store.data_dir, "*.jsonl") == []
    assert [p for p in store.data_dir.rglob("*") if p.name.endswith((".tmp", ".new"))] == []


def test_open_compacts_what_an_earlier_process_left(tmp_path):
    migrate(tmp_path)
    sealed_segment(tmp_path, lines(record("left-behind")))
    store = CaptureStore(tmp_path, SETTINGS)
    store.open()
    store.close()
    assert (files(tmp_path, "*.jsonl"), rows(tmp_path)) == ([], [("left-behind",)])


def test_truncated_last_line_is_dropped_and_the_rest_kept(tmp_path):
    migrate(tmp_path)
    sealed_segment(tmp_path, lines(record("a"), record("b")) + b'{"request_id": "c", "mod')
    result = compact(tmp_path / "calls", table_schema("calls"))
    assert (result.records, result.bad_lines) == (2, 0)
    assert rows(tmp_path) == [("a",), ("b",)]


def test_garbage_line_keeps_the_good_lines(tmp_path):
    migrate(tmp_path)
    sealed_segment(tmp_path, lines(record("a")) + b"\x00garbage{\n" + lines(record("b")))
    result = compact(tmp_path / "calls", table_schema("calls"))
    assert (result.records, result.bad_lines) == (2, 1)
    assert rows(tmp_path) == [("a",), ("b",)]


def test_line_with_a_wrong_type_is_counted_bad(tmp_path):
    migrate(tmp_path)
    sealed_segment(tmp_path, lines(record("a"), record("b", status_code="two hundred")))
    assert compact(tmp_path / "calls", table_schema("calls")).bad_lines == 1
    assert rows(tmp_path) == [("a",)]


def test_segment_left_after_a_crash_mid_compaction_shows_no_duplicates(tmp_path):
    migrate(tmp_path)
    segment = sealed_segment(tmp_path, lines(record("a"), record("b")))
    compact(tmp_path / "calls", table_schema("calls"))
    sealed_segment(tmp_path, lines(record("a"), record("b")), name=segment.stem)  # unlink never happened
    assert rows(tmp_path) == [("a",), ("b",)]
    compact(tmp_path / "calls", table_schema("calls"))
    assert (len(files(tmp_path, "*.parquet")), rows(tmp_path)) == (1, [("a",), ("b",)])


def test_large_record_survives_compaction(store):
    store.append("calls", record("big", request="x" * 3_000_000))
    store.close()
    assert rows(store.data_dir, "request_id, length(request)") == [("big", 3_000_000)]


def test_open_connection_survives_a_compaction(tmp_path):
    store = CaptureStore(tmp_path, CaptureSettings(fsync="never", segment_max_records=1))
    store.open()
    store.append("calls", record("a"))
    con = connect(tmp_path)
    store.close()
    assert con.execute("SELECT request_id FROM calls").fetchall() == [("a",)]


def test_connect_to_a_directory_that_is_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not an arbitrage data directory"):
        connect(tmp_path)


def test_connect_to_a_missing_directory(tmp_path):
    with pytest.raises(StoreError):
        connect(tmp_path / "nowhere")


def test_open_on_an_unwritable_path_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError):
        CaptureStore(tmp_path / "file" / "data").open()


# Journal


def journal(tmp_path: Path, max_records: int) -> Journal:
    j = Journal(tmp_path / "calls", CaptureSettings(fsync="never", segment_max_records=max_records))
    j.open()
    return j


def test_journal_rotates_after_max_records(tmp_path):
    j = journal(tmp_path, max_records=2)
    for i in range(5):
        j.append({"request_id": str(i)})
    counts = [len(p.read_bytes().splitlines()) for p in files(tmp_path, "*.jsonl")]
    assert (sorted(counts), j.active_records) == ([1, 2, 2], 1)
    j.close()


def test_rotated_segments_are_sealed_and_compactable(tmp_path):
    j = journal(tmp_path, max_records=2)
    for i in range(5):
        j.append({"request_id": str(i)})
    result = compact(tmp_path / "calls", table_schema("calls"))
    assert (result.segments, result.records) == (2, 4)
    j.close()


def test_closing_an_empty_journal_leaves_no_segment(tmp_path):
    journal(tmp_path, max_records=10).close()
    assert files(tmp_path, "*.jsonl") == []


def test_journal_lines_are_whole_json_records(tmp_path):
    j = journal(tmp_path, max_records=10)
    j.append({"request_id": "a", "ts": datetime(2024, 5, 1, tzinfo=UTC)})
    [segment] = files(tmp_path, "*.jsonl")
    assert json.loads(segment.read_bytes()) == {"request_id": "a", "ts": "2024-05-01T00:00:00+00:00"}
    j.close()


def test_append_after_close_is_a_store_error(tmp_path):
    j = journal(tmp_path, max_records=10)
    j.close()
    with pytest.raises(StoreError):
        j.append({"request_id": "late"})


def test_open_connection_sees_records_written_after_it_connected(tmp_path):
    store = CaptureStore(tmp_path, CaptureSettings(fsync="never", segment_max_records=2))
    store.open()
    con = connect(tmp_path)
    for name in ("a", "b", "c"):
        store.append("calls", record(name))
    store.compact()
    assert con.execute("SELECT request_id FROM calls ORDER BY 1").fetchall() == [("a",), ("b",), ("c",)]


async def test_background_compaction_runs_in_a_child_process(tmp_path):
    store = CaptureStore(tmp_path, CaptureSettings(fsync="never", segment_max_records=1, compact_interval_s=0.1))
    store.open()
    passes = []
    for name in ("a", "b"):
        store.append("calls", record(name))
    task = asyncio.create_task(store.run_background(lambda result, backlog: passes.append(result)))
    async with asyncio.timeout(30):
        while not any(p.records for p in passes):
            await asyncio.sleep(0.1)
    task.cancel()
    store.close()
    assert sum(p.records for p in passes) == 2 and len(files(tmp_path, "*.parquet")) == 2


def test_a_query_is_retried_when_a_segment_vanishes_between_glob_and_read_and_other_errors_are_not():
    """A journal segment compacted and removed while DuckDB expands the view's glob fails that one
    query with "No such file"; its records are in Parquet by then, so running it again is right."""
    import duckdb

    from arbitrage.capture.store import retrying

    tries = []

    def vanishing():
        tries.append(1)
        if len(tries) < 3:
            raise duckdb.IOException('IO Error: Cannot open file "calls/journal/x.jsonl": No such file or directory')
        return [("row",)]

    assert retrying(vanishing) == [("row",)] and len(tries) == 3
    with pytest.raises(duckdb.IOException, match="Permission denied"):
        retrying(lambda: (_ for _ in ()).throw(duckdb.IOException("IO Error: Permission denied")))
    with pytest.raises(duckdb.IOException, match="No such file"):
        retrying(lambda: (_ for _ in ()).throw(duckdb.IOException("No such file or directory")), attempts=2)
