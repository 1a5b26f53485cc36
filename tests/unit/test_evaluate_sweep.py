"""Sweep arms, verdicts against the target, and the recommendation record (no engine)."""

from __future__ import annotations

from cna_vllm.evaluate.sweep import Target, recommendation, strength, summarise, sweep_arms
from cna_vllm.steering import SteeringSpec


def arm(name, spec, refusal, quality=0.99, mmlu=0.5, kind="cna", n=100):
    return {
        "name": name,
        "spec": SteeringSpec.parse(spec).to_list() if spec else [],
        "refusal_rate": refusal,
        "relative_refusal_reduction": None if not spec else (0.4 - refusal) / 0.4,
        "quality_paper": quality,
        "quality_robust": quality - 0.05,
        "mmlu_accuracy": mmlu,
        "circuits": {name.split("@")[0]: {"kind": kind, "num_neurons": n if kind == "cna" else None}} if spec else {},
    }


def test_sweep_arms_cover_the_grid_and_skip_no_ops():
    arms = sweep_arms(["c"], ["scale", "shift"], [0, 1, 2], ["v"], [0, 0.5])
    assert [a.name for a in arms] == ["baseline", "c@0", "c@2", "c@1:shift", "c@2:shift", "v@0.5:shift"]
    assert strength(SteeringSpec.parse("c@3").items[0]) == -2
    assert strength(SteeringSpec.parse("v@0.5:shift").items[0]) == 0.5


def test_the_smallest_setting_that_meets_the_target_is_recommended():
    report = {
        "arms": [
            arm("baseline", None, 0.4),
            arm("c@0", "c@0", 0.7),  # refusal up
            arm("c@3", "c@3", 0.1),  # meets, |α| = 2
            arm("c@2", "c@2", 0.15),  # meets, |α| = 1: recommended
            arm("v@1:shift", "v@1:shift", 0.0, quality=0.5, kind="caa"),  # quality collapses
            arm("c@5", "c@5", 0.1, mmlu=0.45),  # MMLU drop of 5 pp
        ]
    }
    summary = summarise(report, Target())
    verdicts = {r["arm"]: r["meets_target"] for r in summary["rows"]}
    assert verdicts == {"c@0": False, "c@3": True, "c@2": True, "v@1:shift": False, "c@5": False}
    by = {r["arm"]: r for r in summary["rows"]}
    assert by["v@1:shift"]["kind"] == "caa" and any("quality" in m for m in by["v@1:shift"]["misses"])
    assert any("MMLU" in m for m in by["c@5"]["misses"])
    assert summary["recommended"]["arm"] == "c@2" and summary["closest"] is None
    rec = recommendation(summary, "m")
    assert rec["spec"] == "c@2" and rec["meets_target"] and rec["alpha"] == -1 and "note" not in rec


def test_without_a_winner_the_closest_safe_arm_is_named_plainly():
    report = {"arms": [arm("baseline", None, 0.4), arm("c@2", "c@2", 0.3), arm("v@1:shift", "v@1:shift", 0.0, 0.4)]}
    summary = summarise(report, Target())
    assert summary["recommended"] is None and summary["closest"]["arm"] == "c@2"
    rec = recommendation(summary, "m")
    assert rec["spec"] == "c@2" and not rec["meets_target"] and "no setting met the target" in rec["note"]


def test_grid_covers_parts_modes_and_both_signs_with_caa_at_matched_strength():
    from cna_vllm.evaluate.sweep import grid_arms

    arms = grid_arms(["c"], ["all", "pos"], ["scale", "patch", "shift"], [0.5, 1], vectors=["v"])
    names = [a.name for a in arms]
    assert names[0] == "baseline" and len(names) == len(set(names))
    # 2 parts x 3 modes x 4 strengths (±0.5, ±1) + CAA at the same 4 strengths
    assert len(names) == 1 + 2 * 3 * 4 + 4
    assert {"c@0", "c@2", "c@0.5", "c@1.5", "c[pos]@0", "c[pos]@2"} <= set(names)  # scale: m = 1 − α
    assert {"c@-1:patch", "c@1:patch", "c[pos]@-0.5:shift", "v@-1:shift", "v@0.5:shift"} <= set(names)
    assert {strength(a.spec.items[0]) for a in arms[1:]} == {-1, -0.5, 0.5, 1}
    one_sign = grid_arms(["c"], ["neg"], ["shift"], [1], both_signs=False, vectors=["v"], vector_alphas=[0.25])
    assert [a.name for a in one_sign] == ["baseline", "c[neg]@1:shift", "v@0.25:shift"]


def test_kl_ceiling_and_neuron_spec_in_the_recommendation():
    report = {
        "arms": [
            arm("baseline", None, 0.4),
            arm("c[pos]@2", "c[pos]@2", 0.1) | {"kl_forced": 0.5},  # misses: KL above the ceiling
            arm("c[neg]@2", "c[neg]@2", 0.15) | {"kl_forced": 0.01},  # meets: the neuron spec
            arm("v@0.5:shift", "v@0.5:shift", 0.1, kind="caa") | {"kl_forced": 0.01},  # meets, smaller |α|
        ]
    }
    report["arms"][2]["circuits"] = {"c[neg]": {"kind": "cna", "num_neurons": 100}}
    summary = summarise(report, Target(max_kl=0.1))
    by = {r["arm"]: r for r in summary["rows"]}
    assert by["c[pos]@2"]["misses"] == ["KL 0.500 > 0.1"] and by["c[pos]@2"]["part"] == "pos"
    assert summary["recommended"]["arm"] == "v@0.5:shift"
    assert summary["neuron_recommended"]["arm"] == "c[neg]@2"
    rec = recommendation(summary, "m")
    assert rec["spec"] == "v@0.5:shift" and rec["meets_target"] and rec["kl_forced"] == 0.01
    assert rec["neuron_spec"] == "c[neg]@2" and rec["neuron"]["meets_target"] and rec["neuron"]["kl_forced"] == 0.01
    assert SteeringSpec.parse(rec["neuron_spec"])  # `cna-vllm ab --arms` takes it as is
    assert summarise(report, Target(max_kl=None))["rows"][0]["meets_target"]


def test_quality_floor_is_relative_to_the_baseline_and_ties_go_to_the_smaller_kl():
    """At 128 tokens the unsteered model itself scores 0.906: an arm at 0.886 keeps 97.8% of it."""
    report = {
        "arms": [
            arm("baseline", None, 0.4, quality=0.906),
            arm("v@0.5:shift", "v@0.5:shift", 0.15, quality=0.886, kind="caa") | {"kl_forced": 0.09},  # 0.978 x
            arm("c@3", "c@3", 0.1, quality=0.85) | {"kl_forced": 0.05},  # 0.938 x: misses on quality
            arm("c@2", "c@2", 0.3, quality=0.90) | {"kl_forced": 0.09},
            arm("c[pos]@2", "c[pos]@2", 0.3, quality=0.89) | {"kl_forced": 0.05},  # same reduction, less KL
        ]
    }
    target = Target()
    assert target.quality_floors(report["arms"][0]) == (0.97 * 0.906, 0.87 * 0.856)
    summary = summarise(report, target)
    by = {r["arm"]: r for r in summary["rows"]}
    assert by["v@0.5:shift"]["meets_target"]
    assert by["c@3"]["misses"] == ["quality 0.850/0.800 under 0.879/0.745"]
    assert summary["recommended"]["arm"] == "v@0.5:shift"
    assert summary["neuron_recommended"] is None and summary["neuron_closest"]["arm"] == "c[pos]@2"


def test_an_arm_that_raises_refusal_is_never_the_closest():
    report = {
        "arms": [
            arm("baseline", None, 0.4),
            arm("c@0", "c@0", 0.8) | {"kl_forced": 0.05},  # misses only on reduction, but raises refusal
            arm("c[pos]@2", "c[pos]@2", 0.3, mmlu=0.45) | {"kl_forced": 0.05},  # lowers it, misses MMLU too
            arm("c[neg]@2", "c[neg]@2", 0.35, mmlu=0.45) | {"kl_forced": 0.01},  # lowers it less
        ]
    }
    summary = summarise(report, Target())
    assert summary["recommended"] is None and summary["closest"]["arm"] == "c[pos]@2"
    rec = recommendation(summary, "m")
    assert rec["neuron_spec"] == "c[pos]@2" and any("MMLU" in m for m in rec["neuron"]["misses"])
    assert any(m.startswith("refusal reduction") for m in rec["misses"]) and "see misses" in rec["note"]
    raising = summarise({"arms": report["arms"][:2]}, Target())
    assert raising["closest"] is None and recommendation(raising, "m")["spec"] is None
