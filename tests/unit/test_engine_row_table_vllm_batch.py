"""The row table driven by vLLM's own persistent batch (``InputBatch``): adds, removals, ``condense``.

vLLM's ``condense`` refills a removed slot by moving the last request into it and drops that
slot from ``removed``: the finished request is gone only in ``moved``. The ``--api-server-count
2`` soak found a step whose final rows fit (two distinct specs, two rows) but which raised in
the worker because rows were released in list order. These tests build the updates with the
real ``InputBatch``, no hand-made ``BatchUpdate``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cna_vllm.engine.row_table import SteeringState
from cna_vllm.steering import SteeringSpec

from .planted import circuit_of

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch  # noqa: E402

SLOTS = 8
CIRCUITS = {"a": circuit_of("a", [(0, 1), (0, 9), (1, 3)], 1), "b": circuit_of("b", [(0, 9), (1, 15)], 2)}
SPECS = [None, "a@0", "a@2", "b@0", "a@0.5,b@1:shift", "b@3"]


def table(capacity: int) -> SteeringState:
    return SteeringState.build(
        CIRCUITS, range(2), intermediate_size=16, hidden_size=4, tp_rank=0, tp_size=1, hot_load_neurons=0,
        capacity=capacity, max_num_seqs=SLOTS, max_num_tokens=64, device=torch.device("cpu"),
    )


class Batch:
    """vLLM's ``InputBatch`` and the row table, stepped the way the model runner steps them."""

    def __init__(self, capacity: int) -> None:
        self.ib = InputBatch(max_num_reqs=SLOTS, max_model_len=64, max_num_batched_tokens=64,
                             device=torch.device("cpu"), vocab_size=100, block_sizes=[16], max_num_blocks_per_req=[4])
        self.rows = table(capacity)
        self.spec_of: dict[str, str | None] = {}
        self._n = 0

    def step(self, finished: list[str], new: list[str | None]) -> None:
        for rid in finished:  # removals first, then adds into the lowest holes, then condense
            self.ib.remove_request(rid)
            del self.spec_of[rid]
        for spec in new:
            rid, self._n = f"r{self._n}", self._n + 1
            extra = {"steering": SteeringSpec.parse(spec).to_wire()} if spec else None
            self.ib.add_request(CachedRequestState(
                req_id=rid, prompt_token_ids=[1, 2, 3], mm_features=[], generator=None, block_ids=([0],),
                sampling_params=SamplingParams(max_tokens=4, extra_args=extra), num_computed_tokens=0,
                output_token_ids=[],
            ))
            self.spec_of[rid] = spec
        self.ib.condense()
        self.last = self.ib.batch_update_builder.get_and_reset(self.ib.num_reqs)
        self.rows.apply_batch_update(self.last)

    def check(self) -> None:
        """Every slot points at the row of its request's spec; a row per distinct spec, no more."""
        row_of: dict[str, int] = {}
        for rid, slot in self.ib.req_id_to_index.items():
            key = SteeringSpec.parse(self.spec_of[rid]).fingerprint()
            row = int(self.rows.slot_rows[slot])
            assert (row == 0) == (not key), (rid, slot, row)
            assert row_of.setdefault(key, row) == row, "one spec, one row"
        assert self.rows.rows_in_use() == len({k for k in row_of if k})
        empty = set(range(SLOTS)) - set(self.ib.req_id_to_index.values())
        assert all(self.rows.slot_rows[s] == 0 for s in empty)


def test_a_condensed_step_that_fits_does_not_raise():
    """The soak's step: four finish, two distinct new specs, a survivor moved down by condense."""
    b = Batch(capacity=2)
    b.step([], ["a@0", "a@0", "b@0", "b@0", None])  # slots 0..4; rows: a@0, b@0
    b.step(["r0", "r1", "r2", "r3"], ["a@2", "b@3"])  # r4 moves 4 -> 2; removed [3]; moved [(4, 2)]
    b.check()
    assert sorted(b.spec_of.values(), key=str) == [None, "a@2", "b@3"]
    assert list(b.last.removed) == [3] and [m[:2] for m in b.last.moved] == [(4, 2)]  # the shape that raised
    assert b.ib.req_id_to_index["r4"] == 2 and b.rows.slot_rows[2] == 0


def test_random_steps_under_the_cap_keep_rows_exact():
    """Random finish/arrive patterns with at most ``capacity`` distinct specs live (the scheduler's promise)."""
    rng = random.Random(0)
    for capacity in (1, 2, 3):
        b = Batch(capacity)
        for _ in range(300):
            live = list(b.spec_of)
            finished = rng.sample(live, rng.randint(0, len(live)))
            keep = {b.spec_of[r] for r in live if r not in finished} - {None}
            new: list[str | None] = []
            for _ in range(rng.randint(0, SLOTS - len(live) + len(finished))):
                spec = rng.choice(SPECS)
                if spec is not None and spec not in keep and len(keep) >= capacity:
                    spec = None  # distinct specs in SPECS: one fingerprint each
                keep |= {spec} - {None}
                new.append(spec)
            b.step(finished, new)
            b.check()
        assert np.all(b.rows.slot_rows[b.ib.num_reqs :] == 0)
