"""The ramp's evidence: each path's latest comparison outcomes under the policy in force.

Outcomes count per policy revision (``RouteTable.revision``: the change that put the policy in
force), so every change of the policy, by the ramp or by hand, starts the evidence afresh, and
an outcome of a comparison made under an earlier policy is never counted for a later one. Of a
revision's outcomes, the last ``ramp.window`` count, kept with their running counts, so an
outcome costs the same at any window.

A person's verdict on a comparison still in the window counts as the calibration counts it
(``overrule``): reviewed ``upstream_wrong``, it agreed; any later verdict restores what the
comparator judged.

One SQLite database holds it: in memory for one worker, or with ``workers = N`` a file in the
run's temporary folder that every worker adds to (``SharedSQLite``), so the ramp decides on all
the path's comparisons (``min_samples`` in all, not in each worker) and ``route show`` reports
the same evidence whichever worker answers. ``serve`` creates the file and names it in
``ARBITRAGE_SHARED_RAMP``.

At start the windows are rebuilt from the capture store (``restore_from_store``: the comparisons
made since each policy's change, with their verdicts), so a restart does not send a ramp back to
zero; ``serve`` does it for the shared file before the workers start, one worker in its lifespan.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

from arbitrage.capture.migrations import SCHEMA_FILE
from arbitrage.config import Config
from arbitrage.errors import StoreError
from gateway import shadow_report
from gateway.route_table import RouteTable
from gateway.shared_sqlite import SharedSQLite

log = logging.getLogger(__name__)

SHARED_RAMP_ENV = "ARBITRAGE_SHARED_RAMP"
"""Names the workers' shared ramp evidence (set by ``serve`` for ``workers`` > 1)."""


class Counts(NamedTuple):
    """Outcomes held and how many agreed (the ramp's ``Evidence``)."""

    n: int
    agreed: int


class RampEvidence:
    """The outcomes and window counts of every path; ``path`` None keeps them in this process's memory.

    Adding an outcome and counting the window is one transaction, so two workers never count
    from the same state. The rows of older revisions go when a worker makes a change (``forget``).
    """

    FILE = "ramp.sqlite"

    def __init__(self, path: Path | None = None) -> None:
        self.shared = path is not None
        self.file = SharedSQLite(path or Path(":memory:"), "the ramp's evidence")
        with self.file.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS outcomes (seq INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT, "
                       "revision TEXT, shadow_id TEXT, judged INTEGER, agreed INTEGER)")
            db.execute("CREATE INDEX IF NOT EXISTS outcomes_by_revision ON outcomes (path, revision, seq)")
            db.execute("CREATE INDEX IF NOT EXISTS outcomes_by_comparison ON outcomes (shadow_id)")
            db.execute("CREATE TABLE IF NOT EXISTS windows "
                       "(path TEXT, revision TEXT, n INTEGER, agreed INTEGER, PRIMARY KEY (path, revision))")

    def add(self, path: str, revision: str, shadow_id: str, agreed: bool, window: int) -> Counts:
        """Count comparison ``shadow_id``'s outcome under ``revision``; the counts of its last
        ``window`` outcomes."""
        with self.file.transaction() as db:
            n, held = self._counts(db, path, revision)
            db.execute("INSERT INTO outcomes (path, revision, shadow_id, judged, agreed) VALUES (?, ?, ?, ?, ?)",
                       (path, revision, shadow_id, int(agreed), int(agreed)))
            n, held = n + 1, held + bool(agreed)
            if n > window:  # the oldest outcome leaves the window
                seq, oldest = db.execute("SELECT seq, agreed FROM outcomes WHERE path = ? AND revision = ? "
                                         "ORDER BY seq LIMIT 1", (path, revision)).fetchone()
                db.execute("DELETE FROM outcomes WHERE seq = ?", (seq,))
                n, held = n - 1, held - oldest
            db.execute("INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?)", (path, revision, n, held))
        return Counts(n, held)

    def load(self, path: str, revision: str, outcomes: list[tuple[str, bool, bool]]) -> Counts:
        """Replace ``path``'s evidence with ``revision``'s window of ``outcomes``: (shadow_id, judged,
        reviewed upstream_wrong), oldest first."""
        with self.file.transaction() as db:
            db.execute("DELETE FROM outcomes WHERE path = ?", (path,))
            db.execute("DELETE FROM windows WHERE path = ?", (path,))
            db.executemany("INSERT INTO outcomes (path, revision, shadow_id, judged, agreed) VALUES (?, ?, ?, ?, ?)",
                           [(path, revision, shadow_id, int(judged), int(judged or overruled))
                            for shadow_id, judged, overruled in outcomes])
            counts = Counts(len(outcomes), sum(judged or overruled for _, judged, overruled in outcomes))
            db.execute("INSERT INTO windows VALUES (?, ?, ?, ?)", (path, revision, *counts))
        return counts

    def overrule(self, path: str, shadow_id: str, upstream_wrong: bool) -> tuple[str, Counts] | None:
        """Count a verdict on comparison ``shadow_id``: agreed if ``upstream_wrong``, else as judged.
        The revision and counts of the window holding it; None when no window does."""
        with self.file.transaction() as db:
            row = db.execute("SELECT seq, revision, judged, agreed FROM outcomes WHERE shadow_id = ? AND path = ?",
                             (shadow_id, path)).fetchone()
            if row is None:
                return None
            seq, revision, judged, agreed = row
            counted = int(bool(judged) or upstream_wrong)
            if counted != agreed:
                db.execute("UPDATE outcomes SET agreed = ? WHERE seq = ?", (counted, seq))
                db.execute("UPDATE windows SET agreed = agreed + ? WHERE path = ? AND revision = ?",
                           (counted - agreed, path, revision))
            return revision, self._counts(db, path, revision)

    def counts(self, path: str, revision: str) -> Counts:
        """The counts of ``revision``'s window (none for another revision)."""
        with self.file.reading() as db:
            return self._counts(db, path, revision)

    def forget(self, path: str, keep: str) -> None:
        """Drop ``path``'s outcomes of every revision but ``keep``."""
        with self.file.transaction() as db:
            db.execute("DELETE FROM outcomes WHERE path = ? AND revision != ?", (path, keep))
            db.execute("DELETE FROM windows WHERE path = ? AND revision != ?", (path, keep))

    def close(self) -> None:
        self.file.close()

    @staticmethod
    def _counts(db, path: str, revision: str) -> Counts:
        row = db.execute("SELECT n, agreed FROM windows WHERE path = ? AND revision = ?", (path, revision)).fetchone()
        return Counts(*row) if row else Counts(0, 0)


def ramp_evidence() -> RampEvidence:
    """The workers' shared evidence when ``serve`` made one, else this process's own."""
    shared = os.environ.get(SHARED_RAMP_ENV)
    return RampEvidence(Path(shared) if shared else None)


def restore_from_store(evidence: RampEvidence, table: RouteTable, data_dir: Path) -> int:
    """Rebuild the window of every path the ramp moves (an adapter, not off, the ramp on, a policy
    put in force by a recorded change) from the capture store; how many paths had comparisons. A
    store that cannot be read is logged, and the evidence starts empty."""
    restored = 0
    if not (data_dir / SCHEMA_FILE).exists():
        return restored  # no store yet
    for path, policy in table.policies().items():
        revision = table.revision(path)
        if policy.mode == "off" or not policy.adapter or not policy.ramp.enabled or revision in ("", "config"):
            continue
        try:
            outcomes = shadow_report.ramp_outcomes(data_dir, path, f"{path}/{policy.adapter}", policy, revision)
        except StoreError as exc:
            log.warning("the ramp's evidence starts empty: %s", exc)
            return restored
        if outcomes:
            counts = evidence.load(path, revision, outcomes)
            log.info("ramp evidence of %s restored from the store: %d of %d agreed", path, counts.agreed, counts.n)
            restored += 1
    return restored


def shared_evidence_in(folder: Path, config: Config) -> Path:
    """Create the workers' shared evidence in ``folder``, rebuilt from the capture store, and name
    it in the environment the workers inherit."""
    path = folder / RampEvidence.FILE
    evidence = RampEvidence(path)
    try:
        restore_from_store(evidence, RouteTable(config), config.data_dir)
    finally:
        evidence.close()
    os.environ[SHARED_RAMP_ENV] = str(path)
    return path
