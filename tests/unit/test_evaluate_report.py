"""A/B report rendering: table rows, intervals, KL columns, the Markdown page and the PNG, from hand-made arms."""

from __future__ import annotations

import pytest

from cna_vllm.evaluate.report import TABLE_HEAD, arm_row, plot_ab, render_markdown

from .test_plots import DPI, has_colour, png_size


def baseline_arm(**kw) -> dict:
    return {
        "name": "baseline",
        "n": 10,
        "refusal_rate": 0.4,
        "refusal_ci": [0.168, 0.687],
        "quality_paper": 1.0,
        "quality_robust": 0.95,
        "outputs": ["I'm sorry, I can't.", "Sure:\n\n  step   one", "No.", "never shown"],
        **kw,
    }


def steered_arm(**kw) -> dict:
    return {
        "name": "refusal@0",
        "n": 10,
        "refusal_rate": 0.2,
        "refusal_ci": [0.0567, 0.5098],
        "mcnemar_vs_baseline": {"b": 3, "c": 1, "p_value": 0.03125},
        "over_refusal": 0.1,
        "over_refusal_ci": [0.0179, 0.4042],
        "quality_paper": 0.9512,
        "quality_robust": 0.9004,
        "mmlu_accuracy": 0.55,
        "mmlu_ci": [0.342, 0.742],
        "kl_first": 0.012345,
        "kl_forced": 0.45678,
        "outputs": ["x " * 400],
        **kw,
    }


def cells(row: str) -> list[str]:
    assert row.startswith("| ") and row.endswith(" |")
    return [c.strip() for c in row[2:-2].split(" | ")]


def test_a_full_row_has_every_column_with_its_interval():
    row = arm_row(steered_arm())
    assert row == (
        "| `refusal@0` | 10 | 20.0% [5.7, 51.0] | 0.0312 | 10.0% [1.8, 40.4] | 0.951 | 0.900 | "
        "55.0% [34.2, 74.2] | 0.0123 | 0.4568 |"
    )
    head = TABLE_HEAD.splitlines()
    assert len(cells(row)) == len(cells(head[0])) == head[1].count("---") == 10


def test_missing_measurements_are_dashes_not_zeros():
    row = cells(arm_row(baseline_arm()))
    assert row == ["`baseline`", "10", "40.0% [16.8, 68.7]", "—", "—", "1.000", "0.950", "—", "—", "—"]
    # a refusal rate of None (no prompts) and an empty interval read as a dash too
    row = cells(arm_row(baseline_arm(n=0, refusal_rate=None, refusal_ci=[])))
    assert row[2] == "—"
    # a KL of exactly 0 is a measurement (the baseline against itself), not a missing value
    assert cells(arm_row(baseline_arm(kl_first=0.0, kl_forced=0.0)))[8:] == ["0.0000", "0.0000"]


def settings(**kw) -> dict:
    return {
        "harmful": {"name": "harmbench-eval", "n": 10, "sha256": "aee4f1117d416aaa"},
        "harmless": {"name": "benign-eval", "n": 10, "sha256": "6fb3c87b4ab026f9"},
        "mmlu_n": 20,
        "max_tokens": 64,
        "kl": {"prompts": 4, "tokens": 8, "set": "benign-eval"},
        **kw,
    }


def test_markdown_page_states_the_sets_the_kl_referee_and_samples():
    page = render_markdown({"settings": settings(), "arms": [baseline_arm(), steered_arm()]})
    lines = page.splitlines()
    assert lines[0] == "# A/B refusal report" and page.endswith("\n")
    assert (
        "Harmful set `harmbench-eval` (n=10, sha256 aee4f1117d416aaa); harmless set `benign-eval` (n=10); "
        "MMLU n=20; max_tokens=64; greedy; keyword judge." in lines
    )
    table = lines.index(TABLE_HEAD.splitlines()[0])
    assert lines[table + 2] == arm_row(baseline_arm()) and lines[table + 3] == arm_row(steered_arm())
    assert "on 4 `benign-eval` prompts" in page and "first 8 greedy tokens (teacher-forced)" in page
    # samples: the first three outputs of each arm, whitespace collapsed, at most 300 characters
    samples = lines[lines.index("## Samples") :]
    assert "### `baseline`" in samples and "### `refusal@0`" in samples
    assert "> Sure: step one" in samples and "> No." in samples
    assert not any("never shown" in line for line in samples)
    long = [line for line in samples if line.startswith("> x x")]
    assert len(long) == 1 and len(long[0]) == 2 + 300


def test_markdown_without_harmless_set_or_kl_says_so():
    page = render_markdown({"settings": settings(harmless=None, kl=None), "arms": [baseline_arm()]})
    assert "harmless set `" not in page
    assert "KL: not measured (it needs the in-process engine and a harmless set)." in page


@pytest.mark.parametrize("with_extras", [True, False], ids=["mmlu-and-kl", "refusal-and-quality-only"])
def test_ab_plot_is_a_png_sized_by_the_number_of_arms(tmp_path, with_extras):
    arms = [baseline_arm(), steered_arm(), steered_arm(name="refusal@3")]
    if not with_extras:
        for arm in arms:
            for key in ("mmlu_accuracy", "mmlu_ci", "kl_first", "kl_forced"):
                arm.pop(key, None)
    path = plot_ab({"arms": arms}, tmp_path / "ab.png")
    # four panels, 1.6 in per arm and panel (at least 12 in), 3.8 in tall
    assert png_size(path) == (round(1.6 * 3 * 4 * DPI), round(3.8 * DPI))
    assert has_colour(path, "#b5443b")  # the refusal bars
    assert has_colour(path, "#3b6ea5") == with_extras  # the MMLU bars only when MMLU was measured


def test_ab_plot_keeps_a_minimum_width(tmp_path):
    assert png_size(plot_ab({"arms": [baseline_arm()]}, tmp_path / "one.png"))[0] == 12 * DPI


def test_ab_plot_of_an_arm_that_always_refuses(tmp_path):
    from cna_vllm.evaluate.scoring import wilson

    arm = baseline_arm(refusal_rate=1.0, refusal_ci=list(wilson(10, 10)))
    assert png_size(plot_ab({"arms": [baseline_arm(), arm]}, tmp_path / "all.png"))
