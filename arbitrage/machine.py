"""This machine's CPU as ``/proc/cpuinfo`` describes it (Linux): its name, for records and caches
keyed by machine, and its feature flags, for choices that depend on the instruction set."""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (else what ``platform`` knows, where /proc/cpuinfo is missing or has none)."""
    try:
        lines = cpuinfo.read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags: x86's "flags", Arm's "Features" (empty where /proc/cpuinfo is missing or
    unreadable)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.split(":", 1)[0].strip() in ("flags", "Features")
            for flag in line.split(":", 1)[-1].split()}
