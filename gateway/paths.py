"""Call-path identity: which app prompt template a request belongs to.

In order: the ``X-Arbitrage-Path`` header, the ``arbitrage_path`` entry of
OpenAI's ``metadata`` field, else a stable hash of (endpoint, requested model,
normalized system prompt), so one prompt template maps to one path.
"""

from __future__ import annotations

import functools
import hashlib
import re

from arbitrage.errors import InvalidRequestError

PATH_HEADER = "x-arbitrage-path"
METADATA_KEY = "arbitrage_path"
_VALID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_SPACE = re.compile(r"\s+")


def explicit_path(header: str | None, metadata: object) -> str | None:
    """The path the client named, checked; None when it named none."""
    name = header
    if name is None and isinstance(metadata, dict):
        name = metadata.get(METADATA_KEY)
    if name is None:
        return None
    if not isinstance(name, str) or not _VALID.fullmatch(name):
        raise InvalidRequestError(
            "call path names are 1-128 characters: letters, digits and . _ : / - (starting with a letter or digit)",
            param=METADATA_KEY if header is None else PATH_HEADER,
            code="invalid_path",
        )
    return name


@functools.lru_cache(maxsize=4096)  # an app sends the same few templates over and over
def derived_path(endpoint: str, model: str, template: str) -> str:
    """A stable name for (endpoint, model, normalized template text)."""
    normalized = _SPACE.sub(" ", template).strip()
    digest = hashlib.sha256(f"{endpoint}\0{model}\0{normalized}".encode()).hexdigest()[:10]
    prefix = re.sub(r"[^A-Za-z0-9._-]", "_", model).lstrip("._-")[:48] or "model"
    return f"{prefix}-{digest}"
