"""Markdown tables and PNG plots for A/B reports and sweeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cna_vllm.plots import pyplot, save_figure


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def arm_row(arm: dict[str, Any]) -> str:
    p = arm.get("mcnemar_vs_baseline", {}).get("p_value")
    return (
        f"| `{arm['name']}` | {arm['n']} | {_pct(arm['refusal_rate'])}{_ci(arm['refusal_ci'])} | "
        f"{'—' if p is None else f'{p:.3g}'} | {_pct(arm.get('over_refusal'))}{_ci(arm.get('over_refusal_ci'))} | "
        f"{arm['quality_paper']:.3f} | {arm['quality_robust']:.3f} | "
        f"{_pct(arm.get('mmlu_accuracy'))}{_ci(arm.get('mmlu_ci'))} | {_kl(arm.get('kl_first'))} | "
        f"{_kl(arm.get('kl_forced'))} |"
    )


def _kl(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


TABLE_HEAD = (
    "| arm | n | refusal [95% CI] | McNemar p | over-refusal | quality (paper) | quality (robust) | MMLU [95% CI] "
    "| KL first | KL forced |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# A/B refusal report",
        "",
        f"Harmful set `{s['harmful']['name']}` (n={s['harmful']['n']}, sha256 {s['harmful']['sha256']}); "
        + (f"harmless set `{s['harmless']['name']}` (n={s['harmless']['n']}); " if s.get("harmless") else "")
        + f"MMLU n={s['mmlu_n']}; max_tokens={s['max_tokens']}; greedy; keyword judge.",
        "",
        TABLE_HEAD,
        *[arm_row(a) for a in report["arms"]],
        "",
        "Refusal and MMLU intervals are Wilson 95%; McNemar is exact, paired against the baseline. "
        + (
            f"KL(base ‖ steered) in nats, full vocabulary, on {s['kl']['prompts']} `{s['kl']['set']}` prompts: "
            f"at the first generated token, and the mean over the baseline's first {s['kl']['tokens']} greedy "
            "tokens (teacher-forced)."
            if s.get("kl")
            else "KL: not measured (it needs the in-process engine and a harmless set)."
        ),
        "",
        "## Samples",
    ]
    for arm in report["arms"]:
        lines += ["", f"### `{arm['name']}`", ""]
        for text in arm["outputs"][:3]:
            lines.append("> " + " ".join(text.split())[:300])
            lines.append("")
    return "\n".join(lines) + "\n"


def plot_ab(report: dict[str, Any], path: str | Path) -> Path:
    """Three panels: refusal (with CI), quality (both metrics), MMLU (with CI)."""
    plt = pyplot()
    arms = report["arms"]
    names = [a["name"] for a in arms]
    xs = range(len(arms))
    fig, axes = plt.subplots(1, 4, figsize=(max(12, 1.6 * len(arms) * 4), 3.8))

    def bars(ax, values, cis, title, color):
        vals = [v if v is not None else 0 for v in values]
        err = [[v - c[0] for v, c in zip(vals, cis, strict=True)], [c[1] - v for v, c in zip(vals, cis, strict=True)]]
        ax.bar(xs, vals, yerr=err, color=color, capsize=3)
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)

    bars(axes[0], [a["refusal_rate"] for a in arms], [a["refusal_ci"] for a in arms], "refusal rate", "#b5443b")
    width = 0.4
    axes[1].bar([x - width / 2 for x in xs], [a["quality_paper"] for a in arms], width, label="paper (word 4-gram)")
    axes[1].bar([x + width / 2 for x in xs], [a["quality_robust"] for a in arms], width, label="robust (char 8-gram)")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title("quality")
    axes[1].legend(fontsize=7, loc="lower left")
    axes[1].set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    if any("mmlu_accuracy" in a for a in arms):
        bars(
            axes[2],
            [a.get("mmlu_accuracy") for a in arms],
            [a.get("mmlu_ci", [0, 0]) for a in arms],
            "MMLU accuracy",
            "#3b6ea5",
        )
    else:
        axes[2].set_axis_off()
    if any(a.get("kl_forced") is not None for a in arms):
        axes[3].bar([x - width / 2 for x in xs], [a.get("kl_first") or 0 for a in arms], width, label="first token")
        axes[3].bar([x + width / 2 for x in xs], [a.get("kl_forced") or 0 for a in arms], width, label="teacher-forced")
        axes[3].set_yscale("symlog", linthresh=1e-3)
        axes[3].set_title("KL(base ‖ steered), harmless, nats")
        axes[3].legend(fontsize=7)
        axes[3].set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    else:
        axes[3].set_axis_off()
    return save_figure(fig, path)
