"""The worker-side row table and the front-end capacity logic, without starting an engine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from cna_vllm.engine.admission import AdmissionRefused, SpecGate, plan_waves
from cna_vllm.engine.columns import LayerColumns, shard_index
from cna_vllm.engine.config import EngineSteeringConfig
from cna_vllm.engine.layers import SteeredActivation
from cna_vllm.engine.row_table import SteeringState
from cna_vllm.errors import SteeringError
from cna_vllm.steering import SteeringSpec
from cna_vllm.vectors import VectorSet

from .planted import circuit_of as circuit

vllm = pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

I = 16  # intermediate size  # noqa: E741




H = 4  # hidden size
CIRCUITS = {
    "a": circuit("a", [(0, 1), (0, 9), (1, 3)], 1),
    "b": circuit("b", [(0, 9), (1, 15)], 2),
    "v": VectorSet(name="v", layers=[1, 2], vectors=np.arange(8).reshape(2, H)),
}


def make_state(capacity=3, tp_rank=0, tp_size=1, circuits=CIRCUITS, hot_load=0):
    return SteeringState.build(
        circuits,
        range(3),
        intermediate_size=I,
        hidden_size=H,
        tp_rank=tp_rank,
        tp_size=tp_size,
        hot_load_neurons=hot_load,
        capacity=capacity,
        max_num_seqs=8,
        max_num_tokens=64,
        device=torch.device("cpu"),
    )


def runner_offsets(counts, max_num_seqs=8):
    """``query_start_loc`` as vLLM's model runner fills its buffer: the tail repeats the total."""
    qsl = torch.zeros(max_num_seqs + 1, dtype=torch.int32)
    qsl[1 : len(counts) + 1] = torch.cumsum(torch.tensor(counts, dtype=torch.int32), 0)
    qsl[len(counts) + 1 :] = int(sum(counts))
    return qsl


def bound(st, counts):
    """Bind ``st`` to a runner-like offsets buffer holding ``counts`` tokens per request."""
    qsl = runner_offsets(counts)
    st.bind_request_offsets(qsl)
    return qsl


def params(spec=None):
    return SamplingParams(max_tokens=1, extra_args={"steering": SteeringSpec.parse(spec).to_list()} if spec else None)


def update(removed=(), added=(), moved=()):
    return BatchUpdate(
        batch_size=8,
        removed=list(removed),
        added=[(i, params(s), [1], []) for i, s in added],
        moved=list(moved),
    )


def test_identical_specs_share_a_refcounted_row():
    st = make_state()
    st.apply_batch_update(update(added=[(0, "a@0"), (1, "a@0"), (2, None), (3, "b@2")]))
    assert st.slot_rows[:4].tolist() == [1, 1, 0, 2] and st.rows_in_use() == 2
    st.apply_batch_update(update(removed=[0]))
    assert st.rows_in_use() == 2  # slot 1 still holds a@0
    st.apply_batch_update(update(removed=[1]))
    assert st.rows_in_use() == 1
    st.apply_batch_update(update(added=[(0, "a@2")]))
    assert st.slot_rows[0] == 1  # the freed lowest row is reused and rewritten
    assert torch.equal(st.scale[0][1], torch.tensor([2.0, 2.0]))


def test_rows_hold_composed_values_and_row0_is_identity():
    st = make_state()
    st.apply_batch_update(update(added=[(0, "a@0.5,b@1:shift")]))
    delta_b = CIRCUITS["b"].delta
    # layer 0 union = [1, 9]; neuron 9 is in both circuits: scale 0.5, then shift by -delta
    assert torch.allclose(st.scale[0][1], torch.tensor([0.5, 0.5]))
    assert torch.allclose(st.bias[0][1], torch.tensor([0.0, -delta_b[0]]))
    assert (st.scale[0][0] == 1).all() and (st.bias[0][0] == 0).all()


def test_moves_and_swaps_follow_requests():
    st = make_state()
    st.apply_batch_update(update(added=[(0, "a@0"), (1, None), (2, "b@2")]))
    st.apply_batch_update(update(removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert st.slot_rows[:3].tolist() == [2, 0, 0] and st.rows_in_use() == 1
    st.apply_batch_update(update(moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert st.slot_rows[:2].tolist() == [0, 2]
    # an add over an occupied slot is an implicit removal
    st.apply_batch_update(update(added=[(1, None)]))
    assert st.rows_in_use() == 0


def test_capacity_is_a_loud_error_in_the_worker():
    """Only reachable if admission is bypassed (the SteeringScheduler makes it impossible)."""
    st = make_state(capacity=2)
    st.apply_batch_update(update(added=[(0, "a@0"), (1, "a@1"), (2, "a@0")]))
    with pytest.raises(SteeringError, match="all 2 steering rows are in use"):
        st.apply_batch_update(update(added=[(3, "b@0")]))


def test_a_replacing_add_releases_before_it_acquires():
    """Issue #9: vLLM reuses a freed slot for a new request without listing it as removed.

    With every row held, a new distinct spec added into the slot of a finishing request
    must take that request's row; acquiring first used to raise and kill the engine.
    """
    st = make_state(capacity=2)
    st.apply_batch_update(update(added=[(0, "a@0"), (1, "a@1")]))
    assert st.rows_in_use() == 2
    st.apply_batch_update(update(added=[(1, "b@0")]))  # slot 1 replaced: a@1 finished, b@0 arrives
    assert st.rows_in_use() == 2 and st.slot_rows[:2].tolist() == [1, 2]
    st.apply_batch_update(update(added=[(0, "b@2"), (1, "a@3")]))  # both replaced in one step
    assert st.rows_in_use() == 2 and sorted(st.slot_rows[:2].tolist()) == [1, 2]


def test_prepare_expands_slots_to_tokens():
    st = make_state()
    st.apply_batch_update(update(added=[(0, "a@0"), (1, None), (2, "b@2")]))
    qsl = bound(st, [3, 1, 3])
    st.prepare(10)  # 7 real tokens + 3 padding
    assert st.token_rows[:10].tolist() == [1, 1, 1, 0, 2, 2, 2, 0, 0, 0]
    qsl.copy_(runner_offsets([1, 2, 1]))  # the runner rewrites its buffer in place each step
    st.prepare(4)
    assert st.token_rows[:4].tolist() == [1, 0, 0, 2]
    st.apply_batch_update(update(removed=[0, 2]))
    qsl.copy_(runner_offsets([1, 1]))
    st.prepare(2)
    assert not st.token_rows.any()
    with pytest.raises(SteeringError, match="buffer"):
        st.prepare(1000)


def test_prepare_needs_the_runner_offsets_of_the_right_size():
    """Issue #9: no runner binding means an unsupported runner, refused at the first forward (start-up)."""
    st = make_state()
    with pytest.raises(SteeringError, match="model runner"):
        st.prepare(1)
    with pytest.raises(SteeringError, match="max_num_seqs"):
        st.bind_request_offsets(torch.zeros(4, dtype=torch.int32))


def test_prepare_reads_no_attention_metadata():
    """Issue #9: FlashInfer's metadata has no ``query_start_loc``; the mapping must not need one.

    The mapping comes from the runner's offsets only, so a forward context whose metadata is
    FlashInfer's shape (or anything else) changes nothing.
    """
    from vllm.config import VllmConfig
    from vllm.forward_context import set_forward_context

    st = make_state()
    st.apply_batch_update(update(added=[(0, None), (1, "a@0")]))
    bound(st, [2, 3])

    class NoOffsets:  # like FlashInferMetadata: no query_start_loc attribute
        pass

    with set_forward_context({"layers.0.attn": NoOffsets()}, VllmConfig()):
        st.prepare(6)
    assert st.token_rows[:6].tolist() == [0, 0, 1, 1, 1, 0]


def test_activation_wrapper_applies_rows_per_token_and_row0_is_exact():
    st = make_state()
    st.apply_batch_update(update(added=[(0, "a@0"), (1, None), (2, "b@3")]))
    bound(st, [1, 1, 1])
    st.prepare(3)
    idx = st.columns[0].columns
    class Fresh(torch.nn.Module):  # like SiluAndMul: returns a new tensor
        def forward(self, x):
            return x.clone()

    act = SteeredActivation(Fresh(), 0, idx, st.scale[0], st.bias[0], st.token_rows)
    x = torch.randn(3, I)
    y = act(x)
    assert torch.equal(y[1], x[1])  # unsteered token: bit-exact
    assert torch.equal(y[0, [1, 9]], torch.zeros(2)) and torch.equal(y[0, 2:9], x[0, 2:9])
    assert torch.equal(y[2, 9], x[2, 9] * 3) and torch.equal(y[2, 1], x[2, 1])


def test_tensor_parallel_shards():
    union = {0: np.array([1, 7, 8, 15])}
    assert shard_index(union, 16, 0, 2)[0].tolist() == [1, 7]
    assert shard_index(union, 16, 1, 2)[0].tolist() == [8, 15]
    with pytest.raises(SteeringError, match="divisible"):
        shard_index(union, 15, 0, 2)
    st = make_state(tp_rank=1, tp_size=2)  # rank 1 holds neurons 8..15 as local columns 0..7
    st.apply_batch_update(update(added=[(0, "b@2")]))
    assert st.columns[0].columns.tolist() == [1] and st.columns[1].columns.tolist() == [7]
    assert torch.equal(st.scale[0][1], torch.tensor([2.0]))


def test_vector_rows_hold_summed_offsets():
    st = make_state()
    assert sorted(st.offset) == [1, 2] and sorted(st.columns) == [0, 1]  # no neuron in layer 2
    st.apply_batch_update(update(added=[(0, "v@0.5:shift,a@0"), (1, "a@0")]))
    v = CIRCUITS["v"].vectors
    assert torch.equal(st.offset[1][1], torch.from_numpy(-0.5 * v[0]))
    assert torch.equal(st.offset[2][1], torch.from_numpy(-0.5 * v[1]))
    assert not st.offset[1][0].any() and not st.offset[1][2].any()  # identity and a pure-neuron row
    assert torch.equal(st.scale[0][1], torch.zeros(2))  # the neuron item of the same spec


def test_offset_mlp_is_exact_for_row0_and_keeps_weight_names():
    from cna_vllm.patches.engine import add_output_offset

    st = make_state()
    st.apply_batch_update(update(added=[(0, "v@1:shift"), (1, None)]))
    bound(st, [1, 1])
    st.prepare(2)
    mlp = torch.nn.Sequential(torch.nn.Linear(H, H))
    names = [n for n, _ in mlp.named_parameters()]
    x = torch.randn(2, H)
    plain = mlp(x)
    add_output_offset(mlp, st.offset[1], st.token_rows)
    y = mlp(x)
    assert [n for n, _ in mlp.named_parameters()] == names and "cna_offset" not in mlp.state_dict()
    assert torch.equal(y[1], plain[1]) and torch.allclose(y[0], plain[0] - torch.from_numpy(CIRCUITS["v"].vectors[0]))
    with pytest.raises(SteeringError, match="already"):
        add_output_offset(mlp, st.offset[1], st.token_rows)


def test_hot_load_claims_spare_columns_without_touching_rows_in_use():
    st = make_state(circuits={"a": CIRCUITS["a"]}, hot_load=2)
    assert sorted(st.columns) == [0, 1, 2] and sorted(st.offset) == [0, 1, 2]  # every layer when hot-loading
    assert st.columns[0].columns.tolist() == [1, 9, 15, 14]  # circuit neurons, then 2 spare placeholders
    st.apply_batch_update(update(added=[(0, "a@3")]))
    before = st.scale[0][1].clone()
    st.add("b", CIRCUITS["b"])  # layer 0: 9 is known; layer 1: 15 is a placeholder column already
    assert st.columns[1].columns.tolist() == [3, 15, 14] and st.columns[1].slot_of == {3: 0, 15: 1}
    assert torch.equal(st.scale[0][1][:3], before[:3])
    st.add("v", CIRCUITS["v"])
    st.apply_batch_update(update(added=[(1, "b@2,v@1:shift")]))
    assert st.scale[1][2].tolist() == [1.0, 2.0, 1.0] and torch.equal(st.offset[2][2], -torch.arange(4.0, 8.0))
    with pytest.raises(SteeringError, match="already loaded"):
        st.add("b", CIRCUITS["b"])
    big = circuit("big", [(2, 0), (2, 1), (2, 2)])
    with pytest.raises(SteeringError, match="spare slot"):
        st.add("big", big)
    assert "big" not in st.circuits and st.columns[2].spare  # refused atomically
    st.add("two", circuit("two", [(2, 0), (2, 14)]))
    assert st.columns[2].columns.tolist() == [0, 14] or st.columns[2].columns.tolist() == [14, 0]
    assert len(set(st.columns[2].columns.tolist())) == 2


def test_no_room_without_a_hot_load_reserve():
    st = make_state(circuits={"a": CIRCUITS["a"]})
    with pytest.raises(SteeringError, match="no room"):
        st.add("b", CIRCUITS["b"])
    with pytest.raises(SteeringError, match="no room"):
        st.add("v", CIRCUITS["v"])


def test_layer_columns_are_distinct_and_tp_local():
    cols = LayerColumns(0, np.array([9, 12]), first=8, size=8, spare=3, device="cpu")
    assert cols.columns.tolist() == [1, 4, 7, 6, 5] and cols.missing([3, 9, 10, 15]) == [10, 15]
    cols.claim([3, 10, 15])  # 3 is on another rank; 15 (local 7) keeps its placeholder slot
    assert cols.slot_of[15] == 2 and len(set(cols.columns.tolist())) == 5
    assert sorted(cols.columns.tolist()) == [1, 2, 4, 5, 7] or sorted(cols.columns.tolist()) == [1, 2, 4, 6, 7]


def test_engine_config_roundtrip_and_errors(tmp_path):
    path = CIRCUITS["a"].save(tmp_path / "a.safetensors")
    from cna_vllm.sources import file_sha256

    cfg = EngineSteeringConfig({"a": {"path": str(path), "sha256": file_sha256(path)}}, 5)
    back = EngineSteeringConfig.from_additional_config({"cna_vllm": cfg.to_dict()})
    assert back == cfg and set(back.load_circuits()) == {"a"}
    with pytest.raises(SteeringError, match="additional_config"):
        EngineSteeringConfig.from_additional_config({})
    bad = EngineSteeringConfig({"a": {"path": str(path), "sha256": "0" * 64}})
    with pytest.raises(SteeringError, match="changed since"):
        bad.load_circuits()
    wrong = EngineSteeringConfig({"z": {"path": str(path), "sha256": ""}})
    with pytest.raises(SteeringError, match="named 'a'"):
        wrong.load_circuits()


def test_plan_waves_bounds_distinct_specs():
    specs = [SteeringSpec.parse(s) for s in ["a@0", None, "a@1", "a@0", "a@2", "a@3", None, "a@1"]]
    waves = plan_waves(specs, 2)
    assert sorted(i for w in waves for i in w) == list(range(len(specs)))
    for wave in waves:
        assert len({specs[i].fingerprint() for i in wave if specs[i]}) <= 2
    assert waves[0] == [0, 1, 2, 3, 6, 7]


def test_spec_gate_waits_for_a_free_row():
    async def run():
        gate = SpecGate(1)
        a, b = SteeringSpec.parse("a@0"), SteeringSpec.parse("b@0")
        await gate.acquire(a)
        await gate.acquire(a)  # same spec: shares the row
        waiter = asyncio.create_task(gate.acquire(b))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await gate.release(a)
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await gate.release(a)
        await asyncio.wait_for(waiter, 1)
        assert set(gate.active) == {b.fingerprint()}

    asyncio.run(run())


def test_table_memory_is_bounded_by_the_sparse_index():
    from cna_vllm.rows import union_neurons, vector_layers

    union = union_neurons(CIRCUITS.values())
    assert sum(len(v) for v in union.values()) == 4 and sorted(union) == [0, 1]
    assert vector_layers(CIRCUITS.values()) == [1, 2]
    st = make_state(capacity=64)
    assert st.table_bytes() == 4 * 65 * (2 * 4 + 2 * H)  # float32 scale + bias per neuron, one offset per layer


def test_spec_in_sampling_params_is_honoured_and_salted():
    from cna_vllm.engine.admission import steer_request
    from cna_vllm.engine.llm import effective_spec
    sp = params("a@0")
    spec = effective_spec(SteeringSpec(), sp)
    assert spec.to_list() == SteeringSpec.parse("a@0").to_list()
    assert effective_spec(SteeringSpec.parse("b@1"), sp).to_list()[0]["circuit"] == "b"
    prompt, new = steer_request("hi", sp, spec)
    assert prompt == "hi"  # the salt is composed at intake (test_engine_intake.py), for every path
    assert new.extra_args["steering"] == spec.to_wire()  # the one wire form
    assert SteeringSpec.from_params(new) == SteeringSpec.from_params(sp) == spec
    prompt, new = steer_request({"prompt_token_ids": [1], "cache_salt": "user"}, sp, spec)
    assert prompt["cache_salt"] == "user"
    prompt, new = steer_request("hi", sp, SteeringSpec())
    assert prompt == "hi" and not (new.extra_args or {}).get("steering")


def test_spec_gate_is_fifo_bounded_and_times_out():
    """Issue #9: an active spec does not jump ahead of an earlier waiter; full queue -> 429; timeout -> 503."""
    a, b, c = (SteeringSpec.parse(x) for x in ("a@0", "b@0", "c@0"))

    async def run():
        gate = SpecGate(1, max_waiting=2, wait_timeout=None)
        await gate.acquire(a)
        wait_b = asyncio.create_task(gate.acquire(b))
        await asyncio.sleep(0.01)
        wait_a = asyncio.create_task(gate.acquire(a))  # a is active, but b came first
        await asyncio.sleep(0.01)
        assert not wait_a.done() and gate.waiting == 2
        with pytest.raises(AdmissionRefused) as full:
            await gate.acquire(c)
        assert full.value.status == 429 and full.value.code == "steering_queue_full"
        await gate.release(a)
        await asyncio.wait_for(wait_b, 1)
        assert not wait_a.done() and set(gate.active) == {b.fingerprint()}
        wait_a.cancel()  # its client went away: it leaves the queue
        await asyncio.sleep(0.01)
        assert gate.waiting == 0
        await gate.release(b)
        assert not gate.active

        gate = SpecGate(1, wait_timeout=0.05)
        await gate.acquire(a)
        with pytest.raises(AdmissionRefused) as late:
            await gate.acquire(b)
        assert late.value.status == 503 and gate.waiting == 0
        await gate.release(a)
        await asyncio.wait_for(gate.acquire(b), 1)  # the row is free again

    asyncio.run(run())
