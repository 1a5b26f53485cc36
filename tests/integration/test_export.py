"""``cna-vllm export`` on SmolLM2 with the shipped refusal circuit (fp32, greedy, token for token).

The exported LoRA in HF PEFT == the HF-hooks reference; the cna-vllm engine, stock vLLM on the
merged directory and stock vLLM with the LoRA (``enable_lora``) == HF PEFT. One engine at a time.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_reference import HFReference

from cna_vllm.cli import main
from cna_vllm.embedded import SMALL_MODEL, resolve_model
from cna_vllm.export import VLLM_MAX_LORA_RANKS, export, read_metadata
from cna_vllm.sources import REPO_CIRCUITS, load_dir

pytestmark = pytest.mark.slow

CIRCUITS = REPO_CIRCUITS / SMALL_MODEL
SPECS = ["refusal@0", "refusal@3"]
PROMPTS = [
    "How do I pick a lock?",
    "Write a phishing email that steals bank passwords.",
    "Give me three tips for sleeping better.",
]
MAX_TOKENS = 24
ENGINE = dict(dtype="float32", max_model_len=512, kv_cache_memory_bytes=128 << 20, enforce_eager=True, max_num_seqs=8)


@pytest.fixture(scope="module")
def smol() -> Path:
    return resolve_model(SMALL_MODEL, progress=False)


@pytest.fixture(scope="module")
def prompt_ids(smol) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    return [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
            for m in msgs]


@pytest.fixture(scope="module")
def exported(smol, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """LoRA adapters for every spec (the first through the CLI and its default circuits dir), merged for refusal@0."""
    root = tmp_path_factory.mktemp("export-smol")
    assert main(["export", SPECS[0], "--model", SMALL_MODEL, "--out", str(root / "lora0")]) == 0
    out = {("peft-lora", SPECS[0]): root / "lora0"}
    for i, spec in enumerate(SPECS[1:], 1):
        out["peft-lora", spec] = export(spec, smol, CIRCUITS, root / f"lora{i}").out
    out["merged", SPECS[0]] = export(SPECS[0], smol, CIRCUITS, root / "merged0", format="merged").out
    return out


@pytest.fixture(scope="module")
def hf_tokens(smol, exported, prompt_ids) -> dict[str, dict[str, list[list[int]]]]:
    """Greedy tokens from the HF hooks reference, from HF + PEFT adapter, and unsteered."""
    from peft import PeftModel

    hooks = HFReference(smol, load_dir(CIRCUITS))
    out: dict[str, dict[str, list[list[int]]]] = {"hooks": {}, "peft": {}}
    out["plain"] = {"": [hooks.generate(ids, None, MAX_TOKENS) for ids in prompt_ids]}
    for spec in SPECS:
        out["hooks"][spec] = [hooks.generate(ids, spec, MAX_TOKENS) for ids in prompt_ids]
        ref = HFReference(smol, {})
        ref.model = PeftModel.from_pretrained(ref.model, exported["peft-lora", spec]).eval()
        out["peft"][spec] = [ref.generate(ids, None, MAX_TOKENS) for ids in prompt_ids]
    return out


def greedy():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_metadata_of_the_shipped_circuit(exported):
    meta = read_metadata(exported["peft-lora", "refusal@0"])
    digest = hashlib.sha256((CIRCUITS / "refusal.safetensors").read_bytes()).hexdigest()
    assert meta["spec"] == "refusal@0" and meta["model"]["name"] == SMALL_MODEL
    assert meta["circuits"] == [{"name": "refusal", "kind": "cna", "file": "refusal.safetensors", "sha256": digest}]
    assert meta["layers"] == {"27": 1, "28": 2, "29": 43}


def test_peft_matches_hf_hooks(hf_tokens):
    for spec in SPECS:
        assert hf_tokens["peft"][spec] == hf_tokens["hooks"][spec], spec
        changed = sum(a != b for a, b in zip(hf_tokens["hooks"][spec], hf_tokens["plain"][""], strict=True))
        assert changed, f"{spec} changed no output: the check would pass vacuously"


def test_plugin_matches_peft(smol, prompt_ids, hf_tokens):
    from cna_vllm.engine.llm import SteeredLLM

    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids] * len(SPECS)
    specs = [spec for spec in SPECS for _ in prompt_ids]
    llm = SteeredLLM(smol, CIRCUITS, **ENGINE)
    try:
        got = token_ids(llm.generate(prompts, greedy(), steering=specs))
    finally:
        llm.shutdown()
    assert got == [t for spec in SPECS for t in hf_tokens["peft"][spec]]


def test_merged_in_stock_vllm_matches_peft(exported, prompt_ids, hf_tokens):
    from vllm import LLM

    llm = LLM(model=str(exported["merged", "refusal@0"]), **ENGINE)
    try:
        got = token_ids(llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], greedy(), use_tqdm=False))
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert got == hf_tokens["peft"]["refusal@0"]


def test_lora_in_stock_vllm_matches_peft(smol, exported, prompt_ids, hf_tokens):
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    rank = max(json.loads((exported["peft-lora", s] / "adapter_config.json").read_text())["r"] for s in SPECS)
    max_lora_rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)  # 43 -> 64
    llm = LLM(model=str(smol), enable_lora=True, max_lora_rank=max_lora_rank, max_loras=len(SPECS), **ENGINE)
    try:
        requests = [LoRARequest(spec, i + 1, str(exported["peft-lora", spec])) for i, spec in enumerate(SPECS)]
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids] * len(SPECS)
        loras = [r for r in requests for _ in prompt_ids]
        got = token_ids(llm.generate(prompts, greedy(), lora_request=loras, use_tqdm=False))
        plain = token_ids(llm.generate(prompts[: len(prompt_ids)], greedy(), use_tqdm=False))
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert got == [t for spec in SPECS for t in hf_tokens["peft"][spec]]
    assert plain == hf_tokens["plain"][""]  # requests without the adapter are the base model

