"""The simulated upstream: answers classification requests from a labelled data set, with
realistic latency and the failure mode the model name asks for."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from functools import lru_cache
from typing import Any

import orjson
from litestar import Request, Response
from litestar.response import Stream

from simulator.config import SimulatorConfig
from simulator.dataset import LabelledDataset
from simulator.embeddings import as_base64, pseudo_embedding
from simulator.errors import SimulatedFailure
from simulator.failures import FailureInjector, ModelChoice, parse_model_name
from simulator.pacing import Pacing
from simulator.protocol import (
    chat_completion, embedding_list, model_list, new_reply_header, parse_chat_request,
    parse_completion_request, parse_embedding_request, text_completion,
)
from simulator.streaming import EventStream, chat_event_stream, text_event_stream, truncated
from simulator.usage import (
    PromptCache, chat_prompt_tokens, chat_usage, completion_usage, count_tokens,
)

HANG_SECONDS = 3600.0
OTHER_MODELS = ("gpt-4o", "gpt-4.1-mini", "text-embedding-3-small")


@lru_cache(maxsize=1024)
def answer_content(answer_key: str, label: str) -> str:
    """The JSON text of an answer: ``{"intent": "card_arrival"}``."""
    return json.dumps({answer_key: label})


class Simulator:
    """Answers OpenAI requests; one per app, holding the per-process state (prompt cache,
    recover counters, seeded random draws)."""

    def __init__(self, config: SimulatorConfig, dataset: LabelledDataset) -> None:
        self.config = config
        self.dataset = dataset
        self.pacing = Pacing(config)
        self.failures = FailureInjector(config.seed)
        self.prompt_cache = PromptCache()
        self.model_ids = list(dict.fromkeys((config.default_model, "gpt-4o-mini", *OTHER_MODELS)))

    async def chat(self, body: dict[str, Any], request: Request) -> Response:
        """Answer ``/v1/chat/completions``."""
        chat = parse_chat_request(body)
        choice = await self._admit(chat.model, chat.texts[0], request)
        contents = [self._answer(chat.texts[0])] * chat.n
        messages = body["messages"]
        usage = chat_usage(chat_prompt_tokens(messages), _completion_tokens(contents),
                           self.prompt_cache.cached_tokens(messages))
        header = new_reply_header("chatcmpl", choice.reply_model)
        if chat.stream:
            return self._stream(chat_event_stream(header, contents, usage, chat.include_usage),
                                choice)
        return self._json(chat_completion(header, contents, usage), choice)

    async def completion(self, body: dict[str, Any], request: Request) -> Response:
        """Answer the legacy ``/v1/completions``: one choice per prompt (times ``n``)."""
        legacy = parse_completion_request(body)
        choice = await self._admit(legacy.model, "\n".join(legacy.texts), request)
        contents = [self._answer(text) for text in legacy.texts for _ in range(legacy.n)]
        usage = completion_usage(sum(count_tokens(text) for text in legacy.texts),
                                 _completion_tokens(contents))
        header = new_reply_header("cmpl", choice.reply_model)
        if legacy.stream:
            return self._stream(text_event_stream(header, contents, usage, legacy.include_usage),
                                choice)
        return self._json(text_completion(header, contents, usage), choice)

    async def embeddings(self, body: dict[str, Any], request: Request) -> Response:
        """Answer ``/v1/embeddings`` with deterministic pseudo-embeddings."""
        embedding = parse_embedding_request(body)
        choice = await self._admit(embedding.model, "\n".join(embedding.inputs), request)
        vectors: list[Any] = [pseudo_embedding(text, embedding.dimensions)
                              for text in embedding.inputs]
        if embedding.encoding_format == "base64":
            vectors = [as_base64(vector) for vector in vectors]
        tokens = sum(count_tokens(text) for text in embedding.inputs)
        return self._json(embedding_list(choice.reply_model, vectors, tokens), choice)

    def models(self) -> Response:
        """Answer ``/v1/models``."""
        return Response(orjson.dumps(model_list(self.model_ids)), media_type="application/json")

    async def _admit(self, model: str, text: str, request: Request) -> ModelChoice:
        """Apply the failure mode the model name asks for, then wait the upstream latency."""
        choice = parse_model_name(model, self.config.default_model)
        if choice.mode == "hang":
            await hang(request)
        self.failures.check(choice, model, text)
        await self.pacing.before_answer(slow=choice.mode == "slow")
        return choice

    def _answer(self, text: str) -> str:
        return answer_content(self.config.answer_key, self.dataset.label_for(text))

    def _json(self, payload: dict[str, Any], choice: ModelChoice) -> Response:
        body = orjson.dumps(payload)
        headers = _request_id_header()
        if choice.mode == "cutoff":
            headers["content-length"] = str(len(body))
            return Stream(truncated(body), media_type="application/json", headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    def _stream(self, events: EventStream, choice: ModelChoice) -> Stream:
        iterator = events.events(self.pacing, cut_off=choice.mode == "cutoff")
        return Stream(iterator, media_type="text/event-stream", headers=_request_id_header())


async def hang(request: Request) -> None:
    """Never answer: wait until the client goes away (or an hour passes), then fail with 504
    (which nobody should be left to read)."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_client_gone(request), HANG_SECONDS)
    raise SimulatedFailure(504)


async def _client_gone(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _completion_tokens(contents: list[str]) -> int:
    return sum(count_tokens(content) for content in contents)


def _request_id_header() -> dict[str, str]:
    return {"x-request-id": f"req_{secrets.token_hex(16)}"}
