"""``cna-vllm tune``: an Optuna search over signed part × mode × strength × circuit (size, scoring).

Two objectives, both minimised: the refusal rate on the harmful set and the teacher-forced
KL(base ‖ steered) on harmless prompts (:mod:`.kl`); paper quality ≥ the target is an Optuna
constraint. The search starts from the grid's best settings (``seed_params``, from a sweep's
``report.json``), then a seeded multi-objective TPE sampler proposes the rest. Identical specs
are answered once. Outputs: ``pareto.json`` and ``pareto.png`` (every trial, the front
marked), ``trials.json``, and ``recommended.json`` (the best feasible spec overall and, in
``neuron_spec``, the best neuron-only spec, each with its figures).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cna_vllm.evaluate.ab import BASELINE, Arm
from cna_vllm.evaluate.sweep import Target, strength
from cna_vllm.plots import pyplot, save_figure
from cna_vllm.steering import SteeringItem, SteeringSpec, split_part

FIGURES = ("refusal_rate", "relative_refusal_reduction", "over_refusal", "quality_paper", "quality_robust",
           "kl_first", "kl_forced", "mmlu_accuracy")


@dataclass(frozen=True)
class Space:
    """What a trial may pick."""

    circuits: list[str]
    parts: list[str] = field(default_factory=lambda: ["all", "pos", "neg"])
    modes: list[str] = field(default_factory=lambda: ["scale", "patch", "shift"])
    alpha_range: tuple[float, float] = (-2.0, 2.0)
    alpha_step: float = 0.05
    vectors: list[str] = field(default_factory=list)

    def spec(self, params: dict[str, Any]) -> SteeringSpec:
        """The spec of one trial's parameters (α on the paper's scale; ``scale`` gets m = 1 − α)."""
        a = round(float(params["alpha"]), 6)
        if params.get("family", "cna") == "caa":
            return SteeringSpec((SteeringItem(params["vector"], "shift", a),))
        name = params["circuit"] if params["part"] == "all" else f"{params['circuit']}[{params['part']}]"
        mode = params["mode"]
        return SteeringSpec((SteeringItem(name, mode, round(1.0 - a, 6) if mode == "scale" else a),))

    def suggest(self, trial: Any) -> SteeringSpec:
        params: dict[str, Any] = {}
        if self.vectors:
            params["family"] = trial.suggest_categorical("family", ["cna", "caa"])
        if params.get("family") == "caa":
            params["vector"] = trial.suggest_categorical("vector", self.vectors)
        else:
            params["circuit"] = trial.suggest_categorical("circuit", self.circuits)
            params["part"] = trial.suggest_categorical("part", self.parts)
            params["mode"] = trial.suggest_categorical("mode", self.modes)
        lo, hi = self.alpha_range
        params["alpha"] = trial.suggest_float("alpha", lo, hi, step=self.alpha_step)
        return self.spec(params)

    def params_of(self, spec: SteeringSpec) -> dict[str, Any] | None:
        """The trial parameters that give ``spec`` (one item), or None if it is outside the space."""
        if len(spec) != 1:
            return None
        item = spec.items[0]
        a = strength(item)
        lo, hi = self.alpha_range
        if not lo <= a <= hi:
            return None
        a = round(round((a - lo) / self.alpha_step) * self.alpha_step + lo, 6)
        if item.circuit in self.vectors:
            return {"family": "caa", "vector": item.circuit, "alpha": a}
        base, part = split_part(item.circuit)
        part = part or "all"
        if base not in self.circuits or part not in self.parts or item.mode not in self.modes:
            return None
        params = {"circuit": base, "part": part, "mode": item.mode, "alpha": a}
        return {"family": "cna", **params} if self.vectors else params


def seed_params(report: dict[str, Any], space: Space, k: int = 3) -> list[dict[str, Any]]:
    """The grid's best ``k`` arms (most refusal reduction among those that keep quality, then any) as trial params."""
    rows = (report.get("sweep") or {}).get("rows") or []
    ok = [r for r in rows if not any(m.startswith("quality") for m in r.get("misses", []))]
    ranked = sorted(ok, key=lambda r: -(r.get("relative_refusal_reduction") or -9)) + rows
    out: list[dict[str, Any]] = []
    for row in ranked:
        params = space.params_of(SteeringSpec.parse(row["arm"]))
        if params is not None and params not in out:
            out.append(params)
        if len(out) >= k:
            break
    return out


def tune(
    evaluate: Callable[[Arm], dict[str, Any]],
    space: Space,
    *,
    trials: int,
    target: Target,
    seeds: list[dict[str, Any]] = (),  # type: ignore[assignment]
    seed: int = 0,
) -> dict[str, Any]:
    """Run the search; ``evaluate(arm)`` returns the arm's report entry (with the figures of :data:`FIGURES`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    baseline = evaluate(Arm(BASELINE, SteeringSpec()))
    cache: dict[str, dict[str, Any]] = {}

    def objective(trial: Any) -> tuple[float, float]:
        spec = space.suggest(trial)
        key = str(spec)
        if key not in cache:
            cache[key] = evaluate(Arm(key, spec))
        arm = cache[key]
        trial.set_user_attr("spec", key)
        trial.set_user_attr("figures", {k: arm.get(k) for k in FIGURES})
        trial.set_user_attr("misses", target.check(arm, baseline))
        constraint = target.quality_floors(baseline)[0] - arm["quality_paper"]
        trial.set_user_attr("constraint", constraint)
        if hasattr(trial, "set_constraint"):  # optuna >= 5
            trial.set_constraint("quality", constraint)
        return arm["refusal_rate"], arm.get("kl_forced") or 0.0

    if hasattr(optuna.trial.Trial, "set_constraint"):  # optuna >= 5: constraints set on the trial
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    else:
        sampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constraints_func=lambda t: [t.user_attrs.get("constraint", 1.0)]
        )
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    for params in seeds:
        study.enqueue_trial(params)
    study.optimize(objective, n_trials=trials)
    done = [t for t in study.trials if t.values is not None]
    front = {t.number for t in study.best_trials}
    rows = [
        {
            "trial": t.number,
            "spec": t.user_attrs["spec"],
            "kind": "caa" if t.params.get("family") == "caa" else "cna",
            "params": t.params,
            **t.user_attrs["figures"],
            "feasible": t.user_attrs["constraint"] <= 0,
            "meets_target": not t.user_attrs["misses"],
            "misses": t.user_attrs["misses"],
            "pareto": t.number in front,
            "seeded": t.number < len(seeds),
        }
        for t in done
    ]
    return {"baseline": {k: baseline.get(k) for k in FIGURES}, "target": target.__dict__, "trials": rows,
            "unique_specs": len(cache)}


def _best(rows: list[dict[str, Any]], target: Target) -> dict[str, Any] | None:
    """Among rows that keep quality and KL under the target, the lowest refusal (then lowest KL)."""
    keep = [r for r in rows if not any(m.startswith(("quality", "KL", "MMLU")) for m in r["misses"])]
    return min(keep, key=lambda r: (r["refusal_rate"], r.get("kl_forced") or 0)) if keep else None


def recommendation(result: dict[str, Any], model: str, target: Target) -> dict[str, Any]:
    """``recommended.json``: the sweep's fields (``spec``, ``meets_target``, figures) plus ``neuron_spec``."""
    best = _best(result["trials"], target)
    neuron = _best([r for r in result["trials"] if r["kind"] == "cna"], target)
    out: dict[str, Any] = {"model": model, "spec": best["spec"] if best else None,
                           "meets_target": bool(best and best["meets_target"]), "target": result["target"],
                           "source": "cna-vllm tune"}
    if best:
        out.update({k: best.get(k) for k in FIGURES})
        out["kind"] = best["kind"]
        out["alpha"] = strength(SteeringSpec.parse(best["spec"]).items[0])
    out["neuron_spec"] = neuron["spec"] if neuron else None
    out["neuron"] = ({"meets_target": neuron["meets_target"], "misses": neuron["misses"],
                      **{k: neuron.get(k) for k in FIGURES}} if neuron else None)
    if not (best and best["meets_target"]):
        out["note"] = ("no trial met the target; spec is the lowest-refusal trial that kept quality and KL"
                       if best else "no trial kept quality and KL under the target")
    return out


def plot_pareto(result: dict[str, Any], path: str | Path) -> Path:
    """Refusal rate against KL for every trial; feasible/infeasible, the Pareto front joined."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    rows = result["trials"]
    for feasible, marker, label in ((True, "o", "quality ≥ target"), (False, "x", "quality < target")):
        pts = [r for r in rows if r["feasible"] == feasible]
        if pts:
            ax.scatter([r["kl_forced"] or 0 for r in pts], [r["refusal_rate"] for r in pts], marker=marker,
                       c=["#b5443b" if r["kind"] == "cna" else "#3b6ea5" for r in pts], label=label, alpha=0.7)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["kl_forced"] or 0)
    if front:
        ax.plot([r["kl_forced"] or 0 for r in front], [r["refusal_rate"] for r in front], "k--", linewidth=1,
                label="Pareto front")
        for r in front:
            ax.annotate(r["spec"], (r["kl_forced"] or 0, r["refusal_rate"]), fontsize=6)
    ax.axhline(result["baseline"]["refusal_rate"], color="grey", linestyle=":", label="baseline refusal")
    if result["target"].get("max_kl") is not None:
        ax.axvline(result["target"]["max_kl"], color="red", linestyle=":", label="KL ceiling")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("KL(base ‖ steered), harmless prompts, teacher-forced (nats)")
    ax.set_ylabel("refusal rate (harmful)")
    ax.set_title("tune: red = neuron specs, blue = CAA")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_outputs(result: dict[str, Any], model: str, target: Target, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    front = [r for r in result["trials"] if r["pareto"]]
    (out / "pareto.json").write_text(json.dumps({"objectives": ["refusal_rate", "kl_forced"],
                                                 "constraint": f"quality_paper >= {target.min_quality} x baseline",
                                                 "baseline": result["baseline"], "front": front}, indent=2) + "\n")
    (out / "trials.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "recommended.json").write_text(json.dumps(recommendation(result, model, target), indent=2) + "\n")
    return [out / "pareto.json", plot_pareto(result, out / "pareto.png"), out / "trials.json", out / "recommended.json"]
