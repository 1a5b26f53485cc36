"""The :class:`Circuit` type and its safetensors file format.

A circuit is a set of MLP neurons, each named by ``(layer, neuron)`` where ``neuron``
indexes the input of that layer's ``down_proj`` (the intermediate dimension). It carries
per-neuron statistics from discovery, so the engine can do more than plain scaling:

========== ======= ==================================================
tensor     dtype   meaning
========== ======= ==================================================
layers     int32   layer index of each neuron
neurons    int32   index into the layer's intermediate dimension
score      float32 ranking score (|delta| or effect size), descending
mean_pos   float32 mean activation over the positive prompt set
mean_neg   float32 mean activation over the negative prompt set
========== ======= ==================================================

Everything else lives in the container's metadata (:mod:`cna_vllm.fileformat`): the name,
behaviour, model identity, discovery parameters, per-layer and per-part counts, creation
time and tool version. Finding and reading files of either kind is :mod:`cna_vllm.sources`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from cna_vllm.errors import CircuitError
from cna_vllm.fileformat import SourceFile, write_file
from cna_vllm.identity import ModelIdentity

PARTS: dict[str, str] = {
    "pos": "|μ⁺| > |μ⁻|: driven harder by the positive set (for refusal: harm-active)",
    "neg": "|μ⁺| ≤ |μ⁻|: driven at least as hard by the negative set (for refusal: benign-active)",
    "up": "δ = μ⁺ − μ⁻ > 0: higher on the positive set",
    "down": "δ = μ⁺ − μ⁻ ≤ 0: higher (or equal) on the negative set",
}
"""Signed parts of a circuit, on two axes: which set drives a neuron harder (``pos``/``neg``),
and the sign of its mean difference (``up``/``down``). Each axis splits a circuit in two."""
SIGN_CONVENTION = (
    "mean_pos, mean_neg: mean activation over the positive / negative set; delta = mean_pos - mean_neg; "
    "parts: pos |mean_pos| > |mean_neg|, neg otherwise; up delta > 0, down otherwise"
)
"""Recorded in every discovered circuit's metadata."""

TENSORS: dict[str, np.dtype] = {
    "layers": np.dtype(np.int32),
    "neurons": np.dtype(np.int32),
    "score": np.dtype(np.float32),
    "mean_pos": np.dtype(np.float32),
    "mean_neg": np.dtype(np.float32),
}


@dataclass(frozen=True, eq=False)
class Circuit(SourceFile):
    """A set of ``(layer, neuron)`` pairs with discovery statistics and metadata."""

    kind: ClassVar[str] = "cna"
    layers: np.ndarray
    neurons: np.ndarray
    score: np.ndarray
    mean_pos: np.ndarray
    mean_neg: np.ndarray

    def __post_init__(self) -> None:
        for key, dtype in TENSORS.items():
            object.__setattr__(self, key, np.ascontiguousarray(getattr(self, key), dtype=dtype))
        self.check()

    # ------------------------------------------------------------------ derived views
    def __len__(self) -> int:
        return int(self.layers.shape[0])

    @property
    def delta(self) -> np.ndarray:
        """Mean difference, positive minus negative set."""
        return self.mean_pos - self.mean_neg

    def pairs(self) -> list[tuple[int, int]]:
        return list(zip(self.layers.tolist(), self.neurons.tolist(), strict=True))

    def layer_counts(self) -> dict[int, int]:
        return dict(sorted(Counter(self.layers.tolist()).items()))

    def by_layer(self) -> dict[int, np.ndarray]:
        """Neuron indices per layer, in rank order."""
        return {layer: self.neurons[self.layers == layer] for layer in self.layer_counts()}

    def part_mask(self, part: str) -> np.ndarray:
        """Boolean mask of the neurons in signed part ``part`` (see :data:`PARTS`)."""
        if part == "pos":
            return np.abs(self.mean_pos) > np.abs(self.mean_neg)
        if part == "neg":
            return ~(np.abs(self.mean_pos) > np.abs(self.mean_neg))
        if part == "up":  # δ > 0, written without the subtraction (no overflow)
            return self.mean_pos > self.mean_neg
        if part == "down":
            return ~(self.mean_pos > self.mean_neg)
        raise CircuitError(f"unknown circuit part {part!r}; use one of {', '.join(PARTS)}")

    def part_counts(self) -> dict[str, int]:
        """``{part: number of neurons}`` for every signed part."""
        return {part: int(self.part_mask(part).sum()) for part in PARTS}

    def part(self, part: str) -> Circuit:
        """The signed part ``part`` as a circuit named ``name[part]`` (rank order kept)."""
        mask = self.part_mask(part)
        if not mask.any():
            raise CircuitError(f"circuit {self.name!r} has no neurons in part {part!r}")
        return replace(
            self,
            name=f"{self.name}[{part}]",
            description=f"{self.name}[{part}]: {PARTS[part]}",
            **{key: getattr(self, key)[mask] for key in TENSORS},
        )

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Structural checks that need no model: shapes, signs, duplicates, finiteness."""
        n = self.layers.shape[0]
        for key in TENSORS:
            arr = getattr(self, key)
            if arr.ndim != 1 or arr.shape[0] != n:
                raise CircuitError(
                    f"circuit {self.name!r}: tensor {key!r} has shape {arr.shape}, expected ({n},)"
                )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise CircuitError(f"circuit {self.name!r}: tensor {key!r} holds {bad} NaN/inf value(s)")
        if n == 0:
            raise CircuitError(f"circuit {self.name!r} is empty")
        if (self.layers < 0).any() or (self.neurons < 0).any():
            raise CircuitError(f"circuit {self.name!r} has a negative layer or neuron index")
        seen = Counter(self.pairs())
        dups = [k for k, c in seen.items() if c > 1]
        if dups:
            raise CircuitError(
                f"circuit {self.name!r} lists {len(dups)} (layer, neuron) pair(s) twice, e.g. {dups[0]}"
            )

    _dims: ClassVar[tuple[str, ...]] = ("num_layers", "intermediate_size", "hidden_size")

    def _check_fit(self, ident: ModelIdentity) -> None:
        if self.layers.max() >= ident.num_layers:
            raise CircuitError(
                f"circuit {self.name!r}: layer index {int(self.layers.max())} is out of range "
                f"for a model with {ident.num_layers} layers"
            )
        if self.neurons.max() >= ident.intermediate_size:
            raise CircuitError(
                f"circuit {self.name!r}: neuron index {int(self.neurons.max())} is out of range "
                f"for intermediate size {ident.intermediate_size}"
            )

    # ------------------------------------------------------------------ set operations
    def _combine(self, other: Circuit, keep: set[tuple[int, int]], name: str) -> Circuit:
        if self.model and other.model and self.model != other.model:
            raise CircuitError(f"cannot combine circuits of different models: {self.name!r}, {other.name!r}")
        rows: dict[tuple[int, int], tuple] = {}
        for circ in (other, self):  # self wins where both have a neuron
            for i, key in enumerate(circ.pairs()):
                if key in keep:
                    rows[key] = (circ.score[i], circ.mean_pos[i], circ.mean_neg[i])
        if not rows:
            raise CircuitError(f"{name!r} would be empty")
        order = sorted(rows, key=lambda k: (-rows[k][0], k))
        stats = np.array([rows[k] for k in order], dtype=np.float32)
        return Circuit(
            name=name,
            layers=[k[0] for k in order],
            neurons=[k[1] for k in order],
            score=stats[:, 0],
            mean_pos=stats[:, 1],
            mean_neg=stats[:, 2],
            model=self.model or other.model,
            description=f"{name} (from {self.name!r} and {other.name!r})",
            discovery={"combined_from": [self.name, other.name]},
        )

    def union(self, other: Circuit, name: str | None = None) -> Circuit:
        return self._combine(other, set(self.pairs()) | set(other.pairs()), name or f"{self.name}|{other.name}")

    def intersection(self, other: Circuit, name: str | None = None) -> Circuit:
        return self._combine(other, set(self.pairs()) & set(other.pairs()), name or f"{self.name}&{other.name}")

    __or__ = union
    __and__ = intersection

    def top(self, k: int) -> Circuit:
        """The first ``k`` neurons by score."""
        order = np.argsort(-self.score, kind="stable")[:k]
        return replace(
            self,
            layers=self.layers[order],
            neurons=self.neurons[order],
            score=self.score[order],
            mean_pos=self.mean_pos[order],
            mean_neg=self.mean_neg[order],
        )

    # ------------------------------------------------------------------ file format
    def metadata(self) -> dict:
        return {
            **self._common_metadata(),
            "num_neurons": len(self),
            "layer_counts": {str(k): v for k, v in self.layer_counts().items()},
            "parts": self.part_counts(),
        }

    def save(self, path: str | Path) -> Path:
        return write_file(path, {key: getattr(self, key) for key in TENSORS}, self.metadata())

    @classmethod
    def from_file(cls, path: Path, meta: dict, tensors: dict[str, np.ndarray]) -> Circuit:
        """The circuit in an already read file (see :func:`cna_vllm.sources.load`)."""
        kind = meta.get("kind", "cna")
        if kind != "cna":
            raise CircuitError(
                f"{path} holds {kind!r} steering vectors, not a neuron circuit; load it with "
                "cna_vllm.sources.load (any kind) or cna_vllm.vectors.VectorSet.load"
            )
        for key, dtype in TENSORS.items():
            if key not in tensors:
                raise CircuitError(f"{path} lacks the tensor {key!r}")
            if tensors[key].dtype != dtype:
                raise CircuitError(f"{path}: tensor {key!r} is {tensors[key].dtype}, expected {dtype}")
        try:
            circuit = cls(**cls._common_fields(meta), **{key: tensors[key] for key in TENSORS})
        except CircuitError as exc:
            raise CircuitError(f"{path}: {exc}") from exc
        except (KeyError, TypeError) as exc:
            raise CircuitError(f"{path} has malformed metadata: {exc!r}") from exc
        return circuit

    def summary(self, top: int = 10) -> str:
        """A readable multi-line description: metadata, counts per layer, top neurons."""
        lines = [f"circuit {self.name!r}: {len(self)} neurons", f"  {self.description}".rstrip()]
        if self.model:
            m = self.model
            lines.append(
                f"  model: {m.architecture}, {m.num_layers} layers, intermediate {m.intermediate_size}, "
                f"hidden {m.hidden_size}, fingerprint {m.fingerprint}"
            )
        for key, value in self.discovery.items():
            lines.append(f"  {key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
        lines.append(f"  created {self.created_at} by cna-vllm {self.version}")
        lines.append("  neurons per layer:")
        counts = self.layer_counts()
        width = max(counts.values())
        for layer, count in counts.items():
            lines.append(f"    L{layer:>3} {count:>5}  {'#' * max(1, round(30 * count / width))}")
        lines.append("  signed parts (select one in a spec as NAME[part], e.g. " f"{self.name}[pos]@0):")
        for part, desc in PARTS.items():
            mask = self.part_mask(part)
            per_layer = Counter(self.layers[mask].tolist())
            layers = " ".join(f"L{k}:{v}" for k, v in sorted(per_layer.items()))
            lines.append(f"    [{part:<4}] {int(mask.sum()):>5}  {desc}")
            lines.append(f"           {layers}")
        lines.append(f"  top {min(top, len(self))} neurons:  layer neuron      score   mean_pos   mean_neg")
        for i in np.argsort(-self.score, kind="stable")[:top]:
            lines.append(
                f"    {int(self.layers[i]):>18} {int(self.neurons[i]):>6} {self.score[i]:>10.4f} "
                f"{self.mean_pos[i]:>10.4f} {self.mean_neg[i]:>10.4f}"
            )
        return "\n".join(lines)
