"""Teacher calls under a hard budget: relabelling (the captured inputs replayed through the
teacher) and, for ``synthesize``, any list of ``Call``s (whole conversations with their own
parameters and content address).

The teacher is any model an upstream of the gateway config serves (the first upstream whose
``models`` patterns match), called with the official ``openai`` client, whose own retries with
exponential backoff (``Retry-After`` honoured) cover 429, 5xx and connection errors
(``max_retries`` and ``timeout_s`` from that upstream's settings).

The budget is hard: before a call starts, an upper bound of its cost is reserved (every prompt
byte as a token at the uncached input price, plus ``max_tokens`` at the output price); a call
starts only if what is spent plus what is reserved plus its own bound fits. When the next call
cannot fit even with nothing in flight, relabelling stops and says so.

Every answer goes to the content-addressed ``AnswerCache`` the moment it arrives; answers found
there are used without a call and cost nothing in this run.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Callable

import openai

from arbitrage.config import Config, UpstreamSettings
from arbitrage.errors import ConfigError, UpstreamError
from arbitrage.pricing import PriceBook
from distill.dataset.cache import AnswerCache, answer_key
from distill.dataset.source import Example

TOKENS_PER_MESSAGE_BOUND = 8
"""Framing tokens per chat message, generously (OpenAI's format adds 3-4)."""

Progress = Callable[[int, float], None]
"""Called with (calls answered so far, dollars spent in this run)."""


@dataclass(frozen=True)
class Call:
    """One teacher call: the whole conversation, its parameters and its content address."""

    messages: tuple[dict[str, str], ...]
    params: dict[str, Any]
    key: str


def find_upstream(config: Config, model: str) -> UpstreamSettings:
    """The upstream that serves ``model``: the first whose patterns match, as in the gateway."""
    for upstream in config.upstreams:
        if any(fnmatch.fnmatchcase(model, pattern) for pattern in upstream.models):
            return upstream
    served = "; ".join(f"{u.name}: {', '.join(u.models)}" for u in config.upstreams)
    raise ConfigError(f"no upstream in the config serves teacher model {model!r} (upstreams: {served})")


class Budget:
    """Dollars spent and reserved for calls in flight, never over the limit."""

    def __init__(self, limit_usd: float) -> None:
        self.limit, self.spent, self.reserved = limit_usd, 0.0, 0.0

    def reserve(self, amount: float) -> bool:
        """Reserve ``amount`` for a call if it fits; False (nothing reserved) if it does not."""
        if self.spent + self.reserved + amount > self.limit:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        """A call ended: release its reservation and count what it cost."""
        self.reserved -= reserved
        self.spent += actual


@dataclass
class TeacherRun:
    """The answers to a list of calls (cache entries by call index), and what they cost."""

    entries: dict[int, dict[str, Any]] = field(default_factory=dict)
    paid: int = 0
    cached: int = 0
    cached_usd: float = 0.0
    spent_usd: float = 0.0
    rejected: int = 0
    """Calls the teacher refused as bad requests (400/422)."""
    first_rejection: str | None = None
    not_asked: int = 0
    """Calls left unasked because the budget was reached."""
    stopped_by_budget: bool = False
    next_call_bound_usd: float | None = None
    """When stopped by the budget: the most the next call could have cost."""


@dataclass
class RelabelResult(TeacherRun):
    """The teacher's answers to the inputs, and what they cost."""

    examples: list[Example] = field(default_factory=list)
    """Relabelled examples, in input order (rejected and unasked inputs left out)."""

    @property
    def not_relabelled(self) -> int:
        """Inputs left unasked because the budget was reached."""
        return self.not_asked


class Teacher:
    """Asks one teacher model, through one upstream, with a strict system prompt."""

    def __init__(self, upstream: UpstreamSettings, model: str, system_prompt: str, params: dict[str, Any],
                 prices: PriceBook) -> None:
        self.upstream, self.model, self.system_prompt, self.params = upstream, model, system_prompt, params
        self.prices = prices
        if self._price(model, 1, 0, 1) is None:
            raise ConfigError(f"no price is known for teacher model {model!r}, so the budget cannot be kept: "
                              f"add [prices.\"{model}\"] to the config")

    def label_call(self, example: Example) -> Call:
        """The call that labels one example: the strict system prompt, then the example's input."""
        messages = ({"role": "system", "content": self.system_prompt}, *example.input_messages)
        key = answer_key(self.model, self.system_prompt, list(example.input_messages), self.params)
        return Call(messages, self.params, key)

    def cost_bound(self, call: Call) -> float:
        """The most one call can cost."""
        prompt = sum(len(m["content"].encode()) + TOKENS_PER_MESSAGE_BOUND for m in call.messages)
        if "response_format" in call.params:  # a structured-outputs schema is billed as input
            prompt += len(json.dumps(call.params["response_format"]).encode())
        return self._price(self.model, prompt + TOKENS_PER_MESSAGE_BOUND, 0, call.params["max_completion_tokens"])

    async def relabel(self, examples: list[Example], cache: AnswerCache, budget: Budget, concurrency: int,
                      progress: Progress | None = None) -> RelabelResult:
        """Answers for every example, from the cache or the teacher, until done or the budget is reached."""
        run = await self.run([self.label_call(e) for e in examples], cache, budget, concurrency, progress)
        result = RelabelResult(**vars(run))
        result.examples = [_relabelled(examples[i], run.entries[i]) for i in sorted(run.entries)]
        return result

    async def run(self, calls: list[Call], cache: AnswerCache, budget: Budget, concurrency: int,
                  progress: Progress | None = None) -> TeacherRun:
        """Answers to every call, from the cache or the teacher, until done or the budget is reached."""
        return await _Run(self, cache, budget, concurrency, progress or (lambda done, spent: None)).all(calls)

    async def ask(self, client: openai.AsyncOpenAI, call: Call, reserved: float) -> dict[str, Any]:
        """One teacher call, as a cache entry."""
        response = await client.chat.completions.create(model=self.model, messages=list(call.messages),
                                                        **call.params)
        choice = response.choices[0] if response.choices else None
        usage = _usage(response.usage)
        cost = self._price(response.model or self.model, *usage.values()) if response.usage else None
        return {
            "key": call.key, "model": self.model, "response_model": response.model,
            "content": choice.message.content if choice else None,
            "refusal": choice.message.refusal if choice else None,
            "finish_reason": choice.finish_reason if choice else None, "usage": usage,
            "cost_usd": reserved if cost is None else cost, "cost_estimated": cost is None,
            "created_at": datetime.now(UTC).isoformat(),
        }

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.upstream.base_url, api_key=self.upstream.api_key() or "none",
                                  max_retries=self.upstream.max_retries, timeout=self.upstream.timeout_s)

    def failure(self, exc: Exception) -> UpstreamError:
        """A one-line error for a call that failed after the client's retries."""
        where = f"teacher {self.model!r} at upstream {self.upstream.name!r} ({self.upstream.base_url})"
        if isinstance(exc, openai.APIStatusError):
            hint = (f" (is ${self.upstream.api_key_env} set?)"
                    if exc.status_code in (401, 403) and self.upstream.api_key_env else "")
            return UpstreamError(f"{where} answered {exc.status_code}: {_message(exc)}{hint}")
        return UpstreamError(f"{where} failed after {self.upstream.max_retries} retries: {exc}")

    def _price(self, model: str, prompt: int, cached: int, completion: int) -> float | None:
        found = self.prices.price(model, prompt, cached, completion, self.upstream.provider, self.upstream.base_url)
        if found is None and model != self.model:
            return self._price(self.model, prompt, cached, completion)
        return found


class _Run:
    """One pass over a list of calls: bounded concurrency, budget reservations, durable answers."""

    def __init__(self, teacher: Teacher, cache: AnswerCache, budget: Budget, concurrency: int,
                 progress: Progress) -> None:
        self.teacher, self.cache, self.budget, self.concurrency = teacher, cache, budget, concurrency
        self.progress, self.result = progress, TeacherRun()
        self.answers = self.result.entries

    async def all(self, calls: list[Call]) -> TeacherRun:
        todo = deque()
        for index, call in enumerate(calls):
            if (entry := self.cache.get(call.key)) is not None:
                self._answered(index, entry, paid=False)
            else:
                todo.append((index, call))
        self.progress(len(self.answers), self.budget.spent)
        if todo:
            async with self.teacher.client() as client:
                await self._ask_all(client, todo)
        self.result.not_asked = len(todo)
        return self.result

    async def _ask_all(self, client: openai.AsyncOpenAI, todo: deque) -> None:
        """Start calls in order while they fit the budget and the concurrency; stop at the first failure."""
        running: set[asyncio.Task] = set()
        failure: BaseException | None = None
        while todo and failure is None:
            index, call = todo[0]
            bound = self.teacher.cost_bound(call)
            if len(running) < self.concurrency and self.budget.reserve(bound):
                todo.popleft()
                running.add(asyncio.create_task(self._one(client, index, call, bound)))
            elif running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                failure = _first_exception(done)
            else:  # the next call could not fit even with nothing in flight
                self.result.stopped_by_budget, self.result.next_call_bound_usd = True, bound
                break
        if running:  # let calls in flight finish: they are paid for, so their answers are kept
            done, _ = await asyncio.wait(running)
            failure = failure or _first_exception(done)
        if failure is not None:
            raise self.teacher.failure(failure) from failure

    async def _one(self, client: openai.AsyncOpenAI, index: int, call: Call, bound: float) -> None:
        try:
            entry = await self.teacher.ask(client, call, bound)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            self.budget.settle(bound, 0.0)
            self.result.rejected += 1
            self.result.first_rejection = self.result.first_rejection or _message(exc)
            return
        except BaseException:
            self.budget.settle(bound, 0.0)
            raise
        self.budget.settle(bound, entry["cost_usd"])
        self.cache.put(entry)
        self._answered(index, entry, paid=True)
        self.progress(len(self.answers), self.budget.spent)

    def _answered(self, index: int, entry: dict[str, Any], paid: bool) -> None:
        self.answers[index] = entry
        if paid:
            self.result.paid += 1
            self.result.spent_usd += entry["cost_usd"]
        else:
            self.result.cached += 1
            self.result.cached_usd += entry["cost_usd"]


def _usage(usage) -> dict[str, int]:
    """Prompt, cached and completion tokens (zeros when the answer reported none: then the cost is the
    call's reserved upper bound, marked ``cost_estimated``)."""
    details = usage.prompt_tokens_details if usage else None
    return {"prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": (details.cached_tokens or 0) if details else 0,
            "completion_tokens": usage.completion_tokens if usage else 0}


def _first_exception(tasks: set[asyncio.Task]) -> BaseException | None:
    """The first failure among finished tasks (every one is retrieved, so none is logged as lost)."""
    failures = [t.exception() for t in tasks if not t.cancelled()]
    return next((f for f in failures if f is not None), None)


def _relabelled(example: Example, entry: dict[str, Any]) -> Example:
    refusal = entry.get("refusal")
    answer = entry["content"] if entry.get("content") is not None else (refusal or "")
    return replace(example, answer=answer, refused=bool(refusal), finish_reason=entry.get("finish_reason"),
                   answer_model=entry.get("response_model"), cost_usd=entry["cost_usd"],
                   source="relabel" if example.source == "captured" else example.source,
                   answer_key=entry["key"])


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(exc)
