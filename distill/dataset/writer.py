"""Writing a dataset version: ``<datasets>/<path>/vN/`` with ``train.parquet``,
``eval.parquet``, optional exports and ``manifest.json``.

Everything is written into a hidden temporary folder beside the versions and renamed into
place at the end, so a folder named ``vN`` is always complete; a build killed while writing
leaves only a ``.building-*`` folder, which is never taken for a version.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from distill.dataset.filters import normalized_input
from distill.dataset.source import Example
from distill.versions import publish

SPLITS = ("train", "eval")

SCHEMA = pa.schema([
    pa.field("example_id", pa.string(), nullable=False),
    pa.field("request_id", pa.string()),
    pa.field("input_messages", pa.string(), nullable=False),
    pa.field("system_prompt", pa.string()),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("answer_model", pa.string()),
    pa.field("cost_usd", pa.float64()),
    pa.field("answer_key", pa.string()),
])
"""One row per example; ``input_messages`` is JSON text: ``[{"role", "content"}, ...]``."""


def example_id(example: Example) -> str:
    """A stable id of the example's input (the same input has the same id in every version)."""
    return hashlib.sha256(normalized_input(example.input_messages).encode()).hexdigest()[:16]


def write_dataset(root: Path, splits: dict[str, list[Example]], manifest: dict[str, Any],
                  exports: tuple[str, ...] = ()) -> Path:
    """Write one new version; returns its folder. ``manifest`` gains ``version`` and ``files``."""
    root.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        files = {f"{name}.parquet": _write_parquet(temp / f"{name}.parquet", rows) for name, rows in splits.items()}
        if "openai-jsonl" in exports:
            files.update({f"{name}.jsonl": _write_jsonl(temp / f"{name}.jsonl", rows) for name, rows in splits.items()})
        return publish(temp, root, {**manifest, "files": files})[0]
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _write_parquet(path: Path, examples: list[Example]) -> dict[str, Any]:
    table = pa.Table.from_pylist([_row(e) for e in examples], schema=SCHEMA)
    pq.write_table(table, path)
    return _file_facts(path, len(examples))


def _row(example: Example) -> dict[str, Any]:
    return {
        "example_id": example_id(example), "request_id": example.request_id,
        "input_messages": json.dumps(list(example.input_messages), ensure_ascii=False),
        "system_prompt": example.system_prompt, "answer": example.answer, "source": example.source,
        "answer_model": example.answer_model, "cost_usd": example.cost_usd, "answer_key": example.answer_key,
    }


def _write_jsonl(path: Path, examples: list[Example]) -> dict[str, Any]:
    with path.open("w", encoding="utf-8") as stream:
        for line in openai_chat_lines(examples):
            stream.write(json.dumps(line, ensure_ascii=False) + "\n")
    return _file_facts(path, len(examples))


def openai_chat_lines(examples: list[Example]) -> Iterator[dict[str, Any]]:
    """OpenAI's chat fine-tuning format: ``{"messages": [system, user, ..., assistant]}``."""
    for example in examples:
        system = [{"role": "system", "content": example.system_prompt}] if example.system_prompt else []
        yield {"messages": [*system, *example.input_messages, {"role": "assistant", "content": example.answer}]}


def _file_facts(path: Path, rows: int) -> dict[str, Any]:
    return {"rows": rows, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
