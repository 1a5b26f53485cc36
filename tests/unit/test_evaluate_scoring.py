"""Metrics, judge and MMLU parsing against hand-computed cases."""

import json
import math

import pytest

from cna_vllm.evaluate.judge import is_refusal
from cna_vllm.evaluate.mmlu import Question, choice_from_logprobs, choice_from_text, load_mmlu
from cna_vllm.evaluate.scoring import mcnemar, quality_paper, quality_robust, wilson
from cna_vllm.prompts import DATA_DIR


def test_wilson_by_hand():
    # p = 0.5, n = 10, z = 1.96: centre 0.5, half = 1.96*sqrt(0.025 + 0.009604)/1.38416
    lo, hi = wilson(5, 10)
    half = 1.959964 * math.sqrt(0.025 + 1.959964**2 / 400) / (1 + 1.959964**2 / 10)
    assert lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_by_hand():
    base = [True] * 6 + [False] * 4
    arm = [False] * 5 + [True] * 1 + [True] * 1 + [False] * 3
    # b = 5 (base only), c = 1 (arm only): p = 2 * (C(6,0)+C(6,1)) / 2^6 = 14/64
    result = mcnemar(base, arm)
    assert (result["b"], result["c"]) == (5, 1)
    assert result["p_value"] == pytest.approx(14 / 64)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_quality_metrics_including_the_degenerate_case():
    assert quality_paper("one two three") == 1.0  # fewer than 4 words
    assert quality_paper("a b c d a b c d") == pytest.approx(4 / 5)  # abcd bcda cdab dabc abcd
    degenerate = "abc" * 100
    assert quality_paper(degenerate) == 1.0  # the paper's metric is fooled
    assert quality_robust(degenerate) < 0.05
    assert quality_robust("") == 0.0 and quality_robust("Yes.") == 1.0
    # "aaaaaaaaaa" (10 chars): 3 char 8-grams, all the same
    assert quality_robust("a" * 10) == pytest.approx(1 / 3)
    normal = "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun."
    assert quality_robust(normal) == 1.0 and quality_paper(normal) == 1.0


def test_judge_on_the_labelled_set():
    rows = [json.loads(line) for line in (DATA_DIR / "judge_labelled.jsonl").read_text().splitlines()]
    assert len(rows) >= 80
    wrong = [r["response"][:80] for r in rows if is_refusal(r["response"]) != r["refusal"]]
    assert not wrong, wrong
    assert not is_refusal("") and is_refusal("I'm sorry, but I can't help with that.")


def test_mmlu_subset_is_fixed_and_parsable():
    a, b = load_mmlu(50, seed=0), load_mmlu(50, seed=0)
    assert a == b and load_mmlu(50, seed=1) != a
    assert all(q.answer in "ABCD" and len(q.choices) == 4 for q in a)
    q = Question("2+2?", ("3", "4", "5", "6"), "B", "math")
    assert q.prompt().endswith("A. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


@pytest.mark.parametrize(
    ("text", "letter"),
    [("B", "B"), (" C.", "C"), ("(D) because", "D"), ("Answer: A", "A"), ("The answer is B.", "B"),
     ("I think it's Apple", None), ("", None)],
)
def test_choice_from_text(text, letter):
    assert choice_from_text(text) == letter


def test_choice_from_logprobs():
    assert choice_from_logprobs({" B": -0.1, "A": -2.0, "The": -0.05}) == "B"
    assert choice_from_logprobs({"A": -3.0, " A": -0.5, "C.": -1.0}) == "A"
    assert choice_from_logprobs({"Hello": -0.1}) is None


def test_wilson_interval_contains_the_estimate():
    outside = [(k, n) for n in range(1, 201) for k in (0, n) if not wilson(k, n)[0] <= k / n <= wilson(k, n)[1]]
    assert not outside, outside[:5]
