"""Steered variants: the flag, the name rules, the combination rule, and what the middleware and routes do."""

import json

import pytest
from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from cna_vllm.engine.admission import SpecGate
from cna_vllm.errors import SteeringError
from cna_vllm.server.catalog import Catalog
from cna_vllm.server.metrics import metrics
from cna_vllm.server.middleware import SteeringMiddleware
from cna_vllm.server.schema import ApiError
from cna_vllm.server.state import ServerState
from cna_vllm.server.variants import Variants, check_name, parse_flag, validate_spec
from cna_vllm.steering import SteeringLimits, SteeringSpec

CIRCUITS = {"refusal": object(), "other": object()}


def test_flag_takes_any_form_of_the_steering_field():
    assert parse_flag("no-refusal=refusal@0") == ("no-refusal", "refusal@0")
    item = {"circuit": "refusal", "multiplier": 2}
    assert parse_flag(' a = [{"circuit": "refusal", "multiplier": 2}]') == ("a", [item])
    assert parse_flag('b={"circuit": "other", "mode": "shift", "alpha": 1}')[1]["mode"] == "shift"
    for bad in ("no-equals", "x=", "x=  "):
        with pytest.raises(SteeringError, match="NAME=SPEC"):
            parse_flag(bad)
    with pytest.raises(SteeringError, match="not valid JSON"):
        parse_flag("x=[{oops")


def test_names_are_checked_and_must_be_free():
    assert check_name("smollm2-refusal-off") == "smollm2-refusal-off"
    assert check_name("org/model:v1.2+steer") == "org/model:v1.2+steer"
    for bad in ("", "-x", "with space", "a=b", "x" * 129, 5, None, "ünï"):
        with pytest.raises(SteeringError, match="invalid steered model name"):
            check_name(bad)
    with pytest.raises(SteeringError, match="already taken"):
        check_name("base", ["base"])


def test_spec_is_validated_like_a_request():
    limits = SteeringLimits()
    assert str(validate_spec("refusal@0,other@1:shift", limits, CIRCUITS, "v")) == "refusal@0,other@1:shift"
    for raw, msg in [("nope@1", "unknown circuit"), ("refusal@50", "out of bounds"), ([], "empty list")]:
        with pytest.raises(SteeringError, match=f"v: .*{msg}"):
            validate_spec(raw, limits, CIRCUITS, "v")


def test_registry_add_and_the_combination_rule():
    v = Variants("base", frozenset({"base", "alias"}))
    off, added = v.add("off", SteeringSpec.parse("refusal@0"))
    assert added and "off" in v and len(v) == 1
    assert v.add("off", SteeringSpec.parse("refusal@0")) == (off, False)  # same spec: idempotent
    for name in ("off", "base", "alias"):  # another spec under a taken name
        with pytest.raises(SteeringError, match="already taken"):
            v.add(name, SteeringSpec.parse("refusal@2"))
    limits = SteeringLimits(max_items=2)
    assert v.combine(off, None, limits, CIRCUITS) == off.spec
    combined = v.combine(off, {"circuit": "other", "mode": "patch", "alpha": 0.5}, limits, CIRCUITS)
    assert str(combined) == "refusal@0,other@0.5:patch"  # the variant's items first, then the field's
    with pytest.raises(ApiError, match=r"model 'off' steers with refusal@0; .*3 items"):
        v.combine(off, "other@1,other@2", limits, CIRCUITS)  # validated as one spec: 3 > max_items
    with pytest.raises(ApiError, match="unknown circuit"):
        v.combine(off, "nope@1", limits, CIRCUITS)


def test_listing_appends_a_card_per_variant_with_its_parent():
    v = Variants("base")
    v.add("off", SteeringSpec.parse("refusal@0"))
    base = {"id": "base", "object": "model", "root": "/models/base", "parent": None, "max_model_len": 1024}
    data = v.list_cards({"object": "list", "data": [base]})["data"]
    assert data[0] == base
    assert data[1]["id"] == "off" and data[1]["parent"] == "base" and data[1]["root"] == "/models/base"
    assert data[1]["steering"] == [{"circuit": "refusal", "mode": "scale", "multiplier": 0.0}]
    assert data[1]["max_model_len"] == 1024 and data[1]["object"] == "model"


# --------------------------------------------------------------------------- HTTP
@pytest.fixture
def client():
    from cna_vllm.server.routes import router

    async def echo_body(request: Request) -> JSONResponse:
        data = json.loads(await request.body())  # as text: a "model" inside a JSON string is never renamed
        return JSONResponse({"model": data.get("model"), "received": json.dumps(data, separators=(",", ":"))})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "base", "object": "model", "parent": None}]})

    app = FastAPI(middleware=[Middleware(SteeringMiddleware)])
    app.include_router(router)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/x"):
        app.add_api_route(path, echo_body, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    catalog = Catalog(dict(CIRCUITS), {}, "/m", "base", 2)
    variants = Variants("base", frozenset({"base"}))
    variants.add("off", SteeringSpec.parse("refusal@0"))
    app.state.cna_steering = ServerState(catalog, SteeringLimits(), SpecGate(2), metrics(), variants=variants)
    return TestClient(app)


def test_model_name_is_rewritten_to_the_base_model_and_its_spec(client):
    r = client.post("/v1/chat/completions", json={"model": "off", "messages": []})
    assert r.status_code == 200, r.text
    got = r.json()
    got["received"] = json.loads(got["received"])
    assert got["received"]["model"] == "base" and "steering" not in got["received"]
    assert SteeringSpec.parse(got["received"]["vllm_xargs"]["steering"]) == SteeringSpec.parse("refusal@0")
    assert got["model"] == "off"  # the answer names the variant again
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.headers["x-cna-steering"] == "refusal@0" and r.headers["x-cna-steered-model"] == "off"
    assert r.headers["x-cna-steering-fingerprint"] == SteeringSpec.parse("refusal@0").fingerprint()
    r = client.post("/v1/completions", json={"model": "off", "prompt": "x", "steering": "other@2:shift"})
    assert r.headers["x-cna-steering"] == "refusal@0,other@2:shift"
    r = client.post("/v1/completions", json={"model": "off", "prompt": "x", "steering": "nope@1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_circuit"
    for model in ("base", "unknown-model"):  # passed on untouched: vLLM answers unknown names with its 404
        r = client.post("/v1/completions", json={"model": model, "prompt": "x"})
        assert json.loads(r.json()["received"]) == {"model": model, "prompt": "x"}
        assert r.headers["x-cna-steering"] == "none"
    r = client.post("/v1/x", json={"model": "off"})  # another endpoint: not rewritten (vLLM: unknown model)
    assert json.loads(r.json()["received"]) == {"model": "off"}


def test_models_listing_and_run_time_add(client):
    data = client.get("/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("base", None), ("off", "base")]
    new = {"name": "amped", "steering": [{"circuit": "refusal", "multiplier": 3}]}
    r = client.post("/v1/steered-models", json=new)
    assert r.status_code == 403 and r.json()["error"]["code"] == "hot_load_not_enabled"
    client.app.state.cna_steering.hot_load_enabled = True
    r = client.post("/v1/steered-models", json=new)
    assert r.status_code == 201 and r.json()["status"] == "created" and r.json()["parent"] == "base", r.text
    r = client.post("/v1/steered-models", json=new)
    assert r.status_code == 200 and r.json()["status"] == "already_exists"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "off", "amped"]
    r = client.post("/v1/completions", json={"model": "amped", "prompt": "x"})
    assert r.headers["x-cna-steering"] == "refusal@3"
    for bad, code in [
        ({"name": "amped", "steering": "refusal@2"}, "model_exists"),
        ({"name": "base", "steering": "refusal@2"}, "model_exists"),
        ({"name": "bad name", "steering": "refusal@2"}, "invalid_model_name"),
        ({"name": "x", "steering": "nope@2"}, "unknown_circuit"),
        ({"name": "x", "steering": None}, "invalid_steering"),
        ({"name": "x"}, "invalid_request"),
        ({"name": "x", "steering": "refusal@1", "extra": 1}, "invalid_request"),
    ]:
        r = client.post("/v1/steered-models", json=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (bad, r.text)


@pytest.mark.slow
def test_start_up_flags_are_checked():
    pytest.importorskip("vllm")
    from cna_vllm.embedded import SMALL_MODEL
    from cna_vllm.server.args import make_parser, prepare_args

    def prepare(*flags: str):
        return prepare_args(make_parser().parse_args(["--model", SMALL_MODEL, *flags]))

    args = prepare("--steered-model", "off=refusal@0", "--steered-model", 'amped={"circuit":"refusal","multiplier":3}')
    assert [n for n, _ in args.cna_steered_models] == ["off", "amped"]
    for flags, msg in [
        (["--steered-model", "off=refusal@0", "--steered-model", "off=refusal@1"], "already taken"),
        (["--steered-model", f"{SMALL_MODEL}=refusal@0"], "already taken"),
        (["--served-model-name", "s", "--steered-model", "s=refusal@0"], "already taken"),
        (["--steered-model", "x=nope@1"], "--steered-model x: unknown circuit 'nope'"),
        (["--steered-model", "x"], "NAME=SPEC"),
    ]:
        with pytest.raises(SteeringError, match=msg):
            prepare(*flags)
