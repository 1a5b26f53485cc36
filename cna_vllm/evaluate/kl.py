"""The KL referee: how far steering moves the next-token distribution on harmless prompts.

For each harmless prompt the baseline's greedy continuation is generated once; then, for the
baseline and for every arm, the full-vocabulary next-token log-probabilities are read along
that same continuation (teacher-forced). Two figures per arm, both KL(base ‖ steered) in nats:

- ``kl_first``: at the first generated token after the chat template, mean over prompts;
- ``kl_forced``: mean over prompts of the mean over the first N positions of the continuation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def kl_divergence(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) over the last axis, from log-probabilities.

    Inputs are renormalised (log-softmax) first, so truncation or rounding of either side
    cannot make it negative; terms with p_v = 0 contribute 0.
    """
    logp = np.asarray(logp, dtype=np.float64)
    logq = np.asarray(logq, dtype=np.float64)
    logp = logp - _logsumexp(logp)
    logq = logq - _logsumexp(logq)
    p = np.exp(logp)
    diff = np.where(p > 0, logp - np.where(np.isfinite(logq), logq, -1e30), 0.0)
    return np.maximum((p * diff).sum(axis=-1), 0.0)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kl_summary(base: Sequence[np.ndarray], steered: Sequence[np.ndarray]) -> dict[str, float | int]:
    """``kl_first`` and ``kl_forced`` (see the module docstring) from per-prompt ``[N, vocab]`` arrays."""
    if len(base) != len(steered):
        raise ValueError(f"{len(base)} baseline prompts against {len(steered)} steered ones")
    first, forced = [], []
    for b, s in zip(base, steered, strict=True):
        if len(b) == 0:
            continue
        kl = kl_divergence(b, s)
        first.append(float(kl[0]))
        forced.append(float(kl.mean()))
    return {
        "kl_first": float(np.mean(first)) if first else float("nan"),
        "kl_forced": float(np.mean(forced)) if forced else float("nan"),
        "kl_first_max": float(np.max(first)) if first else float("nan"),
        "kl_n": len(first),
    }
