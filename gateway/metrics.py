"""Prometheus metrics of the gateway, with bounded label sets.

Labels are: ``path`` (at most ``max_paths`` distinct values, later paths are
"other"), ``endpoint`` and ``served_by`` (small fixed sets), ``error_type``
(a fixed vocabulary) and ``upstream`` (from the config). No key and no model
name chosen by a client ever becomes a label.

With several worker processes (``arbitrage serve --workers N``) the metrics run in
prometheus_client's multiprocess mode: the serving process makes a fresh folder,
names it in ``PROMETHEUS_MULTIPROC_DIR`` before the workers start, and removes it
at exit. Each worker writes its values to memory-mapped files there, and
``/metrics`` from any worker merges all of them: counters and histograms are
summed over every worker that ever ran (a dead worker's counts stay). Every gauge
here describes something the workers share (the capture folder, the routing
policy, the local model server), so its mode is ``livemostrecent``: the value set
last by a live worker, which is right after a live edit where ``max`` would keep
showing a lowered share. Such gauges only take ``set``: prometheus_client refuses
``inc``/``dec`` in that mode. A gauge that one day holds a per-worker quantity
needs ``livesum`` (or ``liveall`` for a series per worker) instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONFIDENCE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
OTHER = "other"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLDER_PREFIX = "arbitrage-metrics-"
_VALUE_FILE = re.compile(r"_(\d+)\.db$")
SHARED = "livemostrecent"
"""Multiprocess mode of every gauge (see the module docstring)."""


class PathLabels:
    """Maps call paths to label values, admitting at most ``limit`` distinct paths."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, path: str) -> str:
        if path in self._known:
            return path
        with self._lock:
            if len(self._known) < self.limit:
                self._known.add(path)
                return path
        return OTHER


class Metrics:
    """All gateway metrics, in their own registry (one per app, so tests stay independent)."""

    def __init__(self, max_paths: int = 100) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self._scraped = _merged_registry(self.multiprocess_dir) if self.multiprocess_dir else self.registry
        self.path_label = PathLabels(max_paths)
        r = self.registry
        self.requests = Counter("arbitrage_requests", "Client requests answered.",
                                ["path", "endpoint", "served_by", "status_class"], registry=r)
        self.tokens = Counter("arbitrage_tokens", "Tokens by kind (prompt, cached, completion).",
                              ["path", "served_by", "kind"], registry=r)
        self.cost = Counter("arbitrage_cost_usd", "Dollars spent on answered requests.",
                            ["path", "served_by"], registry=r)
        self.counterfactual_cost = Counter("arbitrage_counterfactual_cost_usd",
                                           "Dollars the upstream would have charged for the same requests.",
                                           ["path"], registry=r)
        self.unpriced = Counter("arbitrage_unpriced_requests", "Requests whose model has no known price.",
                                ["path"], registry=r)
        self.latency = Histogram("arbitrage_request_latency_seconds", "Time from request to last byte.",
                                 ["endpoint", "served_by"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("arbitrage_time_to_first_token_seconds", "Time to the first streamed token.",
                              ["endpoint", "served_by"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("arbitrage_errors", "Requests that ended in an error, by type.",
                              ["error_type"], registry=r)
        self.retries = Counter("arbitrage_upstream_retries", "Upstream calls retried, by reason.",
                               ["upstream", "reason"], registry=r)
        self.capture_records = Counter("arbitrage_capture_records", "Records written to the capture journal.",
                                       registry=r)
        self.capture_failures = Counter("arbitrage_capture_failures", "Records that could not be written.",
                                        registry=r)
        self.capture_backlog_bytes = Gauge("arbitrage_capture_backlog_bytes",
                                           "Journal bytes not yet compacted into Parquet.", registry=r, multiprocess_mode=SHARED)
        self.capture_backlog_segments = Gauge("arbitrage_capture_backlog_segments",
                                              "Journal segments not yet compacted into Parquet.", registry=r, multiprocess_mode=SHARED)

        # Local route (served_by: upstream | local | fallback; fallback = tried locally, answered upstream)
        self.fallbacks = Counter("arbitrage_fallbacks", "Requests tried locally and answered upstream, by reason.",
                                 ["path", "reason"], registry=r)
        self.confidence = Histogram("arbitrage_local_confidence", "Confidence of local answers.",
                                    ["path"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.saved = Counter("arbitrage_saved_usd", "Counterfactual minus actual dollars of locally served requests.",
                             ["path"], registry=r)
        self.shadow_cost = Counter("arbitrage_shadow_cost_usd", "Dollars spent on shadow and audit calls.",
                                   ["path", "kind"], registry=r)
        self.comparisons = Counter("arbitrage_shadow_comparisons", "Shadow and audit comparisons, by outcome.",
                                   ["path", "kind", "agreed"], registry=r)
        self.shadow_dropped = Counter("arbitrage_shadow_dropped", "Shadow or audit work dropped, by reason.",
                                      ["path", "reason"], registry=r)
        self.share = Gauge("arbitrage_local_share_percent", "Configured share of a path's requests tried locally.",
                           ["path"], registry=r, multiprocess_mode=SHARED)
        self.mode = Gauge("arbitrage_route_mode", "1 for the path's routing mode.", ["path", "mode"], registry=r, multiprocess_mode=SHARED)
        self.agreement = Gauge("arbitrage_agreement_ratio", "Agreement over the path's recent comparisons.",
                               ["path"], registry=r, multiprocess_mode=SHARED)
        self.agreement_lower = Gauge("arbitrage_agreement_lower_bound",
                                     "Wilson lower bound of the recent agreement.", ["path"], registry=r, multiprocess_mode=SHARED)
        self.ramp_samples = Gauge("arbitrage_ramp_samples", "Comparisons in the ramp's evidence under the path's "
                                  "policy in force (it raises the share from ramp.min_samples).", ["path"], registry=r,
                                  multiprocess_mode=SHARED)
        self.agreement_target = Gauge("arbitrage_agreement_target", "Agreement the ramp needs to raise the share.",
                                      ["path"], registry=r, multiprocess_mode=SHARED)
        self.agreement_floor = Gauge("arbitrage_agreement_floor", "Agreement below which the ramp rolls back.",
                                     ["path"], registry=r, multiprocess_mode=SHARED)
        self.ramp_decisions = Counter("arbitrage_ramp_decisions", "Ramp controller decisions, by action.",
                                      ["path", "action"], registry=r)
        self.distill_cost = Gauge("arbitrage_distill_cost_usd",
                                  "One-time cost of the path's serving adapter (teacher dollars + training compute).",
                                  ["path"], registry=r, multiprocess_mode=SHARED)
        self.local_up = Gauge("arbitrage_local_up", "1 while the local model server answers its health check.",
                              registry=r, multiprocess_mode=SHARED)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes (merged over all workers in multiprocess mode)."""
        return generate_latest(self._scraped)

    def worker_started(self) -> None:
        """Multiprocess mode: drop the live gauges of workers that died without saying so (kill -9)."""
        if self.multiprocess_dir:
            for pid in _pids_with_files(self.multiprocess_dir) - {os.getpid()}:
                if not _alive(pid):
                    multiprocess.mark_process_dead(pid, self.multiprocess_dir)

    def worker_exiting(self) -> None:
        """Multiprocess mode: this worker's live gauges stop counting (its counters stay in the sums)."""
        if self.multiprocess_dir:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


@contextlib.contextmanager
def multiprocess_metrics_folder():
    """A fresh folder for the workers' metric files, named in the environment the workers inherit;
    removed at exit. Folders left by a serving process that died (kill -9) are removed first."""
    for stale in glob.glob(os.path.join(tempfile.gettempdir(), f"{FOLDER_PREFIX}*-*")):
        owner = os.path.basename(stale).removeprefix(FOLDER_PREFIX).split("-")[0]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
    os.environ[MULTIPROC_ENV] = folder
    try:
        yield folder
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(folder, ignore_errors=True)


def _merged_registry(path: str) -> CollectorRegistry:
    if values.ValueClass is values.MutexValue:
        raise RuntimeError(f"{MULTIPROC_ENV} was set after prometheus_client was imported: "
                           "this process's metrics would be missing from the merged exposition")
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def _pids_with_files(path: str) -> set[int]:
    """Worker pids named in the value files (``counter_1234.db``, ``gauge_livemostrecent_1234.db``)."""
    matches = (_VALUE_FILE.search(f) for f in glob.glob(os.path.join(path, "*.db")))
    return {int(m.group(1)) for m in matches if m}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
