"""The V1 logits processor that tells the row table about batch changes (it never touches logits)."""

from __future__ import annotations

from typing import Any

import torch

from cna_vllm.engine.context import lookup_state
from cna_vllm.engine.row_table import SteeringState
from cna_vllm.steering import SteeringSpec


def _logits_processor_base() -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class SteeringLogitsProcessor(_logits_processor_base()):  # type: ignore[misc]
    """A V1 logits processor that never touches logits: it only sees batch changes.

    vLLM calls :meth:`update_state` once per step, before the forward, with the slots
    added / removed / moved in the persistent batch. That is the supported place where a
    worker learns each request's ``SamplingParams`` and slot.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.instance_id = vllm_config.instance_id
        self._state: SteeringState | None = None

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        SteeringSpec.from_params(sampling_params)  # syntax and bounds; a SteeringError is a 400

    def _get_state(self) -> SteeringState:
        if self._state is None:
            self._state = lookup_state(self.instance_id)
        return self._state

    def update_state(self, batch_update: Any) -> None:
        if batch_update is not None:
            self._get_state().apply_batch_update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True
