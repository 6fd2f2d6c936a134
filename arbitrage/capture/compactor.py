"""Turns sealed journal segments into Parquet files, in the background.

A segment ``X.jsonl`` becomes ``parquet/X.parquet``, written whole (locally: a
temporary file, flushed, renamed into place; in a bucket: one object upload,
see ``location.py``), and only then is the segment removed. A crash at any
point leaves either the segment (compacted again, to the same name) or the
finished file: never a half-written file that looks complete and never a lost
record. Any process may compact any sealed segment: it holds the segment's
``flock`` while it does, so two compactors never work on one segment, and an
active segment is skipped because its writer holds that lock.
"""

from __future__ import annotations

import fcntl
import functools
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.json as pa_json

from arbitrage.capture.journal import JOURNAL_DIR, SEGMENT_SUFFIX
from arbitrage.capture.location import PARQUET_DIR, LocalParquet, ParquetLocation

log = logging.getLogger(__name__)

__all__ = ["PARQUET_DIR", "CompactionResult", "compact"]

Writer = Callable[[str, pa.Table], None]
"""Writes one named Parquet file of a table whole."""


@dataclass
class CompactionResult:
    """What one compaction pass did."""

    segments: int = 0
    records: int = 0
    bad_lines: int = 0


def compact(table_dir: Path, schema: pa.Schema, location: ParquetLocation | None = None) -> CompactionResult:
    """Compact every sealed segment of one table (into ``table_dir/parquet`` unless a location is given)."""
    result = CompactionResult()
    if location is None:
        location = LocalParquet(table_dir.parent)
        (table_dir / PARQUET_DIR).mkdir(parents=True, exist_ok=True)
    for segment in sorted((table_dir / JOURNAL_DIR).glob(f"[!_]*{SEGMENT_SUFFIX}")):  # "_": layout files
        _compact_if_sealed(segment, functools.partial(location.write, table_dir.name), schema, result)
    return result


def _compact_if_sealed(segment: Path, write: Writer, schema: pa.Schema, result: CompactionResult) -> None:
    try:
        fd = os.open(segment, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # another process compacted it meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return  # active: its writer holds the lock
    try:
        if segment.exists():
            _compact_segment(fd, segment, write, schema, result)
    finally:
        os.close(fd)


def _compact_segment(fd: int, segment: Path, write: Writer, schema: pa.Schema, result: CompactionResult) -> None:
    data = _read_complete_lines(fd)
    table, bad = _parse(data, schema)
    if table.num_rows:
        write(f"{segment.stem}.parquet", table)
    segment.unlink()
    result.segments += 1
    result.records += table.num_rows
    result.bad_lines += bad
    if bad:
        log.warning("%s: skipped %d unreadable journal lines", segment.name, bad)


def _read_complete_lines(fd: int) -> bytes:
    """The segment's bytes up to the last newline (a line cut by a crash is not a record)."""
    with os.fdopen(os.dup(fd), "rb") as f:
        data = f.read()
    return data[: data.rfind(b"\n") + 1]


def _parse(data: bytes, schema: pa.Schema) -> tuple[pa.Table, int]:
    if not data:
        return schema.empty_table(), 0
    options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        return pa_json.read_json(io.BytesIO(data), read_options=_read_options(data), parse_options=options), 0
    except pa.ArrowInvalid:
        return _parse_line_by_line(data, schema)


def _parse_line_by_line(data: bytes, schema: pa.Schema) -> tuple[pa.Table, int]:
    """Slow path for a damaged segment (e.g. a write cut short by a full disk)."""
    options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    tables, bad = [schema.empty_table()], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            tables.append(pa_json.read_json(io.BytesIO(line), read_options=_read_options(line),
                                            parse_options=options))
        except pa.ArrowInvalid:
            bad += 1
    return pa.concat_tables(tables), bad


def _read_options(data: bytes) -> pa_json.ReadOptions:
    """A block must hold the longest line, or pyarrow rejects it (records can be megabytes)."""
    return pa_json.ReadOptions(block_size=max(len(data) + 1, 1 << 20))
