"""Evaluation of an adapter on its dataset's eval split, served by a real vLLM
(``arbitrage distill eval PATH --adapter vN``)::

    adapters/PATH/vN (manifest: base, dataset version, system prompt handling)
    -> vLLM serving the base with the adapter loaded at run time (started here, or --vllm-url)
    -> every eval input asked at temperature 0 with token log-probs, exactly as the local route
       will ask it (the same system prompt handling)
    -> each answer compared with the teacher's (the path's comparator), with its confidence
    -> evals/PATH/vN/vM/: predictions.parquet, curve.parquet, curve.png, disagreements.parquet, manifest.json

``disagreements.parquet`` holds the answers that disagree with the teacher, most confident first, with
their inputs: these decide how much can be served at the target, and at the top they are often the
teacher's own mistakes or inputs that fit two answers (bench/RESULTS-distill.md), worth a person's reading.

The curve gives, for each confidence threshold, the share of answers served (coverage) and the
agreement among them; the report names the threshold where agreement first reaches the target
and the calibrated one (Wilson lower bound at the target, as the router calibrates).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from arbitrage.config import Config
from arbitrage.documented_fields import DocumentedFields
from arbitrage.errors import ConfigError
from distill.dataset.config import check_path_name
from distill.versions import MANIFEST, choose, publish, versions
from router import calibration
from router.comparators import Comparator, make_comparator
from router.confidence import score
from router.policy import ComparatorSpec, PolicyError

PREDICTIONS_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("expected", pa.string()), ("answer", pa.string()),
    ("confidence", pa.float64()), ("confidence_min", pa.float64()), ("agreed", pa.bool_()),
    ("detail", pa.string()), ("finish_reason", pa.string()), ("completion_tokens", pa.int64()),
    ("latency_ms", pa.float64()), ("error", pa.string()),
])
DISAGREEMENTS_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("confidence", pa.float64()), ("expected", pa.string()), ("answer", pa.string()),
    ("input", pa.string()),
])
CURVE_SCHEMA = pa.schema([("threshold", pa.float64()), ("coverage", pa.float64()), ("agreement", pa.float64()),
                          ("lower_bound", pa.float64()), ("n", pa.int64())])


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class EvalConfig(DocumentedFields):
    """One ``arbitrage distill eval`` run."""

    path: str = _help("The call path whose adapter is evaluated.")
    adapter: str | None = _help("Adapter version (vN) [default: the latest].", default=None)
    target: float = _help("Agreement the local route must reach; the report gives the threshold and coverage "
                          "that reach it.", default=0.99)
    confidence: Literal["joint", "min"] = _help(
        "Confidence of an answer: 'joint' (probability of the whole answer) or 'min' (of its least likely "
        "token).", default="joint")
    comparator: str | None = _help("How an answer is compared with the teacher's: exact, json, numeric, similarity "
                                   "[default: json if the dataset checked JSON answers, else exact].", default=None)
    max_examples: int | None = _help("Evaluate at most this many eval examples (the split's first ones).",
                                     default=None)
    max_tokens: int = _help("Longest answer asked of the adapter, in tokens.", default=128)
    concurrency: int = _help("Requests in flight at once.", default=8)
    min_samples: int = _help("Served answers needed before a calibrated threshold is trusted.", default=100)
    vllm_url: str | None = _help("Use this running vLLM (serving the adapter's base model) instead of starting one.",
                                 default=None)

    def __post_init__(self) -> None:
        check_path_name(self.path)
        if self.adapter is not None and not (self.adapter.startswith("v") and self.adapter[1:].isdigit()):
            raise ConfigError(f"--adapter must look like v1, v2, ...; got {self.adapter!r}")
        checks = ((0 < self.target <= 1, "--target must be more than 0 and at most 1"),
                  (self.max_examples is None or self.max_examples >= 1, "--max-examples must be at least 1"),
                  (self.max_tokens >= 1, "--max-tokens must be at least 1"),
                  (self.concurrency >= 1, "--concurrency must be at least 1"),
                  (self.min_samples >= 1, "--min-samples must be at least 1"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class Adapter:
    """A published adapter version and its manifest."""

    path: str
    version: str
    folder: Path
    manifest: dict[str, Any]

    @property
    def served_name(self) -> str:
        """The name vLLM serves it under (the route asks for the same)."""
        return f"{self.path}/{self.version}"


@dataclass
class Prediction:
    example_id: str
    expected: str
    answer: str | None = None
    confidence: float = 0.0
    confidence_min: float = 0.0
    agreed: bool = False
    detail: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    error: str | None = None


@dataclass
class EvalResult:
    folder: Path
    manifest: dict[str, Any]
    predictions: list[Prediction] = dataclasses.field(default_factory=list)


def find_adapter(adapters_root: Path, path: str, wanted: str | None) -> Adapter:
    found = versions(adapters_root / path)
    if not found:
        raise ConfigError(f"no adapter for path {path!r} in {adapters_root}: train one with "
                          f"`arbitrage distill train {path}`")
    chosen = choose(found, wanted, "adapter", path)
    folder = adapters_root / path / chosen
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"adapter {folder} has no readable manifest: {exc}") from None
    return Adapter(path, chosen, folder, manifest)


def eval_rows(adapter: Adapter, limit: int | None) -> list[dict[str, Any]]:
    """The eval split of the dataset the adapter was trained on."""
    dataset = Path(adapter.manifest["dataset"]["folder"])
    split = dataset / "eval.parquet"
    try:
        table = pq.read_table(split, columns=["example_id", "input_messages", "system_prompt", "answer"])
    except (OSError, pa.ArrowInvalid) as exc:
        raise ConfigError(f"cannot read the eval split {split} of adapter {adapter.served_name}: {exc}") from None
    rows = table.to_pylist()[:limit] if limit else table.to_pylist()
    if not rows:
        raise ConfigError(f"dataset {dataset} has no eval examples: build it with --eval-fraction above 0")
    return rows


def messages_for(row: dict[str, Any], manifest: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation the adapter was trained on: the path's system prompt or its replacement."""
    handling = manifest.get("system_prompt") or {"mode": "keep"}
    system = handling.get("text") if handling["mode"] == "replace" else row["system_prompt"]
    head = [{"role": "system", "content": system}] if system else []
    return head + json.loads(row["input_messages"])


def default_comparator(adapter: Adapter) -> str:
    """json when the dataset's answers were checked as JSON, else exact."""
    dataset_manifest = Path(adapter.manifest["dataset"]["folder"]) / MANIFEST
    try:
        answer_format = json.loads(dataset_manifest.read_text())["config"]["answer_format"]
    except (OSError, ValueError, KeyError):
        answer_format = "text"
    return "json" if answer_format == "json" else "exact"


def path_comparator(adapter: Adapter, name: str | None = None) -> tuple[str, Comparator]:
    """The comparator named ``name``, else the path's default (see ``default_comparator``), and its name."""
    name = name or default_comparator(adapter)
    try:
        return name, make_comparator(ComparatorSpec(name=name))
    except (PolicyError, ValueError) as exc:
        raise ConfigError(f"--comparator: {exc}") from None


def judge(predictions: Sequence[Prediction], comparator: Comparator) -> None:
    """Set ``agreed`` and ``detail`` of every answered prediction: its answer against the teacher's."""
    for prediction in predictions:
        if prediction.answer is not None:
            comparison = comparator.compare(prediction.expected, prediction.answer)
            prediction.agreed, prediction.detail = comparison.agreed, comparison.detail


def evaluate(cfg: EvalConfig, config: Config, command: Sequence[str], *, models_dir: Path | None = None,
             progress: bool = True) -> EvalResult:
    """Run the whole evaluation and publish its folder; user mistakes raise ConfigError first."""
    started = time.perf_counter()
    adapter = find_adapter(config.data_dir / "adapters", cfg.path, cfg.adapter)
    rows = eval_rows(adapter, cfg.max_examples)
    comparator_name, comparator = path_comparator(adapter, cfg.comparator)
    with serving(cfg, config, adapter) as base_url:
        asked = time.perf_counter()
        predictions = asyncio.run(ask_all(base_url, adapter, rows, cfg, progress))
        ask_seconds = time.perf_counter() - asked
    judge(predictions, comparator)
    errors = [p for p in predictions if p.error]
    if len(errors) == len(predictions):
        raise ConfigError(f"every request to the adapter failed; the first: {errors[0].error}")
    points = [(p.confidence, p.agreed) for p in predictions]
    summary = summarize(points, cfg)
    disagreeing = disagreements(predictions, rows)
    manifest = {
        "path": cfg.path, "adapter": {"version": adapter.version, "folder": str(adapter.folder.resolve()),
                                      "served_name": adapter.served_name},
        "dataset": {k: adapter.manifest["dataset"].get(k) for k in ("version", "folder")},
        "created_at": datetime.now(UTC).isoformat(), "command": shlex.join(command),
        "config": dataclasses.asdict(cfg), "comparator": comparator_name,
        "examples": len(predictions), "errors": len(errors), "first_error": errors[0].error if errors else None,
        "disagreements": len(disagreeing),
        **summary,
        "timing": {"wall_seconds": round(time.perf_counter() - started, 2), "ask_seconds": round(ask_seconds, 2),
                   "requests_per_s": round(len(predictions) / ask_seconds, 2) if ask_seconds else None},
    }
    folder, manifest = write_eval(config.data_dir / "evals" / cfg.path / adapter.version, predictions, points,
                                  manifest, disagreeing)
    return EvalResult(folder, manifest, predictions)


def disagreements(predictions: Sequence[Prediction], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The answers that disagree with the teacher, most confident first, each with its input (the last
    message of the conversation asked)."""
    inputs = {row["example_id"]: last_input(row["input_messages"]) for row in rows}
    wrong = [p for p in predictions if p.answer is not None and not p.agreed]
    return [{"example_id": p.example_id, "confidence": p.confidence, "expected": p.expected, "answer": p.answer,
             "input": inputs.get(p.example_id)} for p in sorted(wrong, key=lambda p: p.confidence, reverse=True)]


def last_input(messages: str | list[dict[str, Any]]) -> str | None:
    """The content of a conversation's last message (a list, or its JSON), as text (content parts
    as their JSON)."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    content = messages[-1].get("content") if messages and isinstance(messages[-1], dict) else None
    return content if content is None or isinstance(content, str) else json.dumps(content, ensure_ascii=False)


def summarize(points: list[tuple[float, bool]], cfg: EvalConfig) -> dict[str, Any]:
    """Agreement at full coverage, the threshold reaching the target, and the calibrated one."""
    n = len(points)
    reached = calibration.at_target(points, cfg.target)
    calibrated = calibration.calibrate(points, cfg.target, min_samples=cfg.min_samples)
    calibrated_point = next((p for p in calibration.curve(points) if p.threshold == calibrated), None)
    return {
        "agreement": sum(a for _, a in points) / n if n else None,
        "target": cfg.target,
        "at_target": ({"threshold": reached.threshold, "coverage": reached.coverage, "agreement": reached.agreement,
                       "n": reached.n} if reached else None),
        "calibrated": ({"threshold": calibrated, "coverage": calibrated_point.coverage,
                        "agreement": calibrated_point.agreement, "lower_bound": calibrated_point.lower_bound,
                        "min_samples": cfg.min_samples} if calibrated_point else None),
    }


@contextlib.contextmanager
def serving(cfg: EvalConfig, config: Config, adapter: Adapter) -> Iterator[str]:
    """A vLLM with the adapter loaded: the given one, else one started here (and stopped after)."""
    from deploy.vllm import LocalClient, LocalServer, free_port

    server = None
    if cfg.vllm_url:
        base_url = cfg.vllm_url.rstrip("/")
    else:
        state = Path(tempfile.mkdtemp(prefix="arbitrage-eval-vllm-"))
        server = LocalServer(config.local, adapter.manifest["base"]["location"], state, port=free_port())
        server.start()
        base_url = server.base_url
    try:
        client = LocalClient(base_url)
        if not client.healthy():
            raise ConfigError(f"no healthy vLLM at {base_url}")
        client.load_adapter(adapter.served_name, adapter.folder)
        client.close()
        yield base_url
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.state_dir, ignore_errors=True)


async def ask_all(base_url: str, adapter: Adapter, rows: list[dict[str, Any]], cfg: EvalConfig,
                  progress: bool) -> list[Prediction]:
    """Every eval input through the adapter (bounded concurrency), in input order."""
    import openai
    from tqdm.auto import tqdm

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=2, timeout=300)
    semaphore = asyncio.Semaphore(cfg.concurrency)
    bar = tqdm(total=len(rows), desc="evaluating", unit="ex", disable=not progress, dynamic_ncols=True)

    async def ask(row: dict[str, Any]) -> Prediction:
        prediction = Prediction(row["example_id"], row["answer"])
        async with semaphore:
            started = time.perf_counter()
            try:
                response = await client.chat.completions.create(
                    model=adapter.served_name, messages=messages_for(row, adapter.manifest), temperature=0,
                    max_tokens=cfg.max_tokens, logprobs=True)
            except openai.OpenAIError as exc:
                prediction.error = f"{type(exc).__name__}: {exc}"[:500]
            else:
                choice = response.choices[0]
                content = [t.model_dump() for t in (choice.logprobs.content or [])] if choice.logprobs else []
                prediction.answer = choice.message.content or ""
                prediction.confidence = score(content, cfg.confidence)
                prediction.confidence_min = score(content, "min")
                prediction.finish_reason = choice.finish_reason
                prediction.completion_tokens = response.usage.completion_tokens if response.usage else None
            prediction.latency_ms = (time.perf_counter() - started) * 1000
        bar.update(1)
        return prediction

    try:
        return list(await asyncio.gather(*(ask(row) for row in rows)))
    finally:
        bar.close()
        await client.close()


def write_eval(root: Path, predictions: list[Prediction], points: list[tuple[float, bool]],
               manifest: dict[str, Any], disagreeing: list[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """Predictions, the curve (Parquet and PNG), the disagreements and the manifest, published as the next vM."""
    root.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".evaluating-", dir=root))
    try:
        pq.write_table(pa.Table.from_pylist([dataclasses.asdict(p) for p in predictions], PREDICTIONS_SCHEMA),
                       temp / "predictions.parquet")
        points_on_curve = calibration.curve(points)
        pq.write_table(pa.Table.from_pylist([p._asdict() for p in points_on_curve], CURVE_SCHEMA),
                       temp / "curve.parquet")
        plot_curve(points_on_curve, manifest, temp / "curve.png")
        pq.write_table(pa.Table.from_pylist(disagreeing, DISAGREEMENTS_SCHEMA), temp / "disagreements.parquet")
        files = ["predictions.parquet", "curve.parquet", "curve.png", "disagreements.parquet"]
        return publish(temp, root, {**manifest, "files": files})
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def plot_curve(points: list[calibration.CurvePoint], manifest: dict[str, Any], path: Path) -> None:
    """Agreement against coverage as the threshold rises, the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot([p.coverage for p in points], [p.agreement for p in points], label="agreement among served")
    ax.plot([p.coverage for p in points], [p.lower_bound for p in points], linestyle=":",
            label="Wilson lower bound (95%)")
    ax.axhline(manifest["target"], color="grey", linestyle="--", label=f"target {manifest['target']:.0%}")
    if manifest["at_target"]:
        reached = manifest["at_target"]
        ax.scatter([reached["coverage"]], [reached["agreement"]], color="black", zorder=3,
                   label=f"threshold {reached['threshold']:.3f}: {reached['coverage']:.0%} served")
    ax.set_xlabel("coverage (share of requests served locally)")
    ax.set_ylabel("agreement with the teacher")
    ax.set_xlim(0, 1.02)
    ax.set_title(f"{manifest['path']} {manifest['adapter']['version']}: "
                 f"{manifest['agreement']:.1%} agreement at full coverage ({manifest['examples']} examples)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
