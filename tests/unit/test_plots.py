"""``cna_vllm.plots``: figures are written as real PNG files of the documented size, with their bars drawn."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import numpy as np

from cna_vllm.identity import ModelIdentity
from cna_vllm.plots import plot_layer_counts, pyplot, save_figure

from .planted import circuit_of

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPI = 110  # save_figure's resolution


def png_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` in pixels of a PNG file, read from its IHDR chunk; fails on anything else."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR", f"{path}: the first chunk is not IHDR"
    assert len(data) > 2_000, f"{path} is only {len(data)} bytes: an empty figure?"
    return struct.unpack(">II", data[16:24])


def pixels(path: str | Path) -> np.ndarray:
    """The image as ``[height, width, 3]`` uint8 RGB."""
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    return np.round(img[..., :3] * 255).astype(np.uint8) if img.dtype != np.uint8 else img[..., :3]


def has_colour(path: str | Path, hex_colour: str, at_least: int = 50) -> bool:
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
    return int((pixels(path) == rgb).all(axis=-1).sum()) >= at_least


BAR = "#3b6ea5"  # plot_layer_counts' bar colour


def test_layer_counts_plot_is_a_png_of_the_model_size(tmp_path):
    circuit = circuit_of("refusal", [(29, 1), (29, 2), (28, 3), (3, 4)])
    ident = ModelIdentity("LlamaForCausalLM", num_layers=30, intermediate_size=64, hidden_size=32, fingerprint="x")
    path = plot_layer_counts(replace(circuit, model=ident), tmp_path / "deep" / "nested" / "c.png")
    assert path == tmp_path / "deep" / "nested" / "c.png"  # folders created
    # 30 layers: 0.3 in per layer, 3.5 in tall, at 110 dpi
    assert png_size(path) == (round(30 * 0.3 * DPI), round(3.5 * DPI))
    assert has_colour(path, BAR)


def test_layer_counts_without_a_model_span_the_deepest_layer(tmp_path):
    circuit = circuit_of("c", [(3, 40), (2, 17), (1, 5)])  # no model: layers 0..3
    small = plot_layer_counts(circuit, tmp_path / "small.png")
    assert png_size(small) == (6 * DPI, round(3.5 * DPI))  # at least 6 in wide
    wide = plot_layer_counts(circuit, tmp_path / "wide.png", num_layers=40)  # explicit depth wins
    assert png_size(wide) == (round(40 * 0.3 * DPI), round(3.5 * DPI))
    assert has_colour(small, BAR) and has_colour(wide, BAR)


def test_save_figure_writes_closes_and_returns_the_path(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.bar([0, 1], [1, 2], color="#b5443b")
    before = set(plt.get_fignums())
    out = save_figure(fig, str(tmp_path / "sub" / "f.png"))  # a str path works too
    assert isinstance(out, Path) and out.is_file()
    assert png_size(out) == (4 * DPI, 2 * DPI)
    assert fig.number in before and fig.number not in plt.get_fignums()  # closed: no figure leak
    assert has_colour(out, "#b5443b")


def test_backend_is_headless():
    import matplotlib

    pyplot()
    assert matplotlib.get_backend().lower() == "agg"  # no display needed on a server or in CI
