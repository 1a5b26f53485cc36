"""Intake (patch P5): every request's spec is validated against the catalogue, canonicalised and salted."""

from __future__ import annotations

import json

import pytest

from cna_vllm.engine.intake import check_request
from cna_vllm.errors import SteeringError
from cna_vllm.steering import SALT_PREFIX, SteeringSpec

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.engine import EngineCoreRequest  # noqa: E402

CATALOGUE = {"refusal": {"kind": "cna"}, "refusal-caa": {"kind": "caa"}}


def request(steering=None, salt=None) -> EngineCoreRequest:
    sp = SamplingParams(max_tokens=4, extra_args={"steering": steering} if steering is not None else None)
    return EngineCoreRequest("r", [1, 2, 3], None, sp, None, 0.0, None, salt, None)


def check(req: EngineCoreRequest) -> EngineCoreRequest:
    check_request(None, req, circuits=CATALOGUE)
    return req


def test_steered_requests_get_a_fixed_length_steering_keyed_salt():
    spec = SteeringSpec.parse("refusal@0")
    req = check(request('[{"circuit":"refusal","multiplier":-0.0}]'))  # JSON text, -0.0: canonicalised
    assert req.sampling_params.extra_args["steering"] == spec.to_wire()  # the one wire form
    assert SteeringSpec.from_params(req.sampling_params).to_list() == spec.to_list()
    assert req.cache_salt == SALT_PREFIX + spec.fingerprint()
    long_user = "u" * 128  # vLLM's cap on a user salt; the composed salt stays short
    salted = check(request("refusal@0", salt=long_user)).cache_salt
    assert salted.startswith(req.cache_salt + "|") and len(salted) < 64
    assert check(request("refusal@0", salt="other")).cache_salt != salted


def test_unsteered_requests_keep_their_salt_and_cannot_forge_a_steered_one():
    assert check(request()).cache_salt is None
    assert check(request(salt="mine")).cache_salt == "mine"
    forged = SALT_PREFIX + SteeringSpec.parse("refusal@0").fingerprint()
    with pytest.raises(SteeringError, match="reserved"):
        check(request(salt=forged))
    with pytest.raises(SteeringError, match="reserved"):
        check(request("refusal@0", salt=forged))


def test_names_and_modes_are_checked_against_the_catalogue():
    with pytest.raises(SteeringError, match="unknown circuit 'nope'"):
        check(request('[{"circuit":"nope","multiplier":2}]'))
    with pytest.raises(SteeringError, match="CAA vector set"):
        check(request("refusal-caa@1"))
    with pytest.raises(SteeringError, match="finite"):
        check(request("refusal@" + "9" * 400))
    assert check(request("refusal-caa@1:shift")).cache_salt.startswith(SALT_PREFIX)


def test_negative_zero_is_zero():
    a, b = SteeringSpec.parse("refusal@-0.0"), SteeringSpec.parse("refusal@0")
    assert a.fingerprint() == b.fingerprint() and a.cache_salt(None) == b.cache_salt(None)


def test_signed_parts_pass_intake_and_empty_or_vector_parts_are_refused():
    catalogue = {"refusal": {"kind": "cna", "parts": {"pos": 3, "neg": 0, "up": 2, "down": 1}},
                 "refusal-caa": {"kind": "caa"}}
    req = request("refusal[pos]@0")
    check_request(None, req, circuits=catalogue)
    want = [{"circuit": "refusal[pos]", "mode": "scale", "multiplier": 0.0}]
    assert json.loads(req.sampling_params.extra_args["steering"]) == want
    assert req.cache_salt != check(request("refusal@0")).cache_salt
    for bad, match in (("refusal[neg]@0", "no neurons"), ("refusal-caa[pos]@1:shift", "no signed parts"),
                       ("refusal[x]@0", "unknown part")):
        with pytest.raises(SteeringError, match=match):
            check_request(None, request(bad), circuits=catalogue)
