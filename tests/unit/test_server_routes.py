"""``/v1/circuits`` and ``POST /v1/steered-models`` on a FastAPI app with the steering state and no engine.

Everything a route decides before it reaches the engine is here; loading a circuit into a running
engine is tests/integration/test_server_catalogue.py.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from cna_vllm.engine.admission import SpecGate
from cna_vllm.server.catalog import Catalog
from cna_vllm.server.metrics import metrics
from cna_vllm.server.routes import router
from cna_vllm.server.state import ServerState
from cna_vllm.server.variants import Variants
from cna_vllm.steering import SteeringLimits, SteeringSpec

from .test_server_catalog import planted_catalog, planted_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return planted_models(tmp_path_factory.mktemp("models"))


def app_with(catalog: Catalog | None, **state) -> TestClient:
    app = FastAPI()
    app.include_router(router)
    if catalog is not None:
        limits = state.pop("limits", SteeringLimits())
        app.state.cna_steering = ServerState(catalog, limits, SpecGate(catalog.capacity), metrics(), **state)
    return TestClient(app)


@pytest.fixture
def served(models, tmp_path):
    """``(client, catalog, allowed directory, outside directory)``, hot-loading on."""
    catalog, allowed, outside = planted_catalog(models[0], tmp_path)
    variants = Variants("planted", frozenset({"planted"}))
    client = app_with(catalog, hot_load_enabled=True, hot_load_roots=(allowed.resolve(),), variants=variants,
                      limits=SteeringLimits(max_items=3, max_abs_multiplier=5.0, max_abs_alpha=2.0))
    return client, catalog, allowed, outside


def error_of(r, status: int, code: str) -> dict:
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    return r.json()["error"]


def test_listing_carries_the_model_capacity_and_limits(served):
    client = served[0]
    r = client.get("/v1/circuits")
    assert r.status_code == 200
    body = r.json()
    assert [c["id"] for c in body["data"]] == ["caa", "refusal"] and body["object"] == "list"
    assert body["model"] == "planted" and body["max_steering_configs"] == 4
    assert body["limits"] == {"max_items": 3, "max_abs_multiplier": 5.0, "max_abs_alpha": 2.0}


def test_one_card_or_a_404_that_names_the_known_circuits(served):
    client, catalog = served[:2]
    assert client.get("/v1/circuits/refusal").json() == catalog.describe("refusal")
    err = error_of(client.get("/v1/circuits/nope"), 404, "unknown_circuit")
    assert err["message"] == "unknown circuit 'nope'; circuits: caa, refusal" and err["param"] == "name"
    empty = app_with(Catalog({}, {}, "/m", "m", 2))
    assert error_of(empty.get("/v1/circuits/x"), 404, "unknown_circuit")["message"].endswith("circuits: none loaded")
    assert empty.get("/v1/circuits").json()["data"] == []


def test_without_steering_state_every_route_is_a_503():
    client = app_with(None)
    for method, path, body in [("GET", "/v1/circuits", None), ("GET", "/v1/circuits/refusal", None),
                               ("POST", "/v1/circuits", {"path": "/x"}),
                               ("POST", "/v1/steered-models", {"name": "a", "steering": "refusal@0"})]:
        err = error_of(client.request(method, path, json=body), 503, "steering_unavailable")
        assert err["message"] == "this server has no steering engine"


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ('{"file": "x"}', "path"),  # the missing field is named first
        ('{"path": ""}', "path"),
        ('{"path": "/x", "extra": 1}', "extra"),
        ("not json", None),
    ],
)
def test_hot_load_body_errors_name_the_field(served, content, param):
    err = error_of(served[0].post("/v1/circuits", content=content), 400, "invalid_request")
    assert err["param"] == param and err["message"].startswith(f"invalid request: {param or 'body'}: ")


def test_hot_load_answers_before_the_engine(served, models, tmp_path):
    client, catalog, allowed, outside = served
    r = client.post("/v1/circuits", json={"path": str(allowed / "refusal.safetensors")})
    assert r.status_code == 200 and r.json() == {"status": "already_loaded", **catalog.describe("refusal")}
    replace(catalog.circuits["refusal"], name="x").save(outside / "x.safetensors")
    error_of(client.post("/v1/circuits", json={"path": str(outside / "x.safetensors")}), 403, "path_not_allowed")
    error_of(client.post("/v1/circuits", json={"path": "x.safetensors"}), 400, "invalid_path")
    # a server started with --hot-load-neurons 0 has no room: refused before the engine is asked
    full, allowed2, _ = planted_catalog(models[0], tmp_path / "full", hot_load_neurons=0)
    new = replace(full.circuits["refusal"], name="fresh").save(allowed2 / "fresh.safetensors")
    client = app_with(full, hot_load_enabled=True, hot_load_roots=(allowed2.resolve(),))
    err = error_of(client.post("/v1/circuits", json={"path": str(new)}), 409, "hot_load_disabled")
    assert "--hot-load-neurons 0" in err["message"] and "fresh" not in full.circuits


def test_admin_routes_are_off_unless_enabled_but_bodies_are_checked_first(models, tmp_path):
    catalog, allowed, _ = planted_catalog(models[0], tmp_path)
    client = app_with(catalog, hot_load_roots=(allowed.resolve(),))  # --enable-hot-load not given
    for path, body in [("/v1/circuits", {"path": str(allowed / "refusal.safetensors")}),
                       ("/v1/steered-models", {"name": "a", "steering": "refusal@0"})]:
        err = error_of(client.post(path, json=body), 403, "hot_load_not_enabled")
        assert "--enable-hot-load" in err["message"]
    error_of(client.post("/v1/circuits", json={"file": "x"}), 400, "invalid_request")


def test_a_variant_may_not_take_the_name_of_a_lora_adapter(served):
    client = served[0]
    client.app.state.openai_serving_models = SimpleNamespace(lora_requests={"my-adapter": object()})  # vLLM's state
    r = client.post("/v1/steered-models", json={"name": "my-adapter", "steering": "refusal@0"})
    err = error_of(r, 400, "model_exists")
    assert "already serves (base model or LoRA adapter)" in err["message"] and err["param"] == "name"
    r = client.post("/v1/steered-models", json={"name": "off", "steering": "refusal@0,caa@1:shift"})
    assert r.status_code == 201 and r.json()["steering"] == SteeringSpec.parse("refusal@0,caa@1:shift").to_list()
    # the server's limits apply to a variant's spec: 4 items > max_items 3, 9 > max |multiplier| 5
    for steering in ("refusal@0,refusal@1,refusal@2,refusal@3", "refusal@9"):
        error_of(client.post("/v1/steered-models", json={"name": "big", "steering": steering}), 400,
                 "invalid_steering")
