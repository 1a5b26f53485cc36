"""`cna-vllm serve` with its CPU defaults starts and serves while another vLLM engine runs.

Issue #9: vLLM's CPU backend reserves 92% of host memory by default, so a second engine on
the same host failed to start. Here a stock in-process engine holds its memory for the whole
test, and the server is started with *no* KV-cache setting of ours (the test harness's
``VLLM_CPU_KVCACHE_SPACE`` is removed), so only ``cna-vllm serve``'s own defaults apply.
"""

import sys
import time
from pathlib import Path

import httpx
import pytest

from cna_vllm.embedded import SMALL_MODEL, resolve_model

from .procs import _start, _wait_ready

pytestmark = pytest.mark.slow

PROMPT = "Name a famous painter."


def test_serve_starts_and_answers_beside_a_running_engine(tmp_path, monkeypatch):
    from vllm import LLM, SamplingParams

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    other = LLM(str(resolve_model(SMALL_MODEL)), dtype="float32", enforce_eager=True, max_model_len=256,
                kv_cache_memory_bytes=128 << 20, seed=0)  # fmt: skip
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    before = other.generate([PROMPT], greedy)[0].outputs[0].text
    server = _start(
        [str(Path(sys.executable).parent / "cna-vllm"), "serve", "--model", SMALL_MODEL, "--host", "127.0.0.1",
         "--dtype", "float32", "--enforce-eager"],
        tmp_path / "serve.log",
        unset=("VLLM_CPU_KVCACHE_SPACE",),
    )  # fmt: skip
    try:
        _wait_ready(server, time.monotonic() + 420)
        log = server.log.read_text(errors="replace")
        assert "8192" in log  # the CPU default context length was applied (no flag given)
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": SMALL_MODEL, "max_tokens": 6, "temperature": 0.0, "steering": "refusal@0",
                  "messages": [{"role": "user", "content": PROMPT}]},
            timeout=120,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.headers["x-cna-steering"] == "refusal@0" and r.json()["choices"][0]["message"]["content"]
        assert other.generate([PROMPT], greedy)[0].outputs[0].text == before  # the first engine is unharmed
    finally:
        server.stop()
        del other
