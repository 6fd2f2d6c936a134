"""Redaction of e-mail addresses, phone and card numbers in captured bodies."""

from __future__ import annotations

import json

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from arbitrage.capture.redaction import Redactor, luhn_valid, redactor_for
from arbitrage.capture.store import CaptureStore, connect
from arbitrage.config import CaptureSettings, load_config
from arbitrage.errors import ConfigError

REDACT = Redactor()


@pytest.mark.parametrize("text,expected", [
    ("write to jane.doe+tag@mail.example.co.uk today", "write to [EMAIL] today"),
    ("card 4242 4242 4242 4242 please", "card [CARD] please"),
    ("card 4242-4242-4242-4242", "card [CARD]"),
    ("amex 378282246310005", "amex [CARD]"),
    ("call +44 20 7946 0958", "call [PHONE]"),
    ("call (415) 555-0100 now", "call [PHONE] now"),
    ("415.555.0100", "[PHONE]"),
    ("+14155550100", "[PHONE]"),
])
def test_personal_data_is_replaced(text, expected):
    assert REDACT.text(text) == expected


@pytest.mark.parametrize("text", [
    "card 4242 4242 4242 4241",            # fails the Luhn check
    "on 2024-01-15 at 2024-01-15T10:00",  # dates
    "order 123456789012",                  # a bare digit run
    "ip 192.168.1.10, version 1.2.3",
    "local 555-0100",                      # 7 digits: too short to tell from other numbers
    "id chatcmpl-1234567890123 and @handle",
])
def test_other_text_is_kept(text):
    assert REDACT.text(text) == text


def test_luhn():
    assert luhn_valid("4242424242424242") and luhn_valid("79927398713")
    assert not luhn_valid("4242424242424241")


def test_only_the_chosen_kinds_are_redacted():
    assert Redactor(["email"]).text("a@b.io +44 20 7946 0958") == "[EMAIL] +44 20 7946 0958"


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown redaction kinds"):
        Redactor(["ssn"])


def test_json_body_keeps_structure_numbers_and_escapes():
    body = orjson.dumps({"model": "m", "max_tokens": 4242424242424242,
                         "messages": [{"role": "user", "content": "line\nbob@x.io \"quoted\""}]}).decode()
    data = json.loads(REDACT.json_text(body))
    assert data["messages"][0]["content"] == "line\n[EMAIL] \"quoted\"" and data["max_tokens"] == 4242424242424242


def test_json_body_without_personal_data_is_returned_as_it_is():
    body = '{"model": "m",  "messages": []}'
    assert REDACT.json_text(body) is body


def test_unicode_escaped_email_is_found():
    assert json.loads(REDACT.json_text('{"c": "\\u0062ob@x.io"}')) == {"c": "[EMAIL]"}


def test_non_json_body_is_redacted_as_text():
    assert REDACT.json_text("upstream said: bob@x.io") == "upstream said: [EMAIL]"


def test_record_redacts_only_body_columns():
    record = {"request": '{"c": "bob@x.io"}', "response": None, "path": "bob@x.io"}
    assert REDACT.record("calls", record) == {"request": '{"c":"[EMAIL]"}', "response": None, "path": "bob@x.io"}
    assert REDACT.record("shadow", {"local_answer": "bob@x.io"}) == {"local_answer": "[EMAIL]"}


@pytest.mark.parametrize("setting,kinds", [(False, None), ([], None), (True, 3), (["card"], 1)])
def test_setting_picks_the_redactor(setting, kinds):
    redactor = redactor_for(setting)
    assert (redactor and len(redactor.rules)) == kinds or (redactor is None and kinds is None)


def test_config_takes_a_switch_or_a_list(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('[capture]\nredact = ["email", "card"]\n')
    assert load_config(path).capture.redact == ["email", "card"]
    path.write_text('[capture]\nredact = ["email", "ssn"]\n')
    with pytest.raises(ConfigError, match="redact"):
        load_config(path)


def test_store_writes_only_redacted_bodies(tmp_path):
    store = CaptureStore(tmp_path, CaptureSettings(redact=True))
    store.open()
    store.append("calls", {"request_id": "r1", "request": '{"c": "call +1 415 555 0100"}', "response": "x"})
    store.close()
    assert b"555 0100" not in b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert connect(tmp_path).execute("SELECT request FROM calls").fetchall() == [('{"c":"call [PHONE]"}',)]


@given(st.text(alphabet="0123456789 ()+-.a@x", max_size=60))
@settings(max_examples=500, deadline=None)
def test_scanning_number_runs_only_equals_running_the_rules_on_everything(text):
    whole = text
    for pattern, replacement in REDACT._numbers:
        whole = pattern.sub(replacement, whole)
    assert REDACT._redact_numbers(text) == whole
