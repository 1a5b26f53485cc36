"""One request's ``steering`` on its way through the API process: parsed once, validated once.

The HTTP edge parses the field and validates it against the engine's catalogue; intake (patch
P5) then meets the same spec again in ``extra_args``. Neither the parse nor the catalogue check
may run a second time for it, and the worker-bound request carries the one wire form.
"""

from __future__ import annotations

import pytest

from cna_vllm.catalogue import Catalogue
from cna_vllm.engine.intake import check_request
from cna_vllm.server.schema import parse_steering
from cna_vllm.steering import SteeringLimits, SteeringSpec

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.engine import EngineCoreRequest  # noqa: E402


def test_the_edge_parses_and_validates_and_intake_does_neither_again(monkeypatch):
    catalogue = Catalogue({"refusal": {"kind": "cna", "parts": {"pos": 2, "neg": 1, "up": 2, "down": 1}}})
    spec = parse_steering([{"circuit": "refusal[pos]", "multiplier": 0.5}], SteeringLimits(), catalogue)
    wire = spec.to_wire()  # what the middleware ships in vllm_xargs

    parses, validations = [], []
    real_parse, real_validate = SteeringSpec.parse.__func__, SteeringSpec.validate

    def parse(cls, *a, **k):
        parses.append(a)
        return real_parse(cls, *a, **k)

    def validate(self, *a, **k):
        validations.append(a)
        return real_validate(self, *a, **k)

    monkeypatch.setattr(SteeringSpec, "parse", classmethod(parse))
    monkeypatch.setattr(SteeringSpec, "validate", validate)

    sp = SamplingParams(max_tokens=1, extra_args={"steering": wire})
    req = EngineCoreRequest("r", [1, 2], None, sp, None, 0.0, None, None, None)
    check_request(None, req, circuits=catalogue)
    assert parses == [] and validations == []  # the memo of the wire form and of the catalogue
    assert req.sampling_params.extra_args["steering"] == wire
    assert SteeringSpec.from_params(req.sampling_params) is spec  # the very object the edge built
    assert req.cache_salt == spec.cache_salt()

    # A spec the edge never saw (another path, e.g. vllm_xargs sent directly) is parsed and checked here.
    other = SamplingParams(max_tokens=1, extra_args={"steering": "refusal@2"})
    check_request(None, EngineCoreRequest("s", [1], None, other, None, 0.0, None, None, None), circuits=catalogue)
    assert len(parses) == 1 and len(validations) == 1


def test_a_catalogue_checks_each_spec_once_and_still_refuses_bad_ones():
    catalogue = Catalogue({"refusal": {"kind": "cna"}}, foreign={"alien": "other-model"})
    spec = SteeringSpec.parse("refusal@0")
    assert catalogue.validate(spec) is spec and catalogue.validate(spec) is spec
    from cna_vllm.errors import SteeringError

    with pytest.raises(SteeringError) as info:
        catalogue.validate(SteeringSpec.parse("alien@0"))
    assert info.value.code == "circuit_model_mismatch" and info.value.param == "steering.circuit"
    with pytest.raises(SteeringError):  # a refused spec is not remembered as valid
        catalogue.validate(SteeringSpec.parse("alien@0"))
    catalogue.add("alien", {"kind": "cna"})  # hot-loaded: now steerable, and no longer foreign
    assert catalogue.validate(SteeringSpec.parse("alien@0")) and "alien" not in catalogue.foreign
