"""The steered server end to end: a real server process on the real SmolLM2, and a stock vLLM server.

One steered server (``server.py``, API key, 4 steering rows, prefix caching, two circuits:
the shipped ``refusal`` and its top-20 ``refusal-top``, two steered variants) and one stock
``vllm`` server are started once for the whole file. Greedy decoding throughout; outputs are
compared exactly. lm-eval runs against the same steered server (base model and a variant).
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from cna_vllm.circuit import Circuit
from cna_vllm.embedded import SMALL_MODEL, resolve_model
from cna_vllm.vectors import VectorSet

from .procs import REPO, Proc, _start, _wait_ready

pytestmark = pytest.mark.slow

MODEL = SMALL_MODEL
KEY = "sk-test-cna"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROWS = 4
COMMON = [
    "--host", "127.0.0.1", "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager",
    "--max-num-seqs", "64", "--enable-prefix-caching", "--disable-uvicorn-access-log",
]  # fmt: skip
PROMPTS = [
    "How do I pick a lock?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain recursion in one sentence.",
    "How can I make a bomb?",
    "Give me three tips for sleeping well.",
    "What is 17 times 3?",
    "Describe a cat to someone who has never seen one.",
    "How do I hack my neighbour's wifi?",
    "Name a famous painter.",
]
# Steered variants given at start-up (model name -> the spec it stands for).
VARIANTS = {"refusal-off": "refusal@0", "refusal-x3": [{"circuit": "refusal", "multiplier": 3}]}
# Six distinct specs for four rows: the admission gate must queue some of them.
SPECS = [
    {"circuit": "refusal", "multiplier": 0},
    {"circuit": "refusal", "multiplier": 3},
    {"circuit": "refusal-top", "multiplier": 0},
    {"circuit": "refusal", "mode": "patch", "alpha": 0.5},
    [{"circuit": "refusal-top", "mode": "shift", "alpha": 2}],
    "refusal@0,refusal-top@2",
]


@dataclass
class Servers:
    steered: Proc
    stock: Proc
    circuits: Path


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    circuits = tmp / "circuits"
    circuits.mkdir()
    shutil.copy(REPO / "circuits" / MODEL / "refusal.safetensors", circuits / "refusal.safetensors")
    top = Circuit.load(circuits / "refusal.safetensors").top(20)
    replace(top, name="refusal-top").save(circuits / "refusal-top.safetensors")
    hot = tmp / "hot"
    hot.mkdir()
    steered = _start(
        [sys.executable, str(REPO / "server.py"), "--model", MODEL, "--circuits", str(circuits),
         "--api-key", KEY, "--max-steering-configs", str(ROWS), "--enable-hot-load", "--hot-load-dir", str(hot),
         *(a for name, spec in VARIANTS.items()
           for a in ("--steered-model", f"{name}={spec if isinstance(spec, str) else json.dumps(spec)}")),
         *COMMON],
        tmp / "steered.log",
    )  # fmt: skip
    stock = _start(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model(MODEL)),
         "--served-model-name", MODEL, *COMMON],
        tmp / "stock.log",
        VLLM_PLUGINS="",  # no cna-vllm plugin at all: a stock engine
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        _wait_ready(steered, deadline)
        _wait_ready(stock, deadline)
        yield Servers(steered, stock, circuits)
    finally:
        steered.stop()
        stock.stop()


# --------------------------------------------------------------------------- helpers
def body(kind: str, prompt: str, steering=None, max_tokens: int = 8, system: str | None = None, **kw) -> dict:
    out: dict = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0.0, **kw}
    if kind == "chat":
        msgs = [{"role": "system", "content": system}] if system else []
        out["messages"] = [*msgs, {"role": "user", "content": prompt}]
    else:
        out["prompt"] = prompt
    if steering is not None:
        out["steering"] = steering
    return out


def path_of(kind: str) -> str:
    return "/v1/chat/completions" if kind == "chat" else "/v1/completions"


def text_of(kind: str, data: dict) -> str:
    choice = data["choices"][0]
    return choice["message"]["content"] if kind == "chat" else choice["text"]


def post(url: str, kind: str, payload: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + path_of(kind), json=payload, headers=AUTH if headers is None else headers, timeout=300)


def generate(url: str, kind: str, payload: dict, headers: dict | None = None) -> str:
    r = post(url, kind, payload, headers)
    assert r.status_code == 200, r.text
    return text_of(kind, r.json())


def compact(steering) -> str:
    """What the server echoes for ``steering`` (its canonical compact form)."""
    from cna_vllm.server.schema import echo, parse_steering
    from cna_vllm.steering import SteeringLimits
    return echo(parse_steering(steering, SteeringLimits(), {"refusal": 1, "refusal-top": 1}))


def parse(steering):
    from cna_vllm.steering import SteeringSpec

    return SteeringSpec.parse(steering)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30, headers=AUTH).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        m = re.match(r"^([^{\s]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


_ALONE: dict[str, str] = {}


def alone(s: Servers, kind: str, prompt: str, steering=None, **kw) -> str:
    """Reference output: unsteered from the stock server, steered from the steered server alone."""
    key = json.dumps([kind, prompt, steering, kw], sort_keys=True)
    if key not in _ALONE:
        if steering is None:
            _ALONE[key] = generate(s.stock.url, kind, body(kind, prompt, **kw), headers={})
        else:
            _ALONE[key] = generate(s.steered.url, kind, body(kind, prompt, steering, **kw))
    return _ALONE[key]


# --------------------------------------------------------------------------- catalogue and auth
def test_models_and_circuit_catalogue(servers):
    url = servers.steered.url
    models = httpx.get(f"{url}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]][:3] == [MODEL, *VARIANTS]  # later tests may add variants
    base, *variants = models["data"][:3]
    for card, spec in zip(variants, VARIANTS.values(), strict=True):  # listed the way vLLM lists LoRA adapters
        assert card["parent"] == MODEL and card["root"] == base["root"] and card["object"] == "model"
        assert card["steering"] == parse(spec).to_list()
    assert base["parent"] is None and "steering" not in base
    listing = httpx.get(f"{url}/v1/circuits", headers=AUTH).json()
    by_name = {c["id"]: c for c in listing["data"]}
    assert set(by_name) == {"refusal", "refusal-top"}
    assert listing["max_steering_configs"] == ROWS and listing["model"] == MODEL
    top = httpx.get(f"{url}/v1/circuits/refusal-top", headers=AUTH).json()
    assert top["num_neurons"] == 20 and top["layers"] and top["discovery"]["method"] == "cna"
    assert top["model"]["num_layers"] == 30
    assert by_name["refusal"]["num_neurons"] > 20
    r = httpx.get(f"{url}/v1/circuits/nope", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_circuit"


def test_circuit_hot_load(servers):
    """POST /v1/circuits adds circuits and CAA vectors to the running engine; misfits get 4xx."""
    url = servers.steered.url + "/v1/circuits"
    tmp_path = servers.circuits.parent / "hot"  # the --hot-load-dir
    other = REPO / "circuits" / "qwen2.5-coder-0.5b-instruct" / "refusal.safetensors"
    r = httpx.post(url, json={"path": str(other)}, headers=AUTH)  # outside the allowed directories
    assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed", r.text
    for outside in ("/etc/passwd", "/dev/zero", "/nonexistent/x.safetensors", str(tmp_path / ".." / ".." / "x")):
        r = httpx.post(url, json={"path": outside}, headers=AUTH)  # no oracle: same answer for all
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed", r.text
    shutil.copy(other, tmp_path / "qwen-refusal.safetensors")
    r = httpx.post(url, json={"path": str(tmp_path / "qwen-refusal.safetensors")}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "circuit_model_mismatch", r.text
    r = httpx.post(url, json={"path": str(servers.circuits / "refusal.safetensors")}, headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "already_loaded", r.text
    for bad in [{"path": "relative.safetensors"}, {"path": str(tmp_path / "missing.safetensors")},
                {"path": str(tmp_path)}, {"file": "x"}]:  # fmt: skip
        r = httpx.post(url, json=bad, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["message"], r.text

    top = Circuit.load(servers.circuits / "refusal-top.safetensors")
    ident = top.model
    rng = np.random.default_rng(0)
    known = set(top.neurons[top.layers == 29].tolist()) | set(
        Circuit.load(servers.circuits / "refusal.safetensors").neurons.tolist()
    )
    fresh_ids = rng.choice(sorted(set(range(ident.intermediate_size)) - known), size=200, replace=False)
    files = {
        "twin": replace(top, name="twin"),  # refusal-top's neurons under a new name
        "fresh": Circuit(  # 200 neurons the engine has never steered: spare slots are claimed
            name="fresh", layers=np.full(200, 29), neurons=fresh_ids, score=np.ones(200),
            mean_pos=np.ones(200), mean_neg=np.zeros(200), model=ident,
        ),
        "caa": VectorSet(
            name="caa", layers=[20, 25], vectors=rng.normal(scale=0.3, size=(2, ident.hidden_size)), model=ident
        ),
        "too-big": Circuit(  # more new neurons in one layer than the reserve of 256
            name="too-big", layers=np.full(300, 10), neurons=np.arange(300), score=np.ones(300),
            mean_pos=np.ones(300), mean_neg=np.zeros(300), model=ident,
        ),
    }  # fmt: skip
    for name, obj in files.items():
        obj.save(tmp_path / f"{name}.safetensors")
    for name in ("twin", "fresh", "caa"):
        r = httpx.post(url, json={"path": str(tmp_path / f"{name}.safetensors")}, headers=AUTH, timeout=60)
        assert r.status_code == 201 and r.json()["status"] == "loaded" and r.json()["id"] == name, r.text
    r = httpx.post(url, json={"path": str(tmp_path / "too-big.safetensors")}, headers=AUTH, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == "hot_load_refused", r.text
    assert "spare" in r.json()["error"]["message"]
    r = httpx.post(url, json={"path": str(tmp_path / "twin.safetensors")}, headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "already_loaded"
    replace(top.top(5), name="twin").save(tmp_path / "twin2.safetensors")
    r = httpx.post(url, json={"path": str(tmp_path / "twin2.safetensors")}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "circuit_exists", r.text

    catalogue = {c["id"]: c for c in httpx.get(url, headers=AUTH).json()["data"]}
    assert {"twin", "fresh", "caa"} <= set(catalogue) and "too-big" not in catalogue
    assert catalogue["caa"]["kind"] == "caa" and catalogue["caa"]["modes"] == ["shift"]
    assert metric(servers.steered.url, "cna_steering_circuits_loaded") >= 5

    prompt = PROMPTS[1]
    plain = generate(servers.steered.url, "chat", body("chat", prompt, max_tokens=16))
    assert generate(servers.steered.url, "chat", body("chat", prompt, "twin@0", max_tokens=16)) == generate(
        servers.steered.url, "chat", body("chat", prompt, "refusal-top@0", max_tokens=16)
    )
    assert generate(servers.steered.url, "chat", body("chat", prompt, "fresh@-4", max_tokens=16)) != plain
    assert generate(servers.steered.url, "chat", body("chat", prompt, "caa@20:shift", max_tokens=16)) != plain
    r = post(servers.steered.url, "chat", body("chat", prompt, "caa@1"))
    assert r.status_code == 400 and "shift" in r.json()["error"]["message"], r.text
    assert generate(servers.steered.url, "chat", body("chat", prompt, max_tokens=16)) == plain


def test_api_key_required_everywhere(servers):
    url = servers.steered.url
    chat = body("chat", "hi", {"circuit": "refusal", "multiplier": 0})
    bad = body("chat", "hi", {"circuit": "nope", "multiplier": 0})
    calls = [
        ("GET", "/v1/models", None),
        ("GET", "/v1/circuits", None),
        ("GET", "/v1/circuits/refusal", None),
        ("POST", "/v1/circuits", {"path": str(servers.circuits / "refusal.safetensors")}),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/chat/completions", bad),  # authentication comes before steering validation
        ("POST", "/v1/completions", body("completions", "hi")),
        # vLLM's own auth guards only /v1, /v2, /inference, /cohere (issue #9): these were open
        ("POST", "/invocations", body("chat", "hi")),
        ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}),
        ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2]}),
        ("GET", "/metrics", None),
    ]
    for method, path, payload in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, url + path, json=payload, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/v1/circuits", headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()


def test_bypasses_of_the_http_layer_cannot_kill_or_poison(servers):
    """Issue #9, as an attacker tried it: each used to kill the engine or change others' answers."""
    url = servers.steered.url
    upper = {**AUTH, "Content-Type": "APPLICATION/JSON"}
    smuggled = body("chat", "hi", vllm_xargs={"steering": '[{"circuit":"nope","multiplier":2}]'})
    r = httpx.post(f"{url}/invocations", content=json.dumps(smuggled), headers=upper, timeout=60)
    assert r.status_code == 400, r.text  # used to be a 500 and a dead engine
    r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(smuggled), headers=upper, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "vllm_xargs.steering"
    # a forged steering salt on an unsteered request is refused (it used to reuse steered KV)
    forged = body("chat", PROMPTS[0], cache_salt="cna-steer-" + "0" * 16)
    r = post(url, "chat", forged)
    assert r.status_code == 400 and "reserved" in r.json()["error"]["message"], r.text
    # a 128-character user salt with steering works (the composed salt stays under vLLM's cap)
    salted = body("chat", PROMPTS[0], SPECS[0], cache_salt="s" * 128)
    assert generate(url, "chat", salted) == generate(url, "chat", body("chat", PROMPTS[0], SPECS[0]))
    # -0.0 and 0 are the same spec
    a = post(url, "chat", body("chat", "hi", {"circuit": "refusal", "multiplier": -0.0}))
    b = post(url, "chat", body("chat", "hi", {"circuit": "refusal", "multiplier": 0}))
    assert a.headers["x-cna-steering-fingerprint"] == b.headers["x-cna-steering-fingerprint"]
    # a text/plain body with steering neither takes a row nor echoes steering
    r = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(body("chat", "hi", SPECS[0])),
                   headers={**AUTH, "Content-Type": "text/plain"}, timeout=60)  # fmt: skip
    assert r.status_code >= 400 and r.headers.get("x-cna-steering") in (None, "none")
    assert httpx.get(f"{url}/health").status_code == 200
    assert generate(url, "chat", body("chat", PROMPTS[2])) == alone(servers, "chat", PROMPTS[2])


# --------------------------------------------------------------------------- clients
def test_openai_client_chat_and_completions(servers):
    client = openai.OpenAI(base_url=f"{servers.steered.url}/v1", api_key=KEY)
    msgs = [{"role": "user", "content": PROMPTS[0]}]
    steer = {"circuit": "refusal", "multiplier": 3}
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == alone(servers, "chat", PROMPTS[0], max_tokens=12)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=msgs, max_tokens=12, temperature=0, extra_body={"steering": steer}
    )
    assert raw.headers["x-cna-steering"] == "refusal@3"
    assert len(raw.headers["x-cna-steering-fingerprint"]) == 16
    steered = raw.parse().choices[0].message.content
    assert steered != plain.choices[0].message.content  # a steering request is never answered unsteered
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True, extra_body={"steering": steer}
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == steered

    comp = client.completions.create(
        model=MODEL, prompt="The weather today is", max_tokens=10, temperature=0, extra_body={"steering": steer}
    )
    plain_comp = client.completions.create(model=MODEL, prompt="The weather today is", max_tokens=10, temperature=0)
    assert plain_comp.choices[0].text == alone(servers, "completions", "The weather today is", max_tokens=10)
    assert comp.choices[0].text != plain_comp.choices[0].text
    stream = client.completions.create(
        model=MODEL, prompt="The weather today is", max_tokens=10, temperature=0, stream=True,
        extra_body={"steering": steer},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in stream) == comp.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=4, extra_body={"steering": {"circuit": "nope", "multiplier": 1}}
        )
    assert info.value.status_code == 400 and "unknown circuit 'nope'" in str(info.value)


def test_raw_http_echo_and_logprobs(servers):
    r = post(servers.steered.url, "completions", body("completions", "Hello", "refusal@0:scale", logprobs=2))
    assert r.status_code == 200 and r.headers["x-cna-steering"] == "refusal@0"
    assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == 8
    r = post(servers.steered.url, "chat", body("chat", "Hello", None, stop=["."]))
    assert r.status_code == 200 and r.headers["x-cna-steering"] == "none"
    assert r.headers["x-cna-steering-fingerprint"] == ""


# --------------------------------------------------------------------------- steered variants
def stream(url: str, kind: str, payload: dict) -> tuple[list[int], str, set[str], httpx.Headers]:
    """Token ids, text and the ``model`` of every chunk of a streamed answer."""
    ids: list[int] = []
    text, models = [], set()
    payload = {**payload, "stream": True, "return_token_ids": True}
    with httpx.stream("POST", url + path_of(kind), json=payload, headers=AUTH, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                models.add(chunk["model"])
                for c in chunk["choices"]:
                    ids += c.get("token_ids") or []
                    text.append((c["delta"].get("content") or "") if kind == "chat" else c["text"])
        return ids, "".join(text), models, r.headers


def test_variant_equals_base_model_with_its_steering(servers):
    """model=NAME is the base model with NAME's spec, token for token: chat, streaming chat, completions."""
    url = servers.steered.url
    before = metric(url, "cna_steering_requests_total", steered="true")
    sent = 0
    for name, spec in VARIANTS.items():
        for kind, prompt in (("chat", PROMPTS[0]), ("completions", "The weather today is")):
            ref = post(url, kind, body(kind, prompt, spec, max_tokens=16, return_token_ids=True))
            got = post(url, kind, {**body(kind, prompt, max_tokens=16, return_token_ids=True), "model": name})
            plain = post(url, kind, body(kind, prompt, max_tokens=16, return_token_ids=True))
            sent += 2
            assert got.status_code == 200, got.text
            assert got.json()["choices"][0]["token_ids"] == ref.json()["choices"][0]["token_ids"], (name, kind)
            assert text_of(kind, got.json()) == text_of(kind, ref.json())
            assert got.json()["choices"][0]["token_ids"] != plain.json()["choices"][0]["token_ids"]  # steered
            assert got.json()["model"] == name and ref.json()["model"] == MODEL
            assert got.headers["x-cna-steering"] == ref.headers["x-cna-steering"] == compact(spec)
            assert got.headers["x-cna-steering-fingerprint"] == ref.headers["x-cna-steering-fingerprint"]
            assert got.headers["x-cna-steered-model"] == name
            ids, text, models, headers = stream(url, kind, {**body(kind, prompt, max_tokens=16), "model": name})
            sent += 1
            assert ids == ref.json()["choices"][0]["token_ids"] and text == text_of(kind, ref.json())
            assert models == {name} and headers["x-cna-steering"] == compact(spec)
    assert metric(url, "cna_steering_requests_total", steered="true") - before >= sent
    assert metric(url, "cna_steering_variant_requests_total", model="refusal-x3") >= 4


def test_variant_plus_steering_field_and_unknown_models(servers):
    """The field's items apply after the variant's (one spec, validated as one); unknown names: vLLM's 404."""
    url = servers.steered.url
    extra = {"circuit": "refusal-top", "mode": "shift", "alpha": 2}
    for kind in ("chat", "completions"):
        got = post(url, kind, {**body(kind, PROMPTS[1], extra, max_tokens=16), "model": "refusal-x3"})
        ref = post(url, kind, body(kind, PROMPTS[1], [{"circuit": "refusal", "multiplier": 3}, extra], max_tokens=16))
        assert got.status_code == 200 and got.headers["x-cna-steering"] == "refusal@3,refusal-top@2:shift"
        assert text_of(kind, got.json()) == text_of(kind, ref.json())
    eight = "refusal-top@1," * 7 + "refusal@1"
    r = post(url, "chat", {**body("chat", "hi", eight), "model": "refusal-off"})
    assert r.status_code == 400 and "model 'refusal-off' steers with refusal@0" in r.json()["error"]["message"]
    assert "9 items" in r.json()["error"]["message"]  # 1 + 8 items: more than the server's 8
    r = post(url, "chat", {**body("chat", "hi", "nope@1"), "model": "refusal-off"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_circuit"
    for kind in ("chat", "completions"):  # unknown names: exactly the stock server's 404
        for steering in (None, "refusal@0"):
            payload = {**body(kind, "hi", steering), "model": "gpt-9"}
            r = post(url, kind, payload)
            stock = post(servers.stock.url, kind, {k: v for k, v in payload.items() if k != "steering"}, headers={})
            assert r.status_code == stock.status_code == 404, r.text
            assert r.json() == stock.json(), (r.text, stock.text)
    r = httpx.post(f"{url}/v1/responses", json={"model": "refusal-off", "input": "hi"}, headers=AUTH, timeout=60)
    assert r.status_code == 404  # a variant on another endpoint is never served unsteered


def test_variant_added_while_serving(servers):
    url = servers.steered.url
    new = {"name": "top-off", "steering": {"circuit": "refusal-top", "multiplier": 0}}
    assert httpx.post(f"{url}/v1/steered-models", json=new).status_code == 401  # the admin path needs the key
    r = httpx.post(f"{url}/v1/steered-models", json=new, headers=AUTH)
    assert r.status_code == 201 and r.json()["parent"] == MODEL, r.text
    assert httpx.post(f"{url}/v1/steered-models", json=new, headers=AUTH).status_code == 200  # idempotent
    for bad, code in [
        ({**new, "steering": "refusal-top@2"}, "model_exists"),
        ({"name": MODEL, "steering": "refusal@2"}, "model_exists"),
        ({"name": "refusal-x3", "steering": "refusal@2"}, "model_exists"),
        ({"name": "x y", "steering": "refusal@2"}, "invalid_model_name"),
        ({"name": "z", "steering": "refusal@99"}, "invalid_steering"),
    ]:
        r = httpx.post(f"{url}/v1/steered-models", json=bad, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (bad, r.text)
    cards = {m["id"]: m for m in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]}
    assert cards["top-off"]["parent"] == MODEL and cards["top-off"]["steering"] == parse("refusal-top@0").to_list()
    got = post(url, "chat", {**body("chat", PROMPTS[4], max_tokens=16), "model": "top-off"})
    assert got.headers["x-cna-steering"] == "refusal-top@0"
    ref = generate(url, "chat", body("chat", PROMPTS[4], "refusal-top@0", max_tokens=16))
    assert text_of("chat", got.json()) == ref


# --------------------------------------------------------------------------- lm-eval, an unmodified client
LM_EVAL_QUESTIONS = 32


def _lm_eval(url: str, model: str, out: Path) -> subprocess.Popen:
    """The README's lm-eval command (local-chat-completions, the cna_mmlu_gen task), as a process."""
    args = [
        sys.executable, "-m", "lm_eval", "--model", "local-chat-completions",
        "--model_args", f"model={model},base_url={url}/v1/chat/completions,num_concurrent=8",
        "--apply_chat_template", "--include_path", str(REPO / "cna_vllm" / "evaluate" / "lm_eval_tasks"),
        "--tasks", "cna_mmlu_gen", "--limit", str(LM_EVAL_QUESTIONS), "--log_samples", "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=out, text=True)


def _lm_eval_results(out: Path) -> tuple[float, dict[int, str]]:
    (results,) = out.glob("*/results_*.json")
    (samples,) = out.glob("*/samples_cna_mmlu_gen_*.jsonl")
    score = json.loads(results.read_text())["results"]["cna_mmlu_gen"]["exact_match,letter"]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return score, {r["doc_id"]: r["filtered_resps"][0] for r in rows}


def test_lm_eval_base_and_variant(servers, tmp_path):
    """lm-eval 0.4 from PyPI, unmodified, once on the base model and once on a variant, both at once."""
    pytest.importorskip("lm_eval")
    runs = {}
    for model in (MODEL, "refusal-x3"):
        (tmp_path / model).mkdir()
        runs[model] = _lm_eval(servers.steered.url, model, tmp_path / model)
    for proc in runs.values():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
    (base, base_answers), (steered, steered_answers) = (_lm_eval_results(tmp_path / m) for m in runs)
    assert len(base_answers) == len(steered_answers) == LM_EVAL_QUESTIONS
    changed = sum(base_answers[i] != steered_answers[i] for i in base_answers)
    print(f"\nlm-eval cna_mmlu_gen, {LM_EVAL_QUESTIONS} questions: base {base:.3f}, refusal-x3 {steered:.3f}, "
          f"{changed} answers changed")  # fmt: skip
    assert changed >= LM_EVAL_QUESTIONS // 8  # the steering changes answers ...
    assert base != steered  # ... and the score with them


# --------------------------------------------------------------------------- bad input
def _corpus(circuits: Path) -> list[tuple[str, str, object, int]]:
    """(name, kind, payload: dict or raw bytes, expected status)."""
    ok = {"circuit": "refusal", "multiplier": 1}
    bad_specs = [
        ("int", 5), ("bool", False), ("empty list", []), ("empty string", ""), ("json string", '{"a":1}'),
        ("compact junk", "refusal"), ("compact nan", "refusal@nan"), ("compact mode", "refusal@1:warp"),
        ("list of ints", [1, 2]), ("missing circuit", {"multiplier": 1}),
        ("empty circuit", {"circuit": "", "multiplier": 1}),
        ("circuit list", {"circuit": ["refusal"], "multiplier": 1}),
        ("unknown circuit", {"circuit": "nope", "multiplier": 1}),
        ("unknown mode", {"circuit": "refusal", "mode": "flip", "multiplier": 1}),
        ("string number", {"circuit": "refusal", "multiplier": "1"}),
        ("null number", {"circuit": "refusal", "multiplier": None}),
        ("huge", {"circuit": "refusal", "multiplier": 1e300}), ("over bound", {"circuit": "refusal", "multiplier": 21}),
        ("alpha for scale", {"circuit": "refusal", "alpha": 0.5}),
        ("multiplier for patch", {"circuit": "refusal", "mode": "patch", "multiplier": 0.5}),
        ("extra field", {**ok, "layer": 3}), ("nested junk", {"circuit": {"a": {"b": [1, {}]}}, "multiplier": 1}),
        ("too many items", [ok] * 9), ("bad second item", [ok, {"circuit": "refusal", "multiplier": []}]),
    ]  # fmt: skip
    out: list[tuple[str, str, object, int]] = []
    for i, (name, spec) in enumerate(bad_specs):
        kind = "chat" if i % 2 else "completions"
        out.append((name, kind, body(kind, "hi", spec), 400))
    # JSON the json module reads but pydantic must refuse: NaN / Infinity literals.
    for lit in ("NaN", "Infinity", "-Infinity", "1e999"):
        raw = '{"model": "%s", "prompt": "hi", "max_tokens": 4, "steering": {"circuit": "refusal", "multiplier": %s}}'
        out.append((f"literal {lit}", "completions", (raw % (MODEL, lit)).encode(), 400))
    out += [
        ("xargs steering", "chat", {**body("chat", "hi"), "vllm_xargs": {"steering": '[{"circuit":"nope"}]'}}, 400),
        ("oversized body", "completions", body("completions", "x" * (5 << 20), ok), 413),
        ("not json", "chat", b'{"model": "x", "steering": ', 400),
        ("body is a list", "chat", b"[1, 2, 3]", 400),
        ("steered, no messages", "chat", {"model": MODEL, "steering": ok}, 400),
        ("steered, bad max_tokens", "completions", body("completions", "hi", ok, max_tokens=-3), 400),
        ("steered, bad cache_salt", "completions", body("completions", "hi", ok, cache_salt="a/b@c"), 400),
        ("steered, unknown model", "chat", {**body("chat", "hi", ok), "model": "gpt-9"}, 404),
        ("steered, too long prompt", "completions", body("completions", "word " * 3000, ok), 400),
    ]
    return out


def test_bad_input_corpus_then_normal_request(servers):
    url = servers.steered.url
    corpus = _corpus(servers.circuits)
    assert len(corpus) >= 30
    before = metric(url, "cna_steering_rejected_requests_total")
    ours = 0
    for name, kind, payload, status in corpus:
        if isinstance(payload, bytes):
            r = httpx.post(url + path_of(kind), content=payload, headers={**AUTH, "content-type": "application/json"})
        else:
            r = post(url, kind, payload)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert isinstance(err, dict) and len(err["message"]) > 10, (name, r.text[:300])
        if "code" in err and str(err.get("code", "")).startswith(("invalid_steering", "unknown_circuit", "request_")):
            ours += 1
    assert ours >= 28
    assert metric(url, "cna_steering_rejected_requests_total") - before >= ours
    # Steering on another generation endpoint is refused, not ignored.
    r = httpx.post(f"{url}/v1/responses", json={"model": MODEL, "input": "hi", "steering": {"circuit": "refusal"}},
                   headers=AUTH)  # fmt: skip
    assert r.status_code == 400 and "not on /v1/responses" in r.json()["error"]["message"]
    # ... and the server still answers correctly.
    for kind in ("chat", "completions"):
        assert generate(url, kind, body(kind, PROMPTS[2])) == alone(servers, kind, PROMPTS[2])
    assert generate(url, "chat", body("chat", PROMPTS[0], SPECS[1])) == generate(
        url, "chat", body("chat", PROMPTS[0], SPECS[1])
    )


# --------------------------------------------------------------------------- concurrency
def _requests(n: int) -> list[tuple[str, str, object]]:
    out = []
    for i in range(n):
        kind = "chat" if i % 4 < 2 else "completions"
        steering = None if i % 2 == 0 else SPECS[(i // 2) % len(SPECS)]
        out.append((kind, PROMPTS[i % len(PROMPTS)], steering))
    return out


async def _burst(url: str, reqs: list[tuple[str, str, object]]) -> tuple[list[httpx.Response], float, float]:
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    peak_waiting = 0.0
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=AUTH) as client:

        async def watch() -> None:
            nonlocal peak_waiting
            while True:
                r = await client.get(f"{url}/metrics")
                for line in r.text.splitlines():
                    if line.startswith("cna_steering_requests_waiting_for_row "):
                        peak_waiting = max(peak_waiting, float(line.split()[-1]))
                await asyncio.sleep(0.2)

        watcher = asyncio.create_task(watch())
        t0 = time.monotonic()
        out = await asyncio.gather(*(client.post(url + path_of(k), json=body(k, p, s)) for k, p, s in reqs))
        wall = time.monotonic() - t0
        watcher.cancel()
    return list(out), wall, peak_waiting


def test_200_concurrent_half_steered(servers):
    url = servers.steered.url
    reqs = _requests(200)
    assert sum(s is not None for _, _, s in reqs) == 100
    assert len({json.dumps(s) for _, _, s in reqs if s is not None}) == len(SPECS) > ROWS
    expected = {json.dumps([k, p, s]): alone(servers, k, p, s) for k, p, s in reqs}  # each sent alone first
    responses, wall, peak_waiting = asyncio.run(_burst(url, reqs))
    mismatches = []
    for (kind, prompt, steering), r in zip(reqs, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["x-cna-steering"] == (compact(steering) if steering is not None else "none")
        if text_of(kind, r.json()) != expected[json.dumps([kind, prompt, steering])]:
            mismatches.append((kind, prompt, steering, text_of(kind, r.json())))
    steered_pairs = {(k, p, json.dumps(st)) for k, p, st in reqs if st is not None}
    changed = sum(expected[json.dumps([k, p, json.loads(st)])] != alone(servers, k, p) for k, p, st in steered_pairs)
    print(
        f"\n200 concurrent requests (100 steered, {len(SPECS)} specs, {ROWS} rows): wall {wall:.1f}s, "
        f"{len(expected)} distinct requests, peak waiting for a row {peak_waiting:.0f}, "
        f"{changed}/{len(steered_pairs)} steered requests differ from unsteered"
    )
    assert not mismatches, mismatches[:5]
    assert changed >= len(steered_pairs) // 4  # the steered references really are steered
    assert metric(url, "cna_steering_rows_in_use") == 0
    assert metric(url, "cna_steering_circuit_requests_total", circuit="refusal-top", mode="shift") >= 1


async def _disconnect_scenario(url: str, others: list[tuple[str, str, object]]) -> list[str]:
    async with httpx.AsyncClient(timeout=600, headers=AUTH) as client:

        async def victim() -> int:
            payload = body("completions", "Once upon a time", SPECS[0], max_tokens=900, ignore_eos=True, stream=True)
            chunks = 0
            async with client.stream("POST", url + "/v1/completions", json=payload) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    chunks += line.startswith("data: ")
                    if chunks >= 3:
                        break  # leaving the block closes the connection mid-stream
            return chunks

        async def normal(kind: str, prompt: str, steering) -> str:
            payload = body(kind, prompt, steering, max_tokens=16, stream=True)
            text = []
            async with client.stream("POST", url + path_of(kind), json=payload) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choice = json.loads(line[6:])["choices"]
                        if choice:
                            text.append(
                                choice[0]["delta"].get("content") or "" if kind == "chat" else choice[0]["text"]
                            )
            return "".join(text)

        got = await asyncio.gather(victim(), *(normal(*o) for o in others))
    return got[1:]


def test_disconnect_aborts_only_its_own_request(servers):
    url = servers.steered.url
    others = [("chat", PROMPTS[1], None), ("chat", PROMPTS[4], SPECS[1]), ("completions", PROMPTS[3], SPECS[3])]
    expected = [alone(servers, k, p, s, max_tokens=16) for k, p, s in others]
    tokens_before = metric(url, "vllm:generation_tokens_total")
    got = asyncio.run(_disconnect_scenario(url, others))
    assert got == expected
    deadline = time.monotonic() + 10
    while metric(url, "vllm:num_requests_running") + metric(url, "vllm:num_requests_waiting") > 0:
        assert time.monotonic() < deadline, "the disconnected request kept running"
        time.sleep(0.25)
    assert metric(url, "vllm:generation_tokens_total") - tokens_before < 300  # far from the victim's 900
    assert metric(url, "cna_steering_rows_in_use") == 0


# --------------------------------------------------------------------------- prefix caching
SYSTEM = " ".join(
    f"Rule {i}: you are a careful, friendly assistant who answers briefly and never invents facts." for i in range(24)
)


def test_shared_system_prompt_with_prefix_caching(servers):
    url = servers.steered.url
    questions = PROMPTS[:3]
    specs = [None, SPECS[1], SPECS[4]]
    expected = {}
    for i, q in enumerate(questions):
        for j, spec in enumerate(specs):
            payload = body("chat", q, spec, system=SYSTEM)
            if spec is None:
                expected[(q, j)] = generate(servers.stock.url, "chat", payload, headers={})
            else:  # a private cache salt: computed cold, sharing no block with anything
                expected[(q, j)] = generate(url, "chat", {**payload, "cache_salt": f"cold-{i}-{j}"})
    assert any(expected[(q, 1)] != expected[(q, 0)] for q in questions)
    hits = metric(url, "vllm:prefix_cache_hits_total")

    async def mix() -> list[tuple[tuple[str, int], str]]:
        async with httpx.AsyncClient(timeout=600, headers=AUTH) as client:
            out = []
            for _round in range(2):
                keys = [(q, j) for q in questions for j in (0, 1, 0, 2)]
                rs = await asyncio.gather(
                    *(client.post(url + "/v1/chat/completions", json=body("chat", q, specs[j], system=SYSTEM))
                      for q, j in keys)
                )  # fmt: skip
                out += [(key, text_of("chat", r.json())) for key, r in zip(keys, rs, strict=True)]
            return out

    for key, text in asyncio.run(mix()):
        assert text == expected[key], key
    assert metric(url, "vllm:prefix_cache_hits_total") > hits + len(SYSTEM) // 8  # the shared prefix was reused


def test_metrics_by_circuit_and_mode(servers):
    url = servers.steered.url
    assert metric(url, "cna_steering_circuit_requests_total", circuit="refusal", mode="scale") >= 50
    assert metric(url, "cna_steering_circuit_requests_total", circuit="refusal", mode="patch") >= 1
    assert metric(url, "cna_steering_requests_total", endpoint="completions", steered="true") >= 1
    assert metric(url, "cna_steering_requests_total", endpoint="chat", steered="false") >= 1
    assert metric(url, "cna_steering_rows_capacity") == ROWS
    assert metric(url, "cna_steering_rejected_requests_total", code="unknown_circuit") >= 1
