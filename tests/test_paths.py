"""Call-path identity: the client's name when given, else a stable hash of the prompt template."""

from __future__ import annotations

import msgspec
import pytest

from arbitrage.errors import InvalidRequestError
from gateway.chat.protocol import ChatCompletionRequest
from gateway.chat.serving import template as chat_template
from gateway.completions.protocol import CompletionRequest
from gateway.completions.serving import template as completion_template
from gateway.paths import PATH_HEADER, derived_path, explicit_path

CHAT = "/v1/chat/completions"


def chat(*messages: tuple[str, object], model: str = "gpt-4o-mini") -> ChatCompletionRequest:
    body = {"model": model, "messages": [{"role": r, "content": c} for r, c in messages]}
    return msgspec.convert(body, ChatCompletionRequest)


def test_header_beats_metadata():
    assert explicit_path("from-header", {"arbitrage_path": "from-metadata"}) == "from-header"


def test_metadata_names_the_path_without_a_header():
    assert explicit_path(None, {"arbitrage_path": "support/triage:v2"}) == "support/triage:v2"


@pytest.mark.parametrize("metadata", [None, {}, {"user": "u1"}, ["arbitrage_path"]])
def test_no_name_given_is_none(metadata):
    assert explicit_path(None, metadata) is None


@pytest.mark.parametrize("name", ["", "-starts-with-dash", "has space", "a" * 129, "emoji-🙂", "semi;colon"])
def test_invalid_header_name_is_a_400_naming_the_header(name):
    with pytest.raises(InvalidRequestError) as info:
        explicit_path(name, None)
    assert (info.value.status_code, info.value.param) == (400, PATH_HEADER)


@pytest.mark.parametrize("value", [42, ["a"], "", "x" * 129])
def test_invalid_metadata_name_is_a_400_naming_the_field(value):
    with pytest.raises(InvalidRequestError) as info:
        explicit_path(None, {"arbitrage_path": value})
    assert (info.value.param, info.value.code) == ("arbitrage_path", "invalid_path")


def test_longest_valid_name_is_accepted():
    assert explicit_path("a" * 128, None) == "a" * 128


def test_name_with_a_trailing_newline_is_rejected():
    with pytest.raises(InvalidRequestError):
        explicit_path(None, {"arbitrage_path": "checkout\n"})


def test_derived_path_ignores_whitespace_differences():
    a = derived_path(CHAT, "gpt-4o-mini", "You are a  helpful\n\tassistant. ")
    assert a == derived_path(CHAT, "gpt-4o-mini", "  You are a helpful assistant.")


def test_derived_path_differs_for_another_prompt():
    assert derived_path(CHAT, "gpt-4o-mini", "Summarise.") != derived_path(CHAT, "gpt-4o-mini", "Translate.")


def test_derived_path_differs_for_another_model_or_endpoint():
    base = derived_path(CHAT, "gpt-4o-mini", "Summarise.")
    assert base != derived_path(CHAT, "gpt-4o", "Summarise.")
    assert base != derived_path("/v1/completions", "gpt-4o-mini", "Summarise.")


def test_derived_path_is_a_valid_path_name():
    name = derived_path(CHAT, "ft:gpt-4o-mini:acme::abc123", "Summarise.")
    assert name.startswith("ft_gpt-4o-mini_acme__abc123-")
    assert explicit_path(name, None) == name


def test_template_is_the_system_prompt():
    request = chat(("user", "hi"), ("system", "Be terse."), ("system", "Second."))
    assert chat_template(request) == "Be terse."


def test_template_takes_the_developer_prompt_and_text_parts():
    parts = [{"type": "text", "text": "Be"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "terse."}]
    assert chat_template(chat(("developer", parts), ("user", "hi"))) == "Be terse."


def test_template_without_a_system_prompt_is_empty():
    assert chat_template(chat(("user", "hi"))) == ""


def test_completions_have_no_template():
    request = msgspec.convert({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}, CompletionRequest)
    assert completion_template(request) == ""
