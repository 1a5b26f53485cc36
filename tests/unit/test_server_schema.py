"""The HTTP ``steering`` field: accepted shapes, the bad-input corpus and the error body."""

import json

import pytest

from cna_vllm.rows import to_rows
from cna_vllm.server.schema import ApiError, echo, parse_steering
from cna_vllm.steering import SteeringItem, SteeringLimits, SteeringSpec

CIRCUITS = {"refusal": object(), "other": object()}
LIMITS = SteeringLimits(max_items=4, max_abs_multiplier=10.0, max_abs_alpha=2.0)


def parse(raw):
    return parse_steering(raw, LIMITS, CIRCUITS, foreign={"qwen-only": "qwen2.5-coder-0.5b-instruct"})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ()),
        ({"circuit": "refusal", "multiplier": 0}, (SteeringItem("refusal", "scale", 0.0),)),
        ({"circuit": "refusal", "multiplier": -1.5, "mode": "scale"}, (SteeringItem("refusal", "scale", -1.5),)),
        ({"circuit": "refusal", "mode": "patch", "alpha": 0.5}, (SteeringItem("refusal", "patch", 0.5),)),
        (
            [{"circuit": "refusal", "multiplier": 2}, {"circuit": "other", "mode": "shift", "alpha": 1}],
            (SteeringItem("refusal", "scale", 2.0), SteeringItem("other", "shift", 1.0)),
        ),
        ("refusal@0.5", (SteeringItem("refusal", "scale", 0.5),)),
        ("refusal@0.5:patch,other@3", (SteeringItem("refusal", "patch", 0.5), SteeringItem("other", "scale", 3.0))),
        ({"circuit": "refusal", "multiplier": 10}, (SteeringItem("refusal", "scale", 10.0),)),  # bound inclusive
    ],
)
def test_accepted(raw, expected):
    spec = parse(raw)
    assert spec.items == expected
    # What the middleware ships in vllm_xargs is a flat string the engine parses back to the same spec.
    assert SteeringSpec.parse(json.dumps(spec.to_list())) == spec


BAD = [
    ("int", 5, "steering", "got int"),
    ("float", 0.5, "steering", "got float"),
    ("bool", True, "steering", "got bool"),
    ("empty list", [], "steering", "empty list"),
    ("empty string", "  ", "steering", "empty string"),
    ("json in a string", '{"circuit": "refusal"}', "steering", "not a string holding JSON"),
    ("compact without value", "refusal", "steering", "NAME@VALUE"),
    ("compact bad number", "refusal@abc", "steering", "must be a number"),
    ("compact nan", "refusal@nan", "steering", "finite"),
    ("compact unknown mode", "refusal@1:twist", "steering", "unknown mode"),
    ("compact over bound", "refusal@50", "steering.multiplier", "out of bounds"),
    ("list of ints", [1, 2], "steering[0]", "must be an object"),
    ("list of lists", [[{"circuit": "refusal", "multiplier": 1}]], "steering[0]", "must be an object"),
    ("missing circuit", {"multiplier": 1}, "steering.circuit", "Field required"),
    ("empty circuit", {"circuit": "", "multiplier": 1}, "steering.circuit", "at least 1 character"),
    ("circuit not a string", {"circuit": ["refusal"], "multiplier": 1}, "steering.circuit", "valid string"),
    ("circuit too long", {"circuit": "x" * 500, "multiplier": 1}, "steering.circuit", "at most 128"),
    ("unknown circuit", {"circuit": "nope", "multiplier": 1}, "steering.circuit", "unknown circuit 'nope'"),
    ("circuit of another model", {"circuit": "qwen-only", "multiplier": 1}, "steering.circuit", "belongs to model"),
    ("unknown mode", {"circuit": "refusal", "mode": "invert", "multiplier": 1}, "steering.mode", "'scale'"),
    ("mode wrong type", {"circuit": "refusal", "mode": 3, "multiplier": 1}, "steering.mode", "'scale'"),
    ("string number", {"circuit": "refusal", "multiplier": "1"}, "steering.multiplier", "must be a number"),
    ("bool number", {"circuit": "refusal", "multiplier": False}, "steering.multiplier", "must be a number"),
    ("null number", {"circuit": "refusal", "multiplier": None}, "steering.multiplier", "needs 'multiplier'"),
    ("nan", {"circuit": "refusal", "multiplier": float("nan")}, "steering.multiplier", "finite"),
    ("inf", {"circuit": "refusal", "multiplier": float("inf")}, "steering.multiplier", "finite"),
    ("-inf alpha", {"circuit": "refusal", "mode": "patch", "alpha": float("-inf")}, "steering.alpha", "finite"),
    ("huge", {"circuit": "refusal", "multiplier": 1e300}, "steering.multiplier", "out of bounds"),
    ("over bound", {"circuit": "refusal", "multiplier": -10.5}, "steering.multiplier", "out of bounds"),
    ("alpha over bound", {"circuit": "refusal", "mode": "shift", "alpha": 3}, "steering.alpha", "out of bounds"),
    ("scale with alpha", {"circuit": "refusal", "alpha": 1}, "steering", "takes 'multiplier', not 'alpha'"),
    ("patch with multiplier", {"circuit": "refusal", "mode": "patch", "multiplier": 1}, "steering", "not"),
    ("both numbers", {"circuit": "refusal", "multiplier": 1, "alpha": 1}, "steering", "not 'alpha'"),
    ("no number", {"circuit": "refusal"}, "steering.multiplier", "needs 'multiplier'"),
    ("extra field", {"circuit": "refusal", "multiplier": 1, "layer": 3}, "steering", "unknown field 'layer'"),
    ("nested junk", {"circuit": {"name": {"x": [1]}}, "multiplier": 1}, "steering.circuit", "valid string"),
    ("dict number", {"circuit": "refusal", "multiplier": {"v": 1}}, "steering.multiplier", "must be a number"),
    ("too many items", [{"circuit": "refusal", "multiplier": 1}] * 5, "steering", "at most 4"),
    ("bad second item", [{"circuit": "refusal", "multiplier": 1}, {"circuit": "x"}], "steering[1]", ""),
]


@pytest.mark.parametrize(("name", "raw", "param", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_rejected(name, raw, param, fragment):
    with pytest.raises(ApiError) as info:
        parse(raw)
    err = info.value
    assert err.status == 400
    assert err.param.startswith(param), (err.param, err.message)
    assert fragment in err.message, err.message
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    assert json.dumps(err.body())  # serialisable as is


def test_corpus_size():
    assert len(BAD) >= 30


def test_unknown_and_foreign_codes():
    with pytest.raises(ApiError) as info:
        parse({"circuit": "nope", "multiplier": 1})
    assert info.value.code == "unknown_circuit"
    assert "refusal" in info.value.message  # lists what is there
    with pytest.raises(ApiError) as info:
        parse({"circuit": "qwen-only", "multiplier": 1})
    assert info.value.code == "circuit_model_mismatch"


@pytest.mark.parametrize(
    "kwargs", [{"max_items": 0}, {"max_items": 99}, {"max_abs_multiplier": float("inf")}, {"max_abs_alpha": 0}]
)
def test_limits_checked(kwargs):
    with pytest.raises(ValueError):
        SteeringLimits(**kwargs)


def test_echo_and_salt():
    spec = parse([{"circuit": "refusal", "multiplier": 0}, {"circuit": "other", "mode": "patch", "alpha": 0.5}])
    assert echo(spec) == "refusal@0,other@0.5:patch"
    assert echo(parse(None)) == "none"
    salt = spec.cache_salt()
    assert salt and len(salt) <= 128 and not set(salt) & set("@/\\\0")  # vLLM's cache_salt rules
    assert parse("refusal@0,other@0.5:patch").cache_salt() == salt
    assert parse({"circuit": "refusal", "multiplier": 0.1}).cache_salt() != parse("refusal@0").cache_salt()


def test_signed_parts_through_the_http_field():
    from cna_vllm.circuit import Circuit

    refusal = Circuit(name="refusal", layers=[0, 1], neurons=[3, 4], score=[2.0, 1.0], mean_pos=[2.0, 0.0],
                      mean_neg=[0.0, 1.0])
    circuits = {"refusal": refusal}
    spec = parse_steering({"circuit": "refusal[pos]", "multiplier": 0}, LIMITS, circuits)
    assert echo(spec) == "refusal[pos]@0" and to_rows(spec, circuits)[0][0].tolist() == [3] and 1 not in to_rows(spec,
        circuits)
    with pytest.raises(ApiError) as info:
        parse_steering("nope[pos]@0", LIMITS, circuits)
    assert info.value.code == "unknown_circuit" and "'nope'" in info.value.message
    with pytest.raises(ApiError) as info:
        parse_steering("refusal[harm]@0", LIMITS, circuits)
    assert info.value.status == 400 and "unknown part 'harm'" in info.value.message
    with pytest.raises(ApiError) as info:
        parse_steering("qwen-only[pos]@0", LIMITS, circuits, foreign={"qwen-only": "q"})
    assert info.value.code == "circuit_model_mismatch"
