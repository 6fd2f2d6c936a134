"""This machine's CPU as ``/proc/cpuinfo`` describes it (Linux): its name, for records and caches
keyed by machine, and its feature flags, for choices that depend on the instruction set."""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (else what ``platform`` knows, where /proc/cpuinfo is missing or has none)."""
    try:
        return next(value for key, value in _fields(cpuinfo) if key == "model name")
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags: x86's "flags", Arm's "Features" (empty where /proc/cpuinfo is missing or
    unreadable)."""
    try:
        return {flag for key, value in _fields(cpuinfo) if key in ("flags", "Features") for flag in value.split()}
    except OSError:
        return set()


def _fields(cpuinfo: Path) -> list[tuple[str, str]]:
    """``key: value`` lines, both stripped (raises OSError where the file cannot be read)."""
    return [(key.strip(), value.strip()) for key, _, value in
            (line.partition(":") for line in cpuinfo.read_text().splitlines())]
