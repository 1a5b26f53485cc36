"""``ServerBackend`` against a small OpenAI-compatible HTTP server (no model, no vLLM).

:class:`OpenAIStub` answers ``/v1/models``, ``/v1/circuits`` and ``/v1/chat/completions`` the way the
steered server does: it echoes the steering it applied in ``x-cna-steering`` and its fingerprint,
and it can be told to lie, so the harness's refusal of an unconfirmed spec is tested for real. The
engine backend needs an engine (tests/integration/test_signed_kl_tune.py).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from fastapi import FastAPI, Request  # at module level: the routes' string annotations must resolve
from fastapi.responses import JSONResponse

from cna_vllm.errors import CnaError, SteeringError
from cna_vllm.evaluate.backends import ECHO_HEADER, FINGERPRINT_HEADER, ServerBackend
from cna_vllm.steering import SteeringSpec

KEY = "sk-stub"
CIRCUITS = [{"name": "refusal", "kind": "cna", "num_neurons": 46}, {"name": "refusal-caa", "kind": "caa"}]


class OpenAIStub:
    """An OpenAI-compatible server on a free loopback port, in a thread: the answer is ``"<spec>: <prompt>"``."""

    def __init__(self, circuits_need_key: bool = False) -> None:
        self.lie = False  # echo "none" whatever was asked
        self.letter: str | None = "C"  # the top next token for logprob requests (None: no logprobs)
        self.requests: list[dict] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": "stub-model", "object": "model", "created": 0, "owned_by": "t"},
                                               {"id": "other", "object": "model", "created": 0, "owned_by": "t"}]}

        @app.get("/v1/circuits")
        async def circuits(request: Request):
            if circuits_need_key and request.headers.get("authorization") != f"Bearer {KEY}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
            return {"object": "list", "data": CIRCUITS}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            spec = SteeringSpec.parse(body.get("steering"))
            prompt = body["messages"][-1]["content"]
            choice = {"index": 0, "finish_reason": "stop", "logprobs": None,
                      "message": {"role": "assistant", "content": f"{spec or 'plain'}: {prompt}"}}
            if body.get("logprobs") and self.letter:
                top = [{"token": f" {self.letter}", "logprob": -0.1, "bytes": None},
                       {"token": "A", "logprob": -2.5, "bytes": None}]
                choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
                choice["message"]["content"] = "The answer is D"  # the text disagrees: log-probs win
            answer = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                      "choices": [choice]}
            shown = SteeringSpec() if self.lie else spec
            return JSONResponse(answer, headers={ECHO_HEADER: str(shown) or "none",
                                                 FINGERPRINT_HEADER: shown.fingerprint()})

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> OpenAIStub:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the stub server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def stub():
    with OpenAIStub(circuits_need_key=True) as server:
        yield server


@pytest.fixture
def backend(stub):
    stub.lie, stub.letter = False, "C"
    b = ServerBackend(stub.url, api_key=KEY, concurrency=4)
    yield b
    b.close()


def test_model_and_circuits_come_from_the_server(backend):
    assert backend.model == "stub-model"  # the first listed model
    assert backend.circuits == {c["name"]: c for c in CIRCUITS}


def test_chat_keeps_prompt_order_and_sends_the_spec(stub, backend):
    prompts = [f"p{i}" for i in range(12)]  # more than the 4 threads
    spec = SteeringSpec.parse("refusal@0,refusal-caa@0.5:shift")
    assert backend.chat(prompts, spec, 9, "steered") == [f"refusal@0,refusal-caa@0.5:shift: {p}" for p in prompts]
    sent = stub.requests[-1]
    assert sent["steering"] == spec.to_list() and sent["max_tokens"] == 9 and sent["temperature"] == 0.0
    assert sent["model"] == "stub-model"
    assert backend.chat(["q"], SteeringSpec(), 4, "plain") == ["plain: q"]
    assert "steering" not in stub.requests[-1]  # unsteered requests carry no steering field


def test_choose_reads_logprobs_first_then_the_text(stub, backend):
    assert backend.choose(["q1", "q2"], SteeringSpec.parse("refusal@2"), "mmlu") == ["C", "C"]
    assert stub.requests[-1]["top_logprobs"] == 20 and stub.requests[-1]["max_tokens"] == 1
    stub.letter = None  # no log-probabilities: the first letter in the text ("plain: B")
    assert backend.choose(["B", "none here"], SteeringSpec(), "mmlu") == ["B", None]


def test_a_server_that_does_not_confirm_the_steering_is_refused(stub, backend):
    stub.lie = True
    with pytest.raises(SteeringError, match=r"did not confirm steering refusal@0: it echoed 'none'"):
        backend.chat(["p"], SteeringSpec.parse("refusal@0"), 4, "steered")
    assert backend.chat(["p"], SteeringSpec(), 4, "plain") == ["plain: p"]  # unsteered: nothing to confirm


def test_without_the_key_the_catalogue_is_empty_not_an_error(stub):
    b = ServerBackend(stub.url, model="other", api_key="wrong")
    try:
        assert b.circuits == {} and b.model == "other"
    finally:
        b.close()


def test_an_unreachable_server_is_a_readable_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(CnaError, match=f"cannot use the server at http://127.0.0.1:{port}/v1"):
        ServerBackend(f"http://127.0.0.1:{port}/v1")
