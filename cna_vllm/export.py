"""Export a steering spec as a PEFT LoRA adapter or as merged weights, for stock servers.

Every neuron item is the map ``a ← s·a + b`` on the input of ``down_proj`` (see
:mod:`cna_vllm.steering`), so ``down_proj(s·a + b) = W·diag(s)·a + W[:, idx]·b``:

- the scale part is an exact rank-k edit of the weight,
  ``W·diag(s) = W + W[:, idx]·diag(s − 1)·E_idx`` (k = the layer's neurons with s ≠ 1).
  As a LoRA, ``A = E_idx`` (one-hot rows, [r, intermediate]) and
  ``B = W[:, idx]·diag(s − 1)`` ([hidden, r]), with ``lora_alpha = r`` so the scaling is 1;
  merged, ``W[:, idx] *= s``.
- the bias part ``W[:, idx]·b`` (``patch``/``shift`` items) and CAA vectors (``−α·v``
  added to the MLP output) are constants added to ``down_proj``'s output at every token.
  A LoRA (``B·A·x``, linear in x) cannot add a constant, so ``peft-lora`` refuses them;
  ``merged`` folds them into ``down_proj.bias`` where the checkpoint has one, else refuses.

Composition of items is :func:`cna_vllm.rows.to_rows`'s, the same the engine uses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cna_vllm.circuit import Circuit
from cna_vllm.embedded import PREPARED_MARKER, resolve_model
from cna_vllm.errors import ExportError
from cna_vllm.fileformat import tool_version
from cna_vllm.identity import ModelIdentity
from cna_vllm.rows import to_offsets, to_rows
from cna_vllm.sources import file_sha256, scan_dir
from cna_vllm.steering import SteeringSpec, is_vector_set, resolve, split_part
from cna_vllm.vectors import VectorSet

FORMATS = ("peft-lora", "merged")
METADATA_FILE = "cna_vllm_export.json"
"""Sidecar written into every export; the same JSON is in the safetensors ``__metadata__``."""
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (``vllm.config.lora.MaxLoRARanks``)."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_DOWN_PROJ = re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.mlp\.down_proj\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: ``layers`` maps each edited layer to its edit's rank."""

    out: Path
    format: str
    model_dir: Path
    layers: dict[int, int]
    metadata: dict[str, Any] = field(repr=False)

    @property
    def rank(self) -> int:
        return max(self.layers.values(), default=0)

    @property
    def vllm_max_lora_rank(self) -> int | None:
        """The smallest ``--max-lora-rank`` vLLM accepts for this adapter (None above 512)."""
        return next((r for r in VLLM_MAX_LORA_RANKS if r >= self.rank), None)


@dataclass(frozen=True)
class _Checkpoint:
    """Where each layer's ``down_proj`` weight (and bias, if any) lives in a safetensors checkpoint."""

    files: dict[str, Path]
    weight: dict[int, str]
    bias: dict[int, str]


@dataclass(frozen=True)
class _LayerEdit:
    idx: np.ndarray  # neurons whose scale changes, ascending
    scale: np.ndarray  # their s (float32)
    bias_idx: np.ndarray  # neurons with b != 0
    bias: np.ndarray  # their b (float32)
    offset: np.ndarray | None  # CAA: constant added to the MLP output (float32 [hidden])

    @property
    def needs_bias(self) -> bool:
        return len(self.bias_idx) > 0 or self.offset is not None


# --------------------------------------------------------------------------- public API
def export(
    spec: Any,
    model: str | Path,
    circuits: str | Path,
    out: str | Path,
    *,
    format: str = "peft-lora",
    overwrite: bool = False,
) -> ExportResult:
    """Write ``spec`` (any form :meth:`SteeringSpec.parse` takes) for ``model`` as ``format`` into ``out``.

    ``circuits`` is a directory of circuit files. ``out`` is written atomically; an existing
    non-empty ``out`` is refused unless ``overwrite``.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    model_dir = resolve_model(str(model))
    ident = ModelIdentity.from_dir(model_dir)
    spec, used, files = _load(spec, ident, Path(circuits))
    edits = _edits(spec, used)
    needs_bias = [layer for layer, e in edits.items() if e.needs_bias]
    if format == "peft-lora" and needs_bias:
        raise ExportError(
            f"cannot export {_bias_items(spec, used)} as a LoRA adapter: patch/shift items and CAA vectors add "
            "a constant to down_proj's output at every token (W[:, idx]·b, resp. −α·v), and a LoRA adds "
            "B·A·x, which is linear in x and cannot add a constant. Export scale items only, use "
            "--format merged on a model whose down_proj has a bias, or serve the spec with cna-vllm"
        )
    ckpt = _checkpoint(model_dir, ident.num_layers)
    missing = [layer for layer in needs_bias if layer not in ckpt.bias]
    if missing:
        raise ExportError(
            f"cannot fold {_bias_items(spec, used)} into the weights of {ident.architecture}: patch/shift items "
            "and CAA vectors add a constant to down_proj's output (W[:, idx]·b, resp. −α·v), which needs a "
            f"down_proj bias, and this checkpoint has none at layer(s) {missing} (Llama and Qwen2 have mlp_bias "
            "false). Export scale items only, or serve the spec with cna-vllm"
        )
    out = Path(out).expanduser().resolve()
    _check_out(out, [model_dir, Path(circuits).resolve()], overwrite)
    meta = _metadata(spec, str(model), ident, used, files, format, edits)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        if format == "peft-lora":
            _write_lora(tmp, model_dir, ckpt, edits, meta)
        else:
            _write_merged(tmp, model_dir, ckpt, edits, meta)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _default_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, format, model_dir, {layer: len(e.idx) for layer, e in edits.items()}, meta)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The export metadata of an adapter or merged directory, or of one of its safetensors files."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        return json.loads((path / METADATA_FILE).read_text())
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["cna_vllm"])


# --------------------------------------------------------------------------- planning
def _load(
    spec: Any, ident: ModelIdentity, circuits_dir: Path
) -> tuple[SteeringSpec, dict[str, Circuit | VectorSet], dict[str, Path]]:
    """Parse and validate ``spec``; load and validate (for the model) only the circuits it names."""
    spec = SteeringSpec.parse(spec)
    if not spec:
        raise ExportError("the steering spec is empty: nothing to export")
    if not circuits_dir.is_dir():
        raise ExportError(f"circuits directory {circuits_dir} does not exist; pass --circuits DIR")
    found = scan_dir(circuits_dir)
    spec.validate({name: c for name, (_, c) in found.items()})
    names = list(dict.fromkeys(split_part(item.circuit)[0] for item in spec.items))  # NAME[part] needs NAME
    used = {name: found[name][1].validate_for(ident) for name in names}
    return spec, used, {name: found[name][0] for name in names}


def _edits(spec: SteeringSpec, circuits: Mapping[str, Circuit | VectorSet]) -> dict[int, _LayerEdit]:
    """Per layer, what the spec changes; refuse a spec that changes nothing."""
    rows, offsets = to_rows(spec, circuits), to_offsets(spec, circuits)
    edits: dict[int, _LayerEdit] = {}
    for layer in sorted(set(rows) | set(offsets)):
        idx, s, b = rows.get(layer, (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)))
        offset = offsets.get(layer)
        edit = _LayerEdit(idx[s != 1], s[s != 1], idx[b != 0], b[b != 0], offset if np.any(offset) else None)
        if len(edit.idx) or edit.needs_bias:
            edits[layer] = edit
    if not edits:
        raise ExportError(f"steering {spec} leaves every weight unchanged: nothing to export")
    return edits


def _bias_items(spec: SteeringSpec, circuits: Mapping[str, Circuit | VectorSet]) -> str:
    items = [str(i) for i in spec.items if i.mode != "scale" or is_vector_set(resolve(circuits, i.circuit))]
    return ", ".join(repr(i) for i in items) or repr(str(spec))


def _checkpoint(model_dir: Path, num_layers: int) -> _Checkpoint:
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
    return _Checkpoint(files, found[stacks[0]]["weight"], found[stacks[0]].get("bias", {}))


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    for path in inputs:
        if out == path or out in path.parents:
            raise ExportError(f"--out {out} would overwrite the input {path}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")


def _metadata(
    spec: SteeringSpec,
    model: str,
    ident: ModelIdentity,
    circuits: Mapping[str, Circuit | VectorSet],
    files: Mapping[str, Path],
    format: str,
    edits: Mapping[int, _LayerEdit],
) -> dict[str, Any]:
    return {
        "format": "cna-vllm/export",
        "format_version": 1,
        "export_format": format,
        "spec": str(spec),
        "spec_items": spec.to_list(),
        "spec_fingerprint": spec.fingerprint(),
        "circuits": [
            {"name": name, "kind": c.kind, "file": files[name].name, "sha256": file_sha256(files[name])}
            for name, c in circuits.items()
        ],
        "model": {"name": model, **ident.to_dict()},
        "layers": {str(layer): len(e.idx) for layer, e in edits.items()},
        "tool_version": tool_version(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _default_permissions(directory: Path) -> None:
    """Undo mkdtemp's 0700 (and safetensors' 0600): a server running as another user must read the export."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~mask)


# --------------------------------------------------------------------------- writers
def _read(files: Mapping[str, Path], keys: list[str]) -> dict[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for path in sorted({files[k] for k in keys}):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in keys if files[k] == path})
    return out


def _write_lora(
    out: Path, model_dir: Path, ckpt: _Checkpoint, edits: Mapping[int, _LayerEdit], meta: dict[str, Any]
) -> None:
    import torch
    from safetensors.torch import save_file

    weights = _read(ckpt.files, [ckpt.weight[layer] for layer in edits])
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


def _write_merged(
    out: Path, model_dir: Path, ckpt: _Checkpoint, edits: Mapping[int, _LayerEdit], meta: dict[str, Any]
) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in model_dir.iterdir():  # config, tokenizer, chat template, shard index; not subfolders
        skip = path.name.startswith(".") or path.name == PREPARED_MARKER or path.name.endswith(_WEIGHT_SUFFIXES)
        if path.is_file() and not skip:
            shutil.copy2(path, out / path.name)
    new = _merged_tensors(ckpt, edits)
    for path in sorted(set(ckpt.files.values())):
        if not any(ckpt.files[k] == path for k in new):
            shutil.copy2(path, out / path.name)
            continue
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: new[k] if k in new else f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        save_file(tensors, str(out / path.name), metadata={**header, "cna_vllm": json.dumps(meta)})


def _merged_tensors(ckpt: _Checkpoint, edits: Mapping[int, _LayerEdit]) -> dict[str, Any]:
    """The edited ``down_proj`` weights (``W[:, idx] *= s``) and biases (``+= W[:, idx]·b + offset``)."""
    import torch

    keys = [ckpt.weight[layer] for layer in edits] + [ckpt.bias[layer] for layer in edits if edits[layer].needs_bias]
    old = _read(ckpt.files, keys)
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
