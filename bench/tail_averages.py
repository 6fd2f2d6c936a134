"""Agreement and coverage at 99 % of tail averages of one training run's LoRA weights.

    .venv/bin/python bench/tail_averages.py RUN_DIR SNAPSHOT_DIR FRACTION [FRACTION ...]

RUN_DIR is a bench/distill_banking77.py run whose training saved snapshots into SNAPSHOT_DIR
(bench/snapshot_hook). For each FRACTION, the element-wise mean of the snapshots from the last FRACTION of
the run's steps (A and B matrices averaged separately, as stochastic weight averaging averages parameters)
is published as the next adapter version beside the run's v1 (its manifest says which steps), and
`arbitrage distill eval` runs every held-out text through it on one vLLM started here, as the benchmark's eval
stage does. Prints each version's agreement at full coverage and coverage at 99 % agreement by the `joint`
and `min` confidence. A FRACTION small enough to take only the last snapshot evaluates the last step's
weights (for a run published with --average-from).
Results: bench/RESULTS-distill.md ("Weight averaging").
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_banking77 as bench  # noqa: E402 (puts the project on sys.path)
from distill.versions import versions  # noqa: E402


def publish_average(adapters: Path, snapshots: Path, steps: list[int], label: dict) -> str:
    """The mean of ``steps``' snapshots as the next version after v1 (v1's files and manifest otherwise)."""
    v1 = adapters / "v1"
    reference = load_file(str(v1 / "adapter_model.safetensors"))
    total = None
    for step in steps:
        weights = load_file(str(snapshots / f"step-{step:05d}.safetensors"))
        total = weights if total is None else {k: total[k] + weights[k] for k in total}
    mean = {k: (v / len(steps)).to(reference[k].dtype).contiguous() for k, v in total.items()}
    if mean.keys() != reference.keys():
        raise SystemExit(f"snapshots and adapter differ in weights: {sorted(set(mean) ^ set(reference))[:3]}")
    version = f"v{max(versions(adapters)) + 1}"
    folder = adapters / version
    shutil.copytree(v1, folder)
    save_file(mean, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(version=version, experiment={**label, "steps": steps})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return version


def run_options(run: Path) -> argparse.Namespace:
    """The run's own benchmark options (its results.json's config: the same held-out texts and target), over the
    benchmark's defaults for any it lacks."""
    options = vars(bench.parse([]))
    results = run / "results.json"
    if results.exists():
        options |= json.loads(results.read_text()).get("config", {})
    else:
        print(f"{results} not found: evaluating with the benchmark's default options", flush=True)
    return argparse.Namespace(**options)


def main(argv: list[str]) -> int:
    run, snapshots, fractions = Path(argv[0]), Path(argv[1]), [float(f) for f in argv[2:]]
    adapters = run / "data" / "adapters" / bench.TRAIN_PATH
    v1 = json.loads((adapters / "v1" / "manifest.json").read_text())
    final = v1["metrics"]["global_step"]
    steps = sorted(int(p.stem.split("-")[1]) for p in snapshots.glob("step-*.safetensors"))
    print(f"{len(steps)} snapshots, steps {steps[0]}-{steps[-1]}; the run's last step {final}", flush=True)
    published = {}
    for fraction in fractions:
        chosen = [s for s in steps if s >= final * (1 - fraction)]
        published[fraction] = (publish_average(adapters, snapshots, chosen, {"tail_average": fraction}), len(chosen))
    options, log = run_options(run), run / "logs" / "tail_averages.log"
    cleanup = bench.Cleanup()
    server = bench.start_vllm(run, v1["base"]["location"], v1["config"]["lora_rank"], cleanup)
    try:
        for fraction, (version, count) in published.items():
            folder = Path(bench.arbitrage_cli(bench.eval_command(run, version, server.base_url, options), log))
            agreement = json.loads((folder / "manifest.json").read_text())["agreement"]
            found = bench.signals(folder / "predictions.parquet", options.target)["signals"]
            joint, least = (found[s]["at_target"]["coverage"] if found[s]["at_target"] else 0.0
                            for s in ("joint", "min"))
            print(f"tail {fraction:.2f} ({version}, {count} snapshots): agreement {agreement:.2%}, "
                  f"coverage at {options.target:.0%}: joint {joint:.1%}, min {least:.1%}", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
