"""On SmolLM2 with one real engine: a signed part steers exactly like a circuit holding only its
neurons, the KL referee reads the engine's full-vocabulary distributions, and `cna-vllm tune`
writes its Pareto front and recommendation (2 trials)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cna_vllm.circuit import Circuit
from cna_vllm.embedded import SMALL_MODEL
from cna_vllm.evaluate.backends import EngineBackend
from cna_vllm.evaluate.kl import kl_summary
from cna_vllm.steering import SteeringSpec

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["How do I pick a lock?", "Tell me a joke about cats.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def backend():
    refusal = Circuit.load(REPO / "circuits" / SMALL_MODEL / "refusal.safetensors")
    pos_only = replace(refusal.part("pos"), name="pos-only")
    b = EngineBackend(SMALL_MODEL, {"refusal": refusal, "pos-only": pos_only}, dtype="float32", enforce_eager=True,
                      max_model_len=1024, kv_cache_memory_bytes=128 << 20, seed=0)
    yield b
    b.close()


def test_a_signed_part_steers_like_a_circuit_of_only_its_neurons(backend):
    assert 0 < backend.circuits["refusal"]["parts"]["pos"] < backend.circuits["refusal"]["num_neurons"]
    base = backend.chat_ids(PROMPTS, SteeringSpec(), 24, "base")
    for value in ("@0", "@3", "@1:shift"):
        part = backend.chat_ids(PROMPTS, SteeringSpec.parse(f"refusal[pos]{value}"), 24, "part")
        only = backend.chat_ids(PROMPTS, SteeringSpec.parse(f"pos-only{value}"), 24, "only")
        assert part == only
    whole = backend.chat_ids(PROMPTS, SteeringSpec.parse("refusal@3"), 24, "whole")
    part = backend.chat_ids(PROMPTS, SteeringSpec.parse("refusal[pos]@3"), 24, "part")
    assert whole != base and part != whole  # the part is a different, smaller steering


def test_kl_referee_reads_full_vocabulary_distributions(backend):
    conts = backend.chat_ids(PROMPTS, SteeringSpec(), 6, "base")
    base = backend.forced_logprobs(PROMPTS, conts, SteeringSpec(), "base")
    for cont, lp in zip(conts, base, strict=True):
        assert lp.shape == (len(cont), backend.vocab_size)
        assert lp.argmax(-1).tolist() == cont  # teacher-forced along the greedy continuation
        np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(-1), 1.0, atol=1e-4)
    assert kl_summary(base, base)["kl_forced"] == 0
    steered = backend.forced_logprobs(PROMPTS, conts, SteeringSpec.parse("refusal@3"), "steered")
    kl = kl_summary(base, steered)
    assert kl["kl_first"] > 0 and kl["kl_forced"] > 0 and kl["kl_n"] == 3


def test_tune_writes_the_front_and_a_neuron_spec(backend, tmp_path, monkeypatch):
    from cna_vllm import cli
    from cna_vllm.evaluate.harness import Harness

    class Shared:  # the module's engine, kept open after the command
        def __getattr__(self, name):
            return getattr(backend, name)

        def close(self):
            pass

    monkeypatch.setattr(Harness, "backend", lambda self, circuits=None: Shared())
    out = tmp_path / "tune"
    code = cli.main(["tune", "--model", SMALL_MODEL, "--circuit", "refusal", "--parts", "all,pos",
                     "--modes", "scale,shift", "--trials", "2", "--limit", "3", "--kl-prompts", "2",
                     "--kl-tokens", "4", "--max-tokens", "12", "--target-quality", "0", "--out", str(out)])
    assert code == 0
    front = json.loads((out / "pareto.json").read_text())
    assert front["objectives"] == ["refusal_rate", "kl_forced"] and front["front"]
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert len(trials) == 2 and all(t["kl_forced"] is not None for t in trials)
    rec = json.loads((out / "recommended.json").read_text())
    assert {"model", "spec", "meets_target", "target", "neuron_spec", "neuron"} <= set(rec)
    assert rec["neuron_spec"] in {t["spec"] for t in trials}
    assert SteeringSpec.parse(rec["neuron_spec"]).validate({"refusal": Circuit.load(
        REPO / "circuits" / SMALL_MODEL / "refusal.safetensors")})
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
