"""What one key's limits cost a request: `Quotas.admit` + `Quotas.spend` for a key with an rpm and a
daily budget, in memory (one worker) against the SQLite file the workers share (workers > 1), side
by side in one run; and what counting one comparison's outcome into the ramp's evidence costs, the
same two ways (`RampEvidence.add` into a full window of 1,000, in memory / in the shared file).

    .venv/bin/python bench/limits_speed.py [--rounds 7] [--calls 2000]

Settings, alternated round by round (median of the rounds' microseconds per call):
  memory        LocalLimits, one process (what `workers = 1` does)
  shared        SharedLimits, one process
  shared x2     SharedLimits, two processes admitting at once (both cores; each process's time)
  evidence memory / evidence shared   one ramp outcome added and the window counted

The bucket is deep enough never to refuse, so every call is a token taken and a spend counted.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arbitrage.keys import KeyEntry  # noqa: E402
from gateway.limits import Quotas, SharedLimits  # noqa: E402
from gateway.ramp_evidence import RampEvidence  # noqa: E402

KEY = KeyEntry("key_bench", "bench", "", "", rpm=10**9, budget_usd_day=10**9)


def per_call_us(shared: Path | None, calls: int) -> float:
    quotas = Quotas(None, shared=shared)
    start = time.perf_counter()
    for _ in range(calls):
        quotas.admit(KEY)
        quotas.spend(KEY.id, 0.0001)
    return (time.perf_counter() - start) / calls * 1e6


def evidence_us(evidence: RampEvidence, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        evidence.add("bench/path", "r1", f"s{i}", i % 50 != 0, 1000)
    return (time.perf_counter() - start) / calls * 1e6


def _worker(shared: str, calls: int, barrier, queue) -> None:
    barrier.wait()
    queue.put(per_call_us(Path(shared), calls))


def contended_us(shared: Path, calls: int) -> float:
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_worker, args=(str(shared), calls, barrier, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    times = [queue.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join()
    return statistics.mean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"memory": [], "shared": [], "shared x2": [], "evidence memory": [],
                                       "evidence shared": []}
    with tempfile.TemporaryDirectory() as folder:
        shared = Path(folder) / SharedLimits.FILE
        SharedLimits(shared).close()
        evidence = {"evidence memory": RampEvidence(), "evidence shared": RampEvidence(Path(folder) / RampEvidence.FILE)}
        per_call_us(None, 200), per_call_us(shared, 200)  # warm up
        for made in evidence.values():
            evidence_us(made, 1000)  # warm up, and the window full
        for _ in range(args.rounds):
            results["memory"].append(per_call_us(None, args.calls))
            results["shared"].append(per_call_us(shared, args.calls))
            results["shared x2"].append(contended_us(shared, args.calls))
            for name, made in evidence.items():
                results[name].append(evidence_us(made, args.calls))
    baseline = {name: statistics.median(results["evidence memory" if name.startswith("evidence") else "memory"])
                for name in results}
    print(f"# {' '.join(sys.argv)}\n# {platform.processor() or platform.machine()}, "
          f"{multiprocessing.cpu_count()} cores, Python {platform.python_version()}, {args.rounds} rounds of "
          f"{args.calls} admit + spend (evidence: {args.calls} outcomes)\n")
    print("| setting | median us per call | min-max | vs memory |\n| --- | ---: | ---: | ---: |")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.1f} | {min(times):.1f}-{max(times):.1f} | {median / baseline[name]:.1f}x |")


if __name__ == "__main__":
    main()
