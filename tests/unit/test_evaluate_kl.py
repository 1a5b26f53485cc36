"""The KL referee's arithmetic against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cna_vllm.evaluate.kl import kl_divergence, kl_summary


def test_kl_matches_a_hand_computation():
    p = [0.5, 0.25, 0.25, 0.0]
    q = [0.25, 0.25, 0.25, 0.25]
    # 0.5·ln(0.5/0.25) + 0.25·ln(1) + 0.25·ln(1) + 0 = 0.5·ln 2
    got = kl_divergence(np.log(p), np.log(q))
    assert got == pytest.approx(0.5 * math.log(2), abs=1e-12)
    # and the other way round: 0.25·ln(0.5) + 0.25·ln 1 + 0.25·ln 1 + 0.25·ln(0.25/0) = inf
    assert math.isinf(kl_divergence(np.log(q), np.log(p))) or kl_divergence(np.log(q), np.log(p)) > 10


def test_kl_is_zero_for_equal_and_renormalises_logits():
    logits = np.array([[2.0, 1.0, -3.0], [0.0, 0.0, 0.0]])
    assert kl_divergence(logits, logits + 7.0) == pytest.approx([0.0, 0.0], abs=1e-12)  # shift-invariant


def test_summary_first_token_and_forced_mean():
    base = [np.log(np.array([[0.5, 0.5], [0.9, 0.1]])), np.log(np.array([[0.5, 0.5]]))]
    steered = [np.log(np.array([[0.25, 0.75], [0.9, 0.1]])), np.log(np.array([[0.5, 0.5]]))]
    k = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    s = kl_summary(base, steered)
    assert s["kl_first"] == pytest.approx(k / 2)  # prompt 1: k at the first token, prompt 2: 0
    assert s["kl_forced"] == pytest.approx((k / 2 + 0.0) / 2)  # prompt 1: mean(k, 0); prompt 2: 0
    assert s["kl_n"] == 2 and s["kl_first_max"] == pytest.approx(k)
