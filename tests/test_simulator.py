"""The upstream simulator, through the official openai client: in-process (litestar's test
client) for answers and errors, and against a real ``python -m simulator`` process for what
only a real connection shows (aborted streams, hanging requests)."""

from __future__ import annotations

import csv
import json
import math
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner
from litestar.testing import TestClient

from simulator.app import create_app
from simulator.cli import sim
from simulator.config import BANKING77_TRAIN, SimulatorConfig
from simulator.dataset import DatasetError, LabelledDataset
from simulator.failures import parse_model_name
from simulator.pacing import Pacing

REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = set(json.loads((BANKING77_TRAIN.parent / "categories.json").read_text()))
SLOW_MS = 300


def train_rows(*indexes: int) -> list[tuple[str, str]]:
    with BANKING77_TRAIN.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    return [(rows[index]["text"], rows[index]["category"]) for index in indexes]


def user(text: object) -> list[dict]:
    return [{"role": "user", "content": text}]


def intent_of(content: str) -> str:
    return json.loads(content)["intent"]


def unique_text() -> str:
    return f"where is my new card {uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def http():
    app = create_app(SimulatorConfig(latency_ms=0, slow_ms=SLOW_MS))
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def client(http):
    return openai.OpenAI(base_url="http://testserver.local/v1", api_key="x", http_client=http,
                         max_retries=0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(base_url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"simulator did not start: {process.communicate()}")


@pytest.fixture(scope="module")
def server_url():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "simulator", "--port", str(port), "--latency-ms", "0",
         "--log-level", "warning"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(base_url, process)
        yield base_url
    finally:
        process.terminate()
        process.communicate(timeout=10)


@pytest.fixture(scope="module")
def remote(server_url):
    return openai.OpenAI(base_url=server_url, api_key="x", max_retries=0)


# Answers

@pytest.mark.parametrize(("text", "gold"), train_rows(0, 5000, 10002))
def test_known_text_gets_its_gold_label(client, text, gold):
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=user(text))
    assert intent_of(reply.choices[0].message.content) == gold


def test_known_text_is_matched_after_normalization(client):
    [(text, gold)] = train_rows(0)
    reply = client.chat.completions.create(model="gpt-4o", messages=user(f"  {text.upper()} "))
    assert intent_of(reply.choices[0].message.content) == gold


def test_unknown_text_gets_a_label_from_the_label_set(client):
    reply = client.chat.completions.create(model="gpt-4o-mini",
                                           messages=user("my kitten ate the plastic card zq"))
    assert intent_of(reply.choices[0].message.content) in LABELS


def test_the_last_user_message_is_classified_and_parts_are_read(client):
    [(first, _), (last, gold)] = train_rows(0, 5000)
    messages = [*user(first), {"role": "assistant", "content": "ok"},
                *user([{"type": "text", "text": last}])]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert intent_of(reply.choices[0].message.content) == gold


def test_reply_is_a_chat_completion_with_usage(client):
    reply = client.chat.completions.create(model="gpt-4o", messages=user("hi there"))
    assert (reply.object, reply.model, reply.choices[0].finish_reason) == (
        "chat.completion", "gpt-4o", "stop")
    assert reply.id.startswith("chatcmpl-")
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0


def test_answer_key_is_configurable():
    app = create_app(SimulatorConfig(latency_ms=0, answer_key="label"))
    with TestClient(app) as http:
        reply = http.post("/v1/chat/completions", json={"model": "m", "messages": user("hi")})
    assert list(json.loads(reply.json()["choices"][0]["message"]["content"])) == ["label"]


def test_repeated_system_prompt_reports_cached_tokens(client):
    messages = [{"role": "system", "content": f"Classify the intent. {uuid.uuid4()}"},
                *user("I lost my card")]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    second = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


# Streaming

def stream_chunks(client, **options) -> list:
    return list(client.chat.completions.create(
        model="gpt-4o-mini", messages=user("I am still waiting on my card?"), stream=True,
        **options))


def test_stream_reassembles_to_the_non_streamed_content(client):
    chunks = stream_chunks(client)
    whole = client.chat.completions.create(model="gpt-4o-mini",
                                           messages=user("I am still waiting on my card?"))
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert content == whole.choices[0].message.content
    assert len(chunks) > 4


def test_stream_starts_with_role_and_ends_with_stop(client):
    chunks = stream_chunks(client)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}


def test_stream_without_include_usage_has_no_usage(client):
    assert all(chunk.usage is None and chunk.choices for chunk in stream_chunks(client))


def test_stream_with_include_usage_sends_it_in_a_last_choiceless_chunk(client):
    chunks = stream_chunks(client, stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_include_usage_puts_usage_null_in_every_chunk_on_the_wire(http):
    body = {"model": "gpt-4o-mini", "messages": user("hi"), "stream": True,
            "stream_options": {"include_usage": True}}
    lines = http.post("/v1/chat/completions", json=body).text.split("\n\n")
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert all("usage" in event for event in events)
    assert lines[-2] == "data: [DONE]"


# Legacy completions, embeddings, models

def test_legacy_completion_answers_the_prompt(client):
    [(text, gold)] = train_rows(5000)
    reply = client.completions.create(model="gpt-3.5-turbo-instruct", prompt=text)
    assert reply.object == "text_completion" and intent_of(reply.choices[0].text) == gold
    assert reply.usage.total_tokens > 0


def test_legacy_completion_streams_with_usage_when_asked(client):
    chunks = list(client.completions.create(model="m", prompt="I lost my card", stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert intent_of(text) in LABELS and chunks[-1].usage.total_tokens > 0


@pytest.mark.parametrize("dimensions", [8, 256])
def test_embeddings_have_the_requested_dimensions_and_unit_length(client, dimensions):
    reply = client.embeddings.create(model="text-embedding-3-small", input=["a", "b c"],
                                     dimensions=dimensions)
    assert [len(item.embedding) for item in reply.data] == [dimensions, dimensions]
    assert math.isclose(sum(value * value for value in reply.data[0].embedding), 1, rel_tol=1e-5)


def test_embeddings_are_deterministic_and_default_to_256_floats(client):
    first = client.embeddings.create(model="e", input="same text", encoding_format="float")
    second = client.embeddings.create(model="e", input="same text")
    assert len(first.data[0].embedding) == 256
    assert first.data[0].embedding == pytest.approx(second.data[0].embedding, abs=1e-6)
    assert first.usage.prompt_tokens == first.usage.total_tokens == 2


def test_models_lists_the_default_model(client):
    assert "gpt-4o-mini" in [model.id for model in client.models.list()]


# Failure modes

def test_model_name_parsing():
    choice = parse_model_name("flaky-30:gpt-4o", "d")
    assert (choice.mode, choice.argument, choice.reply_model) == ("flaky", 30, "gpt-4o")
    assert parse_model_name("slow", "d").reply_model == "d"
    assert parse_model_name("ft:gpt-4o-mini:org::x", "d").mode is None


def test_mode_reports_the_real_model_else_the_default(client):
    named = client.chat.completions.create(model="flaky-0:gpt-4o", messages=user("hi"))
    bare = client.chat.completions.create(model="flaky-0", messages=user("hi"))
    assert (named.model, bare.model) == ("gpt-4o", "gpt-4o-mini")


def test_error_429_is_openais_rate_limit(client):
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="error-429:gpt-4o", messages=user("hi"))
    assert caught.value.response.headers["retry-after"] == "1"
    assert (caught.value.type, caught.value.code) == ("requests", "rate_limit_exceeded")


@pytest.mark.parametrize(("status", "error_class"), [
    (500, openai.InternalServerError), (502, openai.InternalServerError),
    (503, openai.InternalServerError), (400, openai.BadRequestError)])
def test_error_nnn_answers_that_status(client, status, error_class):
    with pytest.raises(error_class) as caught:
        client.chat.completions.create(model=f"error-{status}", messages=user("hi"))
    assert caught.value.status_code == status
    assert set(caught.value.body) == {"message", "type", "param", "code"}


def test_flaky_100_always_fails(client):
    for _ in range(5):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="flaky-100", messages=user("hi"))


def test_flaky_0_never_fails(client):
    replies = [client.chat.completions.create(model="flaky-0", messages=user("hi"))
               for _ in range(5)]
    assert all(reply.choices for reply in replies)


def test_recover_2_fails_twice_then_succeeds(client):
    messages = user(unique_text())
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="recover-2", messages=messages)
        assert (caught.value.status_code, caught.value.response.headers["retry-after"]) == (503, "0")
    assert client.chat.completions.create(model="recover-2", messages=messages).choices


def test_recover_lets_the_clients_own_retries_succeed(http):
    retrying = openai.OpenAI(base_url="http://testserver.local/v1", api_key="x",
                             http_client=http, max_retries=1)
    reply = retrying.chat.completions.create(model="recover-1", messages=user(unique_text()))
    assert reply.choices


def test_slow_adds_slow_ms(client):
    started = time.perf_counter()
    client.chat.completions.create(model="slow", messages=user("hi"))
    assert time.perf_counter() - started >= SLOW_MS / 1000


def test_cutoff_breaks_the_stream_mid_answer(remote):
    stream = remote.chat.completions.create(model="cutoff", messages=user("hi"), stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in stream:
            received.append(chunk)
    assert received and all(chunk.choices[0].finish_reason is None for chunk in received)


def test_cutoff_truncates_a_non_streamed_body(server_url):
    body = {"model": "cutoff", "messages": user("hi")}
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.post(f"{server_url}/chat/completions", json=body)


def test_hang_never_answers(remote):
    with pytest.raises(openai.APITimeoutError):
        remote.with_options(timeout=0.5).chat.completions.create(model="hang",
                                                                 messages=user("hi"))


def test_real_server_answers_a_known_text(remote):
    [(text, gold)] = train_rows(0)
    reply = remote.chat.completions.create(model="gpt-4o-mini", messages=user(text))
    assert intent_of(reply.choices[0].message.content) == gold


# Invalid requests

def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400
    return response.json()["error"]


def test_malformed_json_is_openais_400(http):
    error = error_of(http.post("/v1/chat/completions", content=b"{not json"))
    assert error["type"] == "invalid_request_error" and set(error) == {
        "message", "type", "param", "code"}


def test_missing_model_is_400(http):
    error = error_of(http.post("/v1/chat/completions", json={"messages": user("hi")}))
    assert "model" in error["message"]


def test_missing_messages_is_400_naming_the_parameter(http):
    error = error_of(http.post("/v1/chat/completions", json={"model": "gpt-4o-mini"}))
    assert (error["param"], error["code"]) == ("messages", "missing_required_parameter")


def test_unknown_url_is_openai_shaped_404(http):
    response = http.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["type"]


# Data set and configuration

def write_csv(path: Path, header: str) -> Path:
    path.write_text(f"{header}\nhello there,greeting,x\n")
    return path


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        LabelledDataset.from_csv(tmp_path / "missing.csv")


def test_ambiguous_label_column_names_the_columns(tmp_path):
    path = write_csv(tmp_path / "two.csv", "text,intent,source")
    with pytest.raises(DatasetError, match="text, intent, source"):
        LabelledDataset.from_csv(path)


def test_label_column_picks_among_several(tmp_path):
    path = write_csv(tmp_path / "two.csv", "text,intent,source")
    assert LabelledDataset.from_csv(path, "intent").label_for("Hello  THERE") == "greeting"


def test_unknown_label_column_names_the_columns(tmp_path):
    path = write_csv(tmp_path / "two.csv", "text,intent,source")
    with pytest.raises(DatasetError, match="'topic'.*text, intent, source"):
        LabelledDataset.from_csv(path, "topic")


def test_cli_reports_a_bad_dataset_in_one_line(tmp_path):
    result = CliRunner().invoke(sim, ["--dataset", str(tmp_path / "missing.csv")])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: data set file not found")
    assert "Traceback" not in result.output


def test_zero_sigma_latency_is_the_median():
    pacing = Pacing(SimulatorConfig(latency_ms=120, latency_sigma=0))
    assert pacing.latency_seconds() == pytest.approx(0.12)
