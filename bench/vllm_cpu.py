"""vLLM (CPU build) serving settings, side by side, on the eval requests of a distillation run:

    .venv/bin/python bench/vllm_cpu.py [--run bench/.work/distill/latest] [--path banking77/intents]
        [--examples 300] [--rounds 2] [--concurrency 32 ...] [--only SETTING ...]

Each setting starts its own vLLM with the run's base model, loads the run's adapter and sends the
same held-out inputs exactly as `arbitrage distill eval` and the local route ask them (temperature 0,
log-probs, 32 tokens at most), with 32 in flight (or each of several `--concurrency` values in turn
against the same server: then a setting is reported as name@concurrency). Settings run in turn,
round after round (A B C A B C), so that a noisy neighbour hurts each of them alike; the report
gives each one's median requests/s over the rounds and its ratio to the first. Answers and their
confidence (the joint probability the router gates on) are compared with the first setting's, and
each setting's agreement with the teacher is given, so that a faster setting that answers differently
is seen. With drafts, vLLM's speculative-decoding counters give the share of drafted tokens the model
accepted and the accepted tokens per draft.

Settings (environment of the vLLM process; see deploy/vllm.py):
- stock: vLLM's own CPU LoRA ops (ARBITRAGE_LORA_OPS=stock), no preloaded libraries, vLLM's
  default of one core of two kept for its API server.
- grouped: the grouped LoRA ops of deploy/vllm_cpu_lora (a vLLM plugin), one matmul per adapter in
  the batch instead of a copy of the adapter's weights per token.
- preload: `[local] preload`, LD_PRELOAD of Intel OpenMP (libiomp5, shipped in .venv-vllm) and
  tcmalloc (Debian libtcmalloc-minimal4), which vLLM's CPU worker asks for at start.
- no-reserve: `[local] reserved_cpus = 0`, VLLM_CPU_NUM_OF_RESERVED_CPU=0 (the engine's OpenMP
  threads on both cores; vLLM keeps one core for its API server by default).
- nobind: VLLM_CPU_OMP_THREADS_BIND=nobind, the engine's OpenMP threads not pinned to cores (vLLM pins
  them by default), so the OS may move them off a core that its scheduler or API server needs.
- drafts: `[local] draft_answers`, speculative decoding with arbitrage's proposer, which drafts each answer
  from the answers given before (deploy/vllm_cpu_lora/arbitrage_vllm_answers.py); the other settings
  leave it off.
- bfloat16, float32: the last setting (arbitrage's default on a machine of up to 4 cores) with
  `[local] dtype` set. The other settings take `[local] dtype = "auto"`, which picks float32 on a CPU
  without bfloat16 instructions (so there "stock" is vLLM's defaults but for the dtype).

Results in bench/.work/vllm-cpu/<UTC time>/results.json; add them to bench/RESULTS-distill.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arbitrage.config import LocalSettings
from arbitrage.machine import cpu_flags, cpu_name
from deploy.vllm import BF16_CPU_FLAGS, LocalClient, LocalServer, free_port
from distill.evaluation import EvalConfig, ask_all, eval_rows, find_adapter, judge, path_comparator

WORK = ROOT / "bench" / ".work"
PATH = "banking77/intents"
SPEC_DECODE = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")


def settings() -> dict[str, tuple[dict, dict[str, str]]]:
    """name -> (LocalSettings fields, environment of the vLLM process)."""
    stock = {"ARBITRAGE_LORA_OPS": "stock"}
    plain = {"preload": False, "reserved_cpus": 1}  # vLLM's defaults: nothing preloaded, one core kept back
    return {
        "stock": (plain, stock),
        "stock+preload": ({**plain, "preload": True}, stock),
        "stock+no-reserve": ({**plain, "reserved_cpus": 0}, stock),
        "stock+preload+no-reserve": ({"preload": True, "reserved_cpus": 0}, stock),
        "grouped": (plain, {}),
        "grouped+preload+no-reserve": ({"preload": True, "reserved_cpus": 0}, {}),
        "grouped+preload": ({"preload": True, "reserved_cpus": 1}, {}),
        "grouped+preload+nobind": ({"preload": True, "reserved_cpus": 0}, {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}),
        "grouped+preload+no-reserve+drafts": ({"preload": True, "reserved_cpus": 0, "draft_answers": True}, {}),
        "grouped+preload+no-reserve+drafts15": ({"preload": True, "reserved_cpus": 0, "draft_answers": True,
                                                 "draft_tokens": 15}, {}),
        "bfloat16": ({"preload": True, "reserved_cpus": 0, "dtype": "bfloat16"}, {}),
        "float32": ({"preload": True, "reserved_cpus": 0, "dtype": "float32"}, {}),
    }


def run_one(name: str, fields: dict, env: dict[str, str], base: str, adapter, rows, cfgs: list[EvalConfig],
            comparator, out: Path) -> list[dict]:
    """One vLLM with this setting; the rows sent once per config (concurrency), in turn."""
    settings = LocalSettings(served_model_name="base", max_loras=1, max_lora_rank=16, max_model_len=1024,
                             startup_timeout_s=900, **{"draft_answers": False, **fields})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = LocalServer(settings, base, out / name.replace("+", "-"), port=free_port())
    try:
        server.start()
        client = LocalClient(server.base_url)
        client.load_adapter(adapter.served_name, adapter.folder)
        client.close()
        results = []
        for cfg in cfgs:
            before = spec_decode_counts(server.base_url)
            started = time.perf_counter()
            predictions = asyncio.run(ask_all(server.base_url, adapter, rows, cfg, progress=False))
            seconds = time.perf_counter() - started
            drafts, drafted, accepted = (n - before[counter] for counter, n in spec_decode_counts(server.base_url).items())
            judge(predictions, comparator)
            results.append({"requests_per_s": len(rows) / seconds, "seconds": seconds,
                            "errors": sum(p.error is not None for p in predictions),
                            "median_latency_ms": statistics.median(p.latency_ms for p in predictions),
                            "agreement": sum(p.agreed for p in predictions) / len(predictions),
                            "answers": [p.answer for p in predictions],
                            "confidences": [p.confidence for p in predictions],
                            "drafts": drafts, "draft_tokens": drafted, "accepted_tokens": accepted})
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return results


def spec_decode_counts(base_url: str) -> dict[str, float]:
    """vLLM's speculative-decoding counters so far (all 0 without drafting)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts = dict.fromkeys(SPEC_DECODE, 0.0)
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name in counts:
            counts[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return counts


def draft_counts(results: list[dict]) -> dict[str, float | None]:
    """Of the tokens drafted, the share the model accepted, and accepted tokens per draft (None: no drafts)."""
    accepted = sum(r["accepted_tokens"] for r in results)
    drafted, drafts = sum(r["draft_tokens"] for r in results), sum(r["drafts"] for r in results)
    return {"draft_acceptance": round(accepted / drafted, 3) if drafted else None,
            "accepted_per_draft": round(accepted / drafts, 2) if drafts else None}


def confidence_difference(confidences: list[float], reference: list[float]) -> list[float]:
    differences = [abs(a - b) for a, b in zip(confidences, reference, strict=True)]
    return [round(statistics.median(differences), 6), round(max(differences), 6)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=WORK / "distill" / "latest", help="distillation run folder")
    p.add_argument("--path", default=PATH, help="call path of the run's adapter")
    p.add_argument("--examples", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[32], help="requests in flight (several: each in turn)")
    p.add_argument("--only", nargs="*", help="settings to run [all]")
    args = p.parse_args()

    run = args.run.resolve()
    adapter = find_adapter(run / "data" / "adapters", args.path, None)
    rows = eval_rows(adapter, args.examples)
    _, comparator = path_comparator(adapter)
    cfgs = [EvalConfig(path=args.path, concurrency=c, max_tokens=32) for c in args.concurrency]
    envs = {k: v for k, v in settings().items() if not args.only or k in args.only}
    names = {k: [f"{k}@{c}" if len(cfgs) > 1 else k for c in args.concurrency] for k in envs}
    out = WORK / "vllm-cpu" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True)
    runs: dict[str, list[dict]] = {name: [] for variants in names.values() for name in variants}
    for round_ in range(args.rounds):
        for setting, (fields, env) in envs.items():
            # several concurrencies share a server: their order flips every round, so none always runs first (cold)
            order = list(zip(names[setting], cfgs, strict=True))[::1 if round_ % 2 == 0 else -1]
            results = run_one(setting, fields, env, adapter.manifest["base"]["location"], adapter, rows,
                              [cfg for _, cfg in order], comparator, out)
            for (name, _), result in zip(order, results, strict=True):
                print(f"round {round_ + 1} {name}: {result['requests_per_s']:.2f} req/s, "
                      f"median {result['median_latency_ms']:.0f} ms, {result['errors']} errors", flush=True)
                runs[name].append(result)
    first = next(iter(runs))
    setting_of = {name: setting for setting, variants in names.items() for name in variants}
    reference = runs[first][0]["answers"]
    # confidences are compared with the first setting's at the same concurrency: a batch's make-up alone
    # moves them a little
    first_setting = next(iter(envs))
    same_load = {name: names[first_setting][names[setting_of[name]].index(name)] for name in runs}
    base_speed = statistics.median(r["requests_per_s"] for r in runs[first])
    summary = {}
    for name, results in runs.items():
        speed = statistics.median(r["requests_per_s"] for r in results)
        fields, env = envs[setting_of[name]]
        summary[name] = {"settings": fields, "env": env, "median_requests_per_s": round(speed, 2),
                         "ratio": round(speed / base_speed, 2),
                         "runs_requests_per_s": [round(r["requests_per_s"], 2) for r in results],
                         "median_latency_ms": round(statistics.median(r["median_latency_ms"] for r in results)),
                         "errors": sum(r["errors"] for r in results),
                         "agreement_with_teacher": round(results[0]["agreement"], 4),
                         **draft_counts(results),
                         "answers_differing_from_" + first: sum(a != b for a, b in zip(results[0]["answers"], reference, strict=True)),
                         # the router's confidence: the answer's joint probability
                         "confidence_difference_median_max": confidence_difference(
                             results[0]["confidences"], runs[same_load[name]][0]["confidences"])}
    result = {"run": str(run), "examples": len(rows), "concurrency": args.concurrency, "rounds": args.rounds,
              "machine": f"{cpu_name()}, {os.cpu_count()} cores",
              "bf16_cpu_flags": sorted(cpu_flags() & BF16_CPU_FLAGS), "load_average": os.getloadavg(), "settings": summary}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
