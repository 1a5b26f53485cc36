"""cna_vllm.export on tiny random models: the PEFT LoRA adapter and the merged weights give the
HF-hooks reference's greedy tokens (fp32); what a LoRA or a bias-less model cannot express is refused."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cna_vllm.cli import main
from cna_vllm.errors import CircuitError, ExportError, SteeringError
from cna_vllm.export import METADATA_FILE, export, read_metadata
from cna_vllm.sources import load_dir
from cna_vllm.vectors import VectorSet

from ..hf_reference import HFReference
from ..tiny_models import COMMON, make_tiny
from .planted import circuit_of

PROMPTS = [[5, 9, 100, 42, 7, 300], [1, 77, 3, 250, 12], [400, 401, 402, 8, 9, 10, 11, 33, 17]]
MAX_TOKENS = 16
C_KEYS = [(0, 3), (0, 50), (2, 7), (2, 8), (2, 100), (2, 127)]  # 2 neurons in layer 0, 4 in layer 2


def write_circuits(directory: Path) -> Path:
    circuit_of("c", C_KEYS, seed=1).save(directory / "c.safetensors")
    circuit_of("d", [(2, 8), (1, 20)], seed=2).save(directory / "d.safetensors")  # shares (2, 8) with c
    vectors = np.random.default_rng(3).normal(size=(1, COMMON["hidden_size"]))
    VectorSet(name="v", layers=[1], vectors=vectors).save(directory / "v.safetensors")
    return directory


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export-qwen")
    return make_tiny("Qwen2ForCausalLM", root / "models"), write_circuits(root / "circuits")


@pytest.fixture(scope="module")
def qwen_ref(qwen) -> HFReference:
    model, circuits = qwen
    return HFReference(model, load_dir(circuits))


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama with ``mlp_bias: true`` and non-zero down_proj biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("export-llama-bias")
    config = LlamaConfig(**COMMON, mlp_bias=True)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.bias.normal_(std=0.5)
    model.save_pretrained(root / "model")
    return root / "model", write_circuits(root / "circuits")


def unsteered_ref(model: Path, adapter: Path | None = None) -> HFReference:
    """The HF greedy loop of the reference on a plain model, or with a PEFT adapter on top."""
    ref = HFReference(model, {})
    if adapter is not None:
        from peft import PeftModel

        ref.model = PeftModel.from_pretrained(ref.model, adapter).eval()
    return ref


def assert_same_tokens(got: HFReference, want: HFReference, spec: str) -> None:
    """``got`` unsteered == ``want`` under ``spec`` on every prompt, and ``spec`` changes some output."""
    changed = 0
    for prompt in PROMPTS:
        steered = want.generate(prompt, spec, MAX_TOKENS)
        assert got.generate(prompt, None, MAX_TOKENS) == steered, f"{spec} on {prompt}"
        changed += steered != want.generate(prompt, None, MAX_TOKENS)
    assert changed, f"{spec} changed no output: the check would pass vacuously"


# --------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("spec", ["c@0", "c@3", "c@0.5,d@-1", "c@1:patch,c@0"])
def test_lora_in_peft_matches_hooks(qwen, qwen_ref, tmp_path, spec):
    model, circuits = qwen
    result = export(spec, model, circuits, tmp_path / "lora")
    assert_same_tokens(unsteered_ref(model, result.out), qwen_ref, spec)


def test_lora_layout(qwen, tmp_path):
    model, circuits = qwen
    result = export("c@0", model, circuits, tmp_path / "lora")
    assert sorted(p.name for p in result.out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", METADATA_FILE
    ]
    assert result.layers == {0: 2, 2: 4} and result.rank == 4 and result.vllm_max_lora_rank == 8
    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert config["target_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    with safe_open(str(result.out / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        w0 = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    prefix = "base_model.model.model.layers.{}.mlp.down_proj.lora_{}.weight"
    assert set(tensors) == {prefix.format(i, ab) for i in (0, 2) for ab in "AB"}
    a, b = tensors[prefix.format(0, "A")], tensors[prefix.format(0, "B")]
    assert a.shape == (4, COMMON["intermediate_size"]) and b.shape == (COMMON["hidden_size"], 4)
    expect_a = torch.zeros_like(a)
    expect_a[0, 3] = expect_a[1, 50] = 1.0
    assert torch.equal(a, expect_a)  # one-hot rows, zero padding rows
    assert torch.equal(b[:, :2], -w0[:, [3, 50]]) and not b[:, 2:].any()  # s − 1 = −1; zero padding columns
    from peft import PeftConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns on unknown config keys: there must be none
        assert PeftConfig.from_pretrained(str(result.out)).r == 4


# --------------------------------------------------------------------------- merged
def test_merged_matches_hooks(qwen, qwen_ref, tmp_path):
    model, circuits = qwen
    spec = "c@3,d@0"
    result = export(spec, model, circuits, tmp_path / "merged", format="merged")
    assert_same_tokens(unsteered_ref(result.out), qwen_ref, spec)
    assert json.loads((result.out / "config.json").read_text()) == json.loads((model / "config.json").read_text())
    with safe_open(str(model / "model.safetensors"), "pt") as old, \
            safe_open(str(result.out / "model.safetensors"), "pt") as new:
        changed = {k for k in old.keys() if not torch.equal(old.get_tensor(k), new.get_tensor(k))}  # noqa: SIM118
        assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)}
        w2 = old.get_tensor("model.layers.2.mlp.down_proj.weight")
        w2[:, [7, 100, 127]] *= 3.0
        w2[:, 8] = 0.0  # c then d: 0·3
        assert torch.equal(new.get_tensor("model.layers.2.mlp.down_proj.weight"), w2)


def test_merged_folds_patch_shift_and_caa_into_an_existing_bias(llama_bias, tmp_path):
    model, circuits = llama_bias
    spec = "c@0.5:patch,c@2,d@1:shift,v@0.7:shift"
    result = export(spec, model, circuits, tmp_path / "merged", format="merged")
    assert_same_tokens(unsteered_ref(result.out), HFReference(model, load_dir(circuits)), spec)
    with pytest.raises(ExportError, match="LoRA adds B·A·x"):
        export(spec, model, circuits, tmp_path / "lora")


# --------------------------------------------------------------------------- refused
@pytest.mark.parametrize(
    ("fmt", "spec", "error", "match"),
    [
        ("peft-lora", "c@1:patch", ExportError, r"export 'c@1:patch' as a LoRA adapter: .*cannot add a constant"),
        ("peft-lora", "c@0,d@1:shift", ExportError, r"'d@1:shift' as a LoRA adapter"),
        ("peft-lora", "v@1:shift", ExportError, r"'v@1:shift' as a LoRA adapter.* CAA vectors"),
        ("merged", "c@1:patch", ExportError, r"cannot fold 'c@1:patch' .* has none at layer\(s\) \[0, 2\]"),
        ("merged", "v@0.5:shift", ExportError, r"needs a down_proj bias"),
        ("peft-lora", "nope@0", SteeringError, r"unknown circuit 'nope'; known circuits: c, d, v"),
        ("peft-lora", "v@0", SteeringError, r"CAA vector set"),
        ("merged", "c@1", ExportError, r"leaves every weight unchanged"),
        ("peft-lora", "", ExportError, r"empty"),
        ("peft-lora", "c@lots", SteeringError, r"must be a number"),
    ],
)
def test_refused(qwen, tmp_path, fmt, spec, error, match):
    model, circuits = qwen
    with pytest.raises(error, match=match):
        export(spec, model, circuits, tmp_path / "out", format=fmt)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_refuses_a_circuit_of_another_model_and_a_used_out(qwen, tmp_path):
    model, circuits = qwen
    other = tmp_path / "other"
    circuit_of("far", [(7, 3)]).save(other / "far.safetensors")
    with pytest.raises(CircuitError, match="layer index 7 is out of range"):
        export("far@0", model, other, tmp_path / "out")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export("c@0", model, circuits, tmp_path / "used")
    assert export("c@0", model, circuits, tmp_path / "used", overwrite=True).rank == 4
    assert not (tmp_path / "used" / "x").exists()
    with pytest.raises(ExportError, match="would overwrite the input"):
        export("c@0", model, circuits, model, format="merged", overwrite=True)


# --------------------------------------------------------------------------- metadata and CLI
@pytest.mark.parametrize(
    ("fmt", "weights"), [("peft-lora", "adapter_model.safetensors"), ("merged", "model.safetensors")]
)
def test_metadata_names_circuits_hashes_spec_and_model(qwen, tmp_path, fmt, weights):
    model, circuits = qwen
    result = export("c@0,d@2", model, circuits, tmp_path / "out", format=fmt)
    for meta in (read_metadata(result.out), read_metadata(result.out / weights)):
        assert meta["spec"] == "c@0,d@2" and meta["export_format"] == fmt
        assert [(c["name"], c["file"], c["sha256"]) for c in meta["circuits"]] == [
            (n, f"{n}.safetensors", hashlib.sha256((circuits / f"{n}.safetensors").read_bytes()).hexdigest())
            for n in ("c", "d")
        ]
        assert meta["model"]["name"] == str(model) and meta["model"]["architecture"] == "Qwen2ForCausalLM"
        assert meta["model"]["fingerprint"] and meta["tool_version"]


def test_cli(qwen, tmp_path, capsys):
    model, circuits = qwen
    args = ["export", "c@0", "--model", str(model), "--circuits", str(circuits), "--out", str(tmp_path / "lora")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "LoRA rank 4" in out and "--enable-lora --max-lora-rank 8" in out
    assert main(args) == 2
    assert "cna-vllm export: error: --out" in capsys.readouterr().err
    assert main([*args[:1], "c@1:shift", *args[2:], "--overwrite"]) == 2
    assert "cna-vllm export: error: cannot export 'c@1:shift' as a LoRA adapter" in capsys.readouterr().err


def test_a_signed_part_exports_like_a_circuit_of_only_its_neurons(qwen, tmp_path):
    from dataclasses import replace

    model, circuits = qwen
    part = load_dir(circuits)["c"].part("pos")
    only_dir = tmp_path / "only"
    replace(part, name="only").save(only_dir / "only.safetensors")
    a = export("c[pos]@3", model, circuits, tmp_path / "a", format="merged")
    b = export("only@3", model, only_dir, tmp_path / "b", format="merged")
    assert a.layers == b.layers and 0 < sum(a.layers.values()) < len(C_KEYS)
    with safe_open(str(a.out / "model.safetensors"), "pt") as fa, \
            safe_open(str(b.out / "model.safetensors"), "pt") as fb:
        for key in fa.keys():  # noqa: SIM118
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key
