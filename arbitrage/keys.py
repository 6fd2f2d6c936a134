"""Gateway keys: shown once at creation, stored only as SHA-256 hashes.

A key is 256 random bits, so a plain SHA-256 is enough (no password hashing
needed). Records and metrics name a key by its ``id``, never by the key.
The gateway re-reads ``keys.json`` when it changes, so a new key works at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from arbitrage.errors import ConfigError

KEYS_FILE = "keys.json"
KEY_PREFIX = "sk-arb-"
ROLES = ("client", "metrics", "admin")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class KeyEntry:
    """What is stored about one key."""

    id: str
    name: str
    sha256: str
    created_at: str
    role: str = "client"
    """client | metrics | admin (see the module docstring)."""
    budget_usd_day: float | None = None
    """Spend allowed per UTC day, in dollars; None for no limit."""
    budget_usd_month: float | None = None
    """Spend allowed per UTC calendar month, in dollars; None for no limit."""
    rpm: int | None = None
    """Requests allowed per minute (a token bucket of this size); None for no limit."""

    def has_role(self, role: str) -> bool:
        """True when this key may act as ``role`` (admin may act as anything)."""
        return self.role == role or self.role == "admin"


@dataclass(frozen=True)
class KeyLimits:
    """The settable role and limits of a key (None: client role, no limit)."""

    role: str | None = None
    budget_usd_day: float | None = None
    budget_usd_month: float | None = None
    rpm: int | None = None

    def check(self) -> None:
        """Raise ConfigError for a role or limit that makes no sense."""
        if self.role is not None and self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {self.role!r}")
        for name in ("budget_usd_day", "budget_usd_month", "rpm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be greater than 0 (omit it for no limit), got {value}")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The key file of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / KEYS_FILE
        self._by_digest: dict[str, KeyEntry] = {}
        self._mtime: float | None = None
        self._checked_at = 0.0

    def entries(self) -> list[KeyEntry]:
        """All keys, oldest first."""
        if not self.path.exists():
            return []
        try:
            return [KeyEntry(**e) for e in json.loads(self.path.read_text())["keys"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.path} is unreadable: {exc}") from None

    def create(self, name: str, limits: KeyLimits = KeyLimits()) -> tuple[KeyEntry, str]:
        """Make a key; returns its entry and the key itself (shown once, never stored)."""
        if not _NAME.fullmatch(name):
            raise ConfigError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        limits.check()
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        entry = KeyEntry(f"key_{secrets.token_hex(4)}", name, _digest(secret), datetime.now(UTC).isoformat(),
                         limits.role or "client", limits.budget_usd_day, limits.budget_usd_month, limits.rpm)
        with self._locked():
            existing = self.entries()
            if any(e.name == name for e in existing):
                raise ConfigError(f"a key named {name!r} exists already")
            self._write(existing + [entry])
        return entry, secret

    def revoke(self, name: str) -> KeyEntry:
        """Delete the key with this name."""
        with self._locked():
            existing = self.entries()
            gone = [e for e in existing if e.name == name]
            if not gone:
                raise ConfigError(f"no key named {name!r}")
            self._write([e for e in existing if e.name != name])
        return gone[0]

    def update(self, name: str, **changes) -> KeyEntry:
        """Change the role or limits of the key with this name (a None limit removes it)."""
        unknown = set(changes) - {"role", "budget_usd_day", "budget_usd_month", "rpm"}
        if unknown:
            raise ConfigError(f"unknown key settings: {', '.join(sorted(unknown))}")
        KeyLimits(**changes).check()
        if changes.get("role", "client") is None:
            raise ConfigError("a key always has a role")
        with self._locked():
            existing = self.entries()
            if not any(e.name == name for e in existing):
                raise ConfigError(f"no key named {name!r}")
            updated = [replace(e, **changes) if e.name == name else e for e in existing]
            self._write(updated)
        return next(e for e in updated if e.name == name)

    def lookup(self, secret: str) -> KeyEntry | None:
        """The entry for a presented key, or None. Re-reads the file at most once a second."""
        self._refresh()
        return self._by_digest.get(_digest(secret))

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return
        mtime = self.path.stat().st_mtime if self.path.exists() else None
        if mtime != self._mtime:
            self._by_digest = {e.sha256: e for e in self.entries()}
            self._mtime = mtime
        self._checked_at = now  # only now: a thread checking meanwhile must not see "fresh" and an empty table

    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(self.path.with_suffix(".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lock

    def _write(self, entries: list[KeyEntry]) -> None:
        temp = self.path.with_name(f".{KEYS_FILE}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(e) for e in entries]}, f, indent=2)
        os.replace(temp, self.path)
        self._checked_at = 0.0
