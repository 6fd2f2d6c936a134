"""Banking77 distillation benchmark (issue 3): capture -> build -> train -> evaluate, timed.

    .venv/bin/python bench/distill_banking77.py                      # the full run (all 10,003 texts)
    .venv/bin/python bench/distill_banking77.py --quick              # a smoke run of every stage
    .venv/bin/python bench/distill_banking77.py --trl-baseline 60    # also time TRL's SFTTrainer

1. capture: a real gateway (`arbitrage serve --dev`) in front of `arbitrage sim` (gold labels of
   Banking77's train.csv and test.csv, no added latency); the training texts are sent as app
   traffic with the official openai client (16 in flight, a long classification system prompt
   listing the 77 intents, JSON answers) under the path banking77/intents, the test texts under
   banking77/intents-heldout (header X-Arbitrage-Path), so training never sees them.
2. build: `arbitrage distill build banking77/intents --eval-fraction 0`, then a second version
   whose eval split is the captured held-out path (the teacher's captured answers).
3. train: `arbitrage distill train` with the recipe below (options of this script).
4. eval: vLLM (CPU build) with the adapter, `arbitrage distill eval --target 0.99`; coverage at
   the target is reported for both confidence signals (joint and min token probability).
5. (--trl-baseline STEPS) TRL's SFTTrainer + peft on the same training split, same LoRA, batch,
   learning rate and precision, run from bench/.work/trl-venv (made on first use: a venv that sees
   this project's packages and adds only TRL's own); not counted in the pipeline time.

Everything goes to bench/.work/distill/<UTC time>/ (data dir, logs, results.json, results.md);
bench/.work/distill/latest points at the last run (bench/route_banking77.py uses its adapter).
Every server started here is stopped on exit, on error and on SIGTERM/Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT / "simulator" / "data" / "banking77"
WORK = ROOT / "bench" / ".work"
TRL_VENV = WORK / "trl-venv"
TRL_REQUIREMENT = "trl==1.16.0"
"""The TRL the baseline was measured with (bench/RESULTS-distill.md); it accepts this project's transformers."""
TRAIN_PATH = "banking77/intents"
HELDOUT_PATH = "banking77/intents-heldout"
MODEL = "gpt-4o-mini"
SHORT_PROMPT = "Banking77 intent as JSON."
TARGETS = {"agreement": 0.93, "coverage_at_99": 0.80, "minutes": 30.0}


def app_system_prompt() -> str:
    """The app's long prompt: what a team would send a frontier model for this path."""
    labels = json.loads((DATA / "categories.json").read_text())
    return ("You are the intent classifier of a retail bank's customer support. Read the customer's message and "
            "decide which one of the following 77 intents it expresses. Answer with a single JSON object and "
            'nothing else, in the form {"intent": "<intent>"}, using exactly one of these intent names:\n'
            + "\n".join(f"- {label}" for label in labels))


def read_texts(name: str, limit: int | None) -> list[str]:
    with open(DATA / name, newline="") as stream:
        texts = [row["text"] for row in csv.DictReader(stream)]
    return texts[:limit] if limit else texts


def write_sim_dataset(path: Path) -> None:
    """train.csv and test.csv in one file: the simulator then knows the gold label of every text."""
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "category"])
        for name in ("train.csv", "test.csv"):
            with open(DATA / name, newline="") as stream:
                writer.writerows((row["text"], row["category"]) for row in csv.DictReader(stream))


# ---------------------------------------------------------------- processes


class Cleanup:
    """Servers to stop whatever happens; SIGTERM becomes KeyboardInterrupt so `finally` runs."""

    def __init__(self) -> None:
        self.stops: list = []
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def add(self, stop) -> None:
        self.stops.append(stop)

    def remove(self, stop) -> None:
        self.stops.remove(stop)

    def run(self) -> None:
        while self.stops:
            try:
                self.stops.pop()()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"cleanup: {exc}", file=sys.stderr)

    @staticmethod
    def _on_sigterm(signum, frame) -> None:
        raise KeyboardInterrupt


def arbitrage_cli(args: list[str], log: Path, env: dict | None = None) -> str:
    """Run an `arbitrage` command; stdout returned, stderr appended to ``log``; raises on failure."""
    from arbitrage.server_process import ARBITRAGE

    with open(log, "a") as err:
        err.write(f"\n$ arbitrage {shlex.join(args)}\n")
        err.flush()
        done = subprocess.run(ARBITRAGE + args, stdout=subprocess.PIPE, stderr=err, text=True,
                              env={**os.environ, **(env or {})}, cwd=ROOT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"arbitrage {args[0]} {args[1] if len(args) > 1 else ''} failed "
                           f"({done.returncode}); end of {log}:\n{tail}")
    return done.stdout.strip()


def start_sim_and_gateway(run: Path, cleanup: Cleanup, latency: list[str] | None = None,
                          local_url: str | None = None, local_settings: str = ""):
    """`arbitrage sim` (both Banking77 files) and `arbitrage serve --dev` in front of it (with a
    local model server at ``local_url``, if given, and more ``[local]`` TOML lines)."""
    from arbitrage.server_process import ARBITRAGE, ServerProcess, free_port

    write_sim_dataset(run / "banking77-all.csv")
    port = free_port()
    sim = ServerProcess(ARBITRAGE + ["sim", "--port", str(port), "--dataset", str(run / "banking77-all.csv"),
                                     *(["--latency-ms", "0", "--token-ms", "0"] if latency is None else latency),
                                     "--log-level", "warning"],
                        port, run / "logs" / "sim.log", health="/v1/models")
    cleanup.add(sim.stop)
    sim.start(timeout=60)
    config = run / "arbitrage.toml"
    config.write_text(f'[gateway]\ndev = true\n\n[[upstreams]]\nname = "sim"\nbase_url = "{sim.url}/v1"\n'
                      f'models = ["*"]\nmax_retries = 2\n'
                      + (f'\n[local]\nurl = "{local_url}"\n{local_settings}' if local_url else ""))
    port = free_port()
    gateway = ServerProcess(ARBITRAGE + ["serve", "--dev", "--port", str(port), "--data-dir", str(run / "data"),
                                         "--config", str(config)], port, run / "logs" / "gateway.log")
    cleanup.add(gateway.stop)
    gateway.start(timeout=60)
    return sim, gateway


async def send_all(base_url: str, texts: list[str], path: str, concurrency: int) -> dict:
    """Every text as one chat completion through the gateway; counts of answers and errors."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="dev", max_retries=3, timeout=120)
    semaphore = asyncio.Semaphore(concurrency)
    prompt = app_system_prompt()
    errors: list[str] = []

    async def ask(text: str) -> None:
        async with semaphore:
            try:
                await client.chat.completions.create(
                    model=MODEL, temperature=0, max_tokens=32, extra_headers={"X-Arbitrage-Path": path},
                    messages=[{"role": "system", "content": prompt}, {"role": "user", "content": text}])
            except openai.OpenAIError as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:300])

    try:
        await asyncio.gather(*(ask(t) for t in texts))
    finally:
        await client.close()
    return {"sent": len(texts), "errors": len(errors), "first_error": errors[0] if errors else None}


def capture(run: Path, args, cleanup: Cleanup) -> dict:
    sim, gateway = start_sim_and_gateway(run, cleanup)
    train_texts = read_texts("train.csv", args.train_texts)
    test_texts = read_texts("test.csv", args.test_texts)
    started = time.perf_counter()
    sent = {"train": asyncio.run(send_all(gateway.url + "/v1", train_texts, TRAIN_PATH, args.concurrency)),
            "heldout": asyncio.run(send_all(gateway.url + "/v1", test_texts, HELDOUT_PATH, args.concurrency))}
    seconds = time.perf_counter() - started
    for server in (gateway, sim):
        server.stop()
        cleanup.remove(server.stop)
    total = len(train_texts) + len(test_texts)
    return {**sent, "requests_per_s": round(total / seconds, 1), "concurrency": args.concurrency}


# ---------------------------------------------------------------- build


def build(run: Path, log: Path) -> dict:
    """The training path's dataset (no eval split), then a version whose eval split is the held-out path."""
    import pyarrow.parquet as pq

    data = run / "data"
    v1 = Path(arbitrage_cli(["distill", "build", TRAIN_PATH, "--data-dir", str(data), "--eval-fraction", "0"], log))
    manifest = json.loads((v1 / "manifest.json").read_text())
    train = [example_from_row(row, "captured") for row in pq.read_table(v1 / "train.parquet").to_pylist()]
    heldout, counts = heldout_examples(data, {row_id(e) for e in train})
    from distill.dataset.writer import write_dataset

    eval_manifest = {**{k: v for k, v in manifest.items() if k not in ("version", "files")},
                     "command": f"{manifest['command']}; eval split: bench/distill_banking77.py ({HELDOUT_PATH})",
                     "eval_source": {"path": HELDOUT_PATH, **counts}, "built_from": str(v1)}
    eval_manifest["split"] = {**manifest["split"], "eval": len(heldout),
                              "method": f"eval = captured calls of {HELDOUT_PATH} (Banking77 test.csv)"}
    v2 = write_dataset(data / "datasets" / TRAIN_PATH, {"train": train, "eval": heldout}, eval_manifest)
    return {"dataset": v2.name, "train_examples": len(train), "eval_examples": len(heldout),
            "filters": manifest["filters"], "heldout": counts}


def example_from_row(row: dict, source: str):
    from distill.dataset.source import Example

    return Example(row["request_id"], tuple(json.loads(row["input_messages"])), row["system_prompt"], row["answer"],
                   answer_model=row["answer_model"], cost_usd=row["cost_usd"], source=source)


def row_id(example) -> str:
    from distill.dataset.writer import example_id

    return example_id(example)


def heldout_examples(data: Path, train_ids: set[str]):
    """The held-out path's captured examples: one per distinct input, none whose input is in training."""
    from distill.dataset.source import read_captured

    captured = read_captured(data, HELDOUT_PATH)
    seen, kept, in_train = set(), [], 0
    for example in captured.examples:
        key = row_id(example)
        if key in train_ids:
            in_train += 1
        elif key not in seen:
            kept.append(example)
        seen.add(key)
    return kept, {"captured": captured.calls, "unsupported": captured.unsupported, "same_input_in_train": in_train,
                  "duplicates": len(captured.examples) - in_train - len(kept), "kept": len(kept)}


# ---------------------------------------------------------------- train


def recipe_args(args, max_steps: int | None = None) -> list[str]:
    options = ["--drop-system-prompt", "--short-system-prompt", args.short_prompt, "--rank", str(args.rank),
               "--lr", str(args.lr), "--warmup-ratio", str(args.warmup_ratio), "--lr-schedule", args.schedule,
               "--batch-size", str(args.batch_size), "--grad-accumulation", str(args.grad_accumulation),
               "--max-seq-len", str(args.max_seq_len), "--bf16", args.bf16, "--attention", args.attention,
               "--eval-steps", "100000", "--max-eval-examples", str(args.train_eval_examples),
               "--save-steps", str(args.save_steps), "--logging-steps", "10", "--seed", str(args.seed)]
    if args.lora_alpha:
        options += ["--lora-alpha", str(args.lora_alpha)]
    if args.loraplus_ratio:
        options += ["--loraplus-ratio", str(args.loraplus_ratio)]
    if args.lora_layers:
        options += ["--lora-layers", str(args.lora_layers)]
    if args.average_from is not None:
        options += ["--average-from", str(args.average_from)]
    if args.weight_decay:
        options += ["--weight-decay", str(args.weight_decay)]
    max_steps = max_steps or args.max_steps
    return options + (["--max-steps", str(max_steps)] if max_steps else ["--epochs", str(args.epochs)])


def train(run: Path, dataset: str, args, log: Path) -> dict:
    """`arbitrage distill train`; with --train-minutes, interrupted when the time is up and resumed
    with --max-steps at its last checkpoint, which publishes that checkpoint as the adapter."""
    command = ["distill", "train", TRAIN_PATH, "--data-dir", str(run / "data"), "--dataset-version", dataset]
    stopped = None
    if args.train_minutes:
        folder, stopped = train_for(command + ["--no-resume", *recipe_args(args)], args.train_minutes * 60, run, log)
        if stopped:
            folder = arbitrage_cli(command + recipe_args(args, max_steps=stopped["step"]), log)
    else:
        folder = arbitrage_cli(command + ["--no-resume", *recipe_args(args)], log)
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    timing = manifest["timing"] if not stopped else {
        "train_seconds": None, "tokens_trained": stopped["tokens"], "tokens_per_s": stopped["tokens_per_s"]}
    return {"adapter": Path(folder).name, "folder": str(folder), "command": manifest["command"],
            "steps": manifest["metrics"]["global_step"], "planned_steps": stopped and stopped["planned"],
            "epoch": manifest["metrics"]["epoch"], "train_loss": manifest["metrics"]["train_loss"],
            "eval_loss": manifest["metrics"]["eval_loss"], "precision_bf16": manifest["precision"]["bf16"],
            "stopped_by_time": bool(stopped), **timing, "examples": manifest["dataset"]["train"]}


def train_for(args: list[str], seconds: float, run: Path, log: Path) -> tuple[str | None, dict | None]:
    """Run the training; if it is still running after ``seconds``, interrupt it (Ctrl-C: it keeps its
    checkpoints) and return the last checkpoint's step, tokens seen and the bar's last tokens/s."""
    from arbitrage.server_process import ARBITRAGE

    with open(log, "a") as err:
        err.write(f"\n$ arbitrage {shlex.join(args)}  (time budget {seconds / 60:.0f} min)\n")
        err.flush()
        # Ctrl-C is how the time is called, so the training must not inherit an ignored SIGINT (as it does
        # when this benchmark runs in the background of a script: `nohup ... &`)
        proc = subprocess.Popen(ARBITRAGE + args, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        interrupted = False
        try:
            try:
                out, _ = proc.communicate(timeout=seconds)
            except subprocess.TimeoutExpired:
                interrupted = True
                proc.send_signal(signal.SIGINT)
                out, _ = proc.communicate(timeout=300)  # it may have finished just then (status 0, the adapter's folder)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"training did not stop within 5 minutes of Ctrl-C at its time budget; see {log}") from None
        except BaseException:
            proc.kill()
            raise
    if proc.returncode == 0:
        return out.strip(), None
    if not interrupted:  # it failed on its own, e.g. a diverged loss
        last = log.read_text(errors="replace").strip().splitlines()[-1]
        raise RuntimeError(f"training failed ({proc.returncode}): {last}")
    checkpoints = sorted(run.glob(f"data/adapters/{TRAIN_PATH}/v*.partial/checkpoints/checkpoint-*"),
                         key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if not checkpoints:
        raise RuntimeError(f"training stopped ({proc.returncode}) before its first checkpoint; see {log}")
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    speeds = re.findall(r"tok/s=(\d+)", log.read_text(errors="replace"))
    return None, {"step": state["global_step"], "planned": state["max_steps"],
                  "tokens": state.get("num_input_tokens_seen"), "tokens_per_s": float(speeds[-1]) if speeds else None}


# ---------------------------------------------------------------- eval


def start_vllm(run: Path, base: str, rank: int, cleanup: Cleanup):
    from arbitrage.config import LocalSettings
    from deploy.vllm import LocalServer, free_port

    settings = LocalSettings(served_model_name="base", max_loras=1, max_lora_rank=max(8, rank), max_model_len=1024,
                             startup_timeout_s=900)
    server = LocalServer(settings, base, run / "vllm", port=free_port())
    cleanup.add(server.stop)
    server.start()
    return server


def evaluate(run: Path, trained: dict, args, log: Path, cleanup: Cleanup) -> dict:
    started = time.perf_counter()
    adapter = json.loads((Path(trained["folder"]) / "manifest.json").read_text())
    server = start_vllm(run, adapter["base"]["location"], args.rank, cleanup)
    startup = time.perf_counter() - started
    try:
        folder = Path(arbitrage_cli(eval_command(run, trained["adapter"], server.base_url, args), log))
    finally:
        server.stop()
        cleanup.remove(server.stop)
    manifest = json.loads((folder / "manifest.json").read_text())
    return {"folder": str(folder), "command": manifest["command"], "vllm_startup_seconds": round(startup, 1),
            **signals(folder / "predictions.parquet", args.target),
            **{k: manifest[k] for k in ("examples", "errors", "first_error", "agreement", "at_target", "calibrated")},
            "timing": manifest["timing"]}


def eval_command(run: Path, adapter: str, vllm_url: str, args) -> list[str]:
    """`arbitrage distill eval` of the run's ``adapter`` version on the held-out texts, through ``vllm_url``."""
    options = ["--adapter", adapter, "--vllm-url", vllm_url, "--target", str(args.target),
               "--concurrency", str(args.eval_concurrency), "--max-tokens", "32"]
    options += ["--max-examples", str(args.eval_examples)] if args.eval_examples else []
    return ["distill", "eval", TRAIN_PATH, "--data-dir", str(run / "data"), *options]


def signals(predictions: Path, target: float) -> dict:
    """Coverage at the target agreement by each confidence signal in the predictions."""
    import pyarrow.parquet as pq

    from router import calibration

    rows = pq.read_table(predictions).to_pylist()
    found = {}
    for name, column in (("joint", "confidence"), ("min", "confidence_min")):
        points = [(r[column], bool(r["agreed"])) for r in rows]
        reached = calibration.at_target(points, target)
        calibrated = calibration.calibrate(points, target, min_samples=100)
        calibrated_point = next((p for p in calibration.curve(points) if p.threshold == calibrated), None)
        found[name] = {"at_target": reached._asdict() if reached else None,
                       "calibrated": calibrated_point._asdict() if calibrated_point else None}
    return {"signals": found, "invalid_answers": sum(1 for r in rows if r["answer"] is not None and not r["agreed"]
                                                      and (r["detail"] or "").startswith("invalid"))}


# ---------------------------------------------------------------- TRL baseline


def trl_baseline(run: Path, dataset: str, steps: int, args, log: Path, bf16: bool) -> dict:
    """TRL's SFTTrainer on the same training split, from its own venv (this file's `trl-worker` mode),
    in the precision the measured training used (``bf16``), so the two are compared like for like."""
    out = run / "trl-baseline.json"
    command = [str(trl_python(TRL_VENV, log)), __file__, "trl-worker", "--dataset",
               str(run / "data" / "datasets" / TRAIN_PATH / dataset), "--steps", str(steps), "--out", str(out),
               *trl_recipe(args, bf16)]
    with open(log, "a") as err:
        err.write(f"\n$ {shlex.join(command)}\n")
        err.flush()
        done = subprocess.run(command, stdout=err, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"TRL baseline failed ({done.returncode}); see {log}")
    return json.loads(out.read_text())


def trl_python(venv: Path, log: Path) -> Path:
    """The Python of a venv that sees this project's packages (a .pth file naming its site-packages)
    and adds only what TRL needs beyond them (trl, datasets and theirs), so both trainings run the
    same torch, transformers and peft. Made on first use, in a .partial folder renamed when complete
    (an interrupted install is not mistaken for a venv)."""
    import shutil
    import sysconfig

    python = venv / "bin" / "python"
    if python.exists():
        return python
    partial = venv.with_name(venv.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with open(log, "a") as err:
        def step(command: list[str]) -> str:
            err.write(f"\n$ {shlex.join(command)}\n")
            err.flush()
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"making the TRL venv failed at `{shlex.join(command)}`; see {log}")
            return done.stdout

        step([sys.executable, "-m", "venv", str(partial)])
        site = step([str(partial / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        (Path(site.strip()) / "main-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        step([str(partial / "bin" / "python"), "-m", "pip", "install", "--quiet", TRL_REQUIREMENT])
    partial.rename(venv)
    return python


def trl_recipe(args, bf16: bool) -> list[str]:
    return ["--short-prompt", args.short_prompt, "--rank", str(args.rank), "--lr", str(args.lr),
            "--batch-size", str(args.batch_size), "--grad-accumulation", str(args.grad_accumulation),
            "--max-seq-len", str(args.max_seq_len), "--bf16", "on" if bf16 else "off",
            *(["--lora-alpha", str(args.lora_alpha)] if args.lora_alpha else []),
            *(["--lora-layers", str(args.lora_layers)] if args.lora_layers else [])]


def trl_worker(argv: list[str]) -> None:
    """Runs inside the TRL venv: SFTTrainer + peft, prompt-completion data (loss on the answer only)."""
    parser = argparse.ArgumentParser()
    for name in ("--dataset", "--out", "--short-prompt", "--bf16"):
        parser.add_argument(name, required=True)
    for name in ("--steps", "--rank", "--batch-size", "--grad-accumulation", "--max-seq-len"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--lora-alpha", type=float)
    parser.add_argument("--lora-layers", type=int)
    a = parser.parse_args(argv)
    import pyarrow.parquet as pq
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    base = json.loads((Path(a.dataset) / "manifest.json").read_text())  # noqa: F841 - kept for the record
    models = Path(os.environ.get("ARBITRAGE_MODEL_CACHE", Path.home() / ".cache/arbitrage/models"))
    location = next(p for p in sorted((models / "smollm2-135m-instruct").iterdir()) if (p / "config.json").is_file())
    rows = pq.read_table(Path(a.dataset) / "train.parquet").to_pylist()
    data = Dataset.from_list([{"prompt": [{"role": "system", "content": a.short_prompt}, *json.loads(r["input_messages"])],
                               "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)

    class Timer(TrainerCallback):
        seconds, tokens, started, first = 0.0, 0, 0.0, None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()
            self.first = state.num_input_tokens_seen if self.first is None else self.first

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.started
            self.tokens = state.num_input_tokens_seen - self.first

    timer = Timer()
    config = trl.SFTConfig(output_dir=str(Path(a.out).parent / "trl-out"), max_steps=a.steps, use_cpu=True,
                           bf16=a.bf16 == "on", per_device_train_batch_size=a.batch_size,
                           gradient_accumulation_steps=a.grad_accumulation, learning_rate=a.lr,
                           max_length=a.max_seq_len, logging_steps=10, save_strategy="no", report_to="none",
                           include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0)
    layers = model.config.num_hidden_layers
    upper = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             "layers_to_transform": list(range(layers - a.lora_layers, layers))} if a.lora_layers else {}
    lora = LoraConfig(r=a.rank, lora_alpha=a.lora_alpha or 2 * a.rank, lora_dropout=0.0,
                      **{"target_modules": "all-linear", **upper}, bias="none", task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora, callbacks=[timer])
    output = trainer.train()
    Path(a.out).write_text(json.dumps({
        "steps": a.steps, "tokens": timer.tokens, "train_seconds": round(timer.seconds, 2),
        "tokens_per_s": round(timer.tokens / timer.seconds, 1), "train_loss": output.training_loss,
        "trl": trl.__version__, "transformers": transformers.__version__, "bf16": a.bf16 == "on"}, indent=2))


# ---------------------------------------------------------------- report


def machine() -> dict:
    from arbitrage.machine import cpu_name

    load = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    return {"cores": os.cpu_count(), "cpu": cpu_name(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                        * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "commit": commit.strip(), "load_at_start": [round(x, 2) for x in load]}


def report(results: dict) -> str:
    stages, ev, tr = results["stages"], results.get("eval", {}), results.get("train", {})
    total_min = sum(stages.values()) / 60
    joint, low = (ev.get("signals", {}).get(n, {}).get("at_target") for n in ("joint", "min"))
    best = max((s["coverage"] for s in (joint, low) if s), default=0.0)
    lines = [f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']['cores']} cores ({results['machine']['cpu']}), "
             f"{results['machine']['memory_gib']} GiB, Python {results['machine']['python']}, commit "
             f"{results['machine']['commit']}, started {results['started_at']}; load average at start "
             f"{results['machine']['load_at_start']}, during the run {results.get('load_during')}", "",
             "| measure | target | measured | met |", "| --- | --- | --- | --- |"]
    if ev:
        lines.append(f"| agreement at full coverage ({ev['examples']} test texts) | >= 93% | {ev['agreement']:.1%} | "
                     f"{_met(ev['agreement'] >= TARGETS['agreement'])} |")
        for name, point in (("joint", joint), ("min", low)):
            shown = f"{point['coverage']:.1%} (threshold {point['threshold']:.4f})" if point else "none"
            lines.append(f"| coverage at 99% agreement, `{name}` confidence | >= 80% | {shown} | "
                         f"{_met(bool(point) and point['coverage'] >= TARGETS['coverage_at_99'])} |")
    lines.append(f"| minutes from capture to evaluated adapter | < 30 | {total_min:.1f} | "
                 f"{_met(total_min < TARGETS['minutes'] and bool(ev))} |")
    if tr:
        trl_speed = results.get("trl_baseline", {}).get("tokens_per_s")
        lines.append(f"| training tokens/s vs TRL SFTTrainer | >= TRL | {tr['tokens_per_s']} vs "
                     f"{trl_speed or 'not run'} | {_met(bool(trl_speed) and tr['tokens_per_s'] >= trl_speed)} |")
    lines += ["", "Stages (minutes): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in stages.items()),
              f"Best coverage at 99%: {best:.1%}"]
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


# ---------------------------------------------------------------- main


def parse(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 300 training texts, 100 test texts, 30 steps")
    p.add_argument("--train-texts", type=int, help="send only the first N training texts [all 10,003]")
    p.add_argument("--test-texts", type=int, help="send only the first N test texts [all 3,080]")
    p.add_argument("--trl-baseline", type=int, metavar="STEPS", help="also time TRL's SFTTrainer for STEPS steps")
    p.add_argument("--concurrency", type=int, default=16, help="app requests in flight during capture")
    p.add_argument("--eval-concurrency", type=int, default=128,
                   help="eval requests in flight to vLLM (128: 1.38x the requests/s of 32 on 2 AVX2 cores, bench/vllm_cpu.py)")
    p.add_argument("--eval-examples", type=int, help="evaluate only the first N held-out examples [all]")
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--short-prompt", default=SHORT_PROMPT, help="system prompt trained and served instead of the app's")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, help="[2 x rank]")
    p.add_argument("--lora-layers", type=int, help="LoRA in the last N decoder layers only [all]")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--loraplus-ratio", type=float, help="LoRA+: B matrices at this many times --lr [plain LoRA]")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the LoRA weights")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--schedule", default="linear")
    p.add_argument("--epochs", type=float, default=2.4,
                   help="2 (all layers, lr 2e-3): 92.4%% agreement in 30 minutes on 2 avx512_bf16 cores, "
                        "93.2%% after 3 in 49; with eager attention 2.4 fit in 28.7-28.9 minutes, at 92.3-92.9%% "
                        "(bench/RESULTS-distill.md)")
    p.add_argument("--average-from", default=0.55,
                   help="publish the mean of the LoRA weights after every step past this share of the run "
                        "(distill train --average-from; 0.55: 2.4-5.0 points more coverage at 99%% in three "
                        "runs, bench/RESULTS-distill.md); 'none': the last step's weights",
                   type=lambda v: None if v == "none" else float(v))
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA initialisation and shuffling")
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                   help="bf16 autocast: 'auto' (the product's default) measures which trains faster here; on an "
                        "AVX2-only CPU without bf16 instructions, bf16 matmuls ran 6x slower than fp32 [auto]")
    p.add_argument("--attention", default="auto", choices=["auto", "eager", "sdpa"],
                   help="'auto' (the product's default): eager attention under bf16, 1.23x faster than SDPA")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps [200; 10 with --train-minutes]")
    p.add_argument("--train-minutes", type=float, help="stop training after this long and use its last checkpoint")
    p.add_argument("--train-eval-examples", type=int, default=200, help="eval-loss examples at the end of training")
    p.add_argument("--run-dir", type=Path, help="[bench/.work/distill/<UTC time>]")
    p.add_argument("--resume", action="store_true",
                   help="with --run-dir: run only the stages its results.json does not have (same options)")
    args = p.parse_args(argv)
    if args.resume and not args.run_dir:
        p.error("--resume needs --run-dir")
    args.save_steps = args.save_steps or (10 if args.train_minutes else 200)
    if args.quick:
        args.train_texts = args.train_texts or 300
        args.test_texts = args.test_texts or 100
        args.max_steps = args.max_steps or 30
        args.save_steps = args.save_steps if args.train_minutes else 1000
        args.train_eval_examples = 50
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["trl-worker"]:
        trl_worker(argv[1:])
        return 0
    args = parse(argv)
    os.environ.setdefault("ARBITRAGE_MODEL_CACHE", str(Path.home() / ".cache" / "arbitrage" / "models"))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run = args.run_dir or WORK / "distill" / stamp
    (run / "logs").mkdir(parents=True, exist_ok=True)
    latest = WORK / "distill" / "latest"
    if not args.run_dir:
        latest.unlink(missing_ok=True)
        latest.symlink_to(run.name)
    log = run / "logs" / "stages.log"
    results = {"command": shlex.join([".venv/bin/python", "bench/distill_banking77.py", *argv]), "run_dir": str(run),
               "started_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "stages": {},
               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.resume:
        if not (run / "results.json").exists():
            progress(f"--resume: no results.json in {run}")
            return 2
        results = {**json.loads((run / "results.json").read_text()), "resumed": results}
    cleanup = Cleanup()
    loads = list(results.get("load_during", []))
    try:
        for name, stage in (("capture", lambda: capture(run, args, cleanup)), ("build", lambda: build(run, log)),
                            ("train", lambda: train(run, results["build"]["dataset"], args, log)),
                            ("eval", lambda: evaluate(run, results["train"], args, log, cleanup))):
            if name in results["stages"]:
                progress(f"{name}: done before ({results['stages'][name] / 60:.1f} min)")
                continue
            progress(f"{name}...")
            started = time.perf_counter()
            results[name] = stage()
            results["stages"][name] = round(time.perf_counter() - started, 1)
            loads.append(os.getloadavg()[1])
            progress(f"{name} done in {results['stages'][name] / 60:.1f} min: {short(results[name])}")
            save(run, results)
        if args.trl_baseline:
            progress(f"TRL SFTTrainer baseline, {args.trl_baseline} steps...")
            results["trl_baseline"] = trl_baseline(run, results["build"]["dataset"], args.trl_baseline, args, log,
                                                   bf16=results["train"]["precision_bf16"])
            progress(f"TRL: {short(results['trl_baseline'])}")
    except KeyboardInterrupt:
        progress("interrupted; stopping servers")
        return 130
    finally:
        cleanup.run()
        results["load_during"] = [round(x, 2) for x in loads]
        save(run, results)
    text = report(results)
    (run / "results.md").write_text(text + "\n")
    print(text)
    progress(f"results in {run}")
    return 0


def short(value: dict) -> str:
    return json.dumps({k: v for k, v in value.items() if not isinstance(v, (dict, list))}, default=str)[:600]


def progress(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def save(run: Path, results: dict) -> None:
    (run / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
