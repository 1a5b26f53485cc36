"""Signed parts of a circuit: NAME[part] in a spec selects exactly the neurons of that part."""

from __future__ import annotations

import numpy as np
import pytest

from cna_vllm.circuit import PARTS, Circuit
from cna_vllm.errors import CircuitError, SteeringError
from cna_vllm.rows import to_rows
from cna_vllm.steering import SteeringSpec, resolve, split_part
from cna_vllm.vectors import VectorSet


@pytest.fixture
def circuit() -> Circuit:
    # mean_pos, mean_neg chosen so the two axes disagree on some neurons:
    #   n0: |+|>|-|, δ>0   n1: |+|>|-|, δ<0 (both negative)   n2: |+|<|-|, δ>0   n3: |+|<|-|, δ<0
    return Circuit(
        name="refusal",
        layers=[1, 1, 2, 3],
        neurons=[5, 9, 0, 4],
        score=[4.0, 3.0, 2.0, 1.0],
        mean_pos=[2.0, -3.0, -0.5, 0.1],
        mean_neg=[0.5, -1.0, -1.0, 0.9],
    )


def test_parts_select_the_documented_neurons(circuit):
    want = {"pos": [(1, 5), (1, 9)], "neg": [(2, 0), (3, 4)], "up": [(1, 5), (2, 0)], "down": [(1, 9), (3, 4)]}
    assert set(PARTS) == set(want)
    for part, pairs in want.items():
        sub = circuit.part(part)
        assert sub.pairs() == pairs and sub.name == f"refusal[{part}]"
        assert sorted(sub.score.tolist(), reverse=True) == sub.score.tolist()
    assert circuit.part_counts() == {"pos": 2, "neg": 2, "up": 2, "down": 2}
    assert circuit.metadata()["parts"] == circuit.part_counts()
    assert "[pos]" in circuit.summary() and "L1:2" in circuit.summary()


def test_spec_syntax_and_canonical_form():
    spec = SteeringSpec.parse("refusal[pos]@0, refusal[ down ]@0.5:shift")
    assert [i.circuit for i in spec.items] == ["refusal[pos]", "refusal[down]"]
    assert str(spec) == "refusal[pos]@0,refusal[down]@0.5:shift"
    assert SteeringSpec.parse({"circuit": "refusal[neg]", "multiplier": 2}).to_list()[0]["circuit"] == "refusal[neg]"
    assert spec.fingerprint() != SteeringSpec.parse("refusal@0,refusal@0.5:shift").fingerprint()
    assert split_part("a-b") == ("a-b", None) and split_part("a-b[up]") == ("a-b", "up")
    for bad in ["refusal[harm]@0", "refusal[pos@0", "refusal]@0", "refusal[pos][neg]@0", "[pos]@0"]:
        with pytest.raises(SteeringError, match="part|NAME|JSON"):
            SteeringSpec.parse(bad)


def test_rows_of_a_part_equal_rows_of_a_circuit_holding_only_those_neurons(circuit):
    for part in PARTS:
        only = circuit.part(part)
        for text in ("@0", "@2.5", "@0.7:patch", "@-1:shift"):
            a = to_rows(SteeringSpec.parse(f"refusal[{part}]{text}"), {"refusal": circuit})
            b = to_rows(SteeringSpec.parse(f"x{text}"), {"x": only})
            assert a.keys() == b.keys()
            for layer in a:
                for u, v in zip(a[layer], b[layer], strict=True):
                    np.testing.assert_array_equal(u, v)


def test_catalogue_validation(circuit):
    vectors = VectorSet(name="caa", layers=[0, 1], vectors=np.ones((2, 4), np.float32))
    lonely = Circuit(name="one", layers=[0], neurons=[1], score=[1.0], mean_pos=[2.0], mean_neg=[1.0])
    objects = {"refusal": circuit, "caa": vectors, "one": lonely}
    metadata = {name: {"kind": c.kind, **({"parts": c.part_counts()} if c.kind == "cna" else {})}
                for name, c in objects.items()}
    for catalogue in (objects, metadata):  # the sources themselves, and catalogue metadata (name -> kind, parts)
        SteeringSpec.parse("refusal[neg]@0,one[up]@2").validate(catalogue)
        with pytest.raises(SteeringError, match="no signed parts"):
            SteeringSpec.parse("caa[pos]@1:shift").validate(catalogue)
        with pytest.raises(SteeringError, match="no neurons in part 'down'"):
            SteeringSpec.parse("one[down]@0").validate(catalogue)
        with pytest.raises(SteeringError, match="unknown circuit 'nope'"):
            SteeringSpec.parse("nope[pos]@0").validate(catalogue)
    assert len(resolve(objects, "refusal[up]")) == 2
    with pytest.raises(CircuitError, match="no neurons"):
        lonely.part("down")


def test_parts_reproduce_the_published_sign_split():
    """`refusal[pos]` / `refusal[neg]` are exactly the circuits docs/results/sign-split was first run with."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    refusal = Circuit.load(repo / "circuits" / "qwen2.5-coder-0.5b-instruct" / "refusal.safetensors")
    split = repo / "docs" / "results" / "sign-split" / "circuits"
    if not split.is_dir():
        pytest.skip("the published sign-split circuits are gone")
    for part, name in (("pos", "refusal-harm-active"), ("neg", "refusal-benign-active")):
        published = Circuit.load(split / f"{name}.safetensors")
        ours = refusal.part(part)
        assert ours.pairs() == published.pairs()
        np.testing.assert_array_equal(ours.mean_neg, published.mean_neg)
