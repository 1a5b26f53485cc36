"""What ``cna-vllm discover`` writes next to a circuit or vector file, and what it prints."""

from __future__ import annotations

import json
import resource
from collections.abc import Callable
from pathlib import Path

from cna_vllm.discover.cna import DiscoveryResult
from cna_vllm.plots import plot_layer_counts


def write_circuit(result: DiscoveryResult, out: Path, model: str, echo: Callable[[str], None] = print) -> dict:
    """Save the circuit to ``out``, its ``.summary.json`` and ``.layers.png`` beside it; return the summary."""
    result.circuit.save(out)
    summary = result.summary | {
        "model": model,
        "file": str(out),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    summary_path = out.with_suffix(".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    plot = plot_layer_counts(result.circuit, out.with_suffix(".layers.png"))
    echo(result.circuit.summary(top=10))
    echo(f"universal neurons removed: {summary['discovery']['universal_removed']}")
    echo(f"wrote {out}\n      {summary_path}\n      {plot}")
    echo(f"wall time {summary['wall_time_s']} s, peak RSS {summary['peak_rss_mib']} MiB")
    return summary


def write_vectors(vectors, out: Path, echo: Callable[[str], None] = print) -> None:
    """Save a CAA :class:`~cna_vllm.vectors.VectorSet` to ``out`` and its metadata as ``.summary.json``."""
    vectors.save(out)
    out.with_suffix(".summary.json").write_text(json.dumps(vectors.metadata(), indent=2) + "\n")
    norms = vectors.metadata()["norms"]
    echo(f"CAA vectors {vectors.name!r} ({vectors.site}) at layers {vectors.layers.tolist()}; norms {norms}")
    echo(f"wrote {out}")
