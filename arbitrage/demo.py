"""The demo: the gateway in front of the simulator, on embedded defaults, with app traffic.

Starts ``arbitrage sim`` (a frontier-model stand-in answering Banking77 intents) and
``arbitrage serve --dev`` in front of it, sends support queries through the official
``openai`` client exactly as an app would (only the base URL changes), then shows what
was captured. Both servers keep running until Ctrl-C unless ``exit_after`` is set.
"""

from __future__ import annotations

import concurrent.futures
import csv
import random
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import click
import httpx

SYSTEM_PROMPT = ("You are the support router of a bank. Classify the customer's message into exactly one of "
                 "our 77 intents and answer with JSON: {\"intent\": \"<intent>\"}.")
SUMMARY = """
SELECT path, count(*) AS calls, sum(prompt_tokens + completion_tokens) AS tokens,
       round(sum(cost_usd), 6) AS dollars, round(median(latency_ms), 1) AS p50_ms,
       count(*) FILTER (WHERE error_type IS NOT NULL) AS errors
FROM calls GROUP BY path ORDER BY dollars DESC NULLS LAST
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], health_url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "arbitrage.cli", *args], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"'arbitrage {' '.join(args)}' exited; see {log}")
        try:
            if httpx.get(health_url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise click.ClickException(f"'arbitrage {' '.join(args)}' did not start in 60 s; see {log}")


def _queries(count: int, seed: int = 7) -> list[str]:
    data = resources.files("simulator") / "data" / "banking77" / "train.csv"
    with data.open() as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    return random.Random(seed).sample(texts, count)


def _send_traffic(base_url: str, count: int) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="demo-any-key-works-in-dev-mode", max_retries=2)

    def ask(text: str) -> str:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "system", "content": SYSTEM_PROMPT},
                                           {"role": "user", "content": text}])
        return reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, _queries(count)))


def run_demo(data_dir: Path, port: int, requests: int, exit_after: bool) -> None:
    """Start both servers, send ``requests`` app calls, print the capture summary."""
    data_dir.mkdir(parents=True, exist_ok=True)
    sim_port = _free_port()
    sim = _start(["sim", "--port", str(sim_port), "--latency-ms", "150"],
                 f"http://127.0.0.1:{sim_port}/v1/models", data_dir / "sim.log")
    gateway = None
    try:
        gateway = _start(["serve", "--dev", "--port", str(port), "--data-dir", str(data_dir),
                          "--upstream-url", f"http://127.0.0.1:{sim_port}/v1"],
                         f"http://127.0.0.1:{port}/healthz", data_dir / "gateway.log")
        _report(data_dir, port, requests)
        if not exit_after:
            click.echo("\nGateway and simulator keep running; Ctrl-C stops both.")
            gateway.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for proc in (gateway, sim):
            if proc and proc.poll() is None:
                proc.terminate()
                proc.wait(15)


def _report(data_dir: Path, port: int, requests: int) -> None:
    from arbitrage.capture.store import connect

    base_url = f"http://127.0.0.1:{port}/v1"
    click.echo(f"Gateway: {base_url}  (export OPENAI_BASE_URL={base_url}; any key works in --dev mode)")
    started = time.perf_counter()
    answers = _send_traffic(base_url, requests)
    click.echo(f"Sent {len(answers)} support queries in {time.perf_counter() - started:.1f} s, "
               f"e.g. {answers[0]}")
    click.echo("Captured calls by path (arbitrage sql over the Parquet/DuckDB store):")
    connect(data_dir).sql(SUMMARY).show()
    click.echo(f"Try: arbitrage paths --data-dir {data_dir}")
    click.echo(f"     arbitrage sql --data-dir {data_dir} \"SELECT model, prompt_tokens, cost_usd, response "
               f"FROM calls LIMIT 5\"")
    click.echo(f"     curl http://127.0.0.1:{port}/metrics")
