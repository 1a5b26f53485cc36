"""The worker process's steering context: which row table serves which vLLM engine instance.

The steered model registers its :class:`~cna_vllm.engine.row_table.SteeringState` when it is
built; the logits processor, the runner binding (patch P1) and the hot-load RPCs look it up
by ``vllm_config.instance_id``. That is the whole of the per-process state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cna_vllm.errors import SteeringError

if TYPE_CHECKING:
    from cna_vllm.engine.row_table import SteeringState

_STATES: dict[str, SteeringState] = {}
"""Worker-process registry: vLLM instance id -> state. The model registers, the processor looks up."""


def register_state(instance_id: str, state: SteeringState) -> None:
    _STATES[instance_id] = state


def find_state(instance_id: str) -> SteeringState | None:
    """The state of a steered model built in this process for ``instance_id``, if any."""
    return _STATES.get(instance_id)


def lookup_state(instance_id: str) -> SteeringState:
    try:
        return _STATES[instance_id]
    except KeyError:
        raise SteeringError(
            "the cna-vllm steering logits processor is active but no Steered* model was built in "
            f"this worker (vLLM instance {instance_id!r}); set hf_overrides architectures to a "
            "Steered* class (SteeredLLM does this)"
        ) from None
