"""The steerable columns of each layer's activation shard: which neurons a row table acts on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cna_vllm.errors import SteeringError


def shard_index(
    union: Mapping[int, np.ndarray], intermediate_size: int, tp_rank: int, tp_size: int
) -> dict[int, np.ndarray]:
    """Per layer, the global neuron ids that this TP rank holds (rank r: [r·I/tp, (r+1)·I/tp))."""
    if intermediate_size % tp_size:
        raise SteeringError(f"intermediate size {intermediate_size} is not divisible by TP size {tp_size}")
    per_rank = intermediate_size // tp_size
    return {layer: ids[ids // per_rank == tp_rank] for layer, ids in union.items()}


class LayerColumns:
    """The steerable columns of one layer's activation shard: circuit neurons, then spare slots.

    Slot j of the row tables acts on local column ``columns[j]``. A spare slot points at
    some column no circuit uses and holds the identity in every row, so :meth:`claim` can
    re-point it at a new circuit's neuron while the engine runs (in place: compiled graphs
    read the new value). Columns stay distinct, as ``index_copy_`` needs.
    """

    def __init__(self, layer: int, global_ids: np.ndarray, first: int, size: int, spare: int, device: Any) -> None:
        self.layer, self.first, self.size = layer, first, size  # this rank holds [first, first + size)
        local = [int(g) - first for g in global_ids]
        used = set(local)
        free = [c for c in range(size - 1, -1, -1) if c not in used][: max(spare, 0)]
        self.columns = torch.tensor(local + free, dtype=torch.int64, device=device)
        self.slot_of = {int(g): j for j, g in enumerate(global_ids)}  # global id -> slot
        self.spare = {c: len(local) + j for j, c in enumerate(free)}  # placeholder local column -> slot

    def __len__(self) -> int:
        return int(self.columns.numel())

    def mine(self, global_ids: Any) -> list[int]:
        return [int(g) for g in global_ids if self.first <= int(g) < self.first + self.size]

    def missing(self, global_ids: Any) -> list[int]:
        """The neurons of ``global_ids`` on this rank that have no slot yet."""
        return sorted(set(self.mine(global_ids)) - set(self.slot_of))

    def claim(self, global_ids: Any) -> None:
        """Give every neuron of ``global_ids`` on this rank a slot (spare slots are used up)."""
        new = self.missing(global_ids)
        if len(new) > len(self.spare):
            raise SteeringError(
                f"layer {self.layer}: {len(new)} new steerable neuron(s) but only {len(self.spare)} spare "
                "slot(s) left; restart with a larger hot-load reserve"
            )
        rest = []
        for g in new:  # a neuron whose column is already a placeholder keeps that slot
            slot = self.spare.pop(g - self.first, None)
            if slot is None:
                rest.append(g)
            else:
                self.slot_of[g] = slot
        for g in rest:
            _, slot = self.spare.popitem()
            self.columns[slot] = g - self.first
            self.slot_of[g] = slot
