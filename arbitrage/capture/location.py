"""Where compacted Parquet files live: under the local data folder, or in an S3-compatible bucket.

Both are written whole. Locally a file is written to a temporary name, flushed and renamed
into place; in a bucket it is one object upload, which S3 makes visible only once complete
(a single PUT, or a multipart upload that becomes an object only when completed). The same
segment always becomes the same file name, so compacting it twice overwrites, never duplicates.

DuckDB reads a bucket through an fsspec file system over pyarrow's S3 client: DuckDB's own
``httpfs`` extension is downloaded from the network at ``INSTALL`` time, which these machines
cannot reach, and the extension packages on PyPI are built for other DuckDB versions.
Credentials come from the environment (the AWS SDK's usual chain) and are never written or logged.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from arbitrage.config import S3Settings
from arbitrage.errors import StoreError

PARQUET_DIR = "parquet"
SCHEMA_PARQUET = "_schema.parquet"
LOCATION_FILE = "parquet_location.json"
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class LocalParquet:
    """``<data_dir>/<table>/parquet/``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def write(self, table: str, name: str, rows: pa.Table) -> None:
        """Write one file whole: temporary name, fsync, rename. A failure (a full disk) is a
        StoreError: the segment stays in the journal for the next pass, the partial file is removed."""
        target = self.data_dir / table / PARQUET_DIR / name
        temp = target.with_name(f".{name}.tmp")
        try:
            pq.write_table(rows, temp, compression="zstd")
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(temp, target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StoreError(f"cannot write {target}: {exc}") from None

    def glob(self, table: str) -> str:
        """The pattern DuckDB reads this table's files with."""
        return str(self.data_dir / table / PARQUET_DIR / "*.parquet")

    def prepare(self, schemas: dict[str, pa.Schema]) -> None:
        """Nothing to do: the migrations lay out local folders."""

    def register(self, con: duckdb.DuckDBPyConnection) -> None:
        """Nothing to do: DuckDB reads local files itself."""


@dataclass(frozen=True)
class S3Parquet:
    """``s3://<bucket>/<prefix>/<table>/parquet/`` (picklable, so the compaction child gets one)."""

    url: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, url: str, settings: S3Settings) -> "S3Parquet":
        endpoint = (settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL"))
        region = settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(url.rstrip("/"), endpoint, region or "us-east-1", settings.connect_timeout_s,
                   settings.request_timeout_s)

    @property
    def bucket(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def _root(self) -> str:
        return self.url.removeprefix("s3://")

    def filesystem(self) -> pafs.S3FileSystem:
        return _s3_filesystem(self)

    def write(self, table: str, name: str, rows: pa.Table) -> None:
        """Upload one file whole (one object; never visible half-written)."""
        buffer = io.BytesIO()
        pq.write_table(rows, buffer, compression="zstd")
        with _s3_errors(f"cannot upload {self.url}/{table}/{PARQUET_DIR}/{name}"):
            with self.filesystem().open_output_stream(f"{self._root}/{table}/{PARQUET_DIR}/{name}") as out:
                out.write(buffer.getbuffer())

    def glob(self, table: str) -> str:
        return f"{self.url}/{table}/{PARQUET_DIR}/*.parquet"

    def prepare(self, schemas: dict[str, pa.Schema]) -> None:
        """Check the bucket answers, and give each table's glob a typed match before the first record."""
        with _s3_errors(f"cannot reach the capture bucket {self.url} (endpoint {self.endpoint_url or 'AWS'})"):
            if self.filesystem().get_file_info(self.bucket).type == pafs.FileType.NotFound:
                raise StoreError(f"the capture bucket {self.bucket!r} does not exist (endpoint "
                                 f"{self.endpoint_url or 'AWS'}); create it, or fix gateway.data_dir")
            for table, schema in schemas.items():
                self._ensure_sentinel(table, schema)

    def _ensure_sentinel(self, table: str, schema: pa.Schema) -> None:
        path = f"{self._root}/{table}/{PARQUET_DIR}/{SCHEMA_PARQUET}"
        fs = self.filesystem()
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_file(path) as f:
                if pq.read_schema(f).equals(schema):
                    return
        self.write(table, SCHEMA_PARQUET, schema.empty_table())

    def register(self, con: duckdb.DuckDBPyConnection) -> None:
        """Let this DuckDB connection read ``s3://`` paths through pyarrow's S3 client."""
        from fsspec.implementations.arrow import ArrowFSWrapper

        class S3Files(ArrowFSWrapper):
            protocol = "s3"

        con.register_filesystem(S3Files(self.filesystem()))

    def record(self, data_dir: Path) -> None:
        """Note in the local data folder where its Parquet lives (no credentials), for ``connect``."""
        data_dir.mkdir(parents=True, exist_ok=True)
        temp = data_dir / f".{LOCATION_FILE}.{os.getpid()}.tmp"
        temp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(temp, data_dir / LOCATION_FILE)


ParquetLocation = LocalParquet | S3Parquet


def recorded_location(data_dir: Path) -> ParquetLocation:
    """The location the gateway recorded in this data folder (local when none is recorded)."""
    path = data_dir / LOCATION_FILE
    if not path.exists():
        return LocalParquet(data_dir)
    try:
        return S3Parquet(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise StoreError(f"{path} is unreadable: {exc}") from None


def forget_location(data_dir: Path) -> None:
    """The data folder's Parquet is local again."""
    (data_dir / LOCATION_FILE).unlink(missing_ok=True)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(target: S3Parquet) -> pafs.S3FileSystem:
    endpoint = urlsplit(target.endpoint_url) if target.endpoint_url else None
    return pafs.S3FileSystem(
        region=target.region,
        endpoint_override=endpoint.netloc if endpoint else None,
        scheme=endpoint.scheme if endpoint else "https",
        connect_timeout=target.connect_timeout_s,
        request_timeout=target.request_timeout_s,
    )


@contextlib.contextmanager
def _s3_errors(context: str):
    """Turn pyarrow's S3 errors into a StoreError with this context, credentials removed."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"{context}: {redact(_first_line(str(exc)))}") from None


def redact(text: str) -> str:
    """``text`` with any AWS credential from the environment replaced by ``***``."""
    for name in _CREDENTIAL_VARS:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
