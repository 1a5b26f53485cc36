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
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cna_vllm.circuit import Circuit
from cna_vllm.embedded import resolve_model
from cna_vllm.errors import ExportError
from cna_vllm.export_weights import LayerEdit, default_permissions, find_checkpoint, write_lora, write_merged
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
    ckpt = find_checkpoint(model_dir, ident.num_layers)
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
            write_lora(tmp, model_dir, ckpt, edits, meta)
        else:
            write_merged(tmp, model_dir, ckpt, edits, meta)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        default_permissions(tmp)
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


def _edits(spec: SteeringSpec, circuits: Mapping[str, Circuit | VectorSet]) -> dict[int, LayerEdit]:
    """Per layer, what the spec changes; refuse a spec that changes nothing."""
    rows, offsets = to_rows(spec, circuits), to_offsets(spec, circuits)
    edits: dict[int, LayerEdit] = {}
    for layer in sorted(set(rows) | set(offsets)):
        idx, s, b = rows.get(layer, (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)))
        offset = offsets.get(layer)
        edit = LayerEdit(idx[s != 1], s[s != 1], idx[b != 0], b[b != 0], offset if np.any(offset) else None)
        if len(edit.idx) or edit.needs_bias:
            edits[layer] = edit
    if not edits:
        raise ExportError(f"steering {spec} leaves every weight unchanged: nothing to export")
    return edits


def _bias_items(spec: SteeringSpec, circuits: Mapping[str, Circuit | VectorSet]) -> str:
    items = [str(i) for i in spec.items if i.mode != "scale" or is_vector_set(resolve(circuits, i.circuit))]
    return ", ".join(repr(i) for i in items) or repr(str(spec))


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
    edits: Mapping[int, LayerEdit],
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


