"""Redaction of personal data in captured bodies, before a record touches the disk.

On with ``[capture] redact = true`` (every kind) or a list of kinds
(``["email", "card"]``). Only what is stored changes: the upstream still gets the
real text. A match becomes ``[EMAIL]``, ``[PHONE]`` or ``[CARD]``.

- email: ``local@domain.tld``.
- card: 13-19 digits, optionally grouped by single spaces or dashes, that pass the Luhn check.
- phone: 9-15 digits in groups, starting with ``+`` or ``(`` or split by spaces, dots or
  dashes (``+44 20 7946 0958``, ``(415) 555-0100``, ``415.555.0100``); bare digit runs
  and dates are left alone, and so are 7-digit local numbers (``555-0100``).

Precompiled regular expressions, not a library: Presidio needs spaCy models and
scrubadub is unmaintained and far slower; ``bench/redaction.py`` measures the cost per
record. Bodies are JSON: only string values are redacted (the JSON is parsed, and
written again only when something matched), so numbers, ids and the structure stay; a
string is scanned for e-mail only if it has an ``@`` and for numbers only if it has two
digits in a row.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import orjson

KINDS = ("email", "phone", "card")
BODY_COLUMNS = {"calls": ("request", "response"), "shadow": ("upstream_answer", "local_answer")}
"""The columns of each table that hold request or answer text."""

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,5}){1,5}(?![\w-])"
                   r"|(?<![\w+])\+\d{8,15}(?!\w)")


_TWO_DIGITS = re.compile(r"\d\d")
_NUMBER_RUN = re.compile(r"\d[\d ().-]{6,}\d")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number passes."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _card(match: re.Match) -> str:
    return "[CARD]" if luhn_valid(_digits(match.group())) else match.group()


def _phone(match: re.Match) -> str:
    text = match.group()
    count = len(_digits(text))
    if not 9 <= count <= 15 or _looks_like_a_date(text):
        return text
    return "[PHONE]"


def _looks_like_a_date(text: str) -> bool:
    return bool(re.fullmatch(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}(?:[ T]\d{1,2}[:.]\d{2}.*)?", text))


_RULES: dict[str, tuple[re.Pattern, Callable[[re.Match], str] | str]] = {
    "email": (EMAIL, "[EMAIL]"),
    "card": (CARD, _card),     # before phone: a card number would also look like one
    "phone": (PHONE, _phone),
}


class Redactor:
    """Replaces the chosen kinds of personal data in text and in JSON bodies."""

    def __init__(self, kinds: Iterable[str] = KINDS) -> None:
        kinds = set(kinds)
        unknown = kinds - set(KINDS)
        if unknown:
            raise ValueError(f"unknown redaction kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.rules = [rule for kind, rule in _RULES.items() if kind in kinds]
        self._email = "email" in kinds
        self._numbers = [rule for kind, rule in _RULES.items() if kind in kinds and kind != "email"]

    def text(self, text: str) -> str:
        """``text`` with every match of the chosen kinds replaced."""
        if self._email and "@" in text:  # cheap tests first: most strings have neither
            text = EMAIL.sub("[EMAIL]", text)
        if self._numbers and _TWO_DIGITS.search(text):
            text = self._redact_numbers(text)
        return text

    def _redact_numbers(self, text: str) -> str:
        """Card and phone rules run only on runs of digits and separators (with two characters of
        context before, for a leading + or ( and the rules' look-behinds, and one after): scanning a
        long prompt once with a simple pattern is ~10 times cheaper than with the full rules."""
        pieces, done = [], 0
        for run in _NUMBER_RUN.finditer(text):
            start, end = max(run.start() - 2, done), min(run.end() + 1, len(text))
            segment = text[start:end]
            for pattern, replacement in self._numbers:
                segment = pattern.sub(replacement, segment)
            pieces += [text[done:start], segment]
            done = end
        return "".join(pieces) + text[done:] if pieces else text

    def json_text(self, body: str | None) -> str | None:
        """A captured body: JSON has its string values redacted; anything else is redacted as text."""
        if not body:
            return body
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self.text(body)
        redacted = self._value(data)
        return body if redacted is data else orjson.dumps(redacted).decode()

    def record(self, table: str, record: dict) -> dict:
        """The record with its body columns redacted (a new dict only when one changed)."""
        changed = {}
        for column in BODY_COLUMNS.get(table, ()):
            value = record.get(column)
            if isinstance(value, str):
                redacted = self.json_text(value)
                if redacted is not value:
                    changed[column] = redacted
        return {**record, **changed} if changed else record

    def _value(self, value):
        """``value`` with strings redacted; the same object when nothing changed."""
        if isinstance(value, str):
            redacted = self.text(value)
            return value if redacted == value else redacted
        if isinstance(value, list):
            items = [self._value(v) for v in value]
            return value if all(a is b for a, b in zip(items, value)) else items
        if isinstance(value, dict):
            items = {k: self._value(v) for k, v in value.items()}
            return value if all(items[k] is v for k, v in value.items()) else items
        return value


def redactor_for(setting: bool | list[str]) -> Redactor | None:
    """The redactor a ``[capture] redact`` setting asks for, or None when it is off."""
    if setting is True:
        return Redactor()
    if setting:
        return Redactor(setting)
    return None
