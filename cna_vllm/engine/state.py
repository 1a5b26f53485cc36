"""Per-worker steering state: the row table, slot→row mapping and per-token row index.

How a step flows (V1 model runner):

1. The runner applies the scheduler's batch changes to its persistent batch and calls
   :meth:`SteeringLogitsProcessor.update_state` with the removed / added / moved slots.
   Added requests carry their ``SamplingParams``; ``extra_args["steering"]`` holds the
   spec. :class:`SteeringState` gives each distinct spec a row (identical specs share one,
   refcounted) and records ``slot → row``. Row 0 is the identity and is never written.
2. The steered model's outer ``forward`` (plain Python, outside the compiled graph)
   calls :meth:`SteeringState.prepare`, which expands ``slot → row`` into the per-token
   row index with the model runner's own ``query_start_loc`` buffer (bound once after
   loading, patch P1; every attention backend shares it) and writes it **in place** into
   ``token_rows``.
3. Each :class:`~cna_vllm.engine.layers.SteeredActivation` reads ``token_rows`` and its
   layer's ``(scale, bias)`` table, and each offset MLP (:class:`~cna_vllm.engine.layers.MLPOutputOffset`)
   its ``offset`` table; all are persistent tensors, so torch.compile graphs see new
   values every step without any Python branch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cna_vllm.circuit import Circuit
from cna_vllm.errors import SteeringError
from cna_vllm.steering import SteeringSpec, is_vector_set, union_neurons, vector_layers
from cna_vllm.vectors import VectorSet, load_any

Source = Circuit | VectorSet
"""What a steering item names: a neuron circuit or a CAA vector set."""

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
    ``hot_load_neurons`` > 0 reserves that many spare steerable columns per layer (and an
    offset table on every layer) so that circuits can be added while the engine runs.
    """

    circuits: dict[str, dict[str, str]]  # name -> {"path": ..., "sha256": ...}
    max_steering_configs: int = DEFAULT_MAX_STEERING_CONFIGS
    hot_load_neurons: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "circuits": self.circuits,
            "max_steering_configs": self.max_steering_configs,
            "hot_load_neurons": self.hot_load_neurons,
        }

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
        spare = int(section.get("hot_load_neurons", 0))
        if spare < 0:
            raise SteeringError(f"hot_load_neurons must be >= 0, got {spare}")
        return cls(circuits=dict(section.get("circuits", {})), max_steering_configs=cap, hot_load_neurons=spare)

    def load_circuits(self) -> dict[str, Source]:
        """Read each circuit file and check its content hash and name."""
        return {name: load_entry(name, entry) for name, entry in self.circuits.items()}


def load_entry(name: str, entry: Mapping[str, str]) -> Source:
    """Load ``{"path", "sha256"}`` as circuit ``name``: the file must be unchanged and carry that name."""
    path = Path(entry["path"])
    digest = file_sha256(path) if path.is_file() else "missing"
    if entry.get("sha256") and digest != entry["sha256"]:
        raise SteeringError(
            f"circuit {name!r}: {path} changed since the engine was configured "
            f"(sha256 {digest[:12]} != {entry['sha256'][:12]})"
        )
    circuit = load_any(path)
    if circuit.name != name:
        raise SteeringError(f"circuit file {path} is named {circuit.name!r}, registered as {name!r}")
    return circuit


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- shard layout
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


# --------------------------------------------------------------------------- the state
class SteeringState:
    """Row tables, refcounts, slot→row and token→row for one model in one worker.

    Neuron items use per-layer ``scale``/``bias`` tables ``[rows, K_l]`` over the layer's
    :class:`LayerColumns`; vector items use per-layer ``offset`` tables ``[rows, hidden]``
    added to the MLP output. Row 0 of every table is the identity.
    """

    def __init__(
        self,
        circuits: Mapping[str, Source],
        columns: Mapping[int, LayerColumns],
        offset_layers: Iterable[int] = (),
        *,
        hidden_size: int = 0,
        capacity: int,
        max_num_seqs: int,
        max_num_tokens: int,
        device: torch.device,
    ) -> None:
        self.circuits = dict(circuits)
        self.identity: Any = None  # the served model (dir or ModelIdentity), for hot-loaded circuits
        self.hot_load_neurons = 0  # spare columns reserved per layer (build() sets it)
        self.columns = dict(columns)
        self.capacity = capacity
        self.device = device
        self.scale: dict[int, torch.Tensor] = {}
        self.bias: dict[int, torch.Tensor] = {}
        for layer, cols in self.columns.items():
            self.scale[layer] = torch.ones(capacity + 1, len(cols), dtype=torch.float32, device=device)
            self.bias[layer] = torch.zeros(capacity + 1, len(cols), dtype=torch.float32, device=device)
        self.offset = {
            layer: torch.zeros(capacity + 1, hidden_size, dtype=torch.float32, device=device)
            for layer in sorted(offset_layers)
        }
        self.token_rows = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self.slot_rows = np.zeros(max_num_seqs, dtype=np.int64)
        self._slot_rows_dev = torch.zeros(max_num_seqs + 1, dtype=torch.int64, device=device)  # last: identity
        self._arange = torch.arange(max_num_tokens, dtype=torch.int32, device=device)
        self._request_ends: torch.Tensor | None = None  # the runner's query_start_loc[1:], bound once
        self._rows_of: dict[str, int] = {}  # spec fingerprint -> row
        self._refs = np.zeros(capacity + 1, dtype=np.int64)
        self._spec_of_row: dict[int, str] = {}
        self._free = list(range(capacity, 0, -1))  # pop() gives the lowest free row
        self._token_rows_dirty = True

    @classmethod
    def build(
        cls,
        circuits: Mapping[str, Source],
        held_layers: Iterable[int],
        *,
        intermediate_size: int,
        hidden_size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        hot_load_neurons: int = 0,
        **kwargs: Any,
    ) -> SteeringState:
        """The state for the layers this rank holds; every held layer is steerable when hot-loading."""
        held = set(held_layers)
        mine = shard_index(union_neurons(circuits.values()), intermediate_size, tp_rank, tp_size)
        per_rank = intermediate_size // tp_size
        if hot_load_neurons:
            neuron_layers, offset_layers = held, held
        else:
            neuron_layers = {layer for layer, ids in mine.items() if len(ids)} & held
            offset_layers = set(vector_layers(circuits.values())) & held
        columns = {
            layer: LayerColumns(
                layer, mine.get(layer, np.zeros(0, np.int64)), tp_rank * per_rank, per_rank, hot_load_neurons,
                kwargs["device"],
            )
            for layer in sorted(neuron_layers)
        }
        state = cls(circuits, columns, offset_layers, hidden_size=hidden_size, **kwargs)
        state.hot_load_neurons = hot_load_neurons
        return state

    # ------------------------------------------------------------------ reporting
    def table_bytes(self) -> int:
        tables = (self.scale, self.bias, self.offset)
        return sum(t.numel() * t.element_size() for d in tables for t in d.values())

    def rows_in_use(self) -> int:
        return len(self._rows_of)

    def describe(self) -> str:
        k = sum(len(c.slot_of) for c in self.columns.values())
        spare = sum(len(c.spare) for c in self.columns.values())
        return (
            f"cna-vllm steering: {len(self.circuits)} circuit(s), {k} steerable neuron(s) on this rank "
            f"in {len(self.columns)} layer(s) ({spare} spare), offsets on {len(self.offset)} layer(s), "
            f"{self.capacity} rows, tables {self.table_bytes() / 2**20:.2f} MiB"
        )

    # ------------------------------------------------------------------ hot-load
    def check_add(self, name: str, circuit: Source) -> None:
        """Raise :class:`SteeringError` unless :meth:`add` would succeed."""
        if name in self.circuits:
            raise SteeringError(f"a circuit named {name!r} is already loaded")
        if not self.hot_load_neurons:
            raise SteeringError(
                "this engine reserved no room for new circuits; start it with a hot-load reserve "
                "(SteeredLLM(hot_load_neurons=N), cna-vllm serve --hot-load-neurons N)"
            )
        if is_vector_set(circuit):
            return  # every held layer has an offset table when hot-loading
        for layer, ids in circuit.by_layer().items():
            cols = self.columns.get(layer)
            if cols is None:
                continue  # a layer another pipeline rank holds
            new = cols.missing(ids)
            if len(new) > len(cols.spare):
                raise SteeringError(
                    f"circuit {name!r} needs {len(new)} new neuron(s) in layer {layer} on this rank, but only "
                    f"{len(cols.spare)} spare slot(s) are left; restart with a larger hot-load reserve"
                )

    def add(self, name: str, circuit: Source) -> None:
        """Make ``circuit`` available to new specs (claims spare slots; rows in use are unaffected)."""
        self.check_add(name, circuit)
        if not is_vector_set(circuit):
            for layer, ids in circuit.by_layer().items():
                if layer in self.columns:
                    self.columns[layer].claim(ids)
        self.circuits[name] = circuit

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
        for layer, cols in self.columns.items():
            scale, bias = self.scale[layer], self.bias[layer]
            scale[row].fill_(1.0)
            bias[row].zero_()
            if layer not in rows:
                continue
            ids, s, b = rows[layer]
            keep = [i for i, g in enumerate(ids.tolist()) if g in cols.slot_of]
            pos = torch.tensor([cols.slot_of[int(ids[i])] for i in keep], dtype=torch.int64, device=self.device)
            scale[row].index_copy_(0, pos, torch.from_numpy(s[keep]).to(self.device))
            bias[row].index_copy_(0, pos, torch.from_numpy(b[keep]).to(self.device))
        offsets = spec.to_offsets(self.circuits)
        for layer, table in self.offset.items():
            if layer in offsets:
                table[row].copy_(torch.from_numpy(offsets[layer]))
            else:
                table[row].zero_()

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
        # An added request may replace the one in its slot without that slot being listed as
        # removed: release every replaced row *before* acquiring any, so a step that frees a row
        # and takes one for a new spec never finds the table full (issue #9, capacity crash).
        added = [(slot, spec_of(params)) for slot, params, _prompt, _out in update.added]
        for slot, _spec in added:
            self.set_slot(slot, 0)
        for slot, spec in added:
            self.set_slot(slot, self.acquire(spec))
        for a, b, direction in update.moved:
            ra, rb = int(self.slot_rows[a]), int(self.slot_rows[b])
            if direction == MoveDirectionality.SWAP:
                self.slot_rows[a], self.slot_rows[b] = rb, ra
            else:  # a -> b; whatever b held is gone
                self.release(rb)
                self.slot_rows[b], self.slot_rows[a] = ra, 0
            self._token_rows_dirty = True

    def bind_request_offsets(self, query_start_loc: torch.Tensor) -> None:
        """Use the model runner's persistent ``query_start_loc`` buffer (``[max_num_seqs + 1]``).

        The runner rewrites it in place before every forward, for every attention backend:
        entry ``i`` is where request ``i``'s tokens start, and entries past the last request
        repeat the total, so padding tokens fall past every request.
        """
        size = self.slot_rows.size + 1
        if query_start_loc.ndim != 1 or query_start_loc.numel() != size:
            raise SteeringError(
                f"the model runner's query_start_loc has shape {tuple(query_start_loc.shape)}, expected ({size},) "
                "(max_num_seqs + 1)"
            )
        self._request_ends = query_start_loc[1:]
        self._arange = self._arange.to(query_start_loc.dtype)  # searchsorted wants one dtype

    def prepare(self, num_tokens: int) -> None:
        """Write this step's per-token rows in place (called outside the compiled graph)."""
        if self._request_ends is None:
            raise SteeringError(
                "no model runner bound its query_start_loc to the steering state: this model runner is "
                "not supported (cna-vllm supports vLLM's V1 GPU/CPU model runners)"
            )
        if num_tokens > self.token_rows.numel():
            raise SteeringError(f"step has {num_tokens} tokens but the steering buffer holds {self.token_rows.numel()}")
        if not self.slot_rows.any():
            if self._token_rows_dirty:  # nothing steered: all zeros (stays so until a change)
                self.token_rows.zero_()
                self._token_rows_dirty = False
            return
        # token t belongs to request searchsorted(ends, t, right=True); padding tokens map past
        # the last slot, to the identity entry. Fixed shapes, no host sync, no metadata fields.
        self._slot_rows_dev[:-1].copy_(torch.from_numpy(self.slot_rows))
        req = torch.searchsorted(self._request_ends, self._arange[:num_tokens], right=True)
        torch.index_select(self._slot_rows_dev, 0, req, out=self.token_rows[:num_tokens])
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
