"""Never silently unsteered (issue #24): the body guards in front of a small echo app.

The echo app stands where vLLM's handlers are: it answers what it received, or a 400 when the
prompt says ``fail`` (an error vLLM would answer after the middleware let the request in).
"""

import asyncio
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
from cna_vllm.server.guards import MAX_JSON_DEPTH, is_steering_like
from cna_vllm.server.metrics import metrics
from cna_vllm.server.middleware import SteeringMiddleware
from cna_vllm.server.state import ServerState
from cna_vllm.steering import SteeringLimits, SteeringSpec

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/x", "/v1/circuits", "/v1/steered-models")


async def echo_body(request: Request) -> JSONResponse:
    data = json.loads(await request.body())
    if isinstance(data, dict) and data.get("prompt") == "fail":
        return JSONResponse({"error": {"message": "vLLM said no"}}, status_code=400)
    return JSONResponse({"received": data})


def make_app(gate: SpecGate | None = None) -> Starlette:
    app = Starlette(
        routes=[Route(p, echo_body, methods=["POST"]) for p in PATHS],
        middleware=[Middleware(SteeringMiddleware)],
    )
    catalog = Catalog({"refusal": object()}, {}, "/m", "m", 2)
    app.state.cna_steering = ServerState(catalog, SteeringLimits(), gate or SpecGate(2), metrics(), 1 << 20)
    return app


@pytest.fixture
def client():
    return TestClient(make_app())


def nested(depth: int) -> dict:
    """A chat body whose JSON nests ``depth`` levels (the body object is level 1)."""
    inner: object = "x"
    for _ in range(depth - 3):
        inner = [inner]
    return {"messages": [{"role": "user", "content": "hi", "extra": inner}], "steering": "refusal@1"}


def test_no_500_at_any_nesting_depth(client):
    """A body of depth ~978 used to pass json.loads and fail in json.dumps: HTTP 500."""
    statuses = {}
    for depth in [*range(MAX_JSON_DEPTH - 2, MAX_JSON_DEPTH + 3), 500, 977, 978, 979, 980, 990, 1500, 5000]:
        body = json.dumps(nested(depth)) if depth < 900 else _deep_text(depth)
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        statuses[depth] = r.status_code
        assert r.status_code < 500, (depth, r.text)
    assert statuses[MAX_JSON_DEPTH] == 200 and statuses[MAX_JSON_DEPTH + 1] == 400
    assert all(statuses[d] == 400 for d in (500, 978, 979, 5000))


def _deep_text(depth: int) -> str:
    """The same body as text (json.dumps itself cannot write it past ~980 levels)."""
    return (
        '{"messages": [{"role": "user", "content": "hi", "extra": ' + "[" * (depth - 3) + '"x"' + "]" * (depth - 3)
        + '}], "steering": "refusal@1"}'
    )


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"prompt": "x", "Steering": "refusal@0"}, "Steering"),
        ({"prompt": "x", "STEERING": "refusal@0"}, "STEERING"),
        ({"prompt": "x", "steering_spec": "refusal@0"}, "steering_spec"),
        ({"messages": [{"role": "user", "content": "x", "steering": "refusal@0"}]}, "messages[0].steering"),
        ({"prompt": "x", "metadata": {"steering": "refusal@0"}}, "metadata.steering"),
        ({"prompt": "x", "extra_args": {"steering": "refusal@0"}}, "extra_args.steering"),
        ({"prompt": "x", "chat_template_kwargs": {"steering": "refusal@0"}}, "chat_template_kwargs.steering"),
        ({"prompt": "x", "vllm_xargs": {"Steering": "refusal@0"}}, "vllm_xargs.Steering"),
        ({"prompt": "x", "st\u0065ering ": 1}, "steering "),
    ],
)
def test_steering_in_the_wrong_place_is_a_400_naming_the_right_one(client, payload, param):
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/x"):
        r = client.post(path, content=json.dumps(payload), headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        if path == "/v1/x" and err["code"] == "steering_unsupported_endpoint":
            continue  # a route that never steers refuses vllm_xargs / extra_args steering outright
        assert err["code"] == "misplaced_steering" and err["param"] == param
        assert "top-level 'steering' field" in err["message"]
        assert "x-cna-steering" not in r.headers


def test_steering_as_a_query_parameter_or_header_is_a_400(client):
    r = client.post("/v1/completions?steering=refusal@0", json={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering"
    for header in ("steering", "Steering", "X-Steering", "x-cna-steering"):
        r = client.post("/v1/completions", json={"prompt": "x"}, headers={header: "refusal@0"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "misplaced_steering", header
    assert client.post("/v1/completions?stream=false", json={"prompt": "x"}).status_code == 200


def test_other_unknown_fields_and_schemas_are_left_to_vllm(client):
    tool = {"type": "function", "function": {"name": "car", "parameters": {"properties": {"steering": {}}}}}
    payload = {"messages": [], "tools": [tool], "unknown_field": {"deep": [1, 2]}, "metadata": {"user": "steer-x"}}
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 200 and r.json()["received"] == payload
    assert is_steering_like("X-CNA-Steering") and not is_steering_like("steerable") and not is_steering_like("user")


def test_beam_search_with_steering_is_refused_not_dropped(client):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = client.post(path, json={"prompt": "x", "messages": [], "use_beam_search": True, "steering": "refusal@0"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "use_beam_search", r.text
        assert "x-cna-steering" not in r.headers
        r = client.post(path, json={"prompt": "x", "messages": [], "use_beam_search": True})
        assert r.status_code == 200  # unsteered beam search is vLLM's business
    r = client.post("/v1/completions", json={"prompt": "x", "n": 2, "steering": "refusal@0"})
    assert r.status_code == 200 and r.headers["x-cna-steering"] == "refusal@0"  # n > 1 keeps extra_args


def test_the_echo_is_only_on_answers_that_were_served(client):
    r = client.post("/v1/completions", json={"prompt": "fail", "steering": "refusal@0"})
    assert r.status_code == 400 and "x-cna-steering" not in r.headers and "x-cna-steering-fingerprint" not in r.headers
    r = client.post("/v1/completions", json={"prompt": "x", "steering": "nope@0"})
    assert r.status_code == 400 and "x-cna-steering" not in r.headers
    r = client.post("/v1/completions", json={"prompt": "ok", "steering": "refusal@0"})
    assert r.status_code == 200 and r.headers["x-cna-steering"] == "refusal@0"


def test_admin_routes_take_json_only_and_every_body_is_capped(client):
    for path in ("/v1/circuits", "/v1/steered-models"):
        r = client.post(path, content=b'{"path": "/x"}', headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = client.post(path, content=b'{"path": "/x"}')  # no content type at all
        assert r.status_code == 415
    big = b"x" * (5 << 20)
    for ctype in ("text/plain", "application/octet-stream", "application/json"):
        r = client.post("/v1/x", content=big, headers={"content-type": ctype})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", ctype


def test_a_client_that_leaves_while_queued_frees_its_place():
    """A real gate, full; the queued client disconnects: it leaves the queue, and its place serves the next one."""
    gate = SpecGate(1, max_waiting=1)
    app = make_app(gate)

    def request(spec: str, leave: asyncio.Event | None) -> tuple[asyncio.Task, list]:
        sent: list = []
        messages = [{"type": "http.request", "body": json.dumps({"prompt": "x", "steering": spec}).encode()}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await (leave or asyncio.Event()).wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json")], "app": app,
        }  # fmt: skip
        return asyncio.create_task(app(scope, receive, send)), sent

    async def until(cond) -> None:
        for _ in range(200):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def scenario() -> None:
        held = SteeringSpec.parse("refusal@5")
        await gate.acquire(held)  # the only row, held by another spec
        leave = asyncio.Event()
        first, first_sent = request("refusal@0", leave)
        await until(lambda: gate.waiting == 1)  # queued behind the full table
        leave.set()
        await asyncio.wait_for(first, 5)
        assert gate.waiting == 0 and first_sent == []  # out of the queue; nothing answered to a client gone
        second, second_sent = request("refusal@1", None)  # the one waiting place is free again: no 429
        await until(lambda: gate.waiting == 1)
        await gate.release(held)
        await asyncio.wait_for(second, 5)
        assert second_sent[0]["status"] == 200 and not gate.active

    asyncio.run(scenario())
