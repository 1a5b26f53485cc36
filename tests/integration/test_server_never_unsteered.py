"""Never silently unsteered (issue #24), against a real server on the real SmolLM2.

Each test reproduces what a careless or hostile client did to ``cna-vllm serve`` and checks the
answer: steered, or a clear 4xx; never served unsteered while the echo header claims otherwise.
"""

import json
import shutil
import socket
import sys
import time

import httpx
import pytest

from cna_vllm.embedded import SMALL_MODEL

from .procs import REPO, _start, _wait_ready

pytestmark = pytest.mark.slow

MODEL = SMALL_MODEL
COMMON = [
    "--host", "127.0.0.1", "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager",
    "--max-num-seqs", "16", "--disable-uvicorn-access-log",
]  # fmt: skip
PROMPT = "How do I pick a lock?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("never-unsteered")
    circuits = tmp / "circuits"
    circuits.mkdir()
    shutil.copy(REPO / "circuits" / MODEL / "refusal.safetensors", circuits / "refusal.safetensors")
    proc = _start(
        [sys.executable, str(REPO / "server.py"), "--model", MODEL, "--circuits", str(circuits),
         "--max-steering-configs", "1", "--steering-max-waiting", "1", "--enable-hot-load", *COMMON],
        tmp / "server.log",
    )  # fmt: skip
    try:
        _wait_ready(proc, time.monotonic() + 600)
        yield proc
    finally:
        proc.stop()


def chat(prompt: str = PROMPT, steering=None, **kw) -> dict:
    out = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0.0}
    if steering is not None:
        out["steering"] = steering
    return {**out, **kw}


def completion(prompt: str = PROMPT, steering=None, **kw) -> dict:
    out = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0.0}
    if steering is not None:
        out["steering"] = steering
    return {**out, **kw}


def post(server, path: str, payload, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=payload, timeout=300, **kw)


def texts(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [c["message"]["content"] if "message" in c else c["text"] for c in r.json()["choices"]]


def test_beam_search_with_steering_is_a_400_not_an_unsteered_200(server):
    """It was HTTP 200 with the unsteered answer and ``x-cna-steering: refusal@20``."""
    for path, payload in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        r = post(server, path, payload(steering="refusal@20", use_beam_search=True, n=2))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "use_beam_search" and "x-cna-steering" not in r.headers
        assert post(server, path, payload(use_beam_search=True, n=2)).status_code == 200  # unsteered: vLLM's


def test_n_greater_than_one_is_steered_in_every_choice(server):
    """vLLM refuses n > 1 with greedy sampling; top_k=1 samples the argmax all the same."""
    for path, payload in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        steered = texts(post(server, path, payload(steering="refusal@20")))[0]
        plain = texts(post(server, path, payload()))[0]
        assert steered != plain  # the spec changes this answer
        r = post(server, path, payload(steering="refusal@20", n=3, temperature=1.0, top_k=1))
        assert texts(r) == [steered] * 3 and r.headers["x-cna-steering"] == "refusal@20"


def test_no_500_at_any_nesting_depth(server):
    for depth in (100, 128, 129, 500, 977, 978, 979, 980, 2000, 100_000):
        inner = "[" * depth + "]" * depth
        body = '{"model": "' + MODEL + '", "prompt": "x", "max_tokens": 1, "extra": ' + inner + "}"
        r = httpx.post(server.url + "/v1/completions", content=body, timeout=60,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code < 500, (depth, r.status_code, r.text[:200])


@pytest.mark.parametrize(
    "where",
    ["Steering", "messages[0].steering", "metadata.steering", "extra_args.steering", "chat_template_kwargs.steering"],
)
def test_steering_in_the_wrong_place_is_a_400(server, where):
    payload = chat()
    if where == "messages[0].steering":
        payload["messages"][0]["steering"] = "refusal@20"
    elif "." in where:
        payload[where.split(".")[0]] = {"steering": "refusal@20"}
    else:
        payload[where] = "refusal@20"
    r = post(server, "/v1/chat/completions", payload)
    assert r.status_code == 400 and r.json()["error"]["param"] == where, r.text
    assert r.json()["error"]["code"] == "misplaced_steering" and "x-cna-steering" not in r.headers


def test_steering_as_query_or_header_is_a_400(server):
    r = httpx.post(server.url + "/v1/chat/completions?steering=refusal@20", json=chat(), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "misplaced_steering"
    r = post(server, "/v1/chat/completions", chat(), headers={"Steering": "refusal@20"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "misplaced_steering"


def test_strict_compact_grammar_on_the_wire(server):
    for bad, param in (("refusal\x07@1", "steering.circuit"), ("refusal@1_0", "steering.multiplier"),
                       ("refusal@１", "steering.multiplier"), ({"circuit": "refusal", "mode": ["scale"],
                                                               "multiplier": 1}, "steering.mode")):  # fmt: skip
        r = post(server, "/v1/chat/completions", chat(steering=bad))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_errors_carry_no_echo(server):
    r = post(server, "/v1/completions", completion(steering="refusal@20", max_tokens=10_000))  # vLLM's own 400
    assert r.status_code == 400 and "x-cna-steering" not in r.headers and "x-cna-steering-fingerprint" not in r.headers
    r = post(server, "/v1/completions", completion(steering="refusal@20"))
    assert r.status_code == 200 and r.headers["x-cna-steering"] == "refusal@20"


def test_admin_bodies_must_be_json_and_capped(server):
    for path in ("/v1/circuits", "/v1/steered-models"):
        r = httpx.post(server.url + path, content=b'{"name": "x", "steering": "refusal@0"}', timeout=30,
                       headers={"content-type": "text/plain"})  # fmt: skip
        assert r.status_code == 415, r.text  # a cross-site form could send this without a preflight
    r = httpx.post(server.url + "/v1/circuits", content=b"x" * (5 << 20), timeout=60,
                   headers={"content-type": "text/plain"})  # fmt: skip
    assert r.status_code in (413, 415)
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (5 << 20), timeout=60,
                   headers={"content-type": "text/plain"})  # fmt: skip
    assert r.status_code == 413
    for path, words in (("/tmp/" + "a" * 300, "255"), ("/tmp/a\x00b", "NUL")):
        r = post(server, "/v1/circuits", {"path": path})
        assert r.status_code == 400 and r.json()["error"]["param"] == "path" and words in r.json()["error"]["message"]


def _metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_leaves_while_queued_frees_its_place(server):
    """One row, one waiting place: a queued client disconnects; the next steered request queues (no 429)."""
    long = completion(steering="refusal@20", max_tokens=300, stream=True, ignore_eos=True)
    with httpx.Client(timeout=300) as holder, holder.stream("POST", server.url + "/v1/completions", json=long) as held:
        assert held.status_code == 200
        chunks = held.iter_lines()
        next(chunks)  # the row is taken: the stream is running
        # A raw socket client that queues behind it and then leaves.
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps(completion(steering="refusal@0")).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        deadline = time.monotonic() + 30
        while _metric(server, "cna_steering_requests_waiting_for_row") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _metric(server, "cna_steering_requests_waiting_for_row") == 1
        sock.close()  # the client leaves while queued
        while _metric(server, "cna_steering_requests_waiting_for_row") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _metric(server, "cna_steering_requests_waiting_for_row") == 0  # its place is free
        with httpx.Client(timeout=300) as other:
            queued = other.build_request("POST", server.url + "/v1/completions", json=completion(steering="refusal@1"))
            response = other.send(queued, stream=True)  # would be a 429 if the place were still taken
            for _ in chunks:  # let the long stream finish: its row goes to the queued request
                pass
            response.read()
            assert response.status_code == 200, response.text
