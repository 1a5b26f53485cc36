"""Server start-up (flags, CPU defaults) and the every-route API-key guard."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cna_vllm.errors import SteeringError
from cna_vllm.patches.server import GuardEveryRoute
from cna_vllm.server.args import CPU_MAX_MODEL_LEN, cpu_defaults, make_parser, prepare_args


@pytest.mark.parametrize(("flag", "value"), [("--max-steering-configs", "0"), ("--hot-load-neurons", "-1")])
def test_bad_capacity_flags_are_a_clear_error(flag, value):
    args = make_parser().parse_args([flag, value])
    with pytest.raises(SteeringError, match=f"{flag} must be at least"):
        prepare_args(args)


def test_cpu_defaults_size_the_kv_cache_and_context(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = make_parser().parse_args([])
    cpu_defaults(args)
    import os

    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4" and args.max_model_len == CPU_MAX_MODEL_LEN
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    args = make_parser().parse_args(["--max-model-len", "2048"])
    cpu_defaults(args)  # the user's choices win
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2" and args.max_model_len == 2048


def test_every_route_but_the_probes_needs_the_key():
    async def ok(request):
        return PlainTextResponse("ok")

    guarded = ["/invocations", "/tokenize", "/metrics", "/v1/models"]
    paths = [*guarded, "/health", "/ping", "/playground", "/playground/x.js"]
    app = Starlette(
        routes=[Route(p, ok, methods=["GET", "POST"]) for p in paths],
        middleware=[Middleware(GuardEveryRoute, tokens=["k"])],
    )
    client = TestClient(app)
    for p in ("/invocations", "/tokenize", "/metrics", "/v1/models"):
        assert client.post(p).status_code == 401 and client.get(p).json() == {"error": "Unauthorized"}
        assert client.post(p, headers={"Authorization": "Bearer k"}).status_code == 200
    for p in ("/health", "/ping", "/playground", "/playground/x.js"):
        assert client.get(p).status_code == 200


def test_hot_load_is_opt_in_and_needs_a_key_beyond_loopback():
    args = make_parser().parse_args(["--enable-hot-load", "--host", "0.0.0.0"])
    with pytest.raises(SteeringError, match="needs --api-key"):
        prepare_args(args)

    from fastapi import FastAPI

    from cna_vllm.engine.admission import SpecGate
    from cna_vllm.server.catalog import Catalog
    from cna_vllm.server.metrics import metrics
    from cna_vllm.server.routes import router
    from cna_vllm.server.state import ServerState
    from cna_vllm.steering import SteeringLimits

    app = FastAPI()
    app.include_router(router)
    catalog = Catalog({}, {}, "/m", "m", 2, hot_load_neurons=256)
    app.state.cna_steering = ServerState(catalog, SteeringLimits(), SpecGate(2), metrics())  # flag off
    r = TestClient(app).post("/v1/circuits", json={"path": "/etc/passwd"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "hot_load_not_enabled"
    app.state.cna_steering.hot_load_enabled = True
    app.state.cna_steering.hot_load_roots = ()  # no directory allowed: every path is outside
    for path in ("/etc/passwd", "/dev/zero", "/nonexistent"):
        r = TestClient(app).post("/v1/circuits", json={"path": path})
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"
