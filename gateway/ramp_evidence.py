"""The ramp's evidence: each path's latest comparison outcomes under the policy in force.

Outcomes count per policy revision (``RouteTable.revision``: the change that put the policy in
force), so every change of the policy, by the ramp or by hand, starts the evidence afresh, and
an outcome of a comparison made under an earlier policy is never counted for a later one. Of a
revision's outcomes, the last ``ramp.window`` count.

One worker keeps them in memory (``LocalEvidence``). With ``workers = N``, every worker adds to
one SQLite file in the run's temporary folder (``SharedEvidence``), so the ramp decides on all
the path's comparisons (``min_samples`` of them in all, not in each worker), and ``route show``
reports the same evidence whichever worker answers. ``serve`` creates the file and names it in
``ARBITRAGE_SHARED_RAMP``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from gateway.shared_sqlite import SharedSQLite
from router.stats import AgreementWindow

SHARED_RAMP_ENV = "ARBITRAGE_SHARED_RAMP"
"""Names the workers' shared ramp evidence (set by ``serve`` for ``workers`` > 1)."""


class Counts(NamedTuple):
    """Outcomes held and how many agreed (the ramp's ``Evidence``)."""

    n: int
    agreed: int


class LocalEvidence:
    """The evidence of one process: a window per path, started afresh for a new revision."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[str, AgreementWindow]] = {}

    def add(self, path: str, revision: str, agreed: bool, window: int) -> Counts:
        """Count one outcome under ``revision``; the counts of its last ``window`` outcomes."""
        held = self._windows.get(path)
        if held is None or held[0] != revision:  # a revision's policy, its window included, never changes
            held = self._windows[path] = (revision, AgreementWindow(window))
        held[1].add(agreed)
        return Counts(held[1].n, held[1].agreed)

    def counts(self, path: str, revision: str) -> Counts:
        """The counts of ``revision``'s window (none for another revision)."""
        held = self._windows.get(path)
        if held is None or held[0] != revision:
            return Counts(0, 0)
        return Counts(held[1].n, held[1].agreed)

    def forget(self, path: str, keep: str) -> None:
        """Drop ``path``'s outcomes of every revision but ``keep``."""
        if path in self._windows and self._windows[path][0] != keep:
            del self._windows[path]

    def close(self) -> None:
        """Nothing to release."""


class SharedEvidence:
    """The evidence of every worker of one gateway, in one SQLite file (``SharedSQLite``).

    Adding an outcome and counting the window is one transaction, so two workers never count
    from the same state. A revision keeps its last ``window`` outcomes and their running counts
    (as ``AgreementWindow`` does), so an outcome costs the same at any window; the rows of older
    revisions go when a worker makes a change (``forget``).
    """

    FILE = "ramp.sqlite"

    def __init__(self, path: Path) -> None:
        self.file = SharedSQLite(path, "the workers' shared ramp evidence")
        with self.file.transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS outcomes "
                       "(seq INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT, revision TEXT, agreed INTEGER)")
            db.execute("CREATE INDEX IF NOT EXISTS outcomes_by_revision ON outcomes (path, revision, seq)")
            db.execute("CREATE TABLE IF NOT EXISTS windows "
                       "(path TEXT, revision TEXT, n INTEGER, agreed INTEGER, PRIMARY KEY (path, revision))")

    def add(self, path: str, revision: str, agreed: bool, window: int) -> Counts:
        with self.file.transaction() as db:
            n, held = self._counts(db, path, revision)
            db.execute("INSERT INTO outcomes (path, revision, agreed) VALUES (?, ?, ?)", (path, revision, int(agreed)))
            n, held = n + 1, held + bool(agreed)
            if n > window:  # the oldest outcome leaves the window
                seq, oldest = db.execute("SELECT seq, agreed FROM outcomes WHERE path = ? AND revision = ? "
                                         "ORDER BY seq LIMIT 1", (path, revision)).fetchone()
                db.execute("DELETE FROM outcomes WHERE seq = ?", (seq,))
                n, held = n - 1, held - oldest
            db.execute("INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?)", (path, revision, n, held))
        return Counts(n, held)

    def counts(self, path: str, revision: str) -> Counts:
        with self.file.reading() as db:
            return self._counts(db, path, revision)

    def forget(self, path: str, keep: str) -> None:
        with self.file.transaction() as db:
            db.execute("DELETE FROM outcomes WHERE path = ? AND revision != ?", (path, keep))
            db.execute("DELETE FROM windows WHERE path = ? AND revision != ?", (path, keep))

    def close(self) -> None:
        self.file.close()

    @staticmethod
    def _counts(db, path: str, revision: str) -> Counts:
        row = db.execute("SELECT n, agreed FROM windows WHERE path = ? AND revision = ?", (path, revision)).fetchone()
        return Counts(*row) if row else Counts(0, 0)


def ramp_evidence() -> LocalEvidence | SharedEvidence:
    """The workers' shared evidence when ``serve`` made one, else this process's own."""
    shared = os.environ.get(SHARED_RAMP_ENV)
    return SharedEvidence(Path(shared)) if shared else LocalEvidence()


def shared_evidence_in(folder: Path) -> Path:
    """Create the workers' shared evidence in ``folder`` and name it in the environment the
    workers inherit."""
    path = folder / SharedEvidence.FILE
    SharedEvidence(path).close()
    os.environ[SHARED_RAMP_ENV] = str(path)
    return path
