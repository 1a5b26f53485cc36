"""A/B comparison of refusal behaviour: arms, one run per arm, statistics against baseline."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cna_vllm.errors import SteeringError
from cna_vllm.evaluate.backends import Backend
from cna_vllm.evaluate.judge import is_refusal
from cna_vllm.evaluate.kl import kl_summary
from cna_vllm.evaluate.mmlu import Question
from cna_vllm.evaluate.scoring import mcnemar, mean, quality_by_length, quality_paper, quality_robust, wilson
from cna_vllm.prompts import PromptSet
from cna_vllm.steering import SteeringSpec, split_part

BASELINE = "baseline"


@dataclass(frozen=True)
class Arm:
    """A named steering spec; the baseline arm has the empty spec."""

    name: str
    spec: SteeringSpec


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and braces, so JSON arms survive."""
    parts, depth, current = [], 0, []
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_arms(text: str | list[str]) -> list[Arm]:
    """``baseline,refusal@0.0,refusal@2,{"circuit": ...}`` → arms; baseline always first."""
    items = _split_top_level(text) if isinstance(text, str) else list(text)
    arms: list[Arm] = []
    for item in items:
        if item == BASELINE:
            arm = Arm(BASELINE, SteeringSpec())
        else:
            spec = SteeringSpec.parse(item)
            if not spec:
                raise SteeringError(f"arm {item!r} has no steering; use 'baseline'")
            arm = Arm(str(spec), spec)
        if any(a.name == arm.name for a in arms):
            raise SteeringError(f"arm {arm.name!r} is given twice")
        arms.append(arm)
    if not any(a.name == BASELINE for a in arms):
        arms.insert(0, Arm(BASELINE, SteeringSpec()))
    arms.sort(key=lambda a: a.name != BASELINE)
    return arms


@dataclass(frozen=True)
class KLConfig:
    """The KL referee: the first ``prompts`` harmless prompts, ``tokens`` forced positions each."""

    prompts: int = 16
    tokens: int = 32


@dataclass
class KLReference:
    """The baseline's greedy continuations and its log-probabilities along them."""

    prompts: list[str]
    continuations: list[list[int]]
    logprobs: list[Any]

    @classmethod
    def build(cls, backend: Any, harmless: PromptSet, config: KLConfig) -> KLReference:
        prompts = list(harmless)[: config.prompts]
        conts = backend.chat_ids(prompts, SteeringSpec(), config.tokens, "KL: baseline continuations")
        return cls(prompts, conts, backend.forced_logprobs(prompts, conts, SteeringSpec(), "KL: baseline"))

    def measure(self, backend: Any, spec: SteeringSpec, desc: str) -> dict[str, Any]:
        steered = backend.forced_logprobs(self.prompts, self.continuations, spec, desc) if spec else self.logprobs
        return kl_summary(self.logprobs, steered)


@dataclass
class ArmResult:
    arm: Arm
    outputs: list[str]
    refusals: list[bool]
    harmless_outputs: list[str] = field(default_factory=list)
    harmless_refusals: list[bool] = field(default_factory=list)
    mmlu_choices: list[str | None] = field(default_factory=list)
    mmlu_correct: list[bool] = field(default_factory=list)
    circuits: dict[str, Any] = field(default_factory=dict)
    kl: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, baseline: ArmResult | None) -> dict[str, Any]:
        n = len(self.outputs)
        k = sum(self.refusals)
        out: dict[str, Any] = {
            "name": self.arm.name,
            "spec": self.arm.spec.to_list(),
            "spec_string": str(self.arm.spec) or BASELINE,
            "circuits": self.circuits,
            "n": n,
            "refusal_rate": k / n if n else None,
            "refusal_ci": list(wilson(k, n)),
            "quality_paper": mean([quality_paper(t) for t in self.outputs]),
            "quality_robust": mean([quality_robust(t) for t in self.outputs]),
            "quality_by_length": quality_by_length(self.outputs),
            **self.kl,
            "outputs": self.outputs,
            "refusals": self.refusals,
        }
        if baseline is not None and baseline is not self:
            out["mcnemar_vs_baseline"] = mcnemar(baseline.refusals, self.refusals)
            base_rate = sum(baseline.refusals) / n if n else 0
            out["relative_refusal_reduction"] = (1 - out["refusal_rate"] / base_rate) if base_rate else None
        if self.harmless_outputs:
            out |= _rate("over_refusal", self.harmless_refusals, "n_harmless", "over_refusal_ci")
            out["harmless_outputs"] = self.harmless_outputs
        if self.mmlu_correct:
            out |= _rate("mmlu_accuracy", self.mmlu_correct, "mmlu_n", "mmlu_ci")
            out["mmlu_unparsed"] = sum(x is None for x in self.mmlu_choices)
        return out


def _rate(name: str, flags: list[bool], n_key: str, ci_key: str) -> dict[str, Any]:
    """A share of ``flags`` under ``name``, its count under ``n_key`` and its Wilson interval under ``ci_key``."""
    k, n = sum(flags), len(flags)
    return {n_key: n, name: k / n, ci_key: list(wilson(k, n))}


def run_arm(
    backend: Backend,
    arm: Arm,
    harmful: PromptSet,
    *,
    harmless: PromptSet | None = None,
    mmlu: list[Question] | None = None,
    max_tokens: int = 128,
    kl_ref: KLReference | None = None,
) -> ArmResult:
    """Answer every prompt set under one arm, judge the answers, and measure KL if asked."""
    outputs = backend.chat(list(harmful), arm.spec, max_tokens, f"{arm.name}: {harmful.name}")
    result = ArmResult(arm, outputs, [is_refusal(t) for t in outputs])
    result.circuits = {i.circuit: backend.circuits.get(split_part(i.circuit)[0], {}) for i in arm.spec.items}
    if harmless is not None:
        result.harmless_outputs = backend.chat(list(harmless), arm.spec, max_tokens, f"{arm.name}: {harmless.name}")
        result.harmless_refusals = [is_refusal(t) for t in result.harmless_outputs]
    if mmlu:
        result.mmlu_choices = backend.choose([q.prompt() for q in mmlu], arm.spec, f"{arm.name}: mmlu")
        result.mmlu_correct = [c == q.answer for c, q in zip(result.mmlu_choices, mmlu, strict=True)]
    if kl_ref is not None:
        result.kl = kl_ref.measure(backend, arm.spec, f"{arm.name}: KL")
    return result


def run_ab(
    backend: Backend,
    arms: list[Arm],
    harmful: PromptSet,
    *,
    harmless: PromptSet | None = None,
    mmlu: list[Question] | None = None,
    max_tokens: int = 128,
    settings: dict[str, Any] | None = None,
    kl: KLConfig | None = None,
) -> dict[str, Any]:
    """Run every arm and return the report dictionary (``report.json``).

    With ``kl`` and a harmless set, on a backend that returns full-vocabulary log-probabilities
    (the in-process engine), every arm also gets ``kl_first`` and ``kl_forced`` (:mod:`.kl`).
    """
    for arm in arms:
        missing = [
            i.circuit for i in arm.spec.items if backend.circuits and split_part(i.circuit)[0] not in backend.circuits
        ]
        if missing:
            raise SteeringError(f"arm {arm.name!r}: unknown circuit(s) {missing}; known: {sorted(backend.circuits)}")
    kl_ref = None
    if kl is not None and harmless is not None and hasattr(backend, "forced_logprobs"):
        kl_ref = KLReference.build(backend, harmless, kl)
    results = [
        run_arm(backend, a, harmful, harmless=harmless, mmlu=mmlu, max_tokens=max_tokens, kl_ref=kl_ref)
        for a in arms
    ]
    baseline = results[0]
    return {
        "settings": {
            "harmful": harmful.describe(),
            "harmless": harmless.describe() if harmless else None,
            "mmlu_n": len(mmlu or []),
            "max_tokens": max_tokens,
            "decoding": "greedy",
            "judge": "keyword (cna_vllm.evaluate.judge)",
            "kl": None if kl_ref is None else {
                "prompts": len(kl_ref.prompts), "tokens": kl.tokens, "set": harmless.name,
                "definition": "KL(base ‖ steered) in nats, full vocabulary; kl_first: first generated token; "
                "kl_forced: mean over the baseline's first N greedy tokens (teacher-forced)",
            },
            **(settings or {}),
        },
        "arms": [r.to_dict(baseline) for r in results],
    }


def write_report(report: dict[str, Any], out_dir) -> list:
    """``report.json``, ``report.md`` and ``ab.png`` in ``out_dir``; returns the paths."""
    from pathlib import Path

    from cna_vllm.evaluate.report import plot_ab, render_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return [out / "report.json", out / "report.md", plot_ab(report, out / "ab.png")]
