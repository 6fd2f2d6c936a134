"""Dataclass configs whose fields carry their help text (peft's and TRL's config style)."""

from __future__ import annotations

import dataclasses
from typing import Any


class DocumentedFields:
    """Mix into a dataclass whose fields have ``metadata={"help": ...}``: the command line
    takes each option's help and default from the field."""

    @classmethod
    def help_for(cls, name: str) -> str:
        """The help text of one field."""
        return cls._field(name).metadata["help"]

    @classmethod
    def default_for(cls, name: str) -> Any:
        """The default of one field (None for required ones)."""
        default = cls._field(name).default
        return None if default is dataclasses.MISSING else default

    @classmethod
    def _field(cls, name: str) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(cls) if f.name == name)
