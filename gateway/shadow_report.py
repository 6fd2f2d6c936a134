"""What a route's ``shadow`` rows say, for the admin API (``arbitrage route show``): the threshold
calibrated on its adapter's comparisons, and its most confident disagreements with their inputs; and
the people's verdicts on them (``reviews`` rows, ``arbitrage route review``).

The most confident disagreements are where a teacher's own mistakes and inputs that fit two answers
show up first (bench/RESULTS-distill.md, "The teacher's own mistakes at the top of the confidence
ranking"): an operator reads them before trusting, or distrusting, the calibrated threshold, and
records a verdict; one reviewed ``upstream_wrong`` then counts as agreed in the calibration.

The calibration and the disagreements are reports for an operator, never part of a client's request:
a store that cannot be read gives ``{"error": ...}``, not a failure.
"""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path
from typing import Any, Literal, get_args

from arbitrage.errors import StoreError

MAX_DISAGREEMENTS = 100
"""The most disagreements one admin request returns."""


Verdict = Literal["upstream_wrong", "local_wrong", "ambiguous"]
"""What a person can find a comparison to be (``arbitrage route review``). ``upstream_wrong``: the
local answer was the right one, so the comparison counts as agreed in the calibration."""
VERDICTS: tuple[str, ...] = get_args(Verdict)

LATEST_REVIEWS = """(SELECT shadow_id, arg_max(verdict, ts) AS verdict FROM reviews WHERE path = ?
                    GROUP BY shadow_id)"""


def calibration(data_dir: Path, path: str, adapter: str, policy) -> dict[str, Any]:
    """The lowest threshold whose agreement among the comparisons above it has a Wilson lower
    bound at the policy's target (with at least ``ramp.min_samples`` of them); None if none yet.
    A comparison reviewed ``upstream_wrong`` counts as agreed (``reviewed_upstream_wrong``: how many
    disagreements did)."""
    from router.calibration import calibrate

    try:
        rows = reviewed_comparisons(data_dir, path, adapter)
    except Exception as exc:  # noqa: BLE001 - a report for an operator, never a failed request
        return {"error": str(exc)}
    points = [(confidence, agreed or overruled) for confidence, agreed, overruled in rows]
    ramp = policy.ramp
    threshold = calibrate(points, ramp.target, z=ramp.z, min_samples=ramp.min_samples)
    return {"samples": len(points), "target": ramp.target, "threshold": threshold,
            "reviewed_upstream_wrong": sum(not agreed and overruled for _, agreed, overruled in rows)}


def reviewed_comparisons(data_dir: Path, path: str, adapter: str) -> list[tuple[float, bool, bool]]:
    """(confidence, agreed, reviewed upstream_wrong) of every judged comparison of ``adapter`` whose answer
    passed the output check (one that failed it is never served, whatever its confidence)."""
    return _query(data_dir, f"""
        SELECT s.confidence, s.agreed, coalesce(r.verdict = 'upstream_wrong', false) AS overruled
        FROM shadow s LEFT JOIN {LATEST_REVIEWS} r USING (shadow_id)
        WHERE s.path = ? AND s.adapter = ? AND s.agreed IS NOT NULL AND s.confidence IS NOT NULL
          AND coalesce(s.local_reason, '') NOT IN ('invalid_output', 'local_truncated')""",
                  [path, path, adapter])


def ramp_outcomes(data_dir: Path, path: str, adapter: str, policy, revision: str) -> list[tuple[str, bool, bool]]:
    """(shadow_id, agreed, reviewed upstream_wrong) of the last ``ramp.window`` comparisons the ramp
    counted under policy ``revision`` (made since the ``route_changes`` row of that id), oldest first:
    the comparisons of answers the route serves (``local_reason`` confident). Rows written before that
    column existed count if they are audits or at or above the threshold (whether such an answer also
    passed the output check was not recorded then)."""
    rows = _query(data_dir, f"""
        SELECT s.shadow_id, s.agreed, coalesce(r.verdict = 'upstream_wrong', false) AS overruled
        FROM shadow s LEFT JOIN {LATEST_REVIEWS} r USING (shadow_id)
        WHERE s.path = ? AND s.adapter = ? AND s.agreed IS NOT NULL
          AND coalesce(s.local_reason = 'confident', s.kind = 'audit' OR s.confidence >= ?)
          AND s.ts >= (SELECT min(ts) FROM route_changes WHERE change_id = ?)
        ORDER BY s.ts DESC LIMIT ?""", [path, path, adapter, policy.threshold, revision, policy.ramp.window])
    return rows[::-1]


def disagreements(data_dir: Path, path: str, adapter: str, limit: int) -> dict[str, Any]:
    """``limit`` shadow and audit comparisons of ``adapter`` that disagreed, most confident first
    (then newest), each with the input of the client request it came from and its latest review;
    and how many there are."""
    try:
        total = _query(data_dir, "SELECT count(*) FROM shadow WHERE path = ? AND adapter = ? AND agreed = false",
                       [path, adapter])[0][0]
        rows = _query(data_dir, f"""
            WITH top AS (SELECT * FROM shadow WHERE path = ? AND adapter = ? AND agreed = false
                         ORDER BY confidence DESC NULLS LAST, ts DESC LIMIT ?),
                 asked AS (SELECT request_id, any_value(request) AS request FROM calls
                           WHERE path = ? AND request_id IN (SELECT request_id FROM top) GROUP BY request_id)
            SELECT top.shadow_id, top.ts, top.request_id, top.kind, top.confidence, top.upstream_answer,
                   top.local_answer, asked.request, r.verdict
            FROM top LEFT JOIN asked USING (request_id) LEFT JOIN {LATEST_REVIEWS} r USING (shadow_id)
            ORDER BY top.confidence DESC NULLS LAST, top.ts DESC""", [path, adapter, limit, path, path])
    except Exception as exc:  # noqa: BLE001 - a report for an operator, never a failed request
        return {"error": str(exc)}
    return {"total": total, "shown": [
        {"shadow_id": shadow_id, "ts": ts.astimezone(UTC).isoformat(), "request_id": request_id, "kind": kind,
         "confidence": confidence, "upstream_answer": upstream, "local_answer": local,
         "input": request_input(request), "verdict": verdict}
        for shadow_id, ts, request_id, kind, confidence, upstream, local, request, verdict in rows]}


def comparison(data_dir: Path, path: str, shadow_id: str) -> dict[str, Any] | None:
    """One shadow or audit comparison of ``path`` (None when it has none of that id)."""
    rows = _query(data_dir, "SELECT adapter, agreed FROM shadow WHERE path = ? AND shadow_id = ? LIMIT 1",
                  [path, shadow_id])
    return {"shadow_id": shadow_id, "adapter": rows[0][0], "agreed": rows[0][1]} if rows else None


def request_input(request: str | None) -> str | None:
    """The last message of a recorded chat request (a completion request's prompt), as text; None
    when the request was not recorded or has neither."""
    from distill.evaluation import last_input

    try:
        body = json.loads(request) if request else None
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("messages"), list):
        return last_input(body["messages"])
    prompt = body.get("prompt")
    return prompt if prompt is None or isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def _query(data_dir: Path, sql: str, params: list[Any]) -> list[tuple]:
    """The rows of ``sql`` over the capture store; StoreError (one line) when the store cannot be read."""
    import duckdb

    from arbitrage.capture.store import connect, retrying

    con = None
    try:
        con = connect(Path(data_dir))  # its views read the Parquet files' footers already
        return retrying(lambda: con.execute(sql, params).fetchall())
    except duckdb.Error as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]  # DuckDB adds the SQL on further lines
        raise StoreError(f"the capture store in {data_dir} could not be read: {reason}") from exc
    finally:
        if con is not None:
            con.close()
