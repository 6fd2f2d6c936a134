"""SSE splitting as OpenAI streams it, and rebuilding a completion from its chunks."""

from __future__ import annotations

import orjson
import pytest

from gateway.chat.serving import ChatStreamAssembler
from gateway.completions.serving import CompletionStreamAssembler
from gateway.sse import DONE, EventSplitter, error_event, event_data

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_1"}


def chunk(delta: dict | None = None, finish: str | None = None, index: int = 0) -> dict:
    return {**HEAD, "choices": [{"index": index, "delta": delta or {}, "finish_reason": finish}]}


CHUNKS = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo, wörld"}),
    chunk(finish="stop"),
    {**HEAD, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}},
]
EVENTS = [b"data: " + orjson.dumps(c) for c in CHUNKS] + [b": keep-alive", b"data: [DONE]"]
STREAM = b"".join(e + b"\n\n" for e in EVENTS)


def split_at(stream: bytes, *cuts: int) -> list[bytes]:
    splitter, events, bounds = EventSplitter(), [], [0, *cuts, len(stream)]
    for start, end in zip(bounds, bounds[1:]):
        events += splitter.feed(stream[start:end])
    return events


def test_whole_stream_splits_into_its_events():
    assert split_at(STREAM) == EVENTS


def test_any_single_cut_gives_the_same_events():
    for cut in range(len(STREAM) + 1):
        assert split_at(STREAM, cut) == EVENTS, f"cut at byte {cut}"


def test_byte_by_byte_gives_the_same_events():
    assert split_at(STREAM, *range(1, len(STREAM))) == EVENTS


def test_crlf_events_at_any_cut():
    crlf = STREAM.replace(b"\n", b"\r\n")
    for cut in range(len(crlf) + 1):
        assert split_at(crlf, cut) == EVENTS, f"cut at byte {cut}"


def test_flush_returns_an_unterminated_last_event_once():
    splitter = EventSplitter()
    assert splitter.feed(b'data: {}\n\ndata: {"a": 1}\n') == [b"data: {}"]
    assert splitter.flush() == [b'data: {"a": 1}']
    assert splitter.flush() == []


def test_flush_after_a_complete_stream_is_empty():
    splitter = EventSplitter()
    splitter.feed(STREAM)
    assert splitter.flush() == []


def test_blank_separators_make_no_events():
    assert EventSplitter().feed(b"\n\n\n\ndata: x\n\n\n\n") == [b"data: x"]


def test_event_data_of_a_chunk_and_done():
    assert orjson.loads(event_data(EVENTS[1])) == CHUNKS[1]
    assert event_data(b"data: [DONE]") == DONE


@pytest.mark.parametrize("event", [b": keep-alive", b":", b"event: ping", b"id: 7\nretry: 100"])
def test_event_data_is_none_without_a_data_field(event):
    assert event_data(event) is None


def test_event_data_joins_lines_and_takes_an_optional_space():
    assert event_data(b"event: x\ndata:{\"a\":\ndata: 1}") == b'{"a":\n1}'


def test_error_event_is_one_openai_error():
    [event] = EventSplitter().feed(error_event("boom", "upstream_error", "stream_cut_off"))
    assert orjson.loads(event_data(event))["error"] == {
        "message": "boom", "type": "upstream_error", "param": None, "code": "stream_cut_off"}


def assemble(chunks: list[dict]) -> tuple[dict, list[bool]]:
    assembler = ChatStreamAssembler()
    firsts = [assembler.add(c) for c in chunks]
    return assembler.result(), firsts


def test_assembler_rebuilds_the_message():
    result, _ = assemble(CHUNKS[:4])
    assert result["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello, wörld"}, "finish_reason": "stop"}]
    assert (result["id"], result["model"], result["object"]) == ("chatcmpl-1", HEAD["model"], "chat.completion")


def test_assembler_reports_only_the_first_content_chunk():
    assert assemble(CHUNKS[:4])[1] == [False, True, False, False]


def test_assembler_rebuilds_streamed_tool_calls():
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    pieces = ['{"ci', 'ty": "Par', 'is"}']
    chunks = [chunk({"role": "assistant", "content": None, "tool_calls": [call]})]
    chunks += [chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
    message = assemble(chunks + [chunk(finish="tool_calls")])[0]["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]


def test_assembler_keeps_parallel_tool_calls_apart():
    calls = [{"index": i, "id": f"call_{i}", "function": {"name": n, "arguments": "{}"}} for i, n in enumerate("ab")]
    message = assemble([chunk({"tool_calls": calls[::-1]})])[0]["choices"][0]["message"]
    assert [(c["id"], c["function"]["name"]) for c in message["tool_calls"]] == [("call_0", "a"), ("call_1", "b")]


def test_assembler_keeps_choices_apart():
    result, _ = assemble([chunk({"content": "A"}, index=1), chunk({"content": "B"}, index=0), chunk(finish="length", index=1)])
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in result["choices"]] == [
        (0, "B", None), (1, "A", "length")]


def test_assembler_with_no_chunks_has_no_choices():
    assert ChatStreamAssembler().result()["choices"] == []


def test_completion_assembler_rebuilds_the_text():
    assembler = CompletionStreamAssembler()
    texts = [("", None), ("Hi", None), (" there", None), ("", "stop")]
    firsts = [assembler.add({"id": "cmpl-1", "model": "m", "choices": [{"index": 0, "text": t, "finish_reason": f}]})
              for t, f in texts]
    assert firsts == [False, True, False, False]
    assert assembler.result()["choices"] == [{"index": 0, "text": "Hi there", "finish_reason": "stop"}]
