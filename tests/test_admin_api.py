"""The routing admin API against a real gateway process: keys and roles, merged edits, clear 400s,
edits surviving a restart, promote (from hand-written adapter and eval manifests) and rollback."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.processes import ServerProcess, arbitrage, free_port, gateway

CONFIG = """
[[upstreams]]
name = "sim"
base_url = "{sim}/v1"

[local]
port = {local_port}

[routes."support/intents"]
mode = "canary"
adapter = "v1"
share = 10
threshold = 0.8

[routes.faq]
mode = "off"
"""


@dataclass
class AdminGateway:
    """A gateway process with an admin key and a client key, and how to restart it."""

    tmp: Path
    data_dir: Path
    config: Path
    admin_key: str
    client_key: str
    process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return self.process.url

    def start(self) -> AdminGateway:
        self.process = gateway(self.tmp, self.data_dir, config=self.config, env={"OPENAI_API_KEY": "sk-up"}).start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def call(self, method: str, route: str, key: str | None = "admin", **kwargs) -> httpx.Response:
        secret = {"admin": self.admin_key, "client": self.client_key}.get(key, key)
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        return httpx.request(method, f"{self.url}/admin/routes{route}", headers=headers, timeout=10, **kwargs)


def start_admin_gateway(tmp: Path, sim_url: str) -> AdminGateway:
    """A gateway in front of the simulator with two routes in its config, an admin and a client key."""
    data_dir = tmp / "data"
    config = tmp / "arbitrage.toml"
    config.write_text(CONFIG.format(sim=sim_url, local_port=free_port()))
    admin_key = arbitrage("keys", "create", "ops", "--admin", "--data-dir", str(data_dir)).stdout.strip()
    client_key = arbitrage("keys", "create", "app", "--data-dir", str(data_dir)).stdout.strip()
    return AdminGateway(tmp, data_dir, config, admin_key, client_key).start()


def write_adapter(data_dir: Path, path: str, version: str, answer_format: str = "text") -> Path:
    """A published adapter folder as ``distill train`` leaves it (manifest only: no vLLM here)."""
    dataset = data_dir / "datasets" / path / "v1"
    dataset.mkdir(parents=True, exist_ok=True)
    (dataset / "manifest.json").write_text(json.dumps({"config": {"answer_format": answer_format}}))
    folder = data_dir / "adapters" / path / version
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"version": version, "dataset": {"folder": str(dataset)}}))
    return folder


def write_eval(data_dir: Path, path: str, adapter: str, number: int, calibrated: float | None,
               at_target: float | None, confidence: str = "joint") -> None:
    folder = data_dir / "evals" / path / adapter / f"v{number}"
    folder.mkdir(parents=True)
    manifest = {"calibrated": {"threshold": calibrated} if calibrated is not None else None,
                "at_target": {"threshold": at_target} if at_target is not None else None,
                "config": {"confidence": confidence}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def admin(sim, tmp_path_factory) -> AdminGateway:
    running = start_admin_gateway(tmp_path_factory.mktemp("admin"), sim.url)
    yield running
    running.stop()


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# Keys


def test_admin_routes_need_a_key(admin):
    assert error(admin.call("GET", "", key=None), 401)["code"] == "missing_api_key"
    assert error(admin.call("PUT", "/faq", key=None, json={"share": 1}), 401)["type"] == "authentication_error"
    assert error(admin.call("POST", "/faq/rollback", key="sk-arb-wrong"), 401)["code"] == "invalid_api_key"


def test_admin_routes_refuse_a_client_key(admin):
    assert error(admin.call("GET", "", key="client"), 403)["code"] == "insufficient_role"
    assert error(admin.call("PUT", "/faq", key="client", json={"share": 1}), 403)["type"] == "permission_denied"


# Reading and editing


def test_list_shows_the_config_policies(admin):
    routes = admin.call("GET", "").json()["routes"]
    assert routes["support/intents"]["policy"]["share"] == 10
    assert routes["faq"]["policy"]["mode"] == "off"
    assert isinstance(routes["faq"]["history"], int)


def test_put_merges_fields_and_a_slash_path_keeps_its_name(admin):
    response = admin.call("PUT", "/team/tickets/triage", json={"mode": "shadow", "adapter": "v2"})
    assert response.status_code == 200, response.text
    assert response.json()["path"] == "team/tickets/triage"
    changed = admin.call("PUT", "/team/tickets/triage", json={"shadow_rate": 0.5}).json()
    assert (changed["policy"]["mode"], changed["policy"]["shadow_rate"], changed["history"]) == ("shadow", 0.5, 1)
    assert admin.call("GET", "/team/tickets/triage").json()["policy"]["adapter"] == "v2"


def test_get_of_a_path_without_policy_is_404(admin):
    assert "has no policy" in error(admin.call("GET", "/never/seen"), 404)["message"]


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"share": 150}, "share", "share must be within 0-100 (percent), got 150.0"),
    ({"share": "ten"}, "share", "Expected `float`, got `str` - at `$.share`"),
    ({"mood": "happy"}, "mood", "Object contains unknown field `mood`"),
    ({"ramp": {"floor": 2}}, "ramp.floor", "ramp.floor must be within (0, 1]"),
    ({"mode": "canary", "adapter": "faq/v1"}, "adapter", 'adapter must be a version of this path\'s adapter like "v3"'),
])
def test_bad_policy_values_are_400_naming_the_field(admin, body, param, message):
    found = error(admin.call("PUT", "/faq", json=body), 400)
    assert (found["type"], found["param"], found["code"]) == ("invalid_request_error", param, "invalid_policy")
    assert found["message"].startswith('routes."faq": ') and message in found["message"]


def test_a_body_that_is_not_a_json_object_is_400(admin):
    assert error(admin.call("PUT", "/faq", content=b"{oops"), 400)["code"] == "invalid_json"
    assert "JSON object of policy fields" in error(admin.call("PUT", "/faq", json=[1]), 400)["message"]
    assert "not a usable call path name" in error(admin.call("PUT", "/a/%2E%2E/b", json={}), 400)["message"]


def test_a_change_survives_a_gateway_restart(sim, tmp_path):
    first = start_admin_gateway(tmp_path, sim.url)
    try:
        assert first.call("PUT", "/faq", json={"mode": "shadow", "adapter": "v4"}).status_code == 200
    finally:
        first.stop()
    again = first.start()
    try:
        policy = again.call("GET", "/faq").json()["policy"]
        assert (policy["mode"], policy["adapter"], policy["share"]) == ("shadow", "v4", 0.0)
    finally:
        again.stop()


# Promote


def test_promote_of_a_missing_adapter_is_404(admin):
    found = error(admin.call("POST", "/support/intents/promote", json={"adapter": "v9"}), 404)
    assert "path 'support/intents' has no adapter v9" in found["message"]
    assert (found["param"], found["code"]) == ("adapter", "adapter_not_found")


def test_promote_needs_an_adapter_version(admin):
    assert "missing required field `adapter`" in error(admin.call("POST", "/faq/promote", json={}), 400)["message"]
    assert "like \"v3\"" in error(admin.call("POST", "/faq/promote", json={"adapter": "3"}), 400)["message"]


def test_promote_takes_the_latest_evals_calibrated_threshold(admin):
    write_adapter(admin.data_dir, "support/intents", "v3")
    write_eval(admin.data_dir, "support/intents", "v3", 1, calibrated=0.4, at_target=0.3)
    write_eval(admin.data_dir, "support/intents", "v3", 2, calibrated=0.62, at_target=0.5, confidence="min")
    response = admin.call("POST", "/support/intents/promote", json={"adapter": "v3"})
    policy = response.json()["policy"]
    assert (policy["mode"], policy["share"], policy["adapter"], policy["threshold"]) == ("shadow", 0.0, "v3", 0.62)
    assert (policy["confidence"], policy["comparator"]["name"]) == ("min", "exact")


def test_promote_falls_back_to_the_at_target_threshold_then_the_current_one(admin):
    write_adapter(admin.data_dir, "promo/fallback", "v1")
    write_eval(admin.data_dir, "promo/fallback", "v1", 1, calibrated=None, at_target=0.7)
    assert admin.call("POST", "/promo/fallback/promote", json={"adapter": "v1"}).json()["policy"]["threshold"] == 0.7
    write_adapter(admin.data_dir, "promo/fallback", "v2")
    assert admin.call("POST", "/promo/fallback/promote", json={"adapter": "v2"}).json()["policy"]["threshold"] == 0.7


def test_promote_with_a_threshold_and_a_json_dataset_on_a_new_path(admin):
    write_adapter(admin.data_dir, "promo/json", "v1", answer_format="json")
    write_eval(admin.data_dir, "promo/json", "v1", 1, calibrated=0.9, at_target=0.8)
    policy = admin.call("POST", "/promo/json/promote", json={"adapter": "v1", "threshold": 0.55}).json()["policy"]
    assert (policy["threshold"], policy["comparator"]["name"], policy["mode"]) == (0.55, "json", "shadow")


# Rollback


def test_rollback_restores_the_previous_policy(admin):
    admin.call("PUT", "/roll/back", json={"mode": "canary", "adapter": "v1", "share": 5})
    admin.call("PUT", "/roll/back", json={"share": 50})
    restored = admin.call("POST", "/roll/back/rollback", params={"reason": "too many complaints"}).json()
    assert (restored["policy"]["share"], restored["history"]) == (5.0, 0)


def test_rollback_of_an_unknown_route_is_404_and_an_unknown_action_too(admin):
    assert "has no policy to roll back" in error(admin.call("POST", "/nothing/here/rollback"), 404)["message"]
    assert "unknown route action 'launch'" in error(admin.call("POST", "/faq/launch"), 404)["message"]
