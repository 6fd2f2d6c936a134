"""The output check of a local answer: may it be served at all?

``output = "text"`` accepts any non-empty answer; ``output = "json"`` needs the answer to parse
as JSON and, with ``json_schema``, to match it. An answer that fails is not served: the request
falls back upstream, with the check's detail as the reason.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from arbitrage.errors import ConfigError


class OutputVerdict(NamedTuple):
    """Whether the answer passed, and why not."""

    ok: bool
    detail: str | None = None


class OutputCheck:
    """The check for one policy, the schema validator compiled once."""

    def __init__(self, output: str = "text", json_schema: dict[str, Any] | None = None) -> None:
        self.output = output
        self._validator = compile_schema(json_schema) if json_schema is not None else None

    def check(self, text: str) -> OutputVerdict:
        """Check one answer."""
        if not text.strip():
            return OutputVerdict(False, "empty answer")
        if self.output != "json":
            return OutputVerdict(True)
        try:
            value = json.loads(text)
        except ValueError as exc:
            return OutputVerdict(False, f"not JSON: {exc}")
        if self._validator is None:
            return OutputVerdict(True)
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is None:
            return OutputVerdict(True)
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return OutputVerdict(False, f"schema mismatch at {where}: {error.message}")


def compile_schema(schema: dict[str, Any]) -> Any:
    """A validator for ``schema`` (its own draft, from ``$schema``); ConfigError if the schema is invalid."""
    cls = validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise ConfigError(f"json_schema is not a valid JSON Schema: {exc.message}") from None
    return cls(schema)
