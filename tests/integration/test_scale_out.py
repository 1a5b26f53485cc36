"""Scale-out with vLLM's own flags: ``--api-server-count 2`` and ``--data-parallel-size 2`` serve steering.

Each start is a real ``cna-vllm serve`` (``server.py``) on SmolLM2, fp32, greedy. A single-process
server gives the reference answers; the scaled-out servers must return the same tokens for every
(prompt, spec) pair, unsteered included, while far more distinct specs than steering rows are in
flight at once (each engine admits its own steered requests in its scheduler).
"""

import concurrent.futures as cf
import sys
import time

import httpx
import pytest

from cna_vllm.embedded import SMALL_MODEL

from .procs import REPO, _start, _wait_ready

pytestmark = pytest.mark.slow

ROWS = 2
COMMON = [
    "--model", SMALL_MODEL, "--host", "127.0.0.1", "--max-model-len", "512", "--dtype", "float32",
    "--enforce-eager", "--max-num-seqs", "32", "--max-steering-configs", str(ROWS), "--disable-uvicorn-access-log",
]  # fmt: skip
PROMPTS = ["The capital of France is", "How do I pick a lock?", "Three tips for sleeping well:", "def fib(n):"]
SPECS = [
    None, "refusal@0", "refusal@3", "refusal[pos]@0", "refusal@1:patch", "refusal-caa@1:shift", "refusal@0,refusal@2",
]
"""Six distinct specs (and none) for two rows per engine: admission must hold some back."""


def ask(url: str, prompt: str, steering) -> tuple[int, list[int] | str]:
    body = {"model": SMALL_MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    if steering is not None:
        body["steering"] = steering
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
    if r.status_code != 200:
        return r.status_code, r.text
    return 200, r.json()["choices"][0]["token_ids"]


def soak(url: str, rounds: int = 2) -> dict[tuple[str, str | None], set]:
    """Every (prompt, spec) pair ``rounds`` times, 16 at once; the answers seen for each pair."""
    pairs = [(p, s) for p in PROMPTS for s in SPECS] * rounds
    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda ps: ask(url, *ps), pairs))
    seen: dict[tuple[str, str | None], set] = {}
    for pair, (status, out) in zip(pairs, answers, strict=True):
        assert status == 200, (pair, out)
        seen.setdefault(pair, set()).add(tuple(out))
    return seen


def serve(tmp_path, name: str, *extra: str):
    return _start([sys.executable, str(REPO / "server.py"), *COMMON, *extra], tmp_path / f"{name}.log")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process server's answer to every (prompt, spec) pair."""
    tmp = tmp_path_factory.mktemp("scale-ref")
    p = serve(tmp, "single")
    try:
        _wait_ready(p, time.monotonic() + 600)
        seen = soak(p.url, rounds=1)
    finally:
        p.stop()
    assert all(len(v) == 1 for v in seen.values())
    answers = {pair: next(iter(v)) for pair, v in seen.items()}
    assert len({answers[(PROMPTS[0], s)] for s in SPECS}) >= 4  # the specs really steer
    return answers


@pytest.mark.parametrize(
    "flags", [("--api-server-count", "2"), ("--data-parallel-size", "2")], ids=["api-servers-2", "data-parallel-2"]
)
def test_scaled_out_server_answers_like_one_process(reference, tmp_path, flags):
    p = serve(tmp_path, flags[0].strip("-"), *flags)
    try:
        _wait_ready(p, time.monotonic() + 600)
        seen = soak(p.url)
        for pair, answers in seen.items():
            assert answers == {reference[pair]}, (pair, answers, reference[pair])
        bad = httpx.post(f"{p.url}/v1/completions", json={"model": SMALL_MODEL, "prompt": "x", "steering": "nope@1"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_circuit"
        metrics = httpx.get(f"{p.url}/metrics").text  # both API processes count into one registry
        steered = sum(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("cna_steering_requests_total") and 'steered="true"' in line)  # fmt: skip
        assert steered == 2 * len(PROMPTS) * (len(SPECS) - 1)
    finally:
        p.stop()
    log = p.log.read_text()
    assert log.count("Loaded endpoint plugin cna_vllm") == 2  # one per API server process


def test_hot_load_is_refused_with_several_api_servers(tmp_path):
    p = serve(tmp_path, "refused", "--api-server-count", "2", "--enable-hot-load")
    assert p.proc.wait(120) == 2
    assert "--enable-hot-load needs one API server" in p.log.read_text()
