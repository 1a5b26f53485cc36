"""Overlap of two circuits: shared neurons, share of A in B, Jaccard, per-layer counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cna_vllm.circuit import Circuit
from cna_vllm.plots import pyplot, save_figure


def overlap(a: Circuit, b: Circuit, top: int | None = None) -> dict[str, Any]:
    """Compare the top ``top`` neurons (all if None) of two circuits.

    ``share_of_a_in_b`` is the paper's base-vs-instruct number (|A ∩ B| / |A|), not Jaccard.
    """
    if top is not None:
        a, b = a.top(top), b.top(top)
    pa, pb = set(a.pairs()), set(b.pairs())
    shared = pa & pb
    layers = sorted(set(a.layer_counts()) | set(b.layer_counts()))
    per_layer = {
        layer: {
            "a": a.layer_counts().get(layer, 0),
            "b": b.layer_counts().get(layer, 0),
            "shared": sum(1 for (lay, _) in shared if lay == layer),
        }
        for layer in layers
    }
    return {
        "a": {"name": a.name, "n": len(a)},
        "b": {"name": b.name, "n": len(b)},
        "top": top,
        "shared": len(shared),
        "share_of_a_in_b": len(shared) / len(pa),
        "share_of_b_in_a": len(shared) / len(pb),
        "jaccard": len(shared) / len(pa | pb),
        "per_layer": per_layer,
        "shared_neurons": sorted([list(p) for p in shared]),
    }


def plot_overlap(result: dict[str, Any], path: str | Path) -> Path:
    """Per-layer neuron counts of A, B and their intersection."""
    plt = pyplot()
    per_layer = result["per_layer"]
    layers = list(per_layer)
    xs = range(len(layers))
    width = 0.28
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers)), 3.5))
    series = ((-width, "a", result["a"]["name"]), (0, "b", result["b"]["name"]), (width, "shared", "shared"))
    for offset, key, label in series:
        ax.bar([x + offset for x in xs], [per_layer[layer][key] for layer in layers], width, label=label)
    ax.set_xticks(list(xs), [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_title(
        f"{result['shared']} shared: {100 * result['share_of_a_in_b']:.1f}% of A in B, "
        f"Jaccard {result['jaccard']:.3f}"
    )
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_overlap(a: Circuit, b: Circuit, out_dir: str | Path, top: int | None = None) -> tuple[dict, list[Path]]:
    """:func:`overlap` as ``overlap.json`` and ``overlap.png`` in ``out_dir``; return it and the two paths."""
    result = overlap(a, b, top=top)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlap.json").write_text(json.dumps(result, indent=2) + "\n")
    return result, [out / "overlap.json", plot_overlap(result, out / "overlap.png")]
