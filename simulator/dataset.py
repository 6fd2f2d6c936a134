"""The labelled data set the simulator answers from.

A CSV file with a ``text`` column and one label column. Known texts (after normalization) get
their gold label; unknown texts get the label of the most similar known text, found through a
small inverted index weighted by inverse document frequency, so answers stay plausible and
deterministic.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

TEXT_COLUMN = "text"
GUESS_CACHE_LIMIT = 100_000
RARE_WORD_SHARE = 0.02  # a word in at most this share of rows nominates candidate rows
_WORD = re.compile(r"\w+")


class DatasetError(ValueError):
    """The data set file is missing, unreadable or has unusable columns."""


def normalize_text(text: str) -> str:
    """Collapse whitespace and case-fold, so trivially different spellings match."""
    return " ".join(text.casefold().split())


def words_of(normalized: str) -> set[str]:
    """The distinct words of an already normalized text."""
    return set(_WORD.findall(normalized))


class LabelledDataset:
    """Texts and their labels, indexed for exact lookup and nearest-text guessing."""

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        if not rows:
            raise DatasetError("the data set has no rows")
        self.labels: frozenset[str] = frozenset(label for _, label in rows)
        self._gold: dict[str, str] = {}
        self._row_labels: list[str] = []
        self._row_words: list[frozenset[str]] = []
        self._postings: dict[str, list[int]] = defaultdict(list)
        for text, label in rows:
            self._add(normalize_text(text), label)
        self._idf = self._inverse_document_frequencies()
        self._rare_limit = max(1.0, RARE_WORD_SHARE * len(rows))
        self._most_common = Counter(label for _, label in rows).most_common(1)[0][0]
        self._guesses: dict[str, str] = {}

    @classmethod
    def from_csv(cls, path: str | Path, label_column: str | None = None) -> LabelledDataset:
        """Load a CSV with a ``text`` column and one label column (``label_column`` picks
        it when there are several)."""
        path = Path(path)
        try:
            with path.open(newline="", encoding="utf-8") as stream:
                reader = csv.DictReader(stream)
                column = choose_label_column(path, reader.fieldnames or [], label_column)
                rows = [(row[TEXT_COLUMN], row[column]) for row in reader]
        except FileNotFoundError:
            raise DatasetError(f"data set file not found: {path}") from None
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise DatasetError(f"cannot read data set {path}: {error}") from None
        return cls(rows)

    def __len__(self) -> int:
        return len(self._row_labels)

    def label_for(self, text: str) -> str:
        """The gold label of a known text, else the label of the most similar known text."""
        normalized = normalize_text(text)
        gold = self._gold.get(normalized)
        if gold is not None:
            return gold
        guess = self._guesses.get(normalized)
        if guess is None:
            guess = self._nearest_label(normalized)
            if len(self._guesses) >= GUESS_CACHE_LIMIT:
                self._guesses.clear()
            self._guesses[normalized] = guess
        return guess

    def _add(self, normalized: str, label: str) -> None:
        row = len(self._row_labels)
        words = words_of(normalized)
        self._row_labels.append(label)
        self._row_words.append(frozenset(words))
        self._gold.setdefault(normalized, label)
        for word in words:
            self._postings[word].append(row)

    def _inverse_document_frequencies(self) -> dict[str, float]:
        total = len(self._row_labels)
        return {word: math.log(1 + total / len(rows)) for word, rows in self._postings.items()}

    def _nearest_label(self, normalized: str) -> str:
        """Label of the known text sharing the most (IDF-weighted) words; ties go to the
        earliest row, and a text sharing no word gets the most common label."""
        query = {word for word in words_of(normalized) if word in self._idf}
        candidates = self._candidate_rows(query)
        if not candidates:
            return self._most_common
        best_row = min(candidates, key=lambda row: (-self._overlap(query, row), row))
        return self._row_labels[best_row]

    def _candidate_rows(self, query: set[str]) -> set[int]:
        """Rows sharing a rare query word (any query word when none is rare): scoring only
        these keeps a guess well under a millisecond without losing accuracy."""
        rare = [word for word in query if len(self._postings[word]) <= self._rare_limit]
        return set().union(*(self._postings[word] for word in rare or query))

    def _overlap(self, query: set[str], row: int) -> float:
        return sum(self._idf[word] for word in query & self._row_words[row])


def choose_label_column(path: Path, columns: list[str], requested: str | None) -> str:
    """The label column: the requested one, or the only column besides ``text``."""
    available = ", ".join(columns) or "(none)"
    if TEXT_COLUMN not in columns:
        raise DatasetError(f"{path} has no '{TEXT_COLUMN}' column; columns: {available}")
    candidates = [column for column in columns if column != TEXT_COLUMN]
    if requested is not None:
        if requested not in candidates:
            raise DatasetError(f"label column '{requested}' not in {path}; columns: {available}")
        return requested
    if len(candidates) != 1:
        raise DatasetError(
            f"{path} has {len(candidates)} label column candidates; "
            f"choose one with label_column (columns: {available})"
        )
    return candidates[0]
