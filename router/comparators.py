"""Does a local answer agree with the upstream one? (shadow and audit comparisons)

Built in: ``exact``, ``json``, ``numeric``, ``similarity`` (synchronous) and ``judge`` (asks an
upstream model through a caller-supplied ``ask`` coroutine function). Every comparator has
``async acompare`` so callers treat them alike; the synchronous ones also have ``compare``.

A ``Comparison`` with ``comparable=False`` means the upstream answer itself could not be
judged (not JSON, no number): the caller should not count it as evidence against the local model.
Errors raised by ``ask`` propagate: a failed judge call is not a disagreement.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from rapidfuzz.fuzz import ratio

if TYPE_CHECKING:
    from router.policy import ComparatorSpec

Ask = Callable[[str], Awaitable[str]]
"""Sends one prompt to a judge model and returns its text answer (the gateway's upstream call)."""


class Comparison(NamedTuple):
    """Outcome of one comparison."""

    agreed: bool
    detail: str | None = None
    """Why they disagree, or a note (e.g. the similarity); None when nothing to say."""
    comparable: bool = True
    """False when the upstream answer could not be judged; not evidence either way."""


class Comparator(Protocol):
    """Compares an upstream answer with a local one."""

    name: str

    def compare(self, upstream: str, local: str) -> Comparison:
        """Synchronous comparison (the judge raises ``TypeError``: use ``acompare``)."""
        ...

    async def acompare(self, upstream: str, local: str, *, question: str | None = None) -> Comparison:
        """Comparison usable for every comparator; ``question`` is context for the judge."""
        ...


class _SyncComparator:
    name = ""

    def compare(self, upstream: str, local: str) -> Comparison:
        raise NotImplementedError

    async def acompare(self, upstream: str, local: str, *, question: str | None = None) -> Comparison:
        return self.compare(upstream, local)


class ExactComparator(_SyncComparator):
    """Equal after stripping surrounding whitespace."""

    name = "exact"

    def compare(self, upstream: str, local: str) -> Comparison:
        if upstream.strip() == local.strip():
            return Comparison(True)
        return Comparison(False, "texts differ")


class JsonComparator(_SyncComparator):
    """Both parse as JSON and are equal as values: key order, whitespace and 1 vs 1.0 do not
    matter, true vs 1 does. With ``keys``, only those keys of the top-level objects are compared."""

    name = "json"

    def __init__(self, keys: list[str] | None = None) -> None:
        self.keys = keys

    def compare(self, upstream: str, local: str) -> Comparison:
        try:
            expected = _parse_json(upstream)
        except ValueError as exc:
            return Comparison(False, f"upstream answer is not JSON: {exc}", comparable=False)
        try:
            actual = _parse_json(local)
        except ValueError as exc:
            return Comparison(False, f"local answer is not JSON: {exc}")
        if self.keys is None:
            return Comparison(True) if _canonical(expected) == _canonical(actual) else Comparison(False, "values differ")
        return self._compare_keys(expected, actual)

    def _compare_keys(self, expected: Any, actual: Any) -> Comparison:
        if not isinstance(expected, dict):
            return Comparison(False, "upstream answer is not a JSON object", comparable=False)
        if not isinstance(actual, dict):
            return Comparison(False, "local answer is not a JSON object")
        for key in self.keys or ():
            if key not in expected:
                return Comparison(False, f"upstream answer lacks key {key!r}", comparable=False)
            if key not in actual:
                return Comparison(False, f"local answer lacks key {key!r}")
            if _canonical(expected[key]) != _canonical(actual[key]):
                return Comparison(False, f"key {key!r} differs")
        return Comparison(True)


def _parse_json(text: str) -> Any:
    def reject(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=reject)  # JSONDecodeError is a ValueError


def _canonical(value: Any) -> Any:
    """A hashable form equal for equal JSON values; booleans kept apart from numbers."""
    if isinstance(value, dict):
        return ("object", frozenset((k, _canonical(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("array", tuple(_canonical(v) for v in value))
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    return ("string", value)


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class NumericComparator(_SyncComparator):
    """The first number in each text differs by at most ``tolerance`` (absolute difference).
    Thousands separators are not understood: "1,200" reads as 1."""

    name = "numeric"

    def __init__(self, tolerance: float = 0.0) -> None:
        self.tolerance = tolerance

    def compare(self, upstream: str, local: str) -> Comparison:
        expected, actual = first_number(upstream), first_number(local)
        if expected is None:
            return Comparison(False, "no number in the upstream answer", comparable=False)
        if actual is None:
            return Comparison(False, "no number in the local answer")
        difference = abs(expected - actual)
        if difference <= self.tolerance:
            return Comparison(True)
        return Comparison(False, f"{actual} vs {expected}: off by {difference:g} (tolerance {self.tolerance:g})")


def first_number(text: str) -> float | None:
    """The first decimal number in ``text`` (sign, fraction and exponent allowed), or None."""
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


class SimilarityComparator(_SyncComparator):
    """RapidFuzz's normalized Indel similarity (``fuzz.ratio`` / 100, the measure of difflib's
    ``SequenceMatcher.ratio`` without its heuristics, in linear memory) of the stripped texts
    is at least ``min_similarity``."""

    name = "similarity"

    def __init__(self, min_similarity: float = 0.9) -> None:
        self.min_similarity = min_similarity

    def compare(self, upstream: str, local: str) -> Comparison:
        similarity = similarity_ratio(upstream, local)
        return Comparison(similarity >= self.min_similarity, f"similarity {similarity:.3f}")


def similarity_ratio(a: str, b: str) -> float:
    """Similarity of two texts in [0, 1] (1.0: equal after stripping whitespace)."""
    return ratio(a.strip(), b.strip()) / 100.0


JUDGE_PROMPT = """You compare two answers to the same request. Reply with exactly one word: \
"yes" if answer B says the same thing as answer A (same decision, same facts, same values; \
wording and formatting may differ), otherwise "no".
{question}
<answer_a>
{upstream}
</answer_a>

<answer_b>
{local}
</answer_b>

Do A and B agree? Reply yes or no."""

_VERDICT = re.compile(r"\W*(yes|no)\W*", re.IGNORECASE)


class JudgeComparator:
    """An upstream model judges agreement. Its verdict is parsed strictly: one word, yes or no
    (case, quotes and punctuation around it ignored); anything else is not agreement."""

    name = "judge"

    def __init__(self, ask: Ask, *, judge_model: str | None = None) -> None:
        self.ask = ask
        self.judge_model = judge_model

    def compare(self, upstream: str, local: str) -> Comparison:
        raise TypeError("the judge comparator is asynchronous: use acompare")

    async def acompare(self, upstream: str, local: str, *, question: str | None = None) -> Comparison:
        verdict = await self.ask(judge_prompt(upstream, local, question=question))
        return parse_verdict(verdict)


def judge_prompt(upstream: str, local: str, *, question: str | None = None) -> str:
    """The prompt sent to the judge model (``question`` is the request, when known)."""
    context = f"\n<request>\n{question}\n</request>\n" if question else ""
    return JUDGE_PROMPT.format(question=context, upstream=upstream.strip(), local=local.strip())


def parse_verdict(text: str) -> Comparison:
    """``yes`` -> agreed, ``no`` -> not agreed, anything else -> not agreed with the reason."""
    match = _VERDICT.fullmatch(text or "")
    if match is None:
        return Comparison(False, f"unparseable judge verdict: {text[:80]!r}")
    agreed = match.group(1).lower() == "yes"
    return Comparison(agreed, None if agreed else "judge says the answers differ")


ComparatorFactory = Callable[["ComparatorSpec", "Ask | None"], Comparator]

_FACTORIES: dict[str, ComparatorFactory] = {
    "exact": lambda spec, ask: ExactComparator(),
    "json": lambda spec, ask: JsonComparator(spec.keys),
    "numeric": lambda spec, ask: NumericComparator(spec.tolerance),
    "similarity": lambda spec, ask: SimilarityComparator(spec.min_similarity),
    "judge": lambda spec, ask: _judge(spec, ask),
}


def _judge(spec: ComparatorSpec, ask: Ask | None) -> JudgeComparator:
    if ask is None:
        raise ValueError("the judge comparator needs an `ask` callable (the caller's upstream call)")
    return JudgeComparator(ask, judge_model=spec.judge_model)


def register_comparator(name: str, factory: ComparatorFactory) -> None:
    """Make a comparator available under ``name``; ``factory(spec, ask)`` builds it."""
    _FACTORIES[name] = factory


def comparator_names() -> list[str]:
    """Names of the registered comparators."""
    return sorted(_FACTORIES)


def make_comparator(spec: ComparatorSpec, *, ask: Ask | None = None) -> Comparator:
    """The comparator ``spec`` describes; ``ask`` is required for the judge."""
    try:
        factory = _FACTORIES[spec.name]
    except KeyError:
        raise ValueError(f"unknown comparator {spec.name!r} (known: {', '.join(comparator_names())})") from None
    return factory(spec, ask)
