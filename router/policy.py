"""The routing policy of one call path: who may answer, how much, and how it is judged.

Read from the TOML config (``[routes."<path>"]`` tables) and from admin-API JSON, so it is
strict: unknown keys and bad values stop with a ``ConfigError`` naming the field. Example::

    [routes."support-intents"]
    mode = "canary"
    adapter = "v3"
    share = 10
    threshold = 0.8
    output = "json"
    comparator = { name = "json", keys = ["intent"] }

    [routes."support-intents".ramp]
    steps = [1, 5, 10, 25, 50, 75, 100]
    target = 0.99
    floor = 0.95

Modes: ``off`` (upstream only), ``shadow`` (upstream serves, a sample also goes to the local
model to measure agreement; share is 0), ``canary`` (``share`` percent tried locally),
``local`` (everything tried locally: share 100 unless set). A local answer is still served
only when its confidence clears ``threshold`` and the output check passes.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any, Literal

import msgspec
from msgspec import structs

from arbitrage.errors import ConfigError
from router.comparators import comparator_names
from router.confidence import scorer_names
from router.output import OutputCheck, compile_schema

Mode = Literal["off", "shadow", "canary", "local"]

MODES_NEEDING_ADAPTER = ("shadow", "canary", "local")


class PolicyError(ConfigError, ValueError):
    """A bad policy value. A ``ConfigError``; also a ``ValueError`` so that msgspec, when the
    policy is decoded inside a larger document, reports it with its location (``at $.routes...``)."""


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Frozen, keyword-only, unknown keys rejected."""


class ComparatorSpec(_Strict):
    """How a local answer is compared with the upstream one (shadow and audit)."""

    name: str = "exact"
    """exact | json | numeric | similarity | judge (or a registered comparator)."""
    keys: list[str] | None = None
    """json only: compare just these keys of the top-level object (the whole value when unset)."""
    tolerance: float = 0.0
    """numeric only: largest absolute difference between the first numbers still counted as agreement."""
    min_similarity: float = 0.9
    """similarity only: smallest similarity ratio (0-1) counted as agreement."""
    judge_model: str | None = None
    """judge only: the upstream model that judges whether the two answers agree."""

    def __post_init__(self) -> None:
        if self.name not in comparator_names():
            raise PolicyError(f"comparator.name: unknown comparator {self.name!r} (known: {', '.join(comparator_names())})")
        if self.keys is not None and self.name != "json":
            raise PolicyError(f"comparator.keys applies only to the json comparator, not {self.name!r}")
        if self.keys is not None and not self.keys:
            raise PolicyError("comparator.keys must name at least one key (leave it out to compare the whole value)")
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise PolicyError(f"comparator.tolerance must be >= 0, got {self.tolerance}")
        if not 0.0 <= self.min_similarity <= 1.0:
            raise PolicyError(f"comparator.min_similarity must be within 0-1, got {self.min_similarity}")
        if self.name == "judge" and not self.judge_model:
            raise PolicyError("comparator.judge_model is required for the judge comparator")
        if self.judge_model is not None and self.name != "judge":
            raise PolicyError(f"comparator.judge_model applies only to the judge comparator, not {self.name!r}")


class RampSettings(_Strict):
    """How the ramp controller moves ``share`` on agreement evidence (Wilson bounds)."""

    steps: list[float] = msgspec.field(default_factory=lambda: [1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0])
    """Shares (percent) the ramp moves through, increasing, each in (0, 100]."""
    target: float = 0.99
    """Raise to the next step when the lower bound of agreement is at least this."""
    floor: float = 0.95
    """Roll back to shadow mode when the upper bound of agreement falls below this."""
    min_samples: int = 200
    """Comparisons needed since the last change before the share is raised."""
    window: int = 1000
    """Most recent comparisons the evidence is taken from."""
    z: float = 1.96
    """Normal quantile of the Wilson interval (1.96: 95% two-sided)."""
    enabled: bool = True
    """Let the controller change the share; when false the share only changes by hand."""

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        for name in ("target", "floor"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise PolicyError(f"ramp.{name} must be within (0, 1], got {getattr(self, name)}")
        if self.floor > self.target:
            raise PolicyError(f"ramp.floor ({self.floor}) must not exceed ramp.target ({self.target})")
        if self.min_samples < 1:
            raise PolicyError(f"ramp.min_samples must be >= 1, got {self.min_samples}")
        if self.window < self.min_samples:
            raise PolicyError(f"ramp.window ({self.window}) must be >= ramp.min_samples ({self.min_samples})")
        if not (math.isfinite(self.z) and self.z > 0):
            raise PolicyError(f"ramp.z must be > 0, got {self.z}")


def _check_steps(steps: list[float]) -> None:
    if not steps:
        raise PolicyError("ramp.steps must list at least one share")
    bad = [s for s in steps if not 0.0 < s <= 100.0]
    if bad:
        raise PolicyError(f"ramp.steps must each be within (0, 100], got {bad[0]}")
    if any(b <= a for a, b in pairwise(steps)):
        raise PolicyError(f"ramp.steps must be strictly increasing, got {steps}")


class RoutePolicy(_Strict):
    """The routing policy of one call path."""

    mode: Mode = "off"
    """off | shadow | canary | local."""
    adapter: str | None = None
    """Version of this path's adapter (e.g. "v3": ``<data_dir>/adapters/<path>/v3``, which vLLM serves
    as "<path>/v3"); needed in every mode but off. The config and the route table check the form."""
    share: float = 0.0
    """Percent (0-100) of requests tried locally; 0 in shadow mode; local mode means 100 unless set."""
    threshold: float = 0.0
    """Serve a local answer only when its confidence is >= this (0-1)."""
    confidence: str = "joint"
    """Confidence scorer: joint (product of token probabilities), min (least likely token),
    mean (geometric mean per token), or a registered one."""
    comparator: ComparatorSpec = msgspec.field(default_factory=ComparatorSpec)
    """How shadow and audit comparisons decide agreement."""
    output: Literal["json", "text"] = "text"
    """Output check of a local answer: json (must parse, and match json_schema if set) or text
    (any non-empty answer). A failed check falls back upstream."""
    json_schema: dict[str, Any] | None = None
    """JSON Schema a local answer must match (needs output = "json")."""
    shadow_rate: float = 0.1
    """Share (0-1) of upstream-served requests also sent to the local model in the background."""
    audit_rate: float = 0.05
    """Share (0-1) of locally served requests also sent upstream in the background."""
    sticky: bool = False
    """Same end user (OpenAI's `user` field), same side: membership in the share is a hash of
    (path, user), so a user's side changes only when the share crosses them."""
    local_timeout_s: float = 10.0
    """Give up on the local model after this long and fall back upstream."""
    ramp: RampSettings = msgspec.field(default_factory=RampSettings)
    """The ramp controller's settings."""

    def __post_init__(self) -> None:
        self._check_ranges()
        self._check_mode()
        if self.confidence not in scorer_names():
            raise PolicyError(f"confidence: unknown scorer {self.confidence!r} (known: {', '.join(scorer_names())})")
        if self.json_schema is not None and self.output != "json":
            raise PolicyError('json_schema needs output = "json"')
        if self.json_schema is not None:
            try:
                compile_schema(self.json_schema)
            except ConfigError as exc:
                raise PolicyError(str(exc)) from None

    def _check_ranges(self) -> None:
        if not 0.0 <= self.share <= 100.0:
            raise PolicyError(f"share must be within 0-100 (percent), got {self.share}")
        for name in ("threshold", "shadow_rate", "audit_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PolicyError(f"{name} must be within 0-1, got {getattr(self, name)}")
        if not (math.isfinite(self.local_timeout_s) and self.local_timeout_s > 0):
            raise PolicyError(f"local_timeout_s must be > 0, got {self.local_timeout_s}")

    def _check_mode(self) -> None:
        if self.mode in MODES_NEEDING_ADAPTER and not self.adapter:
            raise PolicyError(f"mode {self.mode!r} needs an adapter (set `adapter`, e.g. \"v1\")")
        if self.mode == "shadow" and self.share != 0:
            raise PolicyError(f"share must be 0 in shadow mode (upstream serves everything), got {self.share}")
        if self.mode == "local" and self.share == 0:
            structs.force_setattr(self, "share", 100.0)

    def output_check(self) -> OutputCheck:
        """The output check of this policy (build once per policy: it compiles the schema)."""
        return OutputCheck(self.output, self.json_schema)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "route policy") -> RoutePolicy:
        """Decode a TOML table or parsed JSON object; errors name ``where`` and the field."""
        try:
            return msgspec.convert(data, cls, strict=True)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def from_json(cls, data: bytes | str, *, where: str = "route policy") -> RoutePolicy:
        """Decode admin-API JSON; errors name ``where`` and the field."""
        try:
            return msgspec.json.decode(data, type=cls, strict=True)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise ConfigError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (nested tables included), as JSON or TOML would hold it."""
        return msgspec.to_builtins(self)

    def with_changes(self, **fields: Any) -> RoutePolicy:
        """A new, validated policy with ``fields`` replaced (nested ones may be given as dicts)."""
        unknown = sorted(set(fields) - set(self.__struct_fields__))
        if unknown:
            raise ConfigError(f"route policy: unknown field {unknown[0]!r}")
        return self.from_dict({**self.to_dict(), **msgspec.to_builtins(fields)})
