"""PNG plots of results people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

from cna_vllm.circuit import Circuit


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (creating folders) and close ``fig``."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_layer_counts(circuit: Circuit, path: str | Path, num_layers: int | None = None) -> Path:
    """Bar chart of the circuit's neurons per layer."""
    plt = pyplot()
    counts = circuit.layer_counts()
    num_layers = num_layers or (circuit.model.num_layers if circuit.model else max(counts) + 1)
    xs = list(range(num_layers))
    fig, ax = plt.subplots(figsize=(max(6, num_layers * 0.3), 3.5))
    ax.bar(xs, [counts.get(x, 0) for x in xs], color="#3b6ea5")
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_title(f"{circuit.name}: {len(circuit)} neurons by layer")
    ax.set_xticks(xs[:: max(1, num_layers // 16)])
    return save_figure(fig, path)
