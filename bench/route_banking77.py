"""Banking77 routing benchmark (issue 4), with the adapter of the last distillation run:

    .venv/bin/python bench/route_banking77.py [--run bench/.work/distill/<time>] [--requests 100]

1. The cost/quality curve: share of the held-out texts served locally against agreement with the
   teacher among them, as the confidence threshold moves (the distillation run's eval predictions,
   both confidence signals).
2. Latency through the real gateway, in one run, one request at a time: the path's route off
   (every answer from `arbitrage sim` at its default latency: log-normal, median 300 ms, sigma 0.5,
   standing in for gpt-4o) against the local route at share 100 and threshold 0 (every answer from
   vLLM with the adapter; output check "text" so that none falls back). Median and p90 of the client's time (official openai client).
3. The operating point: the local route at share 100 and the threshold reaching 99% agreement on
   the eval; held-out texts sent through the gateway (4 in flight): share served locally,
   agreement of what was served with the teacher's (gold) label, upstream dollars paid against
   the counterfactual (everything upstream), from the gateway's own records and prices; dollars
   saved per 10,000 requests at gpt-4o-mini and gpt-4o prices.

Results in bench/.work/route/<UTC time>/ (results.json, results.md, logs). Every server started
here is stopped on exit, on error and on SIGTERM/Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_banking77 as distill  # noqa: E402

ROOT, WORK, PATH = distill.ROOT, distill.WORK, distill.TRAIN_PATH
COVERAGES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
PRICED_MODELS = ("gpt-4o-mini", "gpt-4o")


def curve_table(predictions: Path) -> dict:
    """Agreement among served answers at given coverages, per confidence signal."""
    import pyarrow.parquet as pq

    from router import calibration

    rows = pq.read_table(predictions).to_pylist()
    table = {}
    for name, column in (("joint", "confidence"), ("min", "confidence_min")):
        points = calibration.curve([(r[column], bool(r["agreed"])) for r in rows])
        table[name] = [_at_coverage(points, c) for c in COVERAGES]
    return table


def _at_coverage(points, coverage: float) -> dict:
    """The highest threshold serving at least ``coverage`` of the answers."""
    point = next(p for p in reversed(points) if p.coverage >= coverage - 1e-9)
    return {"coverage": point.coverage, "agreement": point.agreement, "threshold": point.threshold}


def gold_labels() -> dict[str, str]:
    import csv

    with open(distill.DATA / "test.csv", newline="") as stream:
        return {row["text"]: row["category"] for row in csv.DictReader(stream)}


def new_run(kind: str, script: str, argv: list[str], distill_run: Path) -> tuple[dict, Path, dict]:
    """The distillation run's results, a fresh ``bench/.work/<kind>/<UTC time>/`` (with ``logs``), and
    the facts every results.json of such a run starts with."""
    source = json.loads((distill_run / "results.json").read_text())
    run = WORK / kind / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (run / "logs").mkdir(parents=True, exist_ok=True)
    header = {"command": shlex.join([".venv/bin/python", f"bench/{script}", *argv]), "distill_run": str(distill_run),
              "adapter": source["train"]["adapter"], "started_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": distill.machine()}
    return source, run, header


def write_results(run: Path, results: dict) -> None:
    (run / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def publish(run: Path, text: str) -> None:
    """The report as results.md and on stdout."""
    (run / "results.md").write_text(text + "\n")
    print(text)
    distill.progress(f"results in {run}")


def start_servers(run: Path, distill_run: Path, source: dict, cleanup: distill.Cleanup, local_settings: str = ""):
    """vLLM, the simulator at its default latency, and a gateway routing PATH with the distillation
    run's adapter (``source``: its results; and more ``[local]`` TOML lines)."""
    adapter, rank = source["train"]["adapter"], source.get("config", {}).get("rank", 16)
    manifest = json.loads((distill_run / "data" / "adapters" / PATH / adapter / "manifest.json").read_text())
    vllm = distill.start_vllm(run, manifest["base"]["location"], rank, cleanup)
    shutil.copytree(distill_run / "data" / "adapters", run / "data" / "adapters")
    sim, gateway = distill.start_sim_and_gateway(run, cleanup, latency=[], local_url=vllm.base_url,
                                                 local_settings=local_settings)
    return vllm, sim, gateway


def set_policy(run: Path, gateway, fields: dict) -> None:
    """Put the policy in force (as the admin API does) and wait until the gateway routes by it."""
    import httpx

    from arbitrage.config import load_config
    from gateway.route_table import RouteTable

    table = RouteTable(load_config(run / "arbitrage.toml", data_dir=str(run / "data")))
    table.update(PATH, fields, actor="bench", reason="route_banking77")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        entry = httpx.get(f"{gateway.url}/admin/routes", headers={"Authorization": "Bearer dev"},
                          timeout=10).json()["routes"].get(PATH, {})
        status = entry.get("status") or {}
        if entry.get("policy", {}).get("mode") == fields["mode"] and (fields["mode"] == "off"
                                                                       or status.get("adapter_loaded")):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the gateway did not take the policy up: {entry}")


def ask(client, text: str) -> dict:
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=distill.MODEL, temperature=0, max_tokens=32, extra_headers={"X-Arbitrage-Path": PATH},
        messages=[{"role": "system", "content": distill.app_system_prompt()}, {"role": "user", "content": text}])
    seconds = time.perf_counter() - started
    content = raw.parse().choices[0].message.content
    return {"text": text, "ms": seconds * 1000, "served_by": raw.headers.get("x-arbitrage-served-by", "upstream"),
            "answer": content}


def phase(gateway, texts: list[str], concurrency: int = 1, warmup: int = 3) -> list[dict]:
    import openai

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="dev", max_retries=0, timeout=120)
    for text in texts[:warmup]:
        ask(client, text)
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda t: ask(client, t), texts[warmup:]))


def latency(replies: list[dict]) -> dict:
    ms = sorted(r["ms"] for r in replies)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1),
            "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1),
            "served_by": {k: sum(r["served_by"] == k for r in replies) for k in {r["served_by"] for r in replies}}}


def agreement(replies: list[dict], gold: dict[str, str], served_by: str) -> dict:
    served = [r for r in replies if r["served_by"] == served_by]
    agreed = sum(_intent(r["answer"]) == gold[r["text"]] for r in served)
    return {"served": len(served), "agreed": agreed, "agreement": agreed / len(served) if served else None}


def _intent(answer: str | None):
    try:
        return json.loads(answer or "")["intent"]
    except (ValueError, KeyError, TypeError):
        return None


def spend(run: Path, since: str) -> dict:
    """Upstream dollars paid and the counterfactual, from the gateway's records since ``since``."""
    query = (f"SELECT served_by, count(*) AS n, sum(cost_usd) AS paid, sum(counterfactual_cost_usd) AS counterfactual, "
             f"avg(prompt_tokens) AS prompt_tokens, avg(completion_tokens) AS completion_tokens FROM calls "
             f"WHERE path = '{PATH}' AND ts >= TIMESTAMP '{since}' GROUP BY served_by")
    out = subprocess.run([*distill_cli(), "sql", query, "--json", "--data-dir", str(run / "data")],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return {row["served_by"] or "upstream": row for row in json.loads(out.stdout)}


def distill_cli() -> list[str]:
    from arbitrage.server_process import ARBITRAGE

    return ARBITRAGE


def dollars(prompt_tokens: float, completion_tokens: float, local_share: float) -> dict:
    """Per 10,000 requests of the path, at each model's price: all upstream, and saved at the local share."""
    from arbitrage.pricing import PriceBook

    book, found = PriceBook(), {}
    for model in PRICED_MODELS:
        per_call = book.price(model, round(prompt_tokens), 0, round(completion_tokens))
        found[model] = {"all_upstream_usd": round(per_call * 10_000, 2),
                        "saved_usd": round(per_call * 10_000 * local_share, 2), "spend_cut": local_share}
    return found


def parse(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=WORK / "distill" / "latest", help="distillation run folder")
    p.add_argument("--requests", type=int, default=100, help="requests per latency phase (one at a time)")
    p.add_argument("--operating", type=int, default=300, help="requests at the operating point")
    p.add_argument("--confidence", choices=["joint", "min"], help="[the signal with more coverage at 99%%]")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    distill_run = args.run.resolve()
    source, run, header = new_run("route", "route_banking77.py", argv, distill_run)
    signals = source["eval"]["signals"]
    signal = args.confidence or max(signals, key=lambda s: (signals[s]["at_target"] or {}).get("coverage", 0))
    operating = signals[signal]["at_target"]
    results = {**header, "curve": curve_table(Path(source["eval"]["folder"]) / "predictions.parquet"),
               "eval_examples": source["eval"]["examples"], "signal": signal, "eval_operating_point": operating}
    texts, gold = list(gold_labels()), gold_labels()
    cleanup = distill.Cleanup()
    try:
        _, _, gateway = start_servers(run, distill_run, source, cleanup)
        n, policy = args.requests + 3, {"adapter": source["train"]["adapter"], "output": "json", "confidence": signal,
                                        "audit_rate": 0.0, "shadow_rate": 0.0, "ramp": {"enabled": False}}
        distill.progress(f"latency: upstream (sim default latency), {args.requests} requests")
        set_policy(run, gateway, {**policy, "mode": "off"})
        results["upstream"] = latency(phase(gateway, texts[:n]))
        distill.progress(f"latency: local route, share 100, threshold 0, {args.requests} requests")
        set_policy(run, gateway, {**policy, "mode": "local", "share": 100.0, "threshold": 0.0, "output": "text"})
        local = phase(gateway, texts[n:2 * n])
        results["local"] = {**latency(local), **agreement(local, gold, "local")}
        threshold = operating["threshold"] if operating else 1.0
        distill.progress(f"operating point: threshold {threshold:.4f} ({signal}), {args.operating} requests")
        set_policy(run, gateway, {**policy, "mode": "local", "share": 100.0, "threshold": threshold, "output": "json"})
        since = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        replies = phase(gateway, texts[2 * n:2 * n + args.operating + 3], concurrency=4)
        results["operating"] = {"threshold": threshold, **latency(replies), "local": agreement(replies, gold, "local"),
                                "records": spend(run, since)}
    except KeyboardInterrupt:
        distill.progress("interrupted; stopping servers")
        return 130
    finally:
        cleanup.run()
        write_results(run, results)
    results["dollars"] = money(results)
    write_results(run, results)
    publish(run, report(results))
    return 0


def money(results: dict) -> dict:
    """Dollars per 10,000 requests at the eval's operating coverage and at the measured local share
    (tokens per request from the upstream-answered records: a local record counts the short prompt)."""
    records = results["operating"]["records"]
    n = sum(r["n"] for r in records.values())
    upstream = [r for name, r in records.items() if name != "local"]
    upstream_n = sum(r["n"] for r in upstream)
    prompt = sum((r["prompt_tokens"] or 0) * r["n"] for r in upstream) / upstream_n
    completion = sum((r["completion_tokens"] or 0) * r["n"] for r in upstream) / upstream_n
    paid = sum(r["paid"] or 0 for r in records.values())
    counterfactual = sum(r["counterfactual"] or 0 for r in records.values())
    measured_share = records.get("local", {}).get("n", 0) / n
    eval_share = (results["eval_operating_point"] or {}).get("coverage", 0.0)
    return {"tokens_per_request": {"prompt": round(prompt, 1), "completion": round(completion, 1)},
            "gateway_records": {"requests": n, "upstream_paid_usd": paid, "counterfactual_usd": counterfactual,
                                "spend_cut": 1 - paid / counterfactual if counterfactual else None},
            "at_measured_share": dollars(prompt, completion, measured_share),
            "at_eval_coverage": dollars(prompt, completion, eval_share)}


def report(r: dict) -> str:
    lines = [f"Command: `{r['command']}` (adapter {r['adapter']} of {r['distill_run']})", "",
             f"Machine: {r['machine']['cores']} cores, commit {r['machine']['commit']}, {r['started_at']}, "
             f"load average at start {r['machine']['load_at_start']}", "",
             f"Cost/quality curve on {r['eval_examples']} held-out texts (agreement among the answers served locally):",
             "", "| served locally | " + " | ".join(f"{c:.0%}" for c in COVERAGES) + " |",
             "| --- |" + " ---: |" * len(COVERAGES)]
    for name, points in r["curve"].items():
        lines.append(f"| agreement, `{name}` confidence | " + " | ".join(f"{p['agreement']:.1%}" for p in points) + " |")
    up, lo = r["upstream"], r["local"]
    lines += ["", "| answered by | requests | p50 ms | p90 ms |", "| --- | ---: | ---: | ---: |",
              f"| upstream (sim, median 300 ms log-normal) | {up['n']} | {up['p50_ms']} | {up['p90_ms']} |",
              f"| local route (vLLM + adapter), share 100, threshold 0 | {lo['n']} | {lo['p50_ms']} | {lo['p90_ms']} |",
              "", f"Local answers at threshold 0 agreeing with the teacher: {_pct(lo['agreement'])} of {lo['served']}."]
    op, money_ = r["operating"], r["dollars"]
    share = op["served_by"].get("local", 0) / op["n"]
    lines += ["", f"Operating point (`{r['signal']}` >= {op['threshold']:.4f}): {share:.1%} of {op['n']} served locally, "
              f"agreement {_pct(op['local']['agreement'])} among them; upstream spend cut "
              f"{money_['gateway_records']['spend_cut'] or 0:.1%} in the gateway's records; p50 {op['p50_ms']} ms, "
              f"p90 {op['p90_ms']} ms at 4 in flight.", "",
              "| per 10,000 requests | all upstream | saved at the measured share | saved at the eval's coverage |",
              "| --- | ---: | ---: | ---: |"]
    for model in PRICED_MODELS:
        m, e = money_["at_measured_share"][model], money_["at_eval_coverage"][model]
        lines.append(f"| {model} | ${m['all_upstream_usd']:.2f} | ${m['saved_usd']:.2f} ({m['spend_cut']:.1%}) | "
                     f"${e['saved_usd']:.2f} ({e['spend_cut']:.1%}) |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
