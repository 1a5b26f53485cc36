"""Overlap of two circuits against a hand count: shared neurons, shares both ways, Jaccard, per layer, files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cna_vllm.circuit import Circuit
from cna_vllm.evaluate.overlap import overlap, plot_overlap, write_overlap

from .test_plots import DPI, png_size


def circuit(name: str, pairs: list[tuple[int, int]]) -> Circuit:
    n = len(pairs)
    return Circuit(
        name=name,
        layers=np.array([p[0] for p in pairs]),
        neurons=np.array([p[1] for p in pairs]),
        score=np.linspace(1.0, 0.1, n),  # rank order = the order given
        mean_pos=np.ones(n),
        mean_neg=np.zeros(n),
    )


A = circuit("a", [(0, 1), (0, 2), (1, 3), (2, 4)])
B = circuit("b", [(1, 3), (0, 2), (3, 5)])


def test_overlap_by_hand():
    got = overlap(A, B)
    assert got["a"] == {"name": "a", "n": 4} and got["b"] == {"name": "b", "n": 3} and got["top"] is None
    assert got["shared"] == 2 and got["shared_neurons"] == [[0, 2], [1, 3]]
    assert got["share_of_a_in_b"] == pytest.approx(2 / 4)  # the paper's number: |A ∩ B| / |A|
    assert got["share_of_b_in_a"] == pytest.approx(2 / 3)
    assert got["jaccard"] == pytest.approx(2 / 5)  # |A ∩ B| / |A ∪ B|
    assert got["per_layer"] == {
        0: {"a": 2, "b": 1, "shared": 1},
        1: {"a": 1, "b": 1, "shared": 1},
        2: {"a": 1, "b": 0, "shared": 0},
        3: {"a": 0, "b": 1, "shared": 0},
    }


def test_overlap_is_symmetric_where_it_should_be():
    ab, ba = overlap(A, B), overlap(B, A)
    assert ab["jaccard"] == ba["jaccard"] and ab["shared_neurons"] == ba["shared_neurons"]
    assert ab["share_of_a_in_b"] == ba["share_of_b_in_a"]
    same = overlap(A, A)
    assert same["shared"] == 4 and same["jaccard"] == same["share_of_a_in_b"] == 1.0


def test_top_compares_only_the_highest_ranked_neurons():
    got = overlap(A, B, top=2)  # A's (0,1),(0,2) against B's (1,3),(0,2)
    assert got["top"] == 2 and got["a"]["n"] == got["b"]["n"] == 2
    assert got["shared_neurons"] == [[0, 2]] and got["jaccard"] == pytest.approx(1 / 3)
    assert set(got["per_layer"]) == {0, 1}  # layers 2 and 3 are below the cut


def test_write_overlap_writes_json_and_png(tmp_path):
    _, paths = write_overlap(A, B, tmp_path / "out")
    assert paths == [tmp_path / "out" / "overlap.json", tmp_path / "out" / "overlap.png"]
    on_disk = json.loads(paths[0].read_text())
    assert on_disk["shared"] == 2 and on_disk["jaccard"] == pytest.approx(0.4)
    assert on_disk["per_layer"]["3"] == {"a": 0, "b": 1, "shared": 0}  # JSON keys are strings
    assert png_size(paths[1]) == (6 * DPI, round(3.5 * DPI))  # 4 layers: the 6 in minimum


def test_overlap_plot_widens_with_the_layers(tmp_path):
    deep_a = circuit("a", [(layer, 0) for layer in range(20)])
    deep_b = circuit("b", [(layer, 0) for layer in range(0, 20, 2)])
    path = plot_overlap(overlap(deep_a, deep_b), tmp_path / "deep.png")
    assert png_size(path) == (round(0.45 * 20 * DPI), round(3.5 * DPI))
