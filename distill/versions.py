"""Versioned artifact folders (``<root>/v1``, ``v2``, ...): numbering and publishing.

A stage builds its artifact in a temporary folder and publishes it by renaming it to the next
free ``vN``, so a half-written artifact never looks complete and two concurrent runs never
take the same number.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

from arbitrage.errors import ConfigError

MANIFEST = "manifest.json"
_VERSION = re.compile(r"v(\d+)")


def versions(root: Path) -> list[int]:
    """Existing version numbers under ``root``, ascending."""
    found = (_VERSION.fullmatch(p.name) for p in root.iterdir()) if root.is_dir() else ()
    return sorted(int(m[1]) for m in found if m)


def choose(found: list[int], wanted: str | None, what: str, path: str) -> str:
    """``wanted`` (vN) when it is among ``found``, else the latest; ConfigError naming those there are."""
    chosen = wanted or f"v{found[-1]}"
    if int(chosen[1:]) not in found:
        raise ConfigError(f"path {path!r} has no {what} {chosen} (versions: {', '.join(f'v{n}' for n in found)})")
    return chosen


def publish(folder: Path, root: Path, manifest: dict[str, Any], number: int | None = None) -> tuple[Path, dict]:
    """Rename ``folder`` to ``root/vN`` (from ``number``, default the next one, up to the first
    free one), with its manifest written first; returns the new folder and the manifest."""
    number = number or max(versions(root), default=0) + 1
    while True:
        final = {"version": f"v{number}", **manifest}
        write_json(folder / MANIFEST, final)
        try:
            os.rename(folder, root / f"v{number}")
            return root / f"v{number}", final
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            number = max(versions(root)) + 1


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write a JSON file whole (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(temp, path)
