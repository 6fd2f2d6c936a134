"""``arbitrage demo``: the whole loop, offline, on real parts, in one command::

    arbitrage sim (Banking77 answers at gpt-4o prices)  <-  gateway  <-  the demo app (openai client)
    1 capture   app traffic through the gateway, recorded
    2 paths     `arbitrage paths`: the path ranked by spend, with its verdict
    3 build     `arbitrage distill build PATH`: the training set from the captured pairs
    4 train     `arbitrage distill train PATH`: a LoRA adapter on SmolLM2-135M
    5 serve     vLLM (CPU build) with the base model and runtime LoRA loading; the gateway's [local]
    6 eval      `arbitrage distill eval PATH --vllm-url ...`: agreement, confidence curve, threshold
    7 promote   admin API: the route's policy, then the adapter promoted in shadow mode
    8 ramp      traffic keeps flowing; the ramp controller raises the local share on shadow evidence
    9 roi       `arbitrage roi` and this run's money: spent, saved, local share, agreement, breakeven

Every server runs on loopback in its own process group and is stopped at the end, on Ctrl-C
and on any failure. Each run works in a fresh folder ``<data-dir>/run-<UTC time>``, so runs
never mix. ``--quick`` is the small run (a handful of intents, a few hundred requests, about a
hundred training steps); its settings are printed as the run's assumptions.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Self

import httpx

from arbitrage.errors import ArbitrageError, ConfigError
from arbitrage.server_process import ARBITRAGE, ServerProcess, free_port

PATH = "support-intents"
"""The demo app's call path (named with the X-Arbitrage-Path header)."""
MODEL = "gpt-4o"
SYSTEM_PROMPT = ("You are the support router of a bank. Read the customer's message and classify it into exactly "
                 "one of our support intents (card arrival, card payment fees, cash withdrawals, transfers, top-ups, "
                 "identity checks and the rest of the 77 we use). Answer with JSON only, no prose: "
                 "{\"intent\": \"<intent>\"}.")
SHORT_PROMPT = "Classify the bank customer's message. Answer with JSON: {\"intent\": \"<intent>\"}."
STEPS = ("capture", "paths", "build", "train", "serve", "eval", "promote", "ramp", "roi")
SERVED_BY_HEADER = "x-arbitrage-served-by"


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class Profile:
    """The sizes of one demo run (printed at its start as the run's assumptions)."""

    name: str = _help("quick or full.")
    intents: int | None = _help("Banking77 intents in the traffic (the most frequent ones); None: all 77.")
    capture_requests: int = _help("App requests captured before distilling.")
    ramp_requests: int = _help("Most app requests sent while the ramp controller moves the share.")
    settle_requests: int = _help("Requests sent after the share reaches 100% (to measure the operating point).")
    train_steps: int | None = _help("Optimizer steps (None: train for `epochs`).")
    epochs: float = _help("Passes over the training split when train_steps is None.")
    batch_size: int = _help("Training examples per step.")
    learning_rate: float = _help("Peak learning rate.")
    eval_examples: int | None = _help("Eval-split examples asked through vLLM (None: all).")
    target: float = _help("Agreement the route must reach (eval threshold and ramp target).")
    floor: float = _help("Agreement below which the ramp rolls back to shadow.")
    ramp_steps: tuple[float, ...] = _help("Local shares (percent) the ramp moves through.")
    min_samples: int = _help("Comparisons the ramp needs since the last change before raising the share.")
    shadow_rate: float = _help("Share of upstream-served requests also asked of the local model.")
    audit_rate: float = _help("Share of locally served requests also asked upstream (costs upstream dollars).")
    concurrency: int = _help("App requests in flight at once while capturing.")
    ramp_concurrency: int = _help("App requests in flight during the ramp: paced so that the shadow comparisons "
                                  "(one local answer each, about 5/s from vLLM on 2 CPU cores) keep up.")
    sim_latency_ms: float = _help("Median latency of the simulated frontier API.")

    def assumptions(self) -> list[str]:
        """One line per setting, with its meaning."""
        return [f"{f.name} = {getattr(self, f.name)!r}: {f.metadata['help']}" for f in self.__dataclass_fields__.values()
                if f.name != "name"]


QUICK = Profile(name="quick", intents=5, capture_requests=300, ramp_requests=700, settle_requests=40,
                train_steps=80, epochs=1.0, batch_size=8, learning_rate=1e-3, eval_examples=40, target=0.8,
                floor=0.6, ramp_steps=(25.0, 50.0, 100.0), min_samples=40, shadow_rate=1.0, audit_rate=0.1,
                concurrency=6, ramp_concurrency=2, sim_latency_ms=300.0)
"""Target 0.8: the 80-step adapter agrees about 92% of the time (measured), so the Wilson lower bound
of 40 comparisons clears 0.8 while it could not clear 0.9 (which needs 40 of 40)."""
FULL = Profile(name="full", intents=None, capture_requests=10_003, ramp_requests=3_080, settle_requests=500,
               train_steps=None, epochs=1.5, batch_size=16, learning_rate=5e-4, eval_examples=None, target=0.95,
               floor=0.9, ramp_steps=(5.0, 25.0, 50.0, 100.0), min_samples=200, shadow_rate=0.5, audit_rate=0.05,
               concurrency=16, ramp_concurrency=4, sim_latency_ms=300.0)


@dataclass(frozen=True)
class Economics:
    """Prices of your own compute for the ROI (written to the gateway's [economics])."""

    training_usd_per_hour: float = 0.10
    serving_usd_per_hour: float = 0.10
    volume_per_day: int = 20_000
    """Requests a day on the path, for the breakeven date (the demo's own rate says nothing about a day)."""

    def assumptions(self) -> list[str]:
        return [(f"training and serving machine: ${self.training_usd_per_hour:g}/hour and "
                f"${self.serving_usd_per_hour:g}/hour (a 2-vCPU cloud VM like this one)"),
                f"breakeven date at {self.volume_per_day:,} requests a day on the path"]


@dataclass
class Texts:
    """Labelled Banking77 texts: captured ones (the training side) and fresh ones (the ramp)."""

    capture: list[tuple[str, str]]
    fresh: list[tuple[str, str]]
    intents: list[str]


def load_texts(profile: Profile, seed: int = 7) -> Texts:
    """The profile's intents; capture texts from the training file, fresh ones from what is left
    of it and the test file (never captured, so never trained on)."""
    train, test = _read_banking("train.csv"), _read_banking("test.csv")
    counts = Counter(label for _, label in train)
    intents = sorted(label for label, _ in counts.most_common(profile.intents))
    chosen = set(intents)
    rng = random.Random(seed)
    train = [row for row in train if row[1] in chosen]
    rng.shuffle(train)
    capture = train[:profile.capture_requests]
    fresh = train[profile.capture_requests:] + [row for row in test if row[1] in chosen]
    rng.shuffle(fresh)
    return Texts(capture, fresh, intents)


def _read_banking(name: str) -> list[tuple[str, str]]:
    data = resources.files("simulator") / "data" / "banking77" / name
    with data.open(newline="") as f:
        return [(row["text"], row["category"]) for row in csv.DictReader(f)]


class DemoError(ArbitrageError):
    """A demo step failed; the message says which and where its output is."""


@dataclass
class Reply:
    """One app request's outcome as the app sees it."""

    served_by: str
    correct: bool
    upstream_usd: float


class App:
    """The demo application: Banking77 texts through the gateway with the official openai client."""

    def __init__(self, base_url: str, key: str, concurrency: int) -> None:
        import openai

        from arbitrage.pricing import PriceBook

        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=2, timeout=120)
        self.prices = PriceBook()
        self.concurrency = concurrency

    def ask(self, text: str, label: str) -> Reply:
        raw = self.client.chat.completions.with_raw_response.create(
            model=MODEL, temperature=0, extra_headers={"X-Arbitrage-Path": PATH},
            messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}])
        reply = raw.parse()
        usage = reply.usage
        cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage and usage.prompt_tokens_details else 0
        cost = self.prices.price(MODEL, usage.prompt_tokens, cached, usage.completion_tokens) if usage else None
        return Reply(raw.headers.get(SERVED_BY_HEADER, "upstream"), _intent(reply.choices[0].message.content) == label,
                     cost or 0.0)

    def play(self, rows: list[tuple[str, str]], bar, stop=lambda: False) -> list[Reply]:
        """Send rows concurrently, updating ``bar``; stops early (pending requests dropped) when
        ``stop()`` turns true."""
        replies: list[Reply] = []
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            futures = [pool.submit(self.ask, text, label) for text, label in rows]
            for future in as_completed(futures):
                replies.append(future.result())
                bar(replies)
                if stop():
                    break
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return replies


def _intent(content: str | None) -> str | None:
    try:
        value = json.loads(content or "")
    except ValueError:
        return None
    return value.get("intent") if isinstance(value, dict) else None


class Demo:
    """One run: its folder, the servers it started, the steps' results."""

    def __init__(self, run_dir: Path, profile: Profile, economics: Economics, console, vllm_url: str | None = None):
        self.run_dir, self.profile, self.economics, self.console = run_dir, profile, economics, console
        self.data_dir = run_dir / "data"
        self.external_vllm = vllm_url
        self.sim: ServerProcess | None = None
        self.gateway: ServerProcess | None = None
        self.vllm = None
        self.children: list[subprocess.Popen] = []
        self.keys: dict[str, str] = {}
        self.results: dict[str, Any] = {"run_dir": str(run_dir), "profile": asdict(profile),
                                        "economics": asdict(economics), "servers": {}, "steps": {}}
        self.timeline: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.vllm_port = free_port()

    # -- the run ---------------------------------------------------------------------------------

    def run(self, stop_after: str = "roi") -> dict[str, Any]:
        """Every step up to ``stop_after``; the results (also written to ``demo.json``)."""
        self.texts = load_texts(self.profile)
        self._intro()
        for number, name in enumerate(STEPS, 1):
            if name in ("promote", "ramp") and not self._admin_api():
                self._routing_missing()
                break
            self._header(number, name)
            started = time.monotonic()
            outcome = getattr(self, f"step_{name}")()
            self.results["steps"][name] = {**(outcome or {}), "seconds": round(time.monotonic() - started, 1)}
            self._write_results()
            if name == stop_after:
                break
        self.results["seconds"] = round(time.monotonic() - self.started, 1)
        self._write_results()
        self.console.print(f"\n[bold]Done in {_minutes(self.results['seconds'])}.[/] Everything is in {self.run_dir} "
                           f"(results: {self.run_dir / 'demo.json'}).")
        return self.results

    def close(self) -> None:
        """Stop every process this run started (their whole process groups)."""
        for child in self.children:
            _stop_group(child)
        if self.vllm is not None:
            self.vllm.stop()
        for server in (self.gateway, self.sim):
            if server is not None:
                server.stop()

    # -- steps -----------------------------------------------------------------------------------

    def step_capture(self) -> dict[str, Any]:
        self._start_servers()
        app = App(self.gateway.url + "/v1", self.keys["app"], self.profile.concurrency)
        with self._bar("app traffic", len(self.texts.capture)) as bar:
            replies = app.play(self.texts.capture, bar)
        self._wait_for_capture(len(replies))
        spent = sum(r.upstream_usd for r in replies)
        self.console.print(f"{len(replies)} support queries answered by the frontier API through the gateway, "
                           f"${spent:.4f} at {MODEL} prices; the app changed only its base URL")
        return {"requests": len(replies), "upstream_usd": spent, "records": self._count_calls()}

    def step_paths(self) -> dict[str, Any]:
        self._command(["paths", "--data-dir", str(self.data_dir), "--since", "1d"], show_stdout=True)
        paths = json.loads(self._command(["paths", "--data-dir", str(self.data_dir), "--since", "1d", "--json"],
                                         quiet=True))
        top = paths["paths"][0]
        if top["path"] != PATH:
            raise DemoError(f"the top path is {top['path']!r}, not the demo app's {PATH!r}")
        verdict = top["distillability"]["verdict"]
        self.console.print(f"top path: {PATH} ({verdict}, ${top['dollars']:.4f} in {top['calls']} calls)")
        return {"top": PATH, "verdict": verdict, "dollars": top["dollars"]}

    def step_build(self) -> dict[str, Any]:
        folder = self._folder(["distill", "build", PATH, "--data-dir", str(self.data_dir),
                                     "--eval-fraction", "0.15" if self.profile.name == "quick" else "0.1"])
        manifest = _manifest(folder)
        return {"folder": str(folder), "version": manifest["version"], "train": manifest["split"]["train"],
                "eval": manifest["split"]["eval"]}

    def step_train(self) -> dict[str, Any]:
        p = self.profile
        length = ["--max-steps", str(p.train_steps)] if p.train_steps else ["--epochs", f"{p.epochs:g}"]
        folder = self._folder(["distill", "train", PATH, "--data-dir", str(self.data_dir), *length,
                                     "--batch-size", str(p.batch_size), "--grad-accumulation", "1",
                                     "--lr", f"{p.learning_rate:g}", "--max-seq-len", "128", "--rank", "16",
                                     "--drop-system-prompt", "--short-system-prompt", SHORT_PROMPT,
                                     "--eval-steps", "1000000", "--save-steps", "50", "--logging-steps", "10",
                                     "--max-eval-examples", "64"])
        manifest = _manifest(folder)
        return {"folder": str(folder), "version": manifest["version"], "steps": manifest["metrics"]["global_step"],
                "train_loss": manifest["metrics"]["train_loss"], "eval_loss": manifest["metrics"]["eval_loss"],
                "tokens_per_s": manifest["timing"]["tokens_per_s"], "wall_seconds": manifest["timing"]["wall_seconds"]}

    def step_serve(self) -> dict[str, Any]:
        if self.external_vllm:
            from deploy.vllm import LocalClient

            if not LocalClient(self.external_vllm).healthy():
                raise DemoError(f"no healthy vLLM at {self.external_vllm}")
            self.console.print(f"using the running vLLM at {self.external_vllm}")
            return {"url": self.external_vllm, "started": False, "started_at": datetime.now(UTC).isoformat()}
        from arbitrage.config import load_config
        from deploy.vllm import LocalServer

        base = str(self._folder(["distill", "base"]))
        settings = load_config(self.config_file).local
        self.vllm = LocalServer(settings, base, self.run_dir / "vllm", port=self.vllm_port)
        self.console.print(f"$ {' '.join(self.vllm.command()[1:])}\n  (log: {self.vllm.log_path})")
        started, started_at = time.monotonic(), datetime.now(UTC).isoformat()
        with self.console.status("starting vLLM (CPU build): about 30-60 s") as status:
            self.vllm.start(progress=status.update)
        self._started("vllm", self.vllm.base_url, self.vllm.process.pid)
        self.console.print(f"vLLM healthy at {self.vllm.base_url} after {time.monotonic() - started:.0f} s")
        return {"url": self.vllm.base_url, "started": True, "started_at": started_at, "startup_seconds": round(time.monotonic() - started, 1)}

    def step_eval(self) -> dict[str, Any]:
        p = self.profile
        args = ["distill", "eval", PATH, "--data-dir", str(self.data_dir), "--vllm-url", self.vllm_url,
                "--target", f"{p.target:g}", "--min-samples", str(min(p.min_samples, 20)), "--concurrency", "8"]
        folder = self._folder(args + (["--max-examples", str(p.eval_examples)] if p.eval_examples else []))
        manifest = _manifest(folder)
        return {"folder": str(folder), "examples": manifest["examples"], "agreement": manifest["agreement"],
                "at_target": manifest["at_target"], "calibrated": manifest["calibrated"],
                "chart": str(folder / "curve.png")}

    def step_promote(self) -> dict[str, Any]:
        adapter = self.results["steps"]["train"]["version"]
        policy = self.policy()
        self.console.print(f"PUT /admin/routes/{PATH} (what `arbitrage route set` sends): {json.dumps(policy)}")
        self._admin("PUT", f"/admin/routes/{PATH}", policy)
        self.console.print(f"POST /admin/routes/{PATH}/promote {{\"adapter\": \"{adapter}\"}} (what `arbitrage route "
                           f"promote {PATH} --adapter {adapter}` sends): shadow mode, the threshold from the eval")
        route = self._admin("POST", f"/admin/routes/{PATH}/promote", {"adapter": adapter})
        self._wait_for_adapter()
        promoted = route_policy(route)
        self.console.print(f"route {PATH}: {route_summary(route)}, adapter {promoted.get('adapter')}, confidence "
                           f"threshold {promoted.get('threshold', 0):.4f}")
        return {"adapter": adapter, "threshold": promoted.get("threshold"), "route": route}

    def step_ramp(self) -> dict[str, Any]:
        p = self.profile
        app = App(self.gateway.url + "/v1", self.keys["app"], p.ramp_concurrency)
        watcher = RouteWatcher(self, interval_s=1.0)
        settle = SettleCounter(p.settle_requests)
        rows = self.texts.fresh[:p.ramp_requests]
        with watcher, self._bar("app traffic (ramp)", len(rows), watcher=watcher) as bar:
            replies = app.play(rows, bar, stop=lambda: settle.done(watcher.latest))
        self.timeline = watcher.timeline
        final = watcher.poll()
        local = sum(r.served_by == "local" for r in replies)
        self.console.print(f"{len(replies)} requests during the ramp: {local} served locally "
                           f"({local / max(len(replies), 1):.0%}); final route: {route_summary(final)}")
        return {"requests": len(replies), "served_locally": local, "final_route": final,
                "app_accuracy": sum(r.correct for r in replies) / max(len(replies), 1),
                "timeline": watcher.timeline}

    def step_roi(self) -> dict[str, Any]:
        from arbitrage.demo_report import run_report

        self._command(["roi", "--data-dir", str(self.data_dir), "--config", str(self.config_file), "--since", "1d"],
                      show_stdout=True, check=False)
        report = run_report(self)
        self.console.print(report.text)
        return report.facts

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def vllm_url(self) -> str:
        return self.external_vllm or self.vllm.base_url

    @property
    def config_file(self) -> Path:
        return self.run_dir / "arbitrage.toml"

    def policy(self) -> dict[str, Any]:
        """The route's settings before promotion: JSON answers compared on their intent, the ramp."""
        p = self.profile
        return {"mode": "off", "output": "json",
                "comparator": {"name": "json", "keys": ["intent"]}, "shadow_rate": p.shadow_rate,
                "audit_rate": p.audit_rate,
                "ramp": {"steps": list(p.ramp_steps), "target": p.target, "floor": p.floor,
                         "min_samples": p.min_samples, "window": max(1000, p.min_samples)}}

    def _start_servers(self) -> None:
        p = self.profile
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sim_csv = self.run_dir / "sim-dataset.csv"
        _write_sim_dataset(sim_csv, self.texts)
        sim_port = free_port()
        self.sim = ServerProcess(ARBITRAGE + ["sim", "--port", str(sim_port), "--dataset", str(sim_csv),
                                              "--latency-ms", f"{p.sim_latency_ms:g}", "--log-level", "warning"],
                                 sim_port, self.run_dir / "logs" / "sim.log", health="/v1/models")
        self._say_start(self.sim, "the frontier API stand-in (Banking77 gold labels, gpt-4o prices and latency)")
        self.sim.start(60)
        self._started("sim", self.sim.url, self.sim.proc.pid)
        self.config_file.write_text(gateway_config(self.sim.url, self.vllm_url_for_config(), self.economics))
        self.keys = {"app": self._create_key("demo-app"), "admin": self._create_key("demo-admin", admin=True)}
        port = free_port()
        self.gateway = ServerProcess(ARBITRAGE + ["serve", "--config", str(self.config_file), "--port", str(port),
                                                  "--data-dir", str(self.data_dir)],
                                     port, self.run_dir / "logs" / "gateway.log",
                                     env={"OPENAI_API_KEY": "sk-sim-needs-no-real-key"})
        self._say_start(self.gateway, f"the gateway (config {self.config_file})")
        self.gateway.start(60)
        self._started("gateway", self.gateway.url, self.gateway.proc.pid)

    def _started(self, name: str, url: str, pid: int) -> None:
        """Record a server as soon as it runs (demo.json), so whoever watches the run can find it."""
        self.results["servers"][name] = {"url": url, "pid": pid}
        self._write_results()

    def vllm_url_for_config(self) -> str:
        return (self.external_vllm or f"http://127.0.0.1:{self.vllm_port}/v1").rstrip("/")

    def _create_key(self, name: str, admin: bool = False) -> str:
        from arbitrage.keys import KeyLimits, KeyStore

        _, secret = KeyStore(self.data_dir).create(name, KeyLimits(role="admin" if admin else None))
        self.console.print(f"$ arbitrage keys create {name}{' --admin' if admin else ''}   (the key is kept in "
                           f"memory only; the data folder holds its hash)")
        return secret

    def _say_start(self, server: ServerProcess, what: str) -> None:
        shown = " ".join(server.args[len(ARBITRAGE):])
        self.console.print(f"$ arbitrage {shown}\n  {what}: {server.url} (log {server.log})")

    def _wait_for_capture(self, expected: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self._count_calls() < expected and time.monotonic() < deadline:
            time.sleep(0.5)

    def _count_calls(self) -> int:
        from arbitrage.capture.store import connect

        with contextlib.closing(connect(self.data_dir)) as con:
            return con.execute("SELECT count(*) FROM calls").fetchone()[0]

    def _command(self, args: list[str], *, show_stdout: bool = False, quiet: bool = False, check: bool = True) -> str:
        """Run an arbitrage command (shown first, its progress on the terminal); its stdout."""
        if not quiet:
            self.console.print(f"$ arbitrage {' '.join(_quote(a) for a in args)}", highlight=False)
        child = subprocess.Popen(ARBITRAGE + args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                 start_new_session=True)
        self.children.append(child)
        out, _ = child.communicate()
        self.children.remove(child)
        if show_stdout and out.strip():
            self.console.print(out.rstrip(), highlight=False, markup=False)
        if check and child.returncode != 0:
            raise DemoError(f"`arbitrage {args[0]}{' ' + args[1] if args[0] == 'distill' else ''}` failed "
                            f"(status {child.returncode}); its message is above")
        return out

    def _folder(self, args: list[str]) -> Path:
        """Run a command that prints the folder it wrote as its last line; that folder."""
        lines = self._command(args).strip().splitlines()
        if not lines:
            raise DemoError(f"`arbitrage {' '.join(args[:2])}` printed no folder")
        return Path(lines[-1])

    def _wait_for_adapter(self, timeout: float = 120.0) -> None:
        """The gateway loads the promoted adapter into vLLM within seconds (its reconciliation)."""
        deadline = time.monotonic() + timeout
        with self.console.status("the gateway loads the adapter into vLLM"):
            while time.monotonic() < deadline:
                status = self._admin("GET", f"/admin/routes/{PATH}").get("status") or {}
                if status.get("adapter_loaded"):
                    self.console.print("adapter loaded into vLLM by the gateway")
                    return
                time.sleep(1.0)
        raise DemoError(f"the gateway did not load the adapter into vLLM within {timeout:.0f} s; see "
                        f"{self.gateway.log}")

    def _admin_api(self) -> bool:
        """The gateway serves the admin API of routes (GET /admin/routes is not a 404)."""
        response = httpx.get(self.gateway.url + "/admin/routes", timeout=10,
                             headers={"Authorization": f"Bearer {self.keys['admin']}"})
        return response.status_code != 404

    def _admin(self, method: str, route: str, body: dict | None = None) -> Any:
        response = httpx.request(method, self.gateway.url + route, json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {self.keys['admin']}"})
        if response.status_code >= 400:
            raise DemoError(f"{method} {route}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    @contextlib.contextmanager
    def _bar(self, description: str, total: int, watcher: RouteWatcher | None = None) -> Iterator:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = [TextColumn(description), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[money]}"),
                   TextColumn("{task.fields[served]}"), TimeElapsedColumn()]
        with Progress(*columns, console=self.console) as progress:
            task = progress.add_task(description, total=total, money="", served="")

            def update(replies: list[Reply]) -> None:
                local = sum(r.served_by == "local" for r in replies)
                paid = sum(r.upstream_usd for r in replies if r.served_by != "local")
                route = f" | route {route_summary(watcher.latest)}" if watcher and watcher.latest else ""
                progress.update(task, completed=len(replies), money=f"${paid:.4f} paid upstream",
                                served=f"local {local} ({local / len(replies):.0%}){route}")

            yield update

    def _intro(self) -> None:
        p = self.profile
        intents = f"{len(self.texts.intents)} Banking77 intents" + (
            f" (the {p.intents} most frequent: {', '.join(self.texts.intents)})" if p.intents else "")
        self.console.rule(f"[bold]arbitrage demo ({p.name})")
        self.console.print(f"run folder: {self.run_dir}\ntraffic: {intents}; the app asks {MODEL} for "
                           f'{{"intent": ...}} JSON\nassumptions of this run:', highlight=False)
        for line in [*p.assumptions(), *self.economics.assumptions()]:
            self.console.print(f"  - {line}", highlight=False, markup=False)

    def _header(self, number: int, name: str) -> None:
        titles = {"capture": "the app's traffic through the gateway", "paths": "where the money goes",
                  "build": "the training set of the top path", "train": "a LoRA adapter on SmolLM2-135M",
                  "serve": "vLLM with runtime LoRA loading", "eval": "the adapter against the teacher, through vLLM",
                  "promote": "the adapter promoted, in shadow mode",
                  "ramp": "traffic keeps flowing; the ramp controller moves the share on evidence",
                  "roi": "the money"}
        self.console.rule(f"[bold]{number}/{len(STEPS)} {name}: {titles[name]}  "
                          f"[dim]({_minutes(time.monotonic() - self.started)} in)")

    def _routing_missing(self) -> None:
        self.results["routing"] = "not available"
        self.console.rule("[bold yellow]promote and ramp: not available yet")
        self.console.print("This gateway has no admin API for routes yet (GET /admin/routes is a 404), so the "
                           "demo cannot promote the adapter and stops after the evaluation. The adapter is trained and "
                           "evaluated; `arbitrage roi` below counts its one-time cost.")
        self.step_roi()

    def _write_results(self) -> None:
        text = json.dumps(self.results, indent=2, default=str)
        temp = self.run_dir / ".demo.json.tmp"
        temp.write_text(text)
        os.replace(temp, self.run_dir / "demo.json")


class RouteWatcher:
    """Polls the route's policy through the admin API in the background during the ramp, keeping
    a timeline of (seconds, mode, share) whenever it changes."""

    def __init__(self, demo: Demo, interval_s: float) -> None:
        self.demo, self.interval_s = demo, interval_s
        self.latest: dict[str, Any] | None = None
        self.timeline: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="route-watcher")

    def __enter__(self) -> Self:
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(DemoError, httpx.HTTPError):
                self.poll()

    def poll(self) -> dict[str, Any]:
        route = self.demo._admin("GET", f"/admin/routes/{PATH}")
        policy = route_policy(route)
        if not self.timeline or (self.timeline[-1]["mode"], self.timeline[-1]["share"]) != (
                policy.get("mode"), policy.get("share")):
            self.timeline.append({"at": datetime.now(UTC).isoformat(), "mode": policy.get("mode"),
                                  "share": policy.get("share")})
        self.latest = route
        return route


class SettleCounter:
    """True once ``requests`` replies have come back since the route reached local mode at 100%."""

    def __init__(self, requests: int) -> None:
        self.requests, self.seen = requests, 0

    def done(self, route: dict[str, Any] | None) -> bool:
        policy = route_policy(route or {})
        if policy.get("mode") == "local" and (policy.get("share") or 0) >= 100:
            self.seen += 1
        return self.seen >= self.requests


def route_policy(route: dict[str, Any]) -> dict[str, Any]:
    """The policy inside an admin-API route answer (the answer itself if it is the policy)."""
    return route.get("policy", route) if isinstance(route, dict) else {}


def route_summary(route: dict[str, Any] | None) -> str:
    """Mode and share, and the ramp's evidence when there is some."""
    policy = route_policy(route or {})
    text = f"{policy.get('mode', '?')} {policy.get('share', 0):g}%"
    evidence = ((route or {}).get("status") or {}).get("evidence")
    if evidence:
        text += f", agreement {evidence['agreed']}/{evidence['n']} (lower bound {evidence['lower']:.2f})"
    return text


def gateway_config(sim_url: str, vllm_url: str, economics: Economics) -> str:
    """The gateway's TOML config: the simulator upstream, the local vLLM, the demo's prices."""
    return f"""# written by `arbitrage demo`
[gateway]
host = "127.0.0.1"

[[upstreams]]
name = "frontier-sim"
base_url = "{sim_url}/v1"
models = ["*"]
max_retries = 2
retry_max_wait_s = 1

[capture]
segment_max_age_s = 5
compact_interval_s = 2

[economics]
training_usd_per_hour = {economics.training_usd_per_hour}
serving_usd_per_hour = {economics.serving_usd_per_hour}

[local]
url = "{vllm_url}"
served_model_name = "base"
max_lora_rank = 16
max_loras = 2
startup_timeout_s = 600
"""


def _write_sim_dataset(target: Path, texts: Texts) -> None:
    """Every text the run sends, with its gold label: the simulator answers each correctly."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "category"])
        writer.writerows(dict.fromkeys(texts.capture + texts.fresh))


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise DemoError(f"no readable manifest in {folder}: {exc}") from None


def _stop_group(child: subprocess.Popen) -> None:
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def new_run_dir(root: Path) -> Path:
    """A fresh folder for one run: ``root/run-<UTC time>`` (a suffix if two start in one second)."""
    stamp = datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
    for suffix in ("", *(f"-{n}" for n in range(2, 100))):
        folder = root / f"{stamp}{suffix}"
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"cannot make a run folder in {root}")


def run_demo(root: Path, quick: bool, stop_after: str = "roi", vllm_url: str | None = None,
             economics: Economics = Economics()) -> dict[str, Any]:
    """One demo run in a fresh folder below ``root``; every process it starts is stopped before
    it returns, whether it finishes, fails or is interrupted (Ctrl-C, SIGTERM, SIGHUP; see
    ``_Interrupts``). After an interrupt these signals stay ignored: the caller is exiting, and a late
    Ctrl-C must not turn that exit into a traceback or a death by SIGINT."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    demo = Demo(new_run_dir(root), QUICK if quick else FULL, economics, console, vllm_url)
    interrupts = _Interrupts()
    previous = {sig: signal.signal(sig, interrupts) for sig in interrupts.SIGNALS}
    try:
        return demo.run(stop_after)
    except KeyboardInterrupt:
        console.print("\n[bold]interrupted[/]: stopping every process the demo started")
        raise
    finally:
        interrupts.closing = True  # a Ctrl-C from here on must not cut the clean-up short
        demo.close()
        if not interrupts.raised:  # an interrupted demo is on its way out: a late Ctrl-C stays ignored until it exits
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
    """The KeyboardInterrupt the demo's handler raises. A subclass on purpose: when a plain
    KeyboardInterrupt leaves code that ``exec()`` or ``eval()`` runs from a string (dataclasses and
    namedtuple build their methods that way, so an import may be such code), CPython notes an unhandled
    Ctrl-C even if the exception is caught further up, and ``python -m`` then ends the process by SIGINT
    instead of with its exit status 130. That check compares the exact type, so a subclass is not noted."""


class _Interrupts:
    """The demo's handler for Ctrl-C, SIGTERM and SIGHUP. The first one sets all three to ignored (at the
    OS level: a handler written in Python is reset to the default action when the interpreter shuts down,
    so a late press would kill the exiting process) and, unless the clean-up has begun, raises
    ``Interrupted``. Deciding in the handler leaves no moment between two statements where a second
    press could cut the clean-up short or escape as a traceback."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.raised = False
        self.closing = False

    def __call__(self, signum, frame) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.closing:
            return
        self.raised = True
        raise Interrupted
