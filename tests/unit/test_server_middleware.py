"""The steering middleware in front of a small echo app: what vLLM's handlers would receive."""

import json

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cna_vllm.engine.admission import SpecGate
from cna_vllm.server.catalog import Catalog
from cna_vllm.server.metrics import metrics
from cna_vllm.server.middleware import SteeringMiddleware
from cna_vllm.server.state import ServerState
from cna_vllm.steering import SteeringLimits, SteeringSpec


async def echo_body(request: Request) -> JSONResponse:
    return JSONResponse({"received": json.loads(await request.body())})


@pytest.fixture
def client():
    app = Starlette(
        routes=[Route(p, echo_body, methods=["POST"]) for p in ("/v1/chat/completions", "/v1/completions", "/v1/x")],
        middleware=[Middleware(SteeringMiddleware)],
    )
    catalog = Catalog({"refusal": object(), "other": object()}, {}, "/m", "m", 2, {"alien": "other-model"})
    app.state.cna_steering = ServerState(catalog, SteeringLimits(), SpecGate(2), metrics(), max_request_bytes=10_000)
    return TestClient(app)


def test_rewrites_into_vllm_fields(client):
    r = client.post(
        "/v1/chat/completions",
        json={"messages": [], "steering": {"circuit": "refusal", "multiplier": 0}, "vllm_xargs": {"k": 1}},
    )
    assert r.status_code == 200
    got = r.json()["received"]
    assert "steering" not in got
    spec = SteeringSpec.parse(got["vllm_xargs"]["steering"])  # a flat string, as vLLM requires
    assert str(spec) == "refusal@0" and got["vllm_xargs"]["k"] == 1
    assert "cache_salt" not in got  # composed at intake (engine/intake.py) for every path
    assert r.headers["x-cna-steering"] == "refusal@0"
    assert r.headers["x-cna-steering-fingerprint"] == spec.fingerprint()


def test_user_cache_salt_is_passed_on_for_intake(client):
    r = client.post("/v1/completions", json={"prompt": "x", "cache_salt": "tenant1", "steering": "other@2:shift"})
    assert r.json()["received"]["cache_salt"] == "tenant1"  # intake composes it with the steering key


def test_content_type_is_matched_in_any_case_and_deep_nesting_is_a_400(client):
    body = '{"prompt": "x", "steering": {"circuit": "nope", "multiplier": 2}}'
    r = client.post("/v1/completions", content=body, headers={"Content-Type": "APPLICATION/JSON"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_circuit"
    r = client.post("/v1/completions", content="[" * 5_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    huge = '{"prompt": "x", "steering": {"circuit": "refusal", "multiplier": 1' + "0" * 400 + "}}"
    r = client.post("/v1/completions", content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]


def test_unsteered_passes_unchanged(client):
    payload = {"prompt": "x", "cache_salt": "t", "steering": None}
    r = client.post("/v1/completions", json=payload)
    assert r.json()["received"] == {"prompt": "x", "cache_salt": "t"}
    assert r.headers["x-cna-steering"] == "none"
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.json()["received"] == {"prompt": "x"}


@pytest.mark.parametrize(
    ("path", "payload", "status", "code"),
    [
        ("/v1/completions", {"steering": {"circuit": "nope", "multiplier": 1}}, 400, "unknown_circuit"),
        ("/v1/completions", {"steering": {"circuit": "alien", "multiplier": 1}}, 400, "circuit_model_mismatch"),
        ("/v1/completions", {"vllm_xargs": {"steering": "refusal@0"}}, 400, "invalid_steering"),
        ("/v1/x", {"steering": "refusal@0"}, 400, "steering_unsupported_endpoint"),
        ("/v1/x", {"vllm_xargs": {"steering": "refusal@0"}}, 400, "steering_unsupported_endpoint"),
        ("/v1/x", {"sampling_params": {"extra_args": {"steering": "x@1"}}}, 400, "steering_unsupported_endpoint"),
        ("/v1/x", {"batch": [{"a": 1}, {"vllm_xargs": {"steering": "x@1"}}]}, 400, "steering_unsupported_endpoint"),
        ("/v1/completions", {"prompt": "y" * 20_000, "steering": "refusal@0"}, 413, "request_too_large"),
    ],
)
def test_refusals(client, path, payload, status, code):
    r = client.post(path, json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and set(err) == {"message", "type", "param", "code"}


def test_non_json_and_other_paths_pass_through(client):
    payload = {"a": 1, "tools": [{"parameters": {"properties": {"steering": {"type": "string"}}}}]}
    r = client.post("/v1/x", json=payload)
    assert r.json()["received"] == payload and "x-cna-steering" not in r.headers
    with pytest.raises(json.JSONDecodeError):  # the echo app, not the middleware, sees the broken body
        client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})


def test_endpoint_plugin_protocol_and_attach():
    from fastapi import FastAPI
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin

    from cna_vllm.server.app import SteeringEndpointPlugin

    plugin = SteeringEndpointPlugin()
    assert isinstance(plugin, EndpointPlugin)
    paths = lambda app: {getattr(r, "path", None) for r in app.routes}  # noqa: E731
    bare = FastAPI()
    bare.state.args = type("Args", (), {"additional_config": {}})()
    plugin.attach_router(bare)  # a stock (unsteered) server: nothing attached
    assert "/v1/circuits" not in paths(bare) and not bare.user_middleware
    app = FastAPI()
    app.state.args = type("Args", (), {"additional_config": {"cna_vllm": {"circuits": {}}}})()
    plugin.attach_router(app)
    plugin.attach_router(app)  # idempotent
    assert {"/v1/circuits", "/v1/circuits/{name}"} <= paths(app)
    assert [m.cls for m in app.user_middleware] == [SteeringMiddleware]


def test_full_steering_queue_is_a_429_with_retry_after(client):
    state = client.app.state.cna_steering
    state.gate = SpecGate(1, max_waiting=0)
    state.gate.active["someone-else"] = 1  # the only row is held by another spec
    r = client.post("/v1/completions", json={"prompt": "x", "steering": "refusal@0"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "steering_queue_full"
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 200  # unsteered: never queued


def test_row_wait_is_observed_for_steered_requests_only(client):
    wait = metrics().row_wait

    def count() -> float:
        return next(s.value for s in wait.collect()[0].samples if s.name.endswith("_count"))

    before = count()
    client.post("/v1/completions", json={"prompt": "x"})
    assert count() == before
    client.post("/v1/completions", json={"prompt": "x", "steering": "refusal@0"})
    assert count() == before + 1
