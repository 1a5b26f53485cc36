"""Per-worker steering state: the row table, slot→row mapping and per-token row index.

How a step flows (V1 model runner):

1. The runner applies the scheduler's batch changes to its persistent batch and calls
   :meth:`~cna_vllm.engine.processor.SteeringLogitsProcessor.update_state` with the removed /
   added / moved slots. Added requests carry their ``SamplingParams``, whose
   ``extra_args["steering"]`` holds the spec's wire form (read back once per distinct spec
   per process). :class:`SteeringState` gives each distinct spec a row (identical specs share
   one, refcounted) and records ``slot → row``. Row 0 is the identity and is never written.
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

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from cna_vllm.engine.columns import LayerColumns, shard_index
from cna_vllm.errors import SteeringError
from cna_vllm.rows import to_offsets, to_rows, union_neurons, vector_layers
from cna_vllm.sources import Source
from cna_vllm.steering import SteeringSpec, is_vector_set


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
        rows = to_rows(spec, self.circuits)
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
        offsets = to_offsets(spec, self.circuits)
        for layer, table in self.offset.items():
            if layer in offsets:
                table[row].copy_(torch.from_numpy(offsets[layer]))
            else:
                table[row].zero_()

    # ------------------------------------------------------------------ batch updates
    def apply_batch_update(self, update: Any) -> None:
        """Apply a vLLM ``BatchUpdate`` (removed, then added, then moved) as one change.

        The final layout is worked out first; every row the step drops is released before any
        new spec takes one. A removed slot that vLLM's ``condense`` refills is not listed in
        ``removed``: its request is gone only in ``moved`` (a -> b drops b's), and an added
        request may replace a slot's old one without a removal at all. Releasing in list order
        would let a step whose final rows fit still find the table full (issue #9; the
        ``--api-server-count 2`` soak hit it).
        """
        if update is None:
            return
        from vllm.v1.sample.logits_processor import MoveDirectionality

        layout = self.slot_rows.copy()
        pending: dict[int, SteeringSpec] = {}  # slot -> spec of an added request, not yet given a row
        dropped: list[int] = []

        def vacate(slot: int) -> None:
            dropped.append(int(layout[slot]))
            layout[slot] = 0
            pending.pop(slot, None)

        for slot in update.removed:
            vacate(slot)
        for slot, params, _prompt, _out in update.added:
            vacate(slot)
            pending[slot] = SteeringSpec.from_params(params)
        for a, b, direction in update.moved:
            if direction == MoveDirectionality.SWAP:
                layout[a], layout[b] = layout[b], layout[a]
                pa, pb = pending.pop(a, None), pending.pop(b, None)
                pending.update({k: v for k, v in ((b, pa), (a, pb)) if v is not None})
            else:  # a -> b; whatever b held is gone
                vacate(b)
                layout[b], layout[a] = layout[a], 0
                if a in pending:
                    pending[b] = pending.pop(a)
        for row in dropped:
            self.release(row)
        for slot, spec in pending.items():
            layout[slot] = self.acquire(spec)
        self.slot_rows[:] = layout
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
