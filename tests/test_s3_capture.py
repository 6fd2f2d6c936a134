"""Capture Parquet in an S3 bucket (``data_dir = "s3://..."``), against a real local S3 server
(moto's server mode): records end up in the bucket and are queried back by DuckDB, credentials
reach neither the spool, the log nor the bucket, and a bucket that cannot be used stops the start
with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from arbitrage.capture.store import CaptureStore, connect
from arbitrage.config import CaptureSettings, load_config
from arbitrage.errors import ConfigError
from tests.conftest import UPSTREAM_KEY, Gateway
from tests.processes import ARBITRAGE, ServerProcess, arbitrage, free_port, gateway

BUCKET, PREFIX = "capture", "team-a"
ACCESS_KEY_ID, SECRET = "AKIAARBITRAGETEST01", "s3-secret-that-must-never-leak"
CONFIG = """
[gateway]
data_dir = "s3://{bucket}/{prefix}"

[[upstreams]]
name = "sim"
base_url = "{sim}/v1"

[capture]
segment_max_age_s = 1
compact_interval_s = 0.5

[capture.s3]
spool_dir = "{spool}"
"""
MESSAGES = [{"role": "user", "content": "I am still waiting on my card?"}]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> str:
    """A moto S3 server on loopback with an empty bucket; its endpoint and fake credentials in the environment."""
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                           tmp_path_factory.mktemp("s3") / "moto.log", health="/").start()
    with pytest.MonkeyPatch.context() as env:
        for name, value in [("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID), ("AWS_SECRET_ACCESS_KEY", SECRET),
                            ("AWS_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", server.url)]:
            env.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield server.url
    server.stop()


@pytest.fixture(scope="module")
def s3_gateway(s3, sim, tmp_path_factory) -> Gateway:
    tmp = tmp_path_factory.mktemp("s3-gateway")
    spool = tmp / "spool"
    config = tmp / "arbitrage.toml"
    config.write_text(CONFIG.format(sim=sim.url, spool=spool, bucket=BUCKET, prefix=PREFIX))
    key = arbitrage("keys", "create", "tests", "--config", str(config)).stdout.strip()
    process = gateway(tmp, f"s3://{BUCKET}/{PREFIX}", config=config, env={"OPENAI_API_KEY": UPSTREAM_KEY}).start()
    yield Gateway(process, spool, key, metrics_key="")
    process.stop()


@pytest.fixture(scope="module")
def sent(s3_gateway) -> list[str]:
    """Ids of 20 requests, once every record has left the journals for the bucket (only the empty
    active segment is left)."""
    client = s3_gateway.client()
    ids = [client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
           .headers["x-arbitrage-request-id"] for _ in range(20)]
    deadline = time.monotonic() + 30
    while any(p.stat().st_size for p in (s3_gateway.data_dir / "calls" / "journal").glob("*.jsonl")):
        assert time.monotonic() < deadline, "journal segments were not compacted"
        time.sleep(0.2)
    return ids


def bucket_keys(prefix: str = PREFIX) -> list[str]:
    return [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def test_an_s3_data_dir_keeps_the_local_files_in_the_spool():
    config = load_config(None, data_dir="s3://bucket/prefix")
    assert (config.data_dir, config.capture_url) == (Path("arbitrage-spool"), "s3://bucket/prefix")


def test_a_data_dir_url_other_than_s3_is_refused():
    with pytest.raises(ConfigError, match=r"gateway.data_dir must be a local folder or s3://BUCKET\[/PREFIX\]"):
        load_config(None, data_dir="gs://bucket/prefix")


def test_records_end_up_in_the_bucket_as_parquet(s3_gateway, sent):
    keys = bucket_keys(f"{PREFIX}/calls/parquet/")
    assert any(not k.endswith("/_schema.parquet") for k in keys) and all(k.endswith(".parquet") for k in keys)


def test_records_are_queried_back_from_the_bucket_exactly_once(s3_gateway, sent):
    rows = s3_gateway.rows("SELECT request_id, count(*) AS n FROM calls GROUP BY request_id")
    assert {r["request_id"]: r["n"] for r in rows} == {request_id: 1 for request_id in sent}


def test_no_credential_in_the_spool_the_log_or_the_bucket(s3_gateway, sent):
    s3_client = boto3.client("s3")
    blobs = [s3_client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in bucket_keys()]
    blobs += [p.read_bytes() for p in s3_gateway.data_dir.rglob("*") if p.is_file()]
    blobs.append(s3_gateway.process.log.read_bytes())
    assert not [b for b in blobs if SECRET.encode() in b or ACCESS_KEY_ID.encode() in b]


def serve_fails(data_dir: str, tmp_path: Path, endpoint: str) -> subprocess.CompletedProcess:
    args = ARBITRAGE + ["serve", "--dev", "--port", str(free_port()), "--data-dir", data_dir]
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)  # spool: ./
    assert done.returncode == 1 and "Traceback" not in done.stderr and SECRET not in done.stderr
    return done


def test_unreachable_bucket_stops_the_start_with_one_clear_line(s3, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    done = serve_fails(f"s3://{BUCKET}/{PREFIX}", tmp_path, closed)
    assert f"Error: cannot reach the capture bucket s3://{BUCKET}/{PREFIX} (endpoint {closed})" in done.stderr


def test_missing_bucket_is_named_at_start(s3, tmp_path):
    done = serve_fails("s3://no-such-bucket/x", tmp_path, s3)
    assert "Error: the capture bucket 'no-such-bucket' does not exist" in done.stderr


def test_a_segment_compacted_again_after_a_crash_is_counted_once(s3, tmp_path):
    # A crash between the upload and the segment's removal leaves both; the view counts it
    # once, and compacting it again overwrites the same object.
    store = CaptureStore(tmp_path, CaptureSettings(), f"s3://{BUCKET}/crash")
    store.open()
    for i in range(5):
        store.append("calls", {"request_id": f"r{i}", "ts": "2024-05-01T00:00:00Z"})
    store.journals["calls"].close()
    segment = next((tmp_path / "calls" / "journal").glob("[!_]*.jsonl"))
    kept = segment.read_bytes()
    store.compact()
    segment.write_bytes(kept)
    assert connect(tmp_path).sql("SELECT count(*) FROM calls").fetchall() == [(5,)]
    store.compact()
    assert connect(tmp_path).sql("SELECT count(*) FROM calls").fetchall() == [(5,)]
    assert len([k for k in bucket_keys("crash/calls/parquet/") if "_schema" not in k]) == 1
    store.close()
