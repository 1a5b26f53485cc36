"""`tune` on a synthetic objective (no engine): seeds first, constraints, front, recommendation files."""

from __future__ import annotations

import json

import pytest

from cna_vllm.evaluate.sweep import Target
from cna_vllm.evaluate.tune import Space, seed_params, tune, write_outputs
from cna_vllm.steering import SteeringSpec

pytest.importorskip("optuna")


def fake_evaluate(arm):
    """Refusal falls with α on part 'neg' only; KL grows with |α|; patch wrecks quality; CAA is cheap."""
    if not arm.spec:
        return {"refusal_rate": 0.5, "quality_paper": 0.99, "quality_robust": 0.95, "kl_forced": 0.0}
    item = arm.spec.items[0]
    a = 1 - item.value if item.mode == "scale" else item.value
    caa = item.circuit == "v"
    drop = 0.4 * max(a, 0) if (caa or "[neg]" in item.circuit) else 0.0
    refusal = max(0.0, 0.5 - drop)
    return {"refusal_rate": refusal, "relative_refusal_reduction": 1 - refusal / 0.5,
            "quality_paper": 0.5 if item.mode == "patch" else 0.99, "quality_robust": 0.9,
            "kl_forced": (0.01 if caa else 0.05) * abs(a), "kl_first": 0.0}


def test_tune_seeds_constraints_and_outputs(tmp_path):
    space = Space(["c"], ["all", "neg"], ["scale", "patch"], (-1.0, 1.0), 0.5, vectors=["v"])
    sweep = {"sweep": {"rows": [
        {"arm": "c[neg]@0", "relative_refusal_reduction": 0.8, "misses": []},
        {"arm": "c@1:patch", "relative_refusal_reduction": 0.9, "misses": ["quality 0.5"]},
        {"arm": "c[up]@0", "relative_refusal_reduction": 0.9, "misses": []},  # part outside the space
    ]}}
    seeds = seed_params(sweep, space, k=2)
    # the best arms that kept quality first (c[up] is outside the space), then the rest
    assert [str(space.spec(p)) for p in seeds] == ["c[neg]@0", "c@1:patch"]
    target = Target(max_kl=0.2)
    result = tune(fake_evaluate, space, trials=8, target=target, seeds=seeds[:1], seed=0)
    trials = result["trials"]
    assert len(trials) == 8 and trials[0]["spec"] == "c[neg]@0" and trials[0]["seeded"]
    assert all(t["feasible"] == (t["params"].get("mode") != "patch") for t in trials)
    paths = write_outputs(result, "m", target, tmp_path)
    assert [p.name for p in paths] == ["pareto.json", "pareto.png", "trials.json", "recommended.json"]
    front = json.loads((tmp_path / "pareto.json").read_text())["front"]
    assert front and all(t["pareto"] for t in front)
    rec = json.loads((tmp_path / "recommended.json").read_text())
    assert rec["spec"] and rec["neuron_spec"] and rec["target"]["max_kl"] == 0.2
    assert SteeringSpec.parse(rec["neuron_spec"]).items[0].circuit.startswith("c")
    neuron = [t for t in trials if t["kind"] == "cna" and t["feasible"] and (t["kl_forced"] or 0) <= 0.2]
    assert rec["neuron"]["refusal_rate"] == min(t["refusal_rate"] for t in neuron)
