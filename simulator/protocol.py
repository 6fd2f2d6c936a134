"""OpenAI's wire format: reading requests (leniently: unknown fields are ignored) and building
responses, fields in the order of OpenAI's API reference."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from simulator.errors import InvalidRequest
from simulator.usage import content_text

SYSTEM_FINGERPRINT = "fp_simulator"
UNPARSABLE_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """The parts of a chat or legacy completion request the simulator uses."""

    model: str
    texts: list[str]
    """Texts to classify: the last user message (chat) or each prompt (legacy)."""
    stream: bool
    include_usage: bool
    n: int


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """The parts of an embeddings request the simulator uses."""

    model: str
    inputs: list[str]
    dimensions: int
    encoding_format: str


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or OpenAI's 400 for anything else."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest(UNPARSABLE_JSON) from None
    if not isinstance(body, dict):
        raise InvalidRequest(UNPARSABLE_JSON)
    return body


def parse_chat_request(body: dict[str, Any]) -> GenerationRequest:
    """Read a ``/v1/chat/completions`` request."""
    model = _model(body)
    messages = _required(body, "messages", list, "an array")
    if not messages:
        raise InvalidRequest("Invalid 'messages': empty array. Expected an array with minimum "
                             "length 1, but got an empty array instead.",
                             param="messages", code="empty_array")
    if not all(isinstance(message, dict) for message in messages):
        raise InvalidRequest("Invalid 'messages': each message must be an object.",
                             param="messages", code="invalid_type")
    return _generation_request(body, model, [last_user_text(messages)])


def parse_completion_request(body: dict[str, Any]) -> GenerationRequest:
    """Read a legacy ``/v1/completions`` request (prompt: a string or a list of strings)."""
    model = _model(body)
    prompts = _required(body, "prompt", (str, list), "a string or array")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise InvalidRequest("Invalid 'prompt': expected a string or a non-empty array of "
                             "strings.", param="prompt", code="invalid_type")
    return _generation_request(body, model, prompts)


def parse_embedding_request(body: dict[str, Any]) -> EmbeddingRequest:
    """Read a ``/v1/embeddings`` request (input: a string or a list of strings)."""
    model = _model(body)
    inputs = _required(body, "input", (str, list), "a string or array")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not inputs or not all(isinstance(item, str) for item in inputs):
        raise InvalidRequest("Invalid 'input': expected a string or a non-empty array of "
                             "strings.", param="input", code="invalid_type")
    dimensions = body.get("dimensions") or 256
    if not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
        raise InvalidRequest("Invalid 'dimensions': expected an integer between 1 and 4096.",
                             param="dimensions", code="invalid_value")
    encoding = "base64" if body.get("encoding_format") == "base64" else "float"
    return EmbeddingRequest(model, inputs, dimensions, encoding)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """The text of the last user message ("" when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def _generation_request(body: dict[str, Any], model: str,
                        texts: list[str]) -> GenerationRequest:
    n = body.get("n") or 1
    if not isinstance(n, int) or not 1 <= n <= 128:
        raise InvalidRequest("Invalid 'n': expected an integer between 1 and 128.",
                             param="n", code="invalid_value")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return GenerationRequest(model, texts, body.get("stream") is True, include_usage, n)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("you must provide a model parameter")
    return model


def _required(body: dict[str, Any], name: str, kind: type | tuple[type, ...],
              kind_name: str) -> Any:
    if name not in body:
        raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name,
                             code="missing_required_parameter")
    value = body[name]
    if not isinstance(value, kind):
        raise InvalidRequest(f"Invalid type for '{name}': expected {kind_name}, but got "
                             f"{type(value).__name__} instead.", param=name, code="invalid_type")
    return value


@dataclass(frozen=True, slots=True)
class ReplyHeader:
    """The fields every object of one response shares."""

    id: str
    created: int
    model: str


def new_reply_header(id_prefix: str, model: str) -> ReplyHeader:
    """A fresh id (``chatcmpl-...``, ``cmpl-...``) and creation time for a response."""
    return ReplyHeader(f"{id_prefix}-{secrets.token_hex(12)}", int(time.time()), model)


def chat_completion(header: ReplyHeader, contents: list[str],
                    usage: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice per content."""
    choices = [{"index": index,
                "message": {"role": "assistant", "content": content, "refusal": None,
                            "annotations": []},
                "logprobs": None, "finish_reason": "stop"}
               for index, content in enumerate(contents)]
    return {"id": header.id, "object": "chat.completion", "created": header.created,
            "model": header.model, "choices": choices, "usage": usage,
            "service_tier": "default", "system_fingerprint": SYSTEM_FINGERPRINT}


def text_completion(header: ReplyHeader, contents: list[str],
                    usage: dict[str, Any]) -> dict[str, Any]:
    """A legacy ``text_completion`` object with one choice per content."""
    choices = [{"text": content, "index": index, "logprobs": None, "finish_reason": "stop"}
               for index, content in enumerate(contents)]
    return {"id": header.id, "object": "text_completion", "created": header.created,
            "model": header.model, "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices, "usage": usage}


def chunk_base(header: ReplyHeader, object_name: str) -> dict[str, Any]:
    """The fields every streamed chunk of one response repeats."""
    base = {"id": header.id, "object": object_name, "created": header.created,
            "model": header.model, "system_fingerprint": SYSTEM_FINGERPRINT}
    if object_name == "chat.completion.chunk":
        base["service_tier"] = "default"
    return base


def chat_delta_choice(index: int, delta: dict[str, Any],
                      finish_reason: str | None = None) -> dict[str, Any]:
    """One choice of a ``chat.completion.chunk``."""
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def text_delta_choice(index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    """One choice of a streamed legacy completion."""
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def embedding_list(model: str, vectors: list[list[float] | str],
                   prompt_tokens: int) -> dict[str, Any]:
    """An embeddings response; each vector is a list of floats or a base64 string."""
    data = [{"object": "embedding", "index": index, "embedding": vector}
            for index, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def model_object(model_id: str) -> dict[str, Any]:
    """One entry of ``/v1/models``."""
    return {"id": model_id, "object": "model", "created": 1_700_000_000, "owned_by": "system"}


def model_list(model_ids: list[str]) -> dict[str, Any]:
    """The ``/v1/models`` list."""
    return {"object": "list", "data": [model_object(model_id) for model_id in model_ids]}
