"""Which confidence signal ranks a distilled adapter's answers best? (issues 3 and 4)

    .venv/bin/python bench/confidence_signals.py --run bench/.work/distill/<run>

Serves the run's adapter with vLLM (CPU build), asks every held-out example at temperature 0 with
the chosen tokens' log-probs and the top 5 alternatives at each position (what the local route
could ask for), then reports, for each signal, the share of answers servable at 99 % agreement
with the teacher (the coverage `distill eval` reports) and the AUROC of correct against wrong.

Signals (p1: the chosen token's probability, p2: the best other token's, per position):
- joint: p1 multiplied over the answer (the router's scorer, the product's default);
- min: the smallest p1 (the router's scorer);
- margin: the smallest p1 - p2;
- ratio: p1 / (p1 + p2) multiplied over the answer (a two-way choice at each position).

Answers and log-probs go to <run>/signals/tokens.jsonl, the report to <run>/signals/results.md.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from distill_banking77 import Cleanup, machine, start_vllm  # noqa: E402

TOP = 5


def signals_of(tokens: list[dict]) -> dict[str, float]:
    """Every signal of one answer from its tokens' log-probs and top alternatives (0 without tokens)."""
    from router.confidence import score

    if not tokens:
        return {name: 0.0 for name in ("joint", "min", "margin", "ratio")}
    seconds = [second_prob(t) for t in tokens]
    probs = [math.exp(min(0.0, t["logprob"])) for t in tokens]
    return {"joint": score(tokens, "joint"), "min": score(tokens, "min"),
            "margin": max(0.0, min(p - q for p, q in zip(probs, seconds))),
            "ratio": math.prod(p / (p + q) for p, q in zip(probs, seconds))}


def second_prob(token: dict) -> float:
    """The probability of the likeliest token other than the chosen one (0 when none is listed)."""
    others = [math.exp(t["logprob"]) for t in token.get("top_logprobs") or [] if t["token"] != token["token"]]
    return max(others, default=0.0)


def auroc(points: list[tuple[float, bool]]) -> float:
    """P(a correct answer scores above a wrong one), ties counted half."""
    right = sorted(c for c, ok in points if ok)
    wrong = sorted(c for c, ok in points if not ok)
    if not right or not wrong:
        return float("nan")
    total = sum(len(right) - bisect.bisect_right(right, w) + 0.5 * (bisect.bisect_right(right, w)
                                                                   - bisect.bisect_left(right, w)) for w in wrong)
    return total / (len(right) * len(wrong))


async def ask_all(base_url: str, model: str, rows: list[dict], manifest: dict, concurrency: int) -> list[dict]:
    import openai

    from distill.evaluation import messages_for

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=2, timeout=600)
    semaphore = asyncio.Semaphore(concurrency)

    async def ask(row: dict) -> dict:
        async with semaphore:
            response = await client.chat.completions.create(
                model=model, messages=messages_for(row, manifest), temperature=0, max_tokens=32, logprobs=True,
                top_logprobs=TOP)
        choice = response.choices[0]
        tokens = [t.model_dump() for t in (choice.logprobs.content or [])] if choice.logprobs else []
        return {"example_id": row["example_id"], "expected": row["answer"], "answer": choice.message.content or "",
                "tokens": tokens}

    try:
        return list(await asyncio.gather(*(ask(row) for row in rows)))
    finally:
        await client.close()


def report(answers: list[dict], target: float) -> dict[str, dict]:
    from router import calibration
    from router.comparators import make_comparator
    from router.policy import ComparatorSpec

    comparator = make_comparator(ComparatorSpec(name="json"))
    agreed = [comparator.compare(a["expected"], a["answer"]).agreed for a in answers]
    scored = [signals_of(a["tokens"]) for a in answers]
    found = {}
    for name in scored[0]:
        points = [(s[name], ok) for s, ok in zip(scored, agreed)]
        reached = calibration.at_target(points, target)
        found[name] = {"coverage": reached.coverage if reached else 0.0, "auroc": auroc(points),
                       "threshold": reached.threshold if reached else None}
    return {"agreement": sum(agreed) / len(agreed), "examples": len(answers), "signals": found}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a bench/distill_banking77.py run folder")
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--concurrency", type=int, default=128)
    args = p.parse_args(argv)

    from distill.evaluation import eval_rows, find_adapter

    results = json.loads((args.run / "results.json").read_text())
    adapter = find_adapter(args.run / "data" / "adapters", "banking77/intents", results["train"]["adapter"])
    rows = eval_rows(adapter, None)
    out = args.run / "signals"
    out.mkdir(exist_ok=True)
    cleanup = Cleanup()
    try:
        server = start_vllm(args.run, adapter.manifest["base"]["location"], results["config"]["rank"], cleanup)
        from deploy.vllm import LocalClient

        client = LocalClient(server.base_url)
        client.load_adapter(adapter.served_name, adapter.folder)
        client.close()
        started = time.perf_counter()
        answers = asyncio.run(ask_all(server.base_url, adapter.served_name, rows, adapter.manifest, args.concurrency))
        seconds = time.perf_counter() - started
    finally:
        cleanup.run()
    with open(out / "tokens.jsonl", "w") as stream:
        stream.writelines(json.dumps(a) + "\n" for a in answers)
    found = report(answers, args.target)
    lines = [f"Command: `.venv/bin/python bench/confidence_signals.py {' '.join(argv)}`", "",
             f"Machine: {json.dumps(machine())}", "",
             f"{found['examples']} held-out answers in {seconds:.0f} s; agreement at full coverage "
             f"{found['agreement']:.1%}", "",
             f"| signal | coverage at {args.target:.0%} agreement | threshold | AUROC (right vs wrong) |",
             "| --- | ---: | ---: | ---: |"]
    for name, s in found["signals"].items():
        threshold = f"{s['threshold']:.4f}" if s["threshold"] is not None else "-"
        lines.append(f"| {name} | {s['coverage']:.1%} | {threshold} | {s['auroc']:.4f} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
