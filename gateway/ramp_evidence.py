"""The ramp's evidence: each path's latest comparison outcomes under the policy in force.

Outcomes count per policy revision (``RouteTable.revision``: the change that put the policy in
force), so every change of the policy, by the ramp or by hand, starts the evidence afresh, and
an outcome of a comparison made under an earlier policy is never counted for a later one. Of a
revision's outcomes, the last ``ramp.window`` count, with their running counts (as
``AgreementWindow`` keeps them), so an outcome costs the same at any window.

A person's verdict on a comparison still in the window counts as the calibration counts it
(``overrule``): reviewed ``upstream_wrong``, it agreed; any later verdict restores what the
comparator judged.

One SQLite database holds it: in memory for one worker, or with ``workers = N`` a file in the
run's temporary folder that every worker adds to (``SharedSQLite``), so the ramp decides on all
the path's comparisons (``min_samples`` in all, not in each worker) and ``route show`` reports
the same evidence whichever worker answers. ``serve`` creates the file and names it in
``ARBITRAGE_SHARED_RAMP``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from gateway.shared_sqlite import SharedSQLite

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
        self.file = SharedSQLite(path or Path(":memory:"), "the workers' shared ramp evidence")
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


def shared_evidence_in(folder: Path) -> Path:
    """Create the workers' shared evidence in ``folder`` and name it in the environment the
    workers inherit."""
    path = folder / RampEvidence.FILE
    RampEvidence(path).close()
    os.environ[SHARED_RAMP_ENV] = str(path)
    return path
