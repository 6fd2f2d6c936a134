"""The official openai client against a real gateway process in front of a real simulator process."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY

CARD = "I am still waiting on my card?"  # a Banking77 training text labelled card_arrival
SYSTEM = "Classify the banking query into one of 77 intents. Answer JSON."


def ask(text: str = CARD, system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def create(client: openai.OpenAI, **kwargs):
    """A chat completion and its gateway request id."""
    raw = client.chat.completions.with_raw_response.create(**{"model": "gpt-4o-mini", "messages": ask(), **kwargs})
    return raw.parse(), raw.headers["x-arbitrage-request-id"]


def test_chat_answer_is_relayed_and_recorded(gw):
    completion, request_id = create(gw.client())
    assert completion.choices[0].message.content == '{"intent": "card_arrival"}'
    record = gw.record(request_id)
    assert (record["upstream"], record["served_by"], record["status_code"]) == ("primary", "upstream", 200)
    assert record["prompt_tokens"] == completion.usage.prompt_tokens > 0
    assert record["completion_tokens"] == completion.usage.completion_tokens > 0
    assert record["cost_usd"] > 0 and record["counterfactual_cost_usd"] == record["cost_usd"]


def test_record_holds_request_and_response_json(gw):
    completion, request_id = create(gw.client())
    record = gw.record(request_id)
    assert CARD in record["request"] and completion.id in record["response"]
    assert record["key_id"].startswith("key_") and record["endpoint"] == "chat.completions"


def test_stream_without_usage_option_hides_the_usage_chunk(gw):
    chunks = list(gw.client().chat.completions.create(model="gpt-4o-mini", messages=ask(), stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == '{"intent": "card_arrival"}'


def test_stream_usage_is_recorded_even_when_hidden(gw):
    raw = gw.client().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=ask(), stream=True)
    list(raw.parse())
    record = gw.record(raw.headers["x-arbitrage-request-id"])
    assert record["stream"] and record["completion_tokens"] > 0 and record["ttft_ms"] > 0
    assert '"card_arrival' in record["response"] and record["error_type"] is None


def test_stream_with_usage_option_keeps_the_usage_chunk(gw):
    chunks = list(gw.client().chat.completions.create(
        model="gpt-4o-mini", messages=ask(), stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


async def test_async_client_plain_and_streamed(gw):
    client = gw.async_client()
    plain, stream = await asyncio.gather(
        client.chat.completions.create(model="gpt-4o-mini", messages=ask()),
        client.chat.completions.create(model="gpt-4o-mini", messages=ask(), stream=True),
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert plain.choices[0].message.content == streamed == '{"intent": "card_arrival"}'


def test_cached_prompt_tokens_are_priced_as_cached(gw):
    system = "A long, unique system prompt for the cache test. " * 20
    _, first = create(gw.client(), messages=ask(system=system))
    _, second = create(gw.client(), messages=ask(system=system))
    a, b = gw.record(first), gw.record(second)
    assert a["cached_tokens"] == 0 and b["cached_tokens"] > 0
    assert b["cost_usd"] < a["cost_usd"]


def test_completions_embeddings_and_models(gw):
    client = gw.client()
    assert client.completions.create(model="gpt-4o-mini", prompt=CARD).choices[0].text == '{"intent": "card_arrival"}'
    assert len(client.embeddings.create(model="text-embedding-3-small", input=["a", "b"]).data) == 2
    assert "gpt-4o-mini" in {m.id for m in client.models.list()}
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"


def test_path_from_header_metadata_or_system_prompt(gw):
    _, by_header = create(gw.client(default_headers={"X-Arbitrage-Path": "support-intents"}))
    _, by_metadata = create(gw.client(), metadata={"arbitrage_path": "ticket-triage"}, store=False)
    _, derived_a = create(gw.client(), messages=ask(system="  Classify   this.\n"))
    _, derived_b = create(gw.client(), messages=ask(system="Classify this."))
    assert gw.record(by_header)["path"] == "support-intents"
    assert gw.record(by_metadata)["path"] == "ticket-triage"
    assert gw.record(derived_a)["path"] == gw.record(derived_b)["path"]
    assert gw.record(derived_a)["path"].startswith("gpt-4o-mini-")


def test_models_route_to_their_upstream(gw):
    _, request_id = create(gw.client(), model="flaky-0:gpt-4o-mini")
    assert gw.record(request_id)["upstream"] == "faults"


def test_price_override_and_unknown_model(gw):
    _, priced = create(gw.client(), model="mycorp-classifier")
    _, unknown = create(gw.client(), model="unknown-model-x")
    p, u = gw.record(priced), gw.record(unknown)
    expected = ((p["prompt_tokens"] - p["cached_tokens"]) * 1.0 + p["cached_tokens"] * 0.5
                + p["completion_tokens"] * 4.0) / 1e6
    assert p["cost_usd"] == pytest.approx(expected) and p["priced"]
    assert u["cost_usd"] is None and u["priced"] is False


def test_upstream_429_status_is_kept_after_retries(gw):
    with pytest.raises(openai.RateLimitError) as caught:
        create(gw.client(), model="error-429")
    assert caught.value.status_code == 429
    rows = gw.rows("SELECT upstream_attempts, error_type FROM calls WHERE model = 'error-429'")
    assert rows[-1] == {"upstream_attempts": 3, "error_type": "rate_limited"}


@pytest.mark.parametrize("model,error", [("error-500", openai.InternalServerError),
                                         ("error-400", openai.BadRequestError)])
def test_upstream_error_status_is_relayed(gw, model, error):
    with pytest.raises(error) as caught:
        create(gw.client(), model=model)
    assert caught.value.status_code == int(model[-3:])
    assert caught.value.body["message"]


def test_retries_recover_before_anything_reached_the_client(gw):
    completion, request_id = create(gw.client(), model="recover-2:gpt-4o-mini", messages=ask("recover me"))
    assert completion.choices[0].message.content.startswith('{"intent"')
    assert gw.record(request_id)["upstream_attempts"] == 3


def test_upstream_timeout_is_a_504(gw):
    with pytest.raises(openai.APIStatusError) as caught:
        create(gw.client(), model="hang")
    assert caught.value.status_code == 504
    assert gw.rows("SELECT error_type FROM calls WHERE model = 'hang'")[-1]["error_type"] == "upstream_timeout"


def test_stream_cut_off_is_an_error_not_a_clean_end(gw):
    stream = gw.client().chat.completions.create(model="cutoff", messages=ask("cut me off"), stream=True)
    with pytest.raises(openai.APIError, match="ended before the answer was complete"):
        list(stream)
    row = gw.rows("SELECT status_code, error_type FROM calls WHERE model = 'cutoff'")[-1]
    assert row == {"status_code": 502, "error_type": "stream_cut_off"}


def test_metrics_count_requests_tokens_and_dollars(gw):
    create(gw.client(default_headers={"X-Arbitrage-Path": "metrics-path"}))
    text = gw.metrics()
    assert 'arbitrage_requests_total{endpoint="chat.completions",path="metrics-path",served_by="upstream",' \
           'status_class="2xx"} 1.0' in text
    assert 'arbitrage_cost_usd_total{path="metrics-path",served_by="upstream"}' in text
    assert "arbitrage_upstream_retries_total" in text and "arbitrage_capture_backlog_bytes" in text


@pytest.mark.parametrize("secret", ["gateway key", "upstream key"])
def test_no_key_in_captured_data_logs_or_metrics(gw, secret):
    create(gw.client())
    with pytest.raises(openai.RateLimitError):
        create(gw.client(), model="error-429")  # errors and retries get logged too
    key = gw.key if secret == "gateway key" else UPSTREAM_KEY
    files = [p for p in gw.data_dir.rglob("*") if p.is_file()]
    assert files and not any(key.encode() in p.read_bytes() for p in files)
    assert key not in gw.metrics()
    assert key not in gw.process.log.read_text()
