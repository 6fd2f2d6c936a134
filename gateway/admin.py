"""The admin API of routing policies (``admin`` keys only)::

    GET  /admin/routes                      every path: {"routes": {path: {"policy", "history", "status"?}}}
    GET  /admin/routes/PATH                 one path:   {"path", "policy", "history", "status"?}
         ?disagreements=N                   status.disagreements: the adapter's N most confident
                                            shadow/audit disagreements, with inputs (N <= 100)
    PUT  /admin/routes/PATH                 policy fields, merged onto the current policy
    POST /admin/routes/PATH/promote         {"adapter": "v3", "threshold": 0.8?}: shadow, share 0
    POST /admin/routes/PATH/rollback        the previous policy (else shadow, share 0)
    POST /admin/routes/PATH/review          {"shadow_id": "...", "verdict": "upstream_wrong", "note": "..."?}:
                                            a person's verdict on one comparison (a ``reviews`` row,
                                            counted in the ramp's evidence while in its window)

PATH is the call path itself, slashes included (``/admin/routes/support/intents``). Changes are
written to ``<data_dir>/routes.json`` through the gateway's ``RouteTable`` (every worker sees them
within a second) and recorded as ``route_changes`` rows with actor "admin". An optional
``?reason=...`` goes into that record. Bad values answer 400 naming the field. These routes are
left out of the OpenAPI document, which describes the OpenAI-compatible surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from litestar import Request, get, post, put
from litestar.params import FromPath

from arbitrage.config import check_route_path
from arbitrage.errors import APIError, ConfigError, InvalidRequestError, NotFoundError, StoreError
from distill.versions import MANIFEST, versions
from gateway import shadow_report
from gateway.auth import require_admin
from gateway.route_table import RouteTable
from gateway.shadow_report import MAX_DISAGREEMENTS, Verdict
from router.policy import ComparatorSpec, RoutePolicy

ACTOR = "admin"
T = TypeVar("T")
ACTIONS = ("promote", "rollback", "review")
_AT_FIELD = re.compile(r"at `\$\.([^`]+)`")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_NAMED_FIELD = re.compile(r'^(?:routes\."[^"]*": )?([a-z_]+(?:\.[a-z_]+)?)\b')


class PromoteRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of ``POST /admin/routes/PATH/promote``."""

    adapter: str
    """Adapter version of the path ("v3"); ``<data_dir>/adapters/PATH/v3`` must exist."""
    threshold: float | None = None
    """Confidence threshold [default: the latest eval's calibrated one, else its at-target one,
    else the current policy's]."""


@get("/admin/routes", guards=[require_admin], include_in_schema=False)
async def list_routes(request: Request) -> dict[str, Any]:
    """Every path with a policy: the policy, how many earlier policies can be rolled back to, and
    live status when the gateway offers it."""
    gateway = request.app.state.gateway
    gateway.routes.refresh()
    paths = list(gateway.routes.policies())
    return {"routes": dict(zip(paths, await asyncio.gather(*(_entry(gateway, path) for path in paths)),
                               strict=True))}


@get("/admin/routes/{path:path}", guards=[require_admin], include_in_schema=False)
async def show_route(request: Request, path: FromPath[str]) -> dict[str, Any]:
    """One path's policy (404 when it has none); ``?disagreements=N`` adds the adapter's N most
    confident disagreements to its status."""
    gateway, path = request.app.state.gateway, _route_path(path)
    shown = _disagreements_param(request.query_params.get("disagreements"))
    gateway.routes.refresh()
    if gateway.routes.get(path) is None:
        raise NotFoundError(f"route {path!r} has no policy (PUT /admin/routes/{path} creates one)", code="unknown_route")
    return {"path": path, **await _entry(gateway, path, disagreements=shown)}


@put("/admin/routes/{path:path}", guards=[require_admin], include_in_schema=False)
async def update_route(request: Request, path: FromPath[str]) -> dict[str, Any]:
    """Merge the body's policy fields onto the path's policy (the default one, mode off, if none)."""
    gateway, path = request.app.state.gateway, _route_path(path)
    fields = _json_object(await request.body())
    with _as_bad_request():
        gateway.routes.update(path, fields, actor=ACTOR, reason=_reason(request, "update"))
    return {"path": path, **await _entry(gateway, path)}


@post("/admin/routes/{path:path}", guards=[require_admin], status_code=200, include_in_schema=False)
async def route_action(request: Request, path: FromPath[str]) -> dict[str, Any]:
    """``PATH/promote``, ``PATH/rollback`` or ``PATH/review`` (litestar's path parameters end the
    route, so the action is the last segment)."""
    gateway = request.app.state.gateway
    path, _, action = path.strip("/").rpartition("/")
    if action not in ACTIONS or not path:
        raise NotFoundError(f"unknown route action {action!r}: POST /admin/routes/PATH/promote, "
                            f"/admin/routes/PATH/rollback or /admin/routes/PATH/review", code="unknown_url")
    path = _route_path(path)
    if action == "review":
        verdict = _action_request(await request.body(), action, ReviewRequest)
        recorded = await review(gateway, path, verdict, request)
        return {"path": path, "review": recorded, **await _entry(gateway, path)}
    with _as_bad_request():
        if action == "promote":
            body = _action_request(await request.body(), action, PromoteRequest)
            promote(gateway.routes, path, body, _reason(request, action))
        else:
            _rollback(gateway.routes, path, _reason(request, "rollback"))
    return {"path": path, **await _entry(gateway, path)}


ADMIN_ROUTES = [list_routes, show_route, update_route, route_action]
"""The handlers to register in the app."""


class ReviewRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of ``POST /admin/routes/PATH/review``."""

    shadow_id: str
    """The comparison reviewed (``arbitrage route show PATH --disagreements N`` lists them)."""
    verdict: Verdict
    """upstream_wrong: the local answer was right (the calibration then counts the comparison as agreed);
    local_wrong: the upstream answer was right; ambiguous: the input fits both."""
    note: str | None = None
    """Why, for whoever reads the ``reviews`` table next."""


async def review(gateway: Any, path: str, request: ReviewRequest, http: Request) -> dict[str, Any]:
    """Record a person's verdict on one of ``path``'s comparisons (404 when it has none of that id)."""
    gateway.routes.refresh()
    if gateway.routes.get(path) is None:
        raise NotFoundError(f"route {path!r} has no policy, so no comparisons to review", code="unknown_route")
    try:
        found = await asyncio.to_thread(shadow_report.comparison, gateway.config.data_dir, path, request.shadow_id)
    except StoreError as exc:
        raise APIError(f"the verdict was not recorded: {exc}", code="store_unreadable") from None
    if found is None:
        raise NotFoundError(f"path {path!r} has no comparison {request.shadow_id!r} (arbitrage route show {path} "
                            f"--disagreements 20 lists them)", code="unknown_comparison")
    key = getattr(http.state, "key", None)
    row = {"review_id": os.urandom(8).hex(), "ts": datetime.now(UTC), "shadow_id": request.shadow_id, "path": path,
           "adapter": found["adapter"], "verdict": request.verdict, "reviewer": key.name if key else None,
           "note": request.note}
    try:
        gateway.store.append("reviews", row)
    except StoreError as exc:
        raise APIError(f"the verdict was not recorded: {exc}", code="store_unwritable") from None
    in_window = gateway.router.review_evidence(path, request.shadow_id, request.verdict)
    return {**row, "ts": row["ts"].isoformat(), "in_ramp_window": in_window}


def promote(table: RouteTable, path: str, request: PromoteRequest, reason: str) -> RoutePolicy:
    """Put adapter ``request.adapter`` of ``path`` in shadow mode with share 0 (see ``PromoteRequest``
    for the threshold; the comparator stays the current policy's, else json when the adapter's
    dataset checked JSON answers, else exact). NotFoundError when the adapter folder is missing."""
    folder = table.adapter_folder(path, request.adapter)
    manifest = _adapter_manifest(folder, path, request.adapter)
    current = table.get(path)
    fields: dict[str, Any] = {"mode": "shadow", "share": 0.0, "adapter": request.adapter}
    evaluation = latest_eval(table.data_dir, path, request.adapter)
    if request.threshold is not None:
        fields["threshold"] = request.threshold
    elif evaluation is not None and eval_threshold(evaluation) is not None:
        fields["threshold"] = eval_threshold(evaluation)
        fields["confidence"] = evaluation.get("config", {}).get("confidence") or RoutePolicy().confidence
    if current is None:
        fields["comparator"] = {"name": dataset_comparator(manifest)}
    return table.update(path, fields, actor=ACTOR, reason=reason, action="promote")


def latest_eval(data_dir: Path, path: str, adapter: str) -> dict[str, Any] | None:
    """The manifest of the newest eval of the adapter (``evals/PATH/vN/vM``), if any is readable."""
    root = data_dir / "evals" / path / adapter
    for number in reversed(versions(root)):
        try:
            return json.loads((root / f"v{number}" / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
    return None


def eval_threshold(manifest: dict[str, Any]) -> float | None:
    """The calibrated threshold of an eval, else the one where agreement reached the target."""
    for key in ("calibrated", "at_target"):
        found = manifest.get(key)
        if isinstance(found, dict) and isinstance(found.get("threshold"), (int, float)):
            return float(found["threshold"])
    return None


def dataset_comparator(adapter_manifest: dict[str, Any]) -> str:
    """json when the adapter's dataset checked JSON answers, else exact (as ``distill eval`` does)."""
    try:
        dataset = Path(adapter_manifest["dataset"]["folder"]) / MANIFEST
        answer_format = json.loads(dataset.read_text())["config"]["answer_format"]
    except (OSError, ValueError, KeyError, TypeError):
        return ComparatorSpec().name
    return "json" if answer_format == "json" else ComparatorSpec().name


def _adapter_manifest(folder: Path, path: str, version: str) -> dict[str, Any]:
    if not folder.is_dir():
        raise NotFoundError(f"path {path!r} has no adapter {version}: {folder} does not exist (train one with "
                            f"`arbitrage distill train {path}`)", param="adapter", code="adapter_not_found")
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise NotFoundError(f"adapter {folder} has no readable {MANIFEST} ({exc}): not a published adapter",
                            param="adapter", code="adapter_not_found") from None


def _rollback(table: RouteTable, path: str, reason: str) -> RoutePolicy:
    if table.get(path) is None:
        raise NotFoundError(f"route {path!r} has no policy to roll back", code="unknown_route")
    return table.rollback(path, actor=ACTOR, reason=reason)


async def _entry(gateway: Any, path: str, disagreements: int = 0) -> dict[str, Any]:
    """One path's policy and history length, plus ``gateway.route_status(path)`` (live numbers:
    loaded adapter, agreement, ...) when the gateway has it. The status reads the store, so it
    runs in a thread: a long query never holds up the clients' requests."""
    routes: RouteTable = gateway.routes
    entry: dict[str, Any] = {"policy": routes.get(path).to_dict(), "history": len(routes.history(path))}
    status = getattr(gateway, "route_status", None)
    if callable(status):
        entry["status"] = await asyncio.to_thread(status, path, disagreements=disagreements)
    return entry


def _disagreements_param(raw: str | None) -> int:
    if raw is None:
        return 0
    try:
        count = int(raw)
    except ValueError:
        count = -1
    if not 0 <= count <= MAX_DISAGREEMENTS:
        raise InvalidRequestError(f"disagreements must be a whole number from 0 to {MAX_DISAGREEMENTS}, not {raw!r}",
                                  param="disagreements", code="invalid_request")
    return count


def _route_path(raw: str) -> str:
    """litestar hands ``{path:path}`` over with a leading slash; the call path has none."""
    path = raw.strip("/")
    with _as_bad_request():
        check_route_path(path)
    return path


def _reason(request: Request, action: str) -> str:
    given = request.query_params.get("reason")
    key = getattr(request.state, "key", None)
    by = f" (key {key.name})" if key is not None else ""
    return f"{given or f'{action} through the admin API'}{by}"


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        fields = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(fields, dict):
        raise InvalidRequestError("The request body must be a JSON object of policy fields, e.g. "
                                  '{"mode": "canary", "share": 5}', code="invalid_policy")
    return fields


def _action_request(body: bytes, action: str, request_type: type[T]) -> T:
    """The body of ``POST /admin/routes/PATH/<action>``; a bad one is a 400 naming the field."""
    try:
        return msgspec.json.decode(body or b"{}", type=request_type)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"{action}: {exc}", param=_param(str(exc)), code="invalid_request") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


@contextlib.contextmanager
def _as_bad_request() -> Iterator[None]:
    """A ConfigError (bad policy value) becomes a 400 naming the field."""
    try:
        yield
    except ConfigError as exc:
        raise InvalidRequestError(str(exc), param=_param(str(exc)), code="invalid_policy") from None


def _param(message: str) -> str | None:
    """The field a validation message is about: a message starting with a field name (``ramp.floor
    must be ...``), else ``at `$.share``` or ``unknown field `x```."""
    named = _NAMED_FIELD.search(message)
    if named and named[1].split(".")[0] in {*RoutePolicy.__struct_fields__, *PromoteRequest.__struct_fields__}:
        return named[1]
    found = _AT_FIELD.search(message) or _UNKNOWN_FIELD.search(message)
    return found[1] if found else None
