"""The live routing policy of every call path: the TOML config's ``[routes."<path>"]`` tables,
overridden path by path by the edits kept in ``<data_dir>/routes.json``.

``routes.json`` survives restarts and is shared by every gateway worker and the CLI::

    {"routes": {"support/intents": {"policy": {...}, "revision": "<id of the change that set it>",
                                    "history": [{"policy": {...}, "ts": "...", "actor": "admin",
                                                 "action": "update", "reason": "..."}, ...]}}}

``history`` holds the policies a path had before its latest changes, oldest first, at most
``HISTORY_LIMIT``; ``rollback`` restores the newest one and drops it, so repeated rollbacks step
further back. The file is written whole (temporary file, then rename), and every edit is a
read-modify-write under an flock on ``.routes.lock``, so concurrent writers never lose an edit;
readers in other processes see it through ``refresh``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from arbitrage.config import Config, check_route_adapter, check_route_path, route_policy
from arbitrage.errors import ConfigError
from router.policy import RoutePolicy

log = logging.getLogger(__name__)

ROUTES_FILE = "routes.json"
LOCK_FILE = ".routes.lock"
HISTORY_LIMIT = 20
"""Earlier policies kept per path for rollback."""
ADAPTERS_DIR = "adapters"


@dataclass(frozen=True)
class RouteChange:
    """One change of a path's policy, for the ``route_changes`` table and the logs."""

    path: str
    actor: str
    """Who changed it: "admin" (API or CLI), "ramp" (the controller), ..."""
    action: str
    """set | update | promote | rollback, or the ramp's decision (raise, rollback)."""
    before: RoutePolicy | None
    """The policy in force before (None: the path had none, i.e. off)."""
    after: RoutePolicy
    reason: str
    evidence: dict[str, Any] | None = None
    """What the change rests on (the ramp's agreement counts and bounds), if anything."""
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    change_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def mode_before(self) -> str | None:
        return self.before.mode if self.before else None

    @property
    def share_before(self) -> float | None:
        return self.before.share if self.before else None

    def to_record(self) -> dict[str, Any]:
        """A row of the ``route_changes`` table (migration 0004)."""
        before = self.before
        return {
            "change_id": self.change_id, "ts": self.ts, "path": self.path, "actor": self.actor,
            "action": self.action,
            "mode_before": before.mode if before else None, "mode_after": self.after.mode,
            "share_before": before.share if before else None, "share_after": self.after.share,
            "threshold_before": before.threshold if before else None, "threshold_after": self.after.threshold,
            "reason": self.reason,
            "evidence": None if self.evidence is None else json.dumps(self.evidence, default=str, sort_keys=True),
        }


@dataclass(frozen=True)
class _Stored:
    """What routes.json holds for one path: the policy and the earlier ones (raw dicts)."""

    policy: RoutePolicy
    history: list[dict[str, Any]]
    revision: str
    """The id of the change that put ``policy`` in force ("" in a file written before revisions)."""


class RouteTable:
    """Policies per call path, shared through ``<data_dir>/routes.json`` (see the module docstring).

    ``on_change`` is called after every change is written (outside the file lock).
    """

    def __init__(self, config: Config, on_change: Callable[[RouteChange], None] | None = None) -> None:
        self.data_dir = config.data_dir
        self.file = self.data_dir / ROUTES_FILE
        self.on_change = on_change
        self._configured = {path: route_policy(path, raw) for path, raw in config.routes.items()}
        self._stored: dict[str, _Stored] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._stored, self._stamp = self._read()

    # Reading

    def get(self, path: str) -> RoutePolicy | None:
        """The policy in force for ``path`` (None: no policy, the path goes upstream only)."""
        stored = self._stored.get(path)
        return stored.policy if stored else self._configured.get(path)

    def policies(self) -> dict[str, RoutePolicy]:
        """Every path with a policy, sorted by path."""
        merged = {**self._configured, **{path: s.policy for path, s in self._stored.items()}}
        return dict(sorted(merged.items()))

    def revision(self, path: str) -> str:
        """Names the policy in force for ``path`` as of its latest change: the id of that change,
        "config" for the config's policy, "" for none. The ramp's evidence counts per revision."""
        stored = self._stored.get(path)
        if stored:
            return stored.revision
        return "config" if path in self._configured else ""

    def history(self, path: str) -> list[dict[str, Any]]:
        """The earlier policies of ``path``, oldest first: ``{"policy", "ts", "actor", "action", "reason"}``."""
        stored = self._stored.get(path)
        return list(stored.history) if stored else []

    def refresh(self) -> bool:
        """Re-read routes.json if it changed since it was last read (another worker or the CLI wrote
        it); True if it did. A file that cannot be read is logged and the last good policies stay."""
        if self._file_stamp() == self._stamp:
            return False
        try:
            self._stored, self._stamp = self._read()
        except ConfigError as exc:
            log.error("%s; keeping the routing policies read before", exc)
            self._stamp = self._file_stamp()
            return False
        return True

    def adapter_folder(self, path: str, version: str) -> Path:
        """Where adapter ``version`` ("v3") of ``path`` lives: ``<data_dir>/adapters/<path>/<version>``."""
        check_route_path(path)
        check_route_adapter(path, RoutePolicy(adapter=version))
        return self.data_dir / ADAPTERS_DIR / path / version

    def needed_adapters(self) -> dict[str, Path]:
        """Served name ("<path>/<version>") -> folder, of every policy not off that names an adapter."""
        return {f"{path}/{p.adapter}": self.adapter_folder(path, p.adapter)
                for path, p in self.policies().items() if p.mode != "off" and p.adapter}

    # Changing

    def set(self, path: str, policy: RoutePolicy, *, actor: str, reason: str,
            evidence: dict[str, Any] | None = None, action: str = "set",
            revision: str | None = None) -> RoutePolicy | None:
        """Put ``policy`` in force for ``path`` (the one before goes to its history); returns it.
        With ``revision``, only while the path's policy is still that revision: None, and nothing
        written, when another worker or an operator changed it first."""
        policy = route_policy(path, policy.to_dict())
        return self._change(path, lambda _: policy, actor=actor, action=action, reason=reason, evidence=evidence,
                            revision=revision)

    def update(self, path: str, fields: dict[str, Any], *, actor: str, reason: str,
               action: str = "update") -> RoutePolicy:
        """Merge ``fields`` onto the current policy (or the default one, mode off) and put the result
        in force. Nested ``ramp`` and ``comparator`` tables merge too (a new comparator name starts
        that table afresh). ConfigError names the field of a bad value."""
        if not isinstance(fields, dict):
            raise ConfigError(f'routes."{path}": the policy fields must be an object, got {type(fields).__name__}')

        def merged(current: RoutePolicy | None) -> RoutePolicy:
            return route_policy(path, merge_fields((current or RoutePolicy()).to_dict(), fields))

        return self._change(path, merged, actor=actor, action=action, reason=reason)

    def rollback(self, path: str, *, actor: str, reason: str = "rollback") -> RoutePolicy:
        """Restore the newest earlier policy of ``path`` (dropping it from the history). Without
        history: the same policy in shadow mode with share 0 (nothing served locally). ConfigError
        when the path has no policy, or is off with no earlier policy."""
        def previous(current: RoutePolicy | None) -> RoutePolicy:
            history = self.history(path)
            if history:
                return route_policy(path, history[-1]["policy"])
            if current is None:
                raise ConfigError(f"route {path!r} has no policy to roll back")
            if current.mode == "off":
                raise ConfigError(f"route {path!r} is off and has no earlier policy: nothing to roll back")
            return current.with_changes(mode="shadow", share=0.0)

        return self._change(path, previous, actor=actor, action="rollback", reason=reason, restores=True)

    def _change(self, path: str, change: Callable[[RoutePolicy | None], RoutePolicy], *, actor: str, action: str,
                reason: str, evidence: dict[str, Any] | None = None, restores: bool = False,
                revision: str | None = None) -> RoutePolicy | None:
        """Apply ``change`` to the freshly read policy under the file lock, write, then report it.
        ``restores``: ``change`` returned the newest history entry, which is dropped instead of
        the current policy being added. ``revision``: change nothing (None) unless the path's
        policy is still that revision."""
        change_id = uuid.uuid4().hex
        with self._locked():
            self._stored, self._stamp = self._read()
            if revision is not None and self.revision(path) != revision:
                return None
            before = self.get(path)
            after = change(before)
            history = self.history(path)
            if restores and history:
                history.pop()
            elif before is not None:
                entry = {"policy": before.to_dict(), "ts": datetime.now(UTC).isoformat(), "actor": actor,
                         "action": action, "reason": reason}
                history = (history + [entry])[-HISTORY_LIMIT:]
            self._stored = {**self._stored, path: _Stored(after, history, change_id)}
            self._write()
        record = RouteChange(path, actor, action, before, after, reason, evidence, change_id=change_id)
        log.info("route %s: %s by %s (%s): mode %s -> %s, share %s -> %s", path, action, actor, reason,
                 record.mode_before, after.mode, record.share_before, after.share)
        if self.on_change:
            self.on_change(record)
        return after

    # The file

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / LOCK_FILE, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.file.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read(self) -> tuple[dict[str, _Stored], tuple[int, int, int] | None]:
        stamp = self._file_stamp()
        if stamp is None:
            return {}, None
        try:
            raw = json.loads(self.file.read_bytes())["routes"]
            stored = {path: _Stored(route_policy(path, entry["policy"]), list(entry.get("history", [])),
                                    str(entry.get("revision", "")))
                      for path, entry in raw.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
            raise ConfigError(f"{self.file} is unreadable ({exc}); fix or remove it (then the config's "
                              f"[routes] apply)") from None
        return stored, stamp

    def _write(self) -> None:
        body = {"routes": {path: {"policy": s.policy.to_dict(), "revision": s.revision, "history": s.history}
                           for path, s in sorted(self._stored.items())}}
        temp = self.file.with_name(f".{ROUTES_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(temp, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(body), indent=2) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.file)
        self._stamp = self._file_stamp()


_MERGED_TABLES = ("ramp", "comparator")
_SHARE_ON_ENTERING = {"shadow": 0.0, "local": 100.0}
"""The share a mode change implies when no share is given (shadow serves nothing locally)."""


def merge_fields(current: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` over ``current``; the ``ramp`` and ``comparator`` tables merge key by key, except
    that a comparator with a new name replaces the old table (its options belong to the old one).
    Entering shadow mode without a share sets it to 0, entering local mode to 100."""
    merged = {**current, **fields}
    if "mode" in fields and "share" not in fields and fields["mode"] != current.get("mode"):
        merged["share"] = _SHARE_ON_ENTERING.get(fields["mode"], merged.get("share"))
    for name in _MERGED_TABLES:
        old, new = current.get(name), fields.get(name)
        if not (isinstance(old, dict) and isinstance(new, dict)):
            continue
        if name == "comparator" and new.get("name", old.get("name")) != old.get("name"):
            continue
        merged[name] = {**old, **new}
    return merged
