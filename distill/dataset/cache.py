"""The teacher's answers, content-addressed and appended durably, so a run that is interrupted
(Ctrl-C, kill, a crash, the budget) resumes without paying twice for an answer.

One JSON line per answer in ``<datasets>/<path>/cache/teacher-answers.jsonl``, written with a
single ``write(2)`` on an ``O_APPEND`` descriptor and fsynced before the answer counts as
done. A line torn by a crash is skipped when reading. The key is the sha256 of everything that
decides the answer: teacher model, system prompt text, input messages, generation parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_FILE = "teacher-answers.jsonl"


def answer_key(model: str, system_prompt: str, messages: Any, params: dict[str, Any]) -> str:
    """The content address of one teacher call."""
    canonical = json.dumps({"model": model, "system_prompt": system_prompt, "messages": messages,
                            "params": params}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class AnswerCache:
    """Answers by key: read once at open, appended one durable line per answer."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / CACHE_FILE
        self.answers: dict[str, dict[str, Any]] = {}
        self._fd: int | None = None

    def open(self) -> AnswerCache:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.answers = dict(_read_lines(self.path))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if _ends_torn(self.path):
            os.write(self._fd, b"\n")  # so the next answer starts a line of its own
        return self

    def get(self, key: str) -> dict[str, Any] | None:
        return self.answers.get(key)

    def put(self, entry: dict[str, Any]) -> None:
        """Store one answer (with its ``key``); durable when this returns."""
        line = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        os.write(self._fd, line)
        os.fsync(self._fd)
        self.answers[entry["key"]] = entry

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _ends_torn(path: Path) -> bool:
    with path.open("rb") as stream:
        if stream.seek(0, os.SEEK_END) == 0:
            return False
        stream.seek(-1, os.SEEK_END)
        return stream.read(1) != b"\n"


def _read_lines(path: Path):
    with path.open("rb") as stream:
        for line in stream:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # torn by a crash mid-write: that answer is simply asked again
            if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                yield entry["key"], entry
