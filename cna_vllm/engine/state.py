"""Per-worker steering state: the row table, slot→row mapping and per-token row index.

How a step flows (V1 model runner):

1. The runner applies the scheduler's batch changes to its persistent batch and calls
   :meth:`SteeringLogitsProcessor.update_state` with the removed / added / moved slots.
   Added requests carry their ``SamplingParams``; ``extra_args["steering"]`` holds the
   spec. :class:`SteeringState` gives each distinct spec a row (identical specs share one,
   refcounted) and records ``slot → row``. Row 0 is the identity and is never written.
2. The steered model's outer ``forward`` (plain Python, outside the compiled graph)
   calls :meth:`SteeringState.prepare`, which expands ``slot → row`` into the per-token
   row index with ``query_start_loc`` and writes it **in place** into ``token_rows``.
3. Each :class:`~cna_vllm.engine.layers.SteeredActivation` reads ``token_rows`` and its
   layer's ``(scale, bias)`` table, both persistent tensors, so torch.compile graphs
   see new values every step without any Python branch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cna_vllm.circuit import Circuit
from cna_vllm.errors import SteeringError
from cna_vllm.steering import SteeringSpec

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

CONFIG_KEY = "cna_vllm"
"""Key of cna-vllm's section in vLLM's ``additional_config``."""
DEFAULT_MAX_STEERING_CONFIGS = 64
LOGITS_PROCESSOR_FQCN = "cna_vllm.engine.state:SteeringLogitsProcessor"


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EngineSteeringConfig:
    """cna-vllm's section of ``additional_config``: circuit files (with content hashes) and capacity.

    It is JSON, so it enters vLLM's compile-cache hash: different circuits, different graphs.
    """

    circuits: dict[str, dict[str, str]]  # name -> {"path": ..., "sha256": ...}
    max_steering_configs: int = DEFAULT_MAX_STEERING_CONFIGS

    def to_dict(self) -> dict[str, Any]:
        return {"circuits": self.circuits, "max_steering_configs": self.max_steering_configs}

    @classmethod
    def from_additional_config(cls, additional: Any) -> EngineSteeringConfig:
        section = additional.get(CONFIG_KEY) if isinstance(additional, Mapping) else None
        if not isinstance(section, Mapping):
            raise SteeringError(
                f"a Steered* architecture needs additional_config={{'{CONFIG_KEY}': {{'circuits': ...}}}}; "
                "use cna_vllm.engine.llm.SteeredLLM or pass --additional-config"
            )
        cap = int(section.get("max_steering_configs", DEFAULT_MAX_STEERING_CONFIGS))
        if cap < 1:
            raise SteeringError(f"max_steering_configs must be >= 1, got {cap}")
        return cls(circuits=dict(section.get("circuits", {})), max_steering_configs=cap)

    def load_circuits(self, model_dir: str | None = None) -> dict[str, Circuit]:
        """Read each circuit, check its content hash and name, and validate it for the model."""
        out: dict[str, Circuit] = {}
        for name, entry in self.circuits.items():
            path = Path(entry["path"])
            digest = file_sha256(path) if path.is_file() else "missing"
            if entry.get("sha256") and digest != entry["sha256"]:
                raise SteeringError(
                    f"circuit {name!r}: {path} changed since the engine was configured "
                    f"(sha256 {digest[:12]} != {entry['sha256'][:12]})"
                )
            circuit = Circuit.load(path)
            if circuit.name != name:
                raise SteeringError(f"circuit file {path} is named {circuit.name!r}, registered as {name!r}")
            if model_dir is not None:
                circuit.validate_for(model_dir)
            out[name] = circuit
        return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- shard layout
@dataclass(frozen=True)
class LayerIndex:
    """The sparse index of one layer on this rank: which activation columns are steerable."""

    layer: int
    global_ids: np.ndarray  # ascending global neuron ids held by this rank
    local_ids: np.ndarray  # the same neurons as columns of this rank's activation shard


def shard_index(
    union: Mapping[int, np.ndarray], intermediate_size: int, tp_rank: int, tp_size: int
) -> dict[int, LayerIndex]:
    """Map global neuron ids to this TP rank's shard (rank r holds [r·I/tp, (r+1)·I/tp))."""
    if intermediate_size % tp_size:
        raise SteeringError(f"intermediate size {intermediate_size} is not divisible by TP size {tp_size}")
    per_rank = intermediate_size // tp_size
    out = {}
    for layer, ids in union.items():
        mine = ids[ids // per_rank == tp_rank]
        out[layer] = LayerIndex(layer, mine, mine - tp_rank * per_rank)
    return out


# --------------------------------------------------------------------------- the state
class SteeringState:
    """Row table, refcounts, slot→row and token→row for one model in one worker."""

    def __init__(
        self,
        circuits: Mapping[str, Circuit],
        layers: Mapping[int, LayerIndex],
        *,
        capacity: int,
        max_num_seqs: int,
        max_num_tokens: int,
        device: torch.device,
    ) -> None:
        self.circuits = dict(circuits)
        self.layers = dict(layers)
        self.capacity = capacity
        self.device = device
        # row tables, one pair per layer; row 0 = identity, rows 1..capacity for specs
        self.scale: dict[int, torch.Tensor] = {}
        self.bias: dict[int, torch.Tensor] = {}
        for layer, index in self.layers.items():
            k = len(index.local_ids)
            self.scale[layer] = torch.ones(capacity + 1, k, dtype=torch.float32, device=device)
            self.bias[layer] = torch.zeros(capacity + 1, k, dtype=torch.float32, device=device)
        self.token_rows = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self.slot_rows = np.zeros(max_num_seqs, dtype=np.int64)
        self._slot_rows_dev = torch.zeros(max_num_seqs + 1, dtype=torch.int64, device=device)
        self._arange = torch.arange(max_num_tokens, dtype=torch.int64, device=device)
        self._rows_of: dict[str, int] = {}  # spec fingerprint -> row
        self._refs = np.zeros(capacity + 1, dtype=np.int64)
        self._spec_of_row: dict[int, str] = {}
        self._free = list(range(capacity, 0, -1))  # pop() gives the lowest free row
        self._token_rows_dirty = True

    # ------------------------------------------------------------------ reporting
    def table_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.scale, self.bias) for t in d.values())

    def rows_in_use(self) -> int:
        return len(self._rows_of)

    def describe(self) -> str:
        k = sum(len(i.local_ids) for i in self.layers.values())
        return (
            f"cna-vllm steering: {len(self.circuits)} circuit(s), {k} steerable neuron(s) on this rank "
            f"in {len(self.layers)} layer(s), {self.capacity} rows, table {self.table_bytes() / 2**20:.2f} MiB"
        )

    # ------------------------------------------------------------------ rows
    def acquire(self, spec: SteeringSpec) -> int:
        """Row for ``spec`` (0 if empty), writing it on first use; refcount +1."""
        if not spec:
            return 0
        key = spec.fingerprint()
        row = self._rows_of.get(key)
        if row is None:
            if not self._free:
                raise SteeringError(
                    f"all {self.capacity} steering rows are in use by distinct specs; raise "
                    "max_steering_configs or admit fewer distinct specs at once (the cna-vllm "
                    "front-ends queue such requests; this worker refuses rather than serve them unsteered)"
                )
            row = self._free.pop()
            self._write_row(row, spec)
            self._rows_of[key] = row
            self._spec_of_row[row] = key
        self._refs[row] += 1
        return row

    def release(self, row: int) -> None:
        if row == 0:
            return
        self._refs[row] -= 1
        if self._refs[row] == 0:
            del self._rows_of[self._spec_of_row.pop(row)]
            self._free.append(row)
            self._free.sort(reverse=True)

    def _write_row(self, row: int, spec: SteeringSpec) -> None:
        rows = spec.to_rows(self.circuits)
        for layer, index in self.layers.items():
            scale, bias = self.scale[layer], self.bias[layer]
            scale[row].fill_(1.0)
            bias[row].zero_()
            if layer not in rows or len(index.global_ids) == 0:
                continue
            ids, s, b = rows[layer]
            keep = np.isin(ids, index.global_ids)
            pos = torch.from_numpy(np.searchsorted(index.global_ids, ids[keep])).to(self.device)
            scale[row].index_copy_(0, pos, torch.from_numpy(s[keep]).to(self.device))
            bias[row].index_copy_(0, pos, torch.from_numpy(b[keep]).to(self.device))

    # ------------------------------------------------------------------ batch updates
    def set_slot(self, slot: int, row: int) -> None:
        """Point ``slot`` at ``row``; release the row it held (an implicit removal)."""
        self.release(int(self.slot_rows[slot]))
        self.slot_rows[slot] = row
        self._token_rows_dirty = True

    def apply_batch_update(self, update: Any) -> None:
        """Apply a vLLM ``BatchUpdate`` (removed, then added, then moved)."""
        if update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        for slot in update.removed:
            self.set_slot(slot, 0)
        for slot, params, _prompt, _out in update.added:
            spec = spec_of(params)
            self.set_slot(slot, self.acquire(spec))
        for a, b, direction in update.moved:
            ra, rb = int(self.slot_rows[a]), int(self.slot_rows[b])
            if direction == MoveDirectionality.SWAP:
                self.slot_rows[a], self.slot_rows[b] = rb, ra
            else:  # a -> b; whatever b held is gone
                self.release(rb)
                self.slot_rows[b], self.slot_rows[a] = ra, 0
            self._token_rows_dirty = True

    def prepare(self, num_tokens: int, query_start_loc: torch.Tensor | None) -> None:
        """Write this step's per-token rows in place (called outside the compiled graph)."""
        if num_tokens > self.token_rows.numel():
            raise SteeringError(f"step has {num_tokens} tokens but the steering buffer holds {self.token_rows.numel()}")
        if query_start_loc is None or not self.slot_rows.any():
            if self._token_rows_dirty:  # nothing steered: all zeros (stays so until a change)
                self.token_rows.zero_()
                self._token_rows_dirty = False
            return
        # token t belongs to request searchsorted(qsl[1:], t, right=True); padding maps to the
        # extra identity entry at index num_reqs. No host sync, no data-dependent shape.
        num_reqs = query_start_loc.numel() - 1
        ends = query_start_loc[1:].to(device=self.device, dtype=torch.int64)
        slot_rows = self._slot_rows_dev[: num_reqs + 1]
        slot_rows.copy_(torch.from_numpy(np.append(self.slot_rows[:num_reqs], 0)), non_blocking=True)
        req = torch.searchsorted(ends, self._arange[:num_tokens], right=True)
        torch.index_select(slot_rows, 0, req, out=self.token_rows[:num_tokens])
        self._token_rows_dirty = True


def spec_of(params: Any) -> SteeringSpec:
    """The spec carried by a ``SamplingParams`` (empty when none)."""
    extra = getattr(params, "extra_args", None) or {}
    return SteeringSpec.parse(extra.get("steering"))


# --------------------------------------------------------------------------- registry
_STATES: dict[str, SteeringState] = {}
"""Worker-process registry: vLLM instance id -> state. The model registers, the processor looks up."""


def register_state(instance_id: str, state: SteeringState) -> None:
    _STATES[instance_id] = state


def lookup_state(instance_id: str) -> SteeringState:
    try:
        return _STATES[instance_id]
    except KeyError:
        raise SteeringError(
            "the cna-vllm steering logits processor is active but no Steered* model was built in "
            f"this worker (vLLM instance {instance_id!r}); set hf_overrides architectures to a "
            "Steered* class (SteeredLLM does this)"
        ) from None


# --------------------------------------------------------------------------- logits processor
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
        spec_of(sampling_params)  # SteeringError is a ValueError: vLLM turns it into HTTP 400

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
