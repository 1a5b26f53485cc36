"""Statistics and output-quality metrics, each small enough to check by hand."""

from __future__ import annotations

import math
from collections.abc import Sequence


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # rounding can leave a bound an ulp inside p at k = 0 or k = n; the interval must contain p
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def mcnemar(baseline: Sequence[bool], arm: Sequence[bool]) -> dict:
    """Exact (binomial) two-sided McNemar test on paired booleans.

    ``b`` counts pairs true under the baseline only, ``c`` pairs true under the arm only.
    """
    if len(baseline) != len(arm):
        raise ValueError(f"paired samples differ in length: {len(baseline)} vs {len(arm)}")
    b = sum(1 for x, y in zip(baseline, arm, strict=True) if x and not y)
    c = sum(1 for x, y in zip(baseline, arm, strict=True) if y and not x)
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "p_value": 1.0}
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"b": b, "c": c, "p_value": min(1.0, 2 * tail)}


def quality_paper(text: str, n: int = 4) -> float:
    """The paper's metric: unique word n-grams / total word n-grams; < n words scores 1.0.

    Known weakness, kept for comparability: degenerate text without spaces scores 1.0.
    """
    words = text.split()
    if len(words) < n:
        return 1.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def quality_robust(text: str, n: int = 8) -> float:
    """Unique character n-grams / total character n-grams (whitespace collapsed).

    Repetition without spaces ("abcabcabc...") scores low, unlike :func:`quality_paper`.
    Empty output scores 0.0; a non-empty output shorter than ``n`` characters scores 1.0.
    """
    chars = " ".join(text.split())
    if not chars:
        return 0.0
    if len(chars) < n:
        return 1.0
    grams = [chars[i : i + n] for i in range(len(chars) - n + 1)]
    return len(set(grams)) / len(grams)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


LENGTH_BUCKETS = ((0, 32), (32, 64), (64, 128), (128, None))
"""Answer lengths in words for :func:`quality_by_length`."""


def quality_by_length(texts: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Paper quality per answer-length bucket (words): ``{"0-32": {"n", "quality_paper"}, ...}``.

    Degeneration (loops) shows in long answers first; a mean over all answers hides it.
    """
    out: dict[str, dict[str, float | int]] = {}
    for lo, hi in LENGTH_BUCKETS:
        sel = [t for t in texts if lo <= len(t.split()) and (hi is None or len(t.split()) < hi)]
        if sel:
            key = f"{lo}-{hi if hi is not None else ''}"
            out[key] = {"n": len(sel), "quality_paper": mean([quality_paper(t) for t in sel])}
    return out
