"""Bad input gets a clear 4xx in OpenAI's error shape, never a 5xx, and is not recorded."""

from __future__ import annotations

import httpx
import orjson
import pytest

CHAT = "/v1/chat/completions"
VALID = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def post(gw, body: bytes | None = None, path: str = CHAT, key: str | None = "default", **headers) -> httpx.Response:
    auth = {"Authorization": f"Bearer {gw.key if key == 'default' else key}"} if key else {}
    return httpx.post(gw.process.url + path, content=body, headers={**auth, "content-type": "application/json",
                                                                    **headers}, timeout=10)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("body,code", [
    (b"{not json", "invalid_json"),
    (b"", "empty_body"),
    (b"[1, 2]", "invalid_type"),
    (b'{"model": 5, "messages": []}', "invalid_type"),
    (b'{"model": "gpt-4o-mini"}', "invalid_type"),
    (b'{"model": "gpt-4o-mini", "messages": "hi"}', "invalid_type"),
    (b'{"model": "gpt-4o-mini", "messages": [], "stream": "yes"}', "invalid_type"),
])
def test_malformed_requests_get_400(gw, body, code):
    assert_openai_error(post(gw, body), 400, code)


def test_wrong_type_names_the_field(gw):
    error = assert_openai_error(post(gw, b'{"model": 5, "messages": []}'), 400)
    assert error["param"] == "model" and "model" in error["message"]


def test_body_over_the_limit_gets_413(gw):
    huge = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + b"x" * 70_000 + b'"}]}'
    assert_openai_error(post(gw, huge), 413, "body_too_large")


def test_unknown_endpoint_and_wrong_method(gw):
    assert_openai_error(post(gw, b"{}", path="/v1/nonexistent"), 404, "unknown_url")
    assert_openai_error(httpx.get(gw.process.url + CHAT, headers={"Authorization": f"Bearer {gw.key}"}), 405)


@pytest.mark.parametrize("key,code", [(None, "missing_api_key"), ("sk-arb-wrong", "invalid_api_key"),
                                      ("", "missing_api_key")])
def test_missing_or_wrong_key_gets_401(gw, key, code):
    assert_openai_error(post(gw, orjson.dumps(VALID), key=key), 401, code)


def test_models_list_needs_a_key(gw):
    assert_openai_error(httpx.get(gw.process.url + "/v1/models"), 401)


def test_invalid_path_header_gets_400(gw):
    assert_openai_error(post(gw, orjson.dumps(VALID), **{"X-Arbitrage-Path": "bad path!"}), 400, "invalid_path")


def test_rejected_requests_are_not_recorded(gw):
    before = gw.rows("SELECT count(*) AS n FROM calls")[0]["n"]
    for body in (b"{not json", b'{"model": 5}', b"[]"):
        post(gw, body)
    post(gw, b'{"model": "gpt-4o-mini", "messages": []}', key="sk-arb-wrong")
    assert gw.rows("SELECT count(*) AS n FROM calls")[0]["n"] == before
