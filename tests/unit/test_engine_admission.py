"""Admission in the scheduler: the distinct specs that may run never exceed the row cap; FIFO for steered."""

from __future__ import annotations

import itertools
import random

import pytest

pytest.importorskip("vllm")
from cna_vllm.engine.admission import held_back


def test_fits_under_the_cap_and_unsteered_never_wait():
    assert held_back([], ["a", "", "b", "a"], capacity=2) == []
    assert held_back(["a", "b"], ["", "c", "", "a"], capacity=2) == [1, 3]  # a waits behind c: FIFO


def test_a_popular_spec_cannot_starve_a_rare_one():
    # c arrived before the later a's: they wait behind it although a is running
    assert held_back(["a"], ["c", "a", "a"], capacity=1) == [0, 1, 2]
    assert held_back([], ["c", "a", "a"], capacity=1) == [1, 2]


def test_running_plus_admitted_specs_never_exceed_the_cap():
    rng = random.Random(0)
    for cap, _ in itertools.product(range(1, 5), range(200)):
        running = [rng.choice("abcdef") for _ in range(rng.randrange(cap + 1))]
        running = [k for k in running if k in set(running[:cap])][:cap]
        waiting = [rng.choice(["", "a", "b", "c", "d", "e", "f", "g"]) for _ in range(rng.randrange(12))]
        held = set(held_back(running, waiting, cap))
        admitted = {k for i, k in enumerate(waiting) if k and i not in held}
        assert len(set(running) | admitted) <= max(cap, len(set(running)))
        # FIFO: after the first held steered request, no later steered request is admitted
        first = min(held, default=len(waiting))
        assert all(i in held for i, k in enumerate(waiting) if k and i > first)
