"""Which answers keep the coverage at 99 % down? The eval's most confident disagreements, read (issues 3 and 4)

    .venv/bin/python bench/confident_disagreements.py --run bench/.work/distill/<run> [--top 30]
    .venv/bin/python bench/confident_disagreements.py --run ... --review bench/banking77_review.csv

Lists the `distill eval` answers that disagree with the teacher, most confident first, with the input
text: the ones that decide how much can be served at the target agreement. With ``--review`` (a CSV of
``example_id,reading`` where a reader marked each as ``teacher_wrong``, ``ambiguous`` or
``student_wrong``), it also reports the coverage at the target if the answers marked ``teacher_wrong``
had counted as agreeing, which is how far the teacher's own mistakes hold the coverage down. The
reading is a person's judgment: the CSV keeps the text, both labels and the reading side by side so
that anyone can check it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.evaluation import find_adapter, last_input  # noqa: E402
from distill.versions import versions  # noqa: E402
from router import calibration  # noqa: E402

READINGS = ("teacher_wrong", "ambiguous", "student_wrong")


def latest_eval(run: Path, path: str) -> tuple[Path, Path]:
    """The newest eval folder of the run's newest adapter, and that adapter's dataset folder."""
    adapter = find_adapter(run / "data" / "adapters", path, None)
    root = run / "data" / "evals" / path / adapter.version
    found = versions(root)
    if not found:
        sys.exit(f"no evaluation of {path} {adapter.version} in {root}: run distill eval first")
    return root / f"v{found[-1]}", Path(adapter.manifest["dataset"]["folder"])


def disagreements(eval_dir: Path, dataset: Path) -> tuple[list[dict], list[dict], dict]:
    """Every answer that disagrees, most confident first, with its input text; every prediction; the manifest."""
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    predictions = pq.read_table(eval_dir / "predictions.parquet").to_pylist()
    texts = {r["example_id"]: last_input(r["input_messages"])
             for r in pq.read_table(dataset / "eval.parquet", columns=["example_id", "input_messages"]).to_pylist()}
    ranked = sorted(predictions, key=lambda p: p["confidence"], reverse=True)
    wrong = [{"example_id": p["example_id"], "rank": rank, "confidence": round(p["confidence"], 4),
              "teacher": p["expected"], "student": p["answer"], "text": texts.get(p["example_id"], "")}
             for rank, p in enumerate(ranked, 1) if not p["agreed"]]
    return wrong, predictions, manifest


def read_review(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        review = {row["example_id"]: row["reading"] for row in csv.DictReader(f)}
    unknown = sorted({r for r in review.values() if r not in READINGS})
    if unknown:
        sys.exit(f"{path}: unknown readings {unknown}; use one of {', '.join(READINGS)}")
    return review


def at_target(points: list[tuple[float, bool]], target: float) -> dict | None:
    point = calibration.at_target(points, target)
    return {"coverage": round(point.coverage, 4), "agreement": round(point.agreement, 4),
            "threshold": round(point.threshold, 4)} if point else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=ROOT / "bench" / ".work" / "distill" / "latest")
    p.add_argument("--path", default="banking77/intents")
    p.add_argument("--top", type=int, default=30, help="disagreements to list")
    p.add_argument("--review", type=Path, help="CSV of example_id,reading for the listed disagreements")
    args = p.parse_args()

    eval_dir, dataset = latest_eval(args.run.resolve(), args.path)
    wrong, predictions, manifest = disagreements(eval_dir, dataset)
    points = [(p["confidence"], p["agreed"]) for p in predictions]
    target = manifest["target"]
    for w in wrong[:args.top]:
        print(f"{w['rank']:5d} {w['confidence']:.4f} teacher {w['teacher']} student {w['student']} :: {w['text']}")
    result = {"eval": str(eval_dir), "examples": len(points), "disagreements": len(wrong), "target": target,
              "confidence": manifest["config"]["confidence"], "at_target": at_target(points, target)}
    if args.review:
        review = read_review(args.review)
        missing = [w["example_id"] for w in wrong[:args.top] if w["example_id"] not in review]
        if missing:
            sys.exit(f"{args.review} has no reading for {len(missing)} of the top {args.top}, e.g. {missing[0]}")
        readings = {r: sum(review[w["example_id"]] == r for w in wrong[:args.top]) for r in READINGS}
        teacher_wrong = {w["example_id"] for w in wrong[:args.top] if review[w["example_id"]] == "teacher_wrong"}
        corrected = [(p["confidence"], p["agreed"] or p["example_id"] in teacher_wrong) for p in predictions]
        result |= {"reviewed": args.top, "readings": readings,
                   "at_target_if_teacher_wrong_agreed": at_target(corrected, target),
                   "agreement_if_teacher_wrong_agreed": round(sum(a for _, a in corrected) / len(corrected), 4)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
