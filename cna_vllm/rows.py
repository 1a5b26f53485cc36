"""A spec as the engine sees it: per-neuron ``(s, b)`` rows and per-layer MLP-output offsets.

The engine knows nothing of circuits or modes: each mode is a way to compute ``(s, b)``
for the affine map ``a ← s·a + b`` (:mod:`cna_vllm.steering`), and CAA vector items sum
into one offset per layer. Where two items touch one neuron the maps compose: after
``(s1, b1)`` then ``(s2, b2)`` the neuron holds ``(s2·s1, s2·b1 + b2)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from cna_vllm.errors import SteeringError
from cna_vllm.steering import SteeringItem, SteeringSpec, is_vector_set, resolve

LayerRows = dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
"""``{layer: (neuron_idx int64 ascending, s float32, b float32)}``."""
LayerOffsets = dict[int, np.ndarray]
"""``{layer: float32 [hidden]}``, added to the layer's MLP output."""


def affine(item: SteeringItem, circuit: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron ``(s, b)`` of one item in the circuit's own neuron order, float64."""
    n = len(circuit)
    v = float(item.value)
    if item.mode == "scale":
        return np.full(n, v), np.zeros(n)
    if item.mode == "patch":
        return np.full(n, 1.0 - v), v * circuit.mean_neg.astype(np.float64)
    return np.ones(n), -v * circuit.delta.astype(np.float64)  # shift


def to_rows(spec: SteeringSpec, sources: Mapping[str, Any]) -> LayerRows:
    """Compose the neuron items into per-layer ``(neuron_idx, s, b)``."""
    spec.validate(sources)
    acc: dict[int, dict[int, tuple[float, float]]] = {}
    for item in spec.items:
        circuit = resolve(sources, item.circuit)
        if is_vector_set(circuit):
            continue
        s_arr, b_arr = affine(item, circuit)
        for layer, neuron, s, b in zip(
            circuit.layers.tolist(), circuit.neurons.tolist(), s_arr.tolist(), b_arr.tolist(), strict=True
        ):
            s0, b0 = acc.setdefault(layer, {}).get(neuron, (1.0, 0.0))
            acc[layer][neuron] = (s * s0, s * b0 + b)
    rows: LayerRows = {}
    for layer in sorted(acc):
        neurons = sorted(acc[layer])
        sb = np.array([acc[layer][n] for n in neurons], dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(sb).all():
            raise SteeringError(f"steering {spec} produces non-finite values at layer {layer}")
        rows[layer] = (np.asarray(neurons, dtype=np.int64), sb[:, 0].astype(np.float32), sb[:, 1].astype(np.float32))
    return rows


def to_offsets(spec: SteeringSpec, sources: Mapping[str, Any]) -> LayerOffsets:
    """Sum the vector items into per-layer MLP-output offsets ``−Σ α·v_l`` (float32)."""
    spec.validate(sources)
    acc: dict[int, np.ndarray] = {}
    for item in spec.items:
        vectors = resolve(sources, item.circuit)
        if not is_vector_set(vectors):
            continue
        for layer, v in zip(vectors.layers.tolist(), vectors.vectors, strict=True):
            acc[layer] = acc.get(layer, 0.0) - float(item.value) * v.astype(np.float64)
    out = {layer: np.asarray(acc[layer], dtype=np.float32) for layer in sorted(acc)}
    if not all(np.isfinite(v).all() for v in out.values()):
        raise SteeringError(f"steering {spec} produces non-finite offsets")
    return out


def union_neurons(sources: Iterable[Any]) -> dict[int, np.ndarray]:
    """Per layer, the ascending union of neuron indices over the neuron circuits (the sparse index)."""
    acc: dict[int, set[int]] = {}
    for circuit in sources:
        if is_vector_set(circuit):
            continue
        for layer, neuron in circuit.pairs():
            acc.setdefault(layer, set()).add(neuron)
    return {layer: np.array(sorted(acc[layer]), dtype=np.int64) for layer in sorted(acc)}


def vector_layers(sources: Iterable[Any]) -> list[int]:
    """The layers whose MLP output some CAA vector set offsets."""
    return sorted({layer for c in sources if is_vector_set(c) for layer in c.layers.tolist()})
