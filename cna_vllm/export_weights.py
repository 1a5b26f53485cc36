"""The weights side of export: find ``down_proj`` in a safetensors checkpoint and write the edited forms.

A :class:`LayerEdit` is what a spec changes in one layer (:mod:`cna_vllm.export` plans it);
:func:`write_lora` writes it as a PEFT adapter, :func:`write_merged` as a full checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cna_vllm.embedded import PREPARED_MARKER
from cna_vllm.errors import ExportError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_DOWN_PROJ = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.mlp\.down_proj\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class Checkpoint:
    """Where each layer's ``down_proj`` weight (and bias, if any) lives in a safetensors checkpoint."""

    files: dict[str, Path]
    weight: dict[int, str]
    bias: dict[int, str]


@dataclass(frozen=True)
class LayerEdit:
    idx: np.ndarray  # neurons whose scale changes, ascending
    scale: np.ndarray  # their s (float32)
    bias_idx: np.ndarray  # neurons with b != 0
    bias: np.ndarray  # their b (float32)
    offset: np.ndarray | None  # CAA: constant added to the MLP output (float32 [hidden])

    @property
    def needs_bias(self) -> bool:
        return len(self.bias_idx) > 0 or self.offset is not None



def find_checkpoint(model_dir: Path, num_layers: int) -> Checkpoint:
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = {k: model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    else:
        files = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                files.update(dict.fromkeys(f.keys(), path))
    if not files:
        raise ExportError(f"{model_dir} holds no safetensors weights (export reads and writes safetensors only)")
    found: dict[str, dict[str, dict[int, str]]] = {}
    for key in files:
        if m := _DOWN_PROJ.match(key):
            found.setdefault(m["prefix"], {}).setdefault(m["param"], {})[int(m["layer"])] = key
    stacks = [p for p, d in found.items() if set(d.get("weight", {})) == set(range(num_layers))]
    if len(stacks) != 1:
        raise ExportError(
            f"{model_dir}: expected one stack of {num_layers} '...layers.N.mlp.down_proj.weight' tensors, "
            f"found {len(stacks)} ({sorted(found) or 'none'})"
        )
    return Checkpoint(files, found[stacks[0]]["weight"], found[stacks[0]].get("bias", {}))



def default_permissions(directory: Path) -> None:
    """Undo mkdtemp's 0700 (and safetensors' 0600): a server running as another user must read the export."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~mask)


# --------------------------------------------------------------------------- writers
def read_tensors(files: Mapping[str, Path], keys: list[str]) -> dict[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for path in sorted({files[k] for k in keys}):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in keys if files[k] == path})
    return out


def write_lora(
    out: Path, model_dir: Path, ckpt: Checkpoint, edits: Mapping[int, LayerEdit], meta: dict[str, Any]
) -> None:
    import torch
    from safetensors.torch import save_file

    weights = read_tensors(ckpt.files, [ckpt.weight[layer] for layer in edits])
    rank = max(len(e.idx) for e in edits.values())
    tensors: dict[str, torch.Tensor] = {}
    modules = []
    for layer, edit in edits.items():
        key = ckpt.weight[layer]
        w = weights[key].to(torch.float32)
        hidden, intermediate = w.shape
        idx = torch.from_numpy(edit.idx)
        a = torch.zeros(rank, intermediate)
        a[torch.arange(len(idx)), idx] = 1.0
        b = torch.zeros(hidden, rank)
        b[:, : len(idx)] = w[:, idx] * (torch.from_numpy(edit.scale) - 1.0)
        module = key.removesuffix(".weight")
        modules.append(module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt", "cna_vllm": json.dumps(meta)})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_merged(
    out: Path, model_dir: Path, ckpt: Checkpoint, edits: Mapping[int, LayerEdit], meta: dict[str, Any]
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in model_dir.iterdir():  # config, tokenizer, chat template, shard index; not subfolders
        skip = path.name.startswith(".") or path.name == PREPARED_MARKER or path.name.endswith(_WEIGHT_SUFFIXES)
        if path.is_file() and not skip:
            shutil.copy2(path, out / path.name)
    new = merged_tensors(ckpt, edits)
    for path in sorted(set(ckpt.files.values())):
        if not any(ckpt.files[k] == path for k in new):
            shutil.copy2(path, out / path.name)
            continue
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: new[k] if k in new else f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        save_file(tensors, str(out / path.name), metadata={**header, "cna_vllm": json.dumps(meta)})


def merged_tensors(ckpt: Checkpoint, edits: Mapping[int, LayerEdit]) -> dict[str, Any]:
    """The edited ``down_proj`` weights (``W[:, idx] *= s``) and biases (``+= W[:, idx]·b + offset``)."""
    import torch

    keys = [ckpt.weight[layer] for layer in edits] + [ckpt.bias[layer] for layer in edits if edits[layer].needs_bias]
    old = read_tensors(ckpt.files, keys)
    new: dict[str, torch.Tensor] = {}
    for layer, edit in edits.items():
        key = ckpt.weight[layer]
        w = old[key].to(torch.float32)
        if edit.needs_bias:
            bias_key = ckpt.bias[layer]
            add = w[:, torch.from_numpy(edit.bias_idx)] @ torch.from_numpy(edit.bias)
            if edit.offset is not None:
                add += torch.from_numpy(edit.offset)
            new[bias_key] = (old[bias_key].to(torch.float32) + add).to(old[bias_key].dtype)
        w[:, torch.from_numpy(edit.idx)] *= torch.from_numpy(edit.scale)
        new[key] = w.to(old[key].dtype).contiguous()
    return new
