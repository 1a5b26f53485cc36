"""SteeringSpec: parsing, validation, fingerprint, (s, b) rows and composition. No vLLM needed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cna_vllm.circuit import Circuit
from cna_vllm.errors import SteeringError
from cna_vllm.rows import to_offsets, to_rows, union_neurons
from cna_vllm.steering import MAX_ABS_VALUE, SteeringItem, SteeringLimits, SteeringSpec, parse_many

from .planted import circuit_of as circuit


@pytest.fixture
def circuits() -> dict[str, Circuit]:
    return {
        "refusal": circuit("refusal", [(3, 10), (3, 2), (5, 7)], seed=1),
        "code": circuit("code", [(3, 2), (4, 1)], seed=2),
    }


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize("empty", [None, "", "  ", [], (), "[]", SteeringSpec()])
def test_empty_forms_mean_unsteered(empty):
    spec = SteeringSpec.parse(empty)
    assert not spec and spec.fingerprint() == "" and spec.cache_salt() is None and spec.to_list() == []


def test_all_forms_agree():
    want = [
        {"circuit": "refusal", "mode": "scale", "multiplier": 2.0},
        {"circuit": "code", "mode": "patch", "alpha": 0.5},
    ]
    forms = [
        want,
        json.dumps(want),
        "refusal@2,code@0.5:patch",
        " refusal @ 2 , code@0.5:patch ",
        [{"circuit": "refusal", "multiplier": 2}, "code@0.5:patch"],
        SteeringSpec.parse(want),
    ]
    specs = [SteeringSpec.parse(f) for f in forms]
    for spec in specs:
        assert spec.to_list() == want
        assert spec.fingerprint() == specs[0].fingerprint()
    assert SteeringSpec.parse({"circuit": "refusal", "multiplier": 0}).to_list() == [
        {"circuit": "refusal", "mode": "scale", "multiplier": 0.0}
    ]
    assert str(specs[0]) == "refusal@2,code@0.5:patch"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("refusal", "NAME@VALUE"),
        ("refusal@x", "must be a number"),
        ("refusal@nan", "finite"),
        ("refusal@inf", "finite"),
        (f"refusal@{MAX_ABS_VALUE + 1}", "must lie in"),
        ("refusal@1:invert", "unknown mode"),
        ("@1", "non-empty"),
        ("[1", "not valid JSON"),
        (42, "must be a list"),
        ([{"circuit": "r", "multiplier": True}], "must be a number"),
        ([{"circuit": "r", "multiplier": None}], "must be a number"),
        ([{"circuit": "r", "mode": "scale", "alpha": 0.5}], "takes 'multiplier', not 'alpha'"),
        ([{"circuit": "r", "mode": "patch", "multiplier": 0.5}], "takes 'alpha'"),
        ([{"circuit": "r", "mode": "shift"}], "needs 'alpha'"),
        ([{"circuit": "r", "multiplier": 1, "strength": 2}], "unknown field"),
        ([{"multiplier": 1}], "'circuit' must be"),
        ([3], "must be an object"),
        (",".join(["r@1"] * 17), "at most"),
    ],
)
def test_bad_specs_raise_clear_errors(bad, message):
    with pytest.raises(SteeringError, match=message):
        SteeringSpec.parse(bad)


def test_validate_unknown_circuit(circuits):
    SteeringSpec.parse("refusal@0,code@1:shift").validate(circuits)
    with pytest.raises(SteeringError, match=r"unknown circuit 'nope'.*code, refusal"):
        SteeringSpec.parse("nope@0").validate(circuits)
    with pytest.raises(SteeringError, match="unknown circuit"):
        to_rows(SteeringSpec.parse("nope@0"), circuits)


def test_steering_error_is_value_error():
    # vLLM turns ValueError from a logits processor's validate_params into HTTP 400.
    assert issubclass(SteeringError, ValueError)


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_is_stable_and_discriminating():
    a = SteeringSpec.parse("refusal@2,code@0.5:patch")
    assert a.fingerprint() == SteeringSpec.parse("refusal@2.0,code@0.50:patch").fingerprint()
    # a pinned value: the fingerprint must not change between runs or versions silently
    assert a.fingerprint() == SteeringSpec.parse(a.to_list()).fingerprint()
    assert len(a.fingerprint()) == 16 and a.cache_salt() == f"cna-steer-{a.fingerprint()}"
    others = [
        "code@0.5:patch,refusal@2",  # order matters (affine composition)
        "refusal@2,code@0.5:shift",
        "refusal@2.0001,code@0.5:patch",
        "refusal@2",
        "refusal@0.5:patch,code@2",
    ]
    prints = {SteeringSpec.parse(o).fingerprint() for o in others} | {a.fingerprint()}
    assert len(prints) == len(others) + 1


def test_fingerprint_is_the_same_in_a_fresh_process():
    code = "from cna_vllm.steering import SteeringSpec; print(SteeringSpec.parse('a@2,b@0.5:patch').fingerprint())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == SteeringSpec.parse("a@2,b@0.5:patch").fingerprint()


# ---------------------------------------------------------------- rows
def test_modes_give_the_documented_affine_maps(circuits):
    c = circuits["refusal"]
    a = np.array([0.3, -1.2, 2.5])  # activations at c's neurons, in c's order
    cases = {
        "refusal@0.25": 0.25 * a,
        "refusal@0.4:patch": 0.6 * a + 0.4 * c.mean_neg,
        "refusal@1.5:shift": a - 1.5 * (c.mean_pos - c.mean_neg),
    }
    for text, want in cases.items():
        rows = to_rows(SteeringSpec.parse(text), {"refusal": c})
        got = []
        for layer, neuron, x in zip(c.layers, c.neurons, a, strict=True):
            idx, s, b = rows[int(layer)]
            j = int(np.flatnonzero(idx == neuron)[0])
            got.append(s[j] * x + b[j])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_rows_are_sorted_per_layer_and_typed(circuits):
    rows = to_rows(SteeringSpec.parse("refusal@0,code@2"), circuits)
    assert sorted(rows) == [3, 4, 5]
    idx, s, b = rows[3]
    assert idx.tolist() == [2, 10] and idx.dtype == np.int64
    assert s.dtype == np.float32 and b.dtype == np.float32


def test_composition_applies_items_in_order(circuits):
    """Neuron (3, 2) is in both circuits: scale 2 then shift α=1 vs the reverse."""
    code = circuits["code"]
    j = 0  # (3, 2) is code's first neuron
    delta = float(code.delta[j])
    a = 0.7

    def apply(text):
        idx, s, b = to_rows(SteeringSpec.parse(text), circuits)[3]
        k = int(np.flatnonzero(idx == 2)[0])
        return float(s[k]) * a + float(b[k])

    assert apply("refusal@2,code@1:shift") == pytest.approx(2 * a - delta, rel=1e-6)
    assert apply("code@1:shift,refusal@2") == pytest.approx(2 * (a - delta), rel=1e-6)
    # a neuron in only one circuit is untouched by the other
    idx, s, b = to_rows(SteeringSpec.parse("refusal@2,code@1:shift"), circuits)[3]
    k = int(np.flatnonzero(idx == 10)[0])
    assert (s[k], b[k]) == (2.0, 0.0)


def test_identity_item_gives_identity_rows(circuits):
    _idx, s, b = to_rows(SteeringSpec.parse("refusal@1"), circuits)[3]
    assert (s == 1).all() and (b == 0).all()


def test_overflowing_rows_are_refused(circuits):
    huge = Circuit(name="huge", layers=[0], neurons=[0], score=[1.0], mean_pos=[3e38], mean_neg=[-3e38])
    with pytest.raises(SteeringError, match="non-finite"):
        to_rows(SteeringSpec.parse("huge@100:shift"), {"huge": huge})
    text = ",".join(["refusal@100"] * 16)  # 1e32: large but finite
    assert np.isfinite(to_rows(SteeringSpec.parse(text), circuits)[3][1]).all()


def test_parse_many_per_prompt_and_shared():
    shared = parse_many([{"circuit": "a", "multiplier": 0}], 3)
    assert len(shared) == 3 and all(s.to_list() == shared[0].to_list() for s in shared)
    per = parse_many([None, "a@0", [{"circuit": "b", "multiplier": 2}]], 3)
    assert [bool(s) for s in per] == [False, True, True]
    assert parse_many("a@0", 2)[1].to_list()[0]["circuit"] == "a"
    assert parse_many(None, 2) == [SteeringSpec(), SteeringSpec()]
    with pytest.raises(SteeringError, match="3 prompts"):
        parse_many([None, "a@0"], 3)


def test_union_neurons(circuits):
    u = union_neurons(circuits.values())
    assert {k: v.tolist() for k, v in u.items()} == {3: [2, 10], 4: [1], 5: [7]}


def test_item_str_and_dict():
    item = SteeringItem("x", "shift", 0.5)
    assert str(item) == "x@0.5:shift" and item.to_dict() == {"circuit": "x", "mode": "shift", "alpha": 0.5}


def test_importable_without_vllm():
    code = (
        "import sys; import cna_vllm.steering; "
        "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules), 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vector_sets_take_shift_only_and_their_offsets_add_up(circuits):
    from cna_vllm.rows import vector_layers
    from cna_vllm.steering import is_vector_set
    from cna_vllm.vectors import VectorSet

    v = VectorSet(name="v", layers=[1, 3], vectors=np.ones((2, 4)))
    w = VectorSet(name="w", layers=[3], vectors=np.full((1, 4), 2.0))
    known = {**circuits, "v": v, "w": w}
    assert is_vector_set(v) and is_vector_set(v.metadata()) and not is_vector_set(known["code"])
    with pytest.raises(SteeringError, match="CAA vector set.*v@1:shift"):
        SteeringSpec.parse("v@0").validate(known)
    with pytest.raises(SteeringError, match="not 'patch'"):
        SteeringSpec.parse("v@1:patch").validate(known)
    spec = SteeringSpec.parse("v@0.5:shift,code@0,w@-1:shift")
    offsets = to_offsets(spec, known)
    assert sorted(offsets) == [1, 3] and offsets[1].dtype == np.float32
    assert np.array_equal(offsets[1], np.full(4, -0.5)) and np.array_equal(offsets[3], np.full(4, 1.5))
    assert to_rows(spec, known).keys() == to_rows(SteeringSpec.parse("code@0"), known).keys()  # vectors skip rows
    assert to_offsets(SteeringSpec.parse("code@0"), known) == {}
    assert union_neurons(known.values()).keys() == union_neurons(circuits.values()).keys()
    assert vector_layers(known.values()) == [1, 3]


# ---------------------------------------------------------------- the strict grammar (issue #24)
@pytest.mark.parametrize(
    ("bad", "param", "message"),
    [
        ("refusal\x07@1", "steering.circuit", "not a circuit name"),  # a control character (was stripped)
        ("\x0brefusal@1", "steering.circuit", "not a circuit name"),
        ("réfusal@1", "steering.circuit", "not a circuit name"),  # non-ASCII
        ("refusal@1_0", "steering.multiplier", "JSON number"),  # Python's float() reads 10
        ("refusal@１", "steering.multiplier", "JSON number"),  # fullwidth digit
        ("refusal@٣", "steering.multiplier", "JSON number"),  # Arabic-Indic digit
        ("refusal@.5", "steering.multiplier", "JSON number"),
        ("refusal@+1", "steering.multiplier", "JSON number"),
        ("refusal@ 1 2", "steering.multiplier", "JSON number"),
        ("refusal@1:", "steering.mode", "non-empty"),
        ("refusal@1\t", "steering.multiplier", "JSON number"),
    ],
)
def test_compact_grammar_is_strict_ascii(bad, param, message):
    with pytest.raises(SteeringError, match=message) as info:
        SteeringSpec.parse(bad)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("item", "param", "message"),
    [
        ({"circuit": "refusal", "mode": ["scale"], "multiplier": 1}, "steering.mode", "must be a string"),
        ({"circuit": "refusal", "mode": {"a": 1}, "multiplier": 1}, "steering.mode", "must be a string"),
        ({"circuit": "refusal\n", "multiplier": 1}, "steering.circuit", "not a circuit name"),
        ({"circuit": " refusal", "multiplier": 1}, "steering.circuit", "not a circuit name"),
        ({"circuit": "refusal", "multiplier": "1_0"}, "steering.multiplier", "JSON number"),
        ({"circuit": "refusal", "multiplier": "１"}, "steering.multiplier", "JSON number"),
    ],
)
def test_object_items_name_the_field_of_every_type_error(item, param, message):
    with pytest.raises(SteeringError, match=message) as info:
        SteeringSpec.parse(item)  # lenient form: numbers may be strings, but JSON numbers only
    assert info.value.param == param


def test_sizes_are_checked_before_parsing():
    huge = ",".join(["refusal@1"] * 400_000)  # 4 MB
    with pytest.raises(SteeringError, match="3999999 characters; at most"):
        SteeringSpec.parse(huge)
    many = ",".join(["refusal@1"] * 17)
    with pytest.raises(SteeringError, match="17 items; at most 8"):
        SteeringSpec.parse(many, SteeringLimits())
    with pytest.raises(SteeringError, match="at most"):
        SteeringSpec.parse("[" + "1," * 20_000 + "1]")  # JSON text: size before json.loads
    assert SteeringSpec.parse(" refusal @ 1 , refusal[pos] @ -2.5e-1 : patch ").to_list() == [
        {"circuit": "refusal", "mode": "scale", "multiplier": 1.0},
        {"circuit": "refusal[pos]", "mode": "patch", "alpha": -0.25},
    ]
