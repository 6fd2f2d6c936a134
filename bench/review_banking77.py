"""The review loop on real parts (issue 4): what an operator gains by reading a path's most confident
disagreements and recording a verdict on each.

    .venv/bin/python bench/review_banking77.py [--run bench/.work/distill/<time>] [--texts N] [--top 30]

1. The distillation run's adapter in shadow mode behind the real gateway (vLLM's CPU build, `arbitrage
   sim` as the teacher at its default latency): every held-out text goes upstream, and the gateway asks
   the adapter too and compares the intents in the background (`shadow_rate` 1, 4 requests in flight,
   `--shadow-concurrency` comparisons at once).
2. `GET /admin/routes/PATH?disagreements=TOP` (what `arbitrage route show PATH --disagreements TOP`
   shows): the threshold calibrated on the comparisons, and the TOP most confident disagreements.
3. Each of those whose text a person has read in `bench/banking77_review.csv` gets that verdict through
   one `arbitrage route review --file` (teacher_wrong -> upstream_wrong, student_wrong -> local_wrong,
   ambiguous); the rest stay unreviewed.
4. The calibration again. Both times: the calibrated threshold (Wilson lower bound of agreement at the
   target, as the gateway computes it) and the plain at-target one (as `distill eval` reports it), with
   the share of comparisons each would serve locally.

Results in bench/.work/review/<UTC time>/ (results.json, results.md, logs). Every server started here
is stopped on exit, on error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_banking77 as distill  # noqa: E402
import route_banking77 as routing  # noqa: E402

ROOT, WORK, PATH = distill.ROOT, distill.WORK, distill.TRAIN_PATH
REVIEW = Path(__file__).resolve().parent / "banking77_review.csv"
VERDICTS = {"teacher_wrong": "upstream_wrong", "student_wrong": "local_wrong", "ambiguous": "ambiguous"}
TARGET = 0.99


def admin(gateway, method: str, route: str, **kwargs) -> dict:
    import httpx

    reply = httpx.request(method, f"{gateway.url}/admin/routes/{route}", headers={"Authorization": "Bearer dev"},
                          timeout=120, **kwargs)
    reply.raise_for_status()
    return reply.json()


def comparisons(run: Path, adapter: str) -> list[tuple[float, bool]]:
    """(confidence, agreed) of every comparison, with the reviews applied as the calibration applies them."""
    from gateway.shadow_report import reviewed_comparisons

    return [(c, agreed or overruled) for c, agreed, overruled in reviewed_comparisons(run / "data", PATH, adapter)]


def operating_points(run: Path, adapter: str, status: dict) -> dict:
    """Coverage and agreement at the gateway's calibrated threshold and at the plain at-target one."""
    from router import calibration

    points = comparisons(run, adapter)
    n = len(points)
    calibrated = status["calibration"]["threshold"]
    served = [agreed for confidence, agreed in points if calibrated is not None and confidence >= calibrated]
    reached = calibration.at_target(points, TARGET)
    return {"comparisons": n, "agreement": sum(a for _, a in points) / n if n else None,
            "calibrated": {"threshold": calibrated, "coverage": len(served) / n if n else None,
                           "agreement": sum(served) / len(served) if served else None},
            "at_target": ({"threshold": reached.threshold, "coverage": reached.coverage,
                           "agreement": reached.agreement} if reached else None),
            "reviewed_upstream_wrong": status["calibration"].get("reviewed_upstream_wrong", 0)}


def wait_for_comparisons(run: Path, settle_s: float = 10.0, timeout_s: float = 900.0) -> None:
    """Until the background comparisons stop arriving (the queue is drained)."""
    from arbitrage.capture.store import connect

    last, stable_since, deadline = -1, time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        con = connect(run / "data")
        count = con.execute("SELECT count(*) FROM shadow").fetchone()[0]
        con.close()
        if count != last:
            last, stable_since = count, time.monotonic()
        elif time.monotonic() - stable_since >= settle_s:
            return
        time.sleep(1.0)


def review(run: Path, gateway, disagreements: list[dict], readings: dict[str, str]) -> dict:
    """One `arbitrage route review --file` with a verdict for each disagreement whose text was read;
    counts by verdict."""
    counts = {"unread": 0, **{v: 0 for v in VERDICTS.values()}}
    verdicts = run / "verdicts.csv"
    with open(verdicts, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["comparison", "verdict", "note"])
        for row in disagreements:
            reading = readings.get(row["input"] or "")
            if reading is None:
                counts["unread"] += 1
                continue
            writer.writerow([row["shadow_id"], VERDICTS[reading], "bench/banking77_review.csv"])
            counts[VERDICTS[reading]] += 1
    if sum(counts.values()) > counts["unread"]:
        subprocess.run([*routing.distill_cli(), "route", "review", PATH, "--file", str(verdicts), "--url", gateway.url],
                       check=True, capture_output=True, text=True, env={**os.environ, "ARBITRAGE_ADMIN_KEY": "dev"},
                       cwd=ROOT)
    return counts


def parse(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=WORK / "distill" / "latest", help="distillation run folder")
    p.add_argument("--texts", type=int, help="send only the first N held-out texts [all 3,080]")
    p.add_argument("--top", type=int, default=30, help="disagreements read, most confident first")
    p.add_argument("--concurrency", type=int, default=4, help="app requests in flight")
    p.add_argument("--shadow-concurrency", type=int, default=16,
                   help="[local] shadow_concurrency: comparisons at once (the product's default, 4, drops a third here)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    distill_run = args.run.resolve()
    source, run, header = routing.new_run("review", "review_banking77.py", argv, distill_run)
    with open(REVIEW, newline="") as stream:
        readings = {row["text"]: row["reading"] for row in csv.DictReader(stream)}
    texts = list(routing.gold_labels())[:args.texts]
    results = {**header, "texts": len(texts), "top": args.top, "shadow_concurrency": args.shadow_concurrency}
    cleanup = distill.Cleanup()
    try:
        _, _, gateway = routing.start_servers(run, distill_run, source, cleanup,
                                              local_settings=f"shadow_concurrency = {args.shadow_concurrency}\n")
        ramp = {"enabled": False, "target": TARGET, "floor": 0.9, "min_samples": 200, "window": 5000}
        routing.set_policy(run, gateway, {"mode": "shadow", "share": 0.0, "adapter": source["train"]["adapter"],
                                          "output": "json", "comparator": {"name": "json", "keys": ["intent"]},
                                          "shadow_rate": 1.0, "audit_rate": 0.0, "ramp": ramp})
        distill.progress(f"shadow mode: {len(texts)} held-out texts, {args.concurrency} in flight")
        started = time.monotonic()
        routing.phase(gateway, texts, concurrency=args.concurrency, warmup=0)
        wait_for_comparisons(run)
        results["send_seconds"] = round(time.monotonic() - started, 1)
        before = admin(gateway, "GET", PATH, params={"disagreements": args.top})
        served_name = f"{PATH}/{source['train']['adapter']}"
        results["before"] = operating_points(run, served_name, before["status"])
        shown = before["status"]["disagreements"]
        results["disagreements"] = {"total": shown["total"], "top": [
            {k: row[k] for k in ("shadow_id", "confidence", "upstream_answer", "local_answer", "input")}
            for row in shown["shown"]]}
        distill.progress(f"reviewing the {len(shown['shown'])} most confident of {shown['total']} disagreements")
        results["reviewed"] = review(run, gateway, shown["shown"], readings)
        after = admin(gateway, "GET", PATH)
        results["after"] = operating_points(run, served_name, after["status"])
        results["metrics_dropped"] = [line for line in _metrics(gateway).splitlines()
                                      if line.startswith("arbitrage_shadow_dropped_total")]
    except KeyboardInterrupt:
        distill.progress("interrupted; stopping servers")
        return 130
    finally:
        cleanup.run()
        routing.write_results(run, results)
    routing.publish(run, report(results))
    return 0


def _metrics(gateway) -> str:
    import httpx

    return httpx.get(f"{gateway.url}/metrics", headers={"Authorization": "Bearer dev"}, timeout=30).text


def report(r: dict) -> str:
    lines = [f"# Review loop: {r['started_at']}", "", f"`{r['command']}`", "",
             f"Adapter {r['adapter']} of {r['distill_run']}; {r['texts']} held-out texts in shadow mode "
             f"({r.get('send_seconds')} s, {r.get('shadow_concurrency', 4)} comparisons at once); dropped background work: {r.get('metrics_dropped') or 'none'}.", ""]
    if "before" not in r:
        return "\n".join(lines + ["(no results: the run stopped early)"])
    reviewed = r["reviewed"]
    lines += [f"Of the {r['top']} most confident of {r['disagreements']['total']} disagreements: "
              + ", ".join(f"{n} {k}" for k, n in reviewed.items()) + ".", "",
              "| | comparisons | agreement | calibrated threshold | served there | agreement there "
              "| at-target threshold | served there |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("before", "after"):
        p = r[name]
        cal, reach = p["calibrated"], p["at_target"] or {}
        lines.append(f"| {name} review | {p['comparisons']} | {_pct(p['agreement'])} | "
                     f"{_num(cal['threshold'])} | {_pct(cal['coverage'])} | {_pct(cal['agreement'])} | "
                     f"{_num(reach.get('threshold'))} | {_pct(reach.get('coverage'))} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
