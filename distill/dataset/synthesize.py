"""Synthesis: new inputs in the style of the captured ones, written by the teacher.

    captured single-message inputs  ->  per batch, a deterministic sample of them as examples
    -> one generation call per batch asking for K new inputs as a JSON array
    -> lenient parse (prose, code fences, a cut-off array), strict validation of every item
    -> exact and near duplicates of captured inputs (and of each other) dropped
    -> labelled by the teacher like relabelled inputs (``build``), train split only

Generation calls are ordinary teacher ``Call``s: content-addressed (teacher model, generation
prompt, the examples shown, batch index, parameters), reserved against the same hard budget
and cached, so a re-run reuses the inputs already generated and pays nothing for them.
A garbage answer never stops the build: it is counted as rejected, with the first reason kept.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from arbitrage.errors import ConfigError
from distill.dataset import filters
from distill.dataset.cache import answer_key
from distill.dataset.config import BuildConfig
from distill.dataset.source import Example
from distill.dataset.teacher import Call, TeacherRun

GENERATION_PROMPT = (
    "You write test inputs for an application that calls a language model. Given the application's "
    "instructions and real messages from its users, you write new messages that other users could send: "
    "realistic, in the same language and style, varied in topic, wording and length, never copies or "
    "paraphrases of the examples. You answer with JSON and nothing else."
)
SOURCE = "synthetic"
MIN_LENGTH_LIMIT = 200
LENGTH_FACTOR = 3
"""An item longer than this many times the longest example shown (at least ``MIN_LENGTH_LIMIT``
characters) is rejected: a run-on answer, not a user's message."""
EXCERPT_CHARS = 80
INPUTS_SCHEMA = {
    "type": "object", "properties": {"inputs": {"type": "array", "items": {"type": "string"}}},
    "required": ["inputs"], "additionalProperties": False,
}
"""The structured-outputs shape (``--synthesize-structured``): only keywords every provider's strict
mode accepts, so the count and the length of items are checked here, not by the schema."""
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "new_inputs", "strict": True,
                                                           "schema": INPUTS_SCHEMA}}


@dataclass(frozen=True)
class Plan:
    """The generation calls of one build, and what each asks for."""

    calls: list[Call]
    asked: list[int]
    """New inputs asked for in each call (``synthesize_per_call``, the last call fewer)."""
    app_prompt: str | None
    """The captured inputs' system prompt (the commonest), given to every synthetic example."""
    length_limit: int
    params: dict[str, Any]


@dataclass
class Generated:
    """The valid new inputs the generation answers held, and what was rejected."""

    examples: list[Example] = field(default_factory=list)
    answers_without_array: int = 0
    items_rejected: int = 0
    first_rejection: str | None = None

    def reject(self, reason: str, items: int = 1) -> None:
        self.items_rejected += items
        self.first_rejection = self.first_rejection or reason


def plan(examples: list[Example], cfg: BuildConfig, model: str) -> Plan:
    """The generation calls for ``cfg.synthesize`` inputs, with examples drawn from ``examples``."""
    seeds = [e for e in examples if len(e.input_messages) == 1 and e.input_messages[0]["role"] == "user"]
    if not seeds:
        raise ConfigError(f"--synthesize shows the teacher captured single-message inputs as examples, and path "
                          f"{cfg.path!r} has none (only multi-turn conversations)")
    texts = [e.input_messages[0]["content"] for e in seeds]
    prompts = Counter(e.system_prompt for e in seeds)
    app_prompt = prompts.most_common(1)[0][0]
    params = {"temperature": cfg.synthesize_temperature, "max_completion_tokens": cfg.synthesize_max_tokens,
              **({"response_format": RESPONSE_FORMAT} if cfg.synthesize_structured else {})}
    per_call = cfg.synthesize_per_call
    asked = [min(per_call, cfg.synthesize - start) for start in range(0, cfg.synthesize, per_call)]
    calls = [generation_call(model, app_prompt, sample(texts, cfg.synthesize_shots, cfg.seed, batch), n, batch,
                             params) for batch, n in enumerate(asked)]
    limit = max(MIN_LENGTH_LIMIT, LENGTH_FACTOR * max(len(t) for t in texts))
    return Plan(calls, asked, app_prompt, limit, params)


def sample(texts: list[str], shots: int, seed: int, batch: int) -> list[str]:
    """The examples shown in one batch: deterministic, another sample per batch."""
    return random.Random(f"{seed}:{batch}").sample(texts, min(shots, len(texts)))


def generation_call(model: str, app_prompt: str | None, shown: list[str], n: int, batch: int,
                    params: dict[str, Any]) -> Call:
    """One generation call; its key covers the model, prompt, examples, batch index and parameters."""
    user = {"role": "user", "content": generation_request(app_prompt, shown, n, "response_format" in params)}
    key = answer_key(model, GENERATION_PROMPT, [user], {**params, "synthesize_batch": batch})
    return Call(({"role": "system", "content": GENERATION_PROMPT}, user), params, key)


def generation_request(app_prompt: str | None, shown: list[str], n: int, structured: bool = False) -> str:
    """The user message of a generation call."""
    context = f'The application\'s instructions to its model:\n"""\n{app_prompt}\n"""\n\n' if app_prompt else ""
    shape = f'a JSON object {{"inputs": [...]}} holding {n} strings' if structured else f"a JSON array of {n} strings"
    return (f"{context}Real messages from its users, as a JSON array:\n{json.dumps(shown, ensure_ascii=False)}\n\n"
            f"Write {n} new messages that other users could send to this application. Answer with {shape} only.")


def read_answers(plan: Plan, run: TeacherRun) -> Generated:
    """The valid new inputs of every answered generation call, in call order."""
    generated = Generated()
    for index in sorted(run.entries):
        entry, asked = run.entries[index], plan.asked[index]
        items, problem = parse_array(entry.get("content") or "")
        if problem:
            generated.answers_without_array += 1
            generated.reject(f"{problem}{_refusal(entry)}", items=0)
            continue
        if len(items) > asked:
            generated.reject(f"{len(items)} inputs where {asked} were asked (the extra ones are ignored)",
                             len(items) - asked)
        for position, item in enumerate(items[:asked]):
            reason = item_problem(item, plan.length_limit)
            if reason:
                generated.reject(f"item {position + 1}: {reason}")
            else:
                generated.examples.append(synthetic_example(item.strip(), plan.app_prompt))
    return generated


def parse_array(text: str) -> tuple[list[Any], str | None]:
    """The items of the first JSON array in an answer (prose and code fences around it are allowed;
    of an array cut off at the token limit, its complete items); else a problem."""
    decoder, start = json.JSONDecoder(), text.find("[")
    if start < 0:
        return [], f"no JSON array in the answer: {_excerpt(text)}"
    try:
        value, _ = decoder.raw_decode(text, start)
        if isinstance(value, list):
            return value, None
    except ValueError:
        pass
    items = _complete_items(decoder, text, start + 1)
    return (items, None) if items else ([], f"no readable JSON array in the answer: {_excerpt(text)}")


def _complete_items(decoder: json.JSONDecoder, text: str, position: int) -> list[Any]:
    """The values of an array that is cut off or broken after them, up to the first unreadable one."""
    items: list[Any] = []
    while True:
        position = _skip_space(text, position)
        try:
            item, position = decoder.raw_decode(text, position)
        except ValueError:
            return items
        items.append(item)
        position = _skip_space(text, position)
        if not text.startswith(",", position):
            return items
        position += 1


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def item_problem(item: Any, length_limit: int) -> str | None:
    """Why an array item is not a usable new input, or None."""
    if not isinstance(item, str):
        return f"not a string: {_excerpt(json.dumps(item, ensure_ascii=False))}"
    if not item.strip():
        return "empty"
    if len(item) > length_limit:
        return f"{len(item)} characters, more than {length_limit}"
    return None


def synthetic_example(text: str, app_prompt: str | None) -> Example:
    """A new input, not yet labelled, with the app's system prompt."""
    return Example(request_id=None, input_messages=({"role": "user", "content": text},), system_prompt=app_prompt,
                   answer="", source=SOURCE)


def drop_known(synthetic: list[Example], existing: list[Example], threshold: float) -> tuple[list[Example], int, int]:
    """(new inputs that are neither exact nor near duplicates of an existing input or of an earlier new
    one, exact duplicates dropped, near duplicates dropped)."""
    combined, _ = filters.drop_exact_duplicates([*existing, *synthetic])
    exact = len(synthetic) - _synthetic_count(combined)
    combined, _ = filters.drop_near_duplicates(combined, threshold)
    kept = [e for e in combined if e.source == SOURCE]
    return kept, exact, len(synthetic) - exact - len(kept)


def _synthetic_count(examples: list[Example]) -> int:
    return sum(e.source == SOURCE for e in examples)


def _refusal(entry: dict[str, Any]) -> str:
    return f" (refusal: {_excerpt(entry['refusal'])})" if entry.get("refusal") else ""


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "...")
