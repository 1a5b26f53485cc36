"""The steered engine against stock vLLM and an HF-hooks reference (fp32, greedy, token for token).

Engines are expensive on CPU (eager ≈ 20-35 s to start, torch.compile ≈ 50 s), so each is
module-scoped and shared, and each holds a small KV cache. Every steered check also
asserts that steering changed the output somewhere, so no check can pass vacuously.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_reference import HFReference
from tiny_models import ARCHS, VOCAB, make_tiny

from cna_vllm.circuit import Circuit
from cna_vllm.embedded import resolve_model
from cna_vllm.identity import ModelIdentity
from cna_vllm.steering import SteeringSpec
from cna_vllm.vectors import VectorSet

pytestmark = pytest.mark.slow

ENGINE = dict(dtype="float32", max_model_len=512, kv_cache_memory_bytes=128 << 20, enforce_eager=True)
TINY = dict(ENGINE, skip_tokenizer_init=True, max_num_seqs=8)


# --------------------------------------------------------------------------- helpers
def random_circuit(name: str, model_dir: Path, n: int, seed: int, scale: float = 1.0) -> Circuit:
    """``n`` random (layer, neuron) pairs with random means, bound to the model's identity."""
    ident = ModelIdentity.from_dir(model_dir)
    rng = np.random.default_rng(seed)
    flat = rng.choice(ident.num_layers * ident.intermediate_size, size=n, replace=False)
    return Circuit(
        name=name,
        layers=flat // ident.intermediate_size,
        neurons=flat % ident.intermediate_size,
        score=np.sort(rng.random(n))[::-1],
        mean_pos=rng.normal(scale=scale, size=n),
        mean_neg=rng.normal(scale=scale, size=n),
        model=ident,
        created_at="2026-01-01T00:00:00+00:00",  # stable bytes -> stable additional_config -> compile cache hits
    )


def random_vectors(name: str, model_dir: Path, layers: list[int], seed: int, scale: float = 1.0) -> VectorSet:
    """Random CAA vectors at ``layers``, bound to the model's identity."""
    ident = ModelIdentity.from_dir(model_dir)
    rng = np.random.default_rng(seed)
    return VectorSet(
        name=name,
        layers=layers,
        vectors=rng.normal(scale=scale, size=(len(layers), ident.hidden_size)),
        model=ident,
        created_at="2026-01-01T00:00:00+00:00",
    )


def greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def check_against_reference(outputs, specs, max_tokens, ref: HFReference, stock=None) -> int:
    """Steered rows == HF hooks; unsteered rows == stock vLLM (or HF). Return #rows steering changed.

    ``stock[i]`` is stock vLLM's unsteered output for row i (same prompt, same length).
    """
    changed = 0
    for i, (out, spec) in enumerate(zip(outputs, specs, strict=True)):
        got = list(out.outputs[0].token_ids)
        n = max_tokens[i] if isinstance(max_tokens, list) else max_tokens
        prompt = list(out.prompt_token_ids)
        spec = SteeringSpec.parse(spec)
        if not spec and stock is not None:
            assert got == stock[i], f"request {i}: unsteered output differs from stock vLLM"
            continue
        want = ref.generate(prompt, spec, n)
        assert got == want, f"request {i} ({spec or 'unsteered'}): {got} != HF {want}"
        if spec:
            plain = stock[i] if stock is not None else ref.generate(prompt, None, n)
            changed += want != plain
    return changed


def token_prompts(n: int, seed: int, lo: int = 4, hi: int = 40) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, VOCAB, size=int(rng.integers(lo, hi))).tolist()} for _ in range(n)]


@contextlib.contextmanager
def steered_engine(model_dir, circuits, **kwargs):
    from cna_vllm.engine.llm import SteeredLLM

    llm = SteeredLLM(model_dir, circuits, **kwargs)
    try:
        yield llm
    finally:
        llm.shutdown()


# --------------------------------------------------------------------------- SmolLM2, eager
SMOL_PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "How do I pick a lock?",
    "Write a haiku about the sea.",
    "The three primary colours are",
    "To bake a cake you need",
    "Explain recursion to a child:",
    "import numpy as np\n",
]
MIXED_SPECS = [None, "c1@0", "c2@3", "c3@1:patch", None, "c1@0.5:patch,c2@2:shift", "c2@3", None, "c3@-1", "c1@0"]
LONG_PREFIX = "You are a careful assistant. Read the following notes and answer briefly. " + " ".join(
    f"Note {i}: the value of item {i} is {i * 7 % 13}." for i in range(25)
)


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return resolve_model("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="module")
def smol_circuits(smol_dir) -> dict[str, Circuit]:
    return {
        "c1": random_circuit("c1", smol_dir, 300, seed=1),
        "c2": random_circuit("c2", smol_dir, 300, seed=2),
        "c3": random_circuit("c3", smol_dir, 300, seed=3, scale=2.0),
    }


@pytest.fixture(scope="module")
def smol_ref(smol_dir, smol_circuits) -> HFReference:
    return HFReference(smol_dir, smol_circuits)


def continuous_requests():
    prompts = [SMOL_PROMPTS[i % len(SMOL_PROMPTS)] + " " * (i // len(SMOL_PROMPTS)) for i in range(14)]
    prompts[5] = LONG_PREFIX  # a long prompt: chunked prefill across steps, mixed with decodes
    max_tokens = [3 + (5 * i) % 17 for i in range(14)]
    specs = [MIXED_SPECS[(3 * i) % len(MIXED_SPECS)] for i in range(14)]
    return prompts, max_tokens, specs


SMOL_ENGINE = dict(ENGINE, max_num_seqs=8, max_num_batched_tokens=128, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def smol_stock(smol_dir):
    """Stock vLLM (no plugin classes) on the same request lists, all unsteered."""
    from vllm import LLM

    llm = LLM(model=str(smol_dir), **SMOL_ENGINE)
    try:
        prompts, max_tokens, _ = continuous_requests()
        return {
            "mixed": tokens(llm.generate(SMOL_PROMPTS, greedy(12), use_tqdm=False)),
            "continuous": tokens(llm.generate(prompts, [greedy(n) for n in max_tokens], use_tqdm=False)),
        }
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def smol(smol_dir, smol_circuits, smol_stock):
    with steered_engine(smol_dir, smol_circuits, max_steering_configs=4, **SMOL_ENGINE) as llm:
        yield llm


def test_mixed_batch_matches_stock_and_hf(smol, smol_ref, smol_stock):
    outs = smol.generate(SMOL_PROMPTS, greedy(12), steering=MIXED_SPECS)
    changed = check_against_reference(outs, MIXED_SPECS, 12, smol_ref, stock=smol_stock["mixed"])
    assert changed >= 4, "steering changed too few outputs: is it active?"
    # the same prompts with no steering at all are exactly stock vLLM
    assert tokens(smol.generate(SMOL_PROMPTS, greedy(12))) == smol_stock["mixed"]


def test_continuous_batching(smol, smol_ref, smol_stock):
    """14 requests, 8 slots, different lengths: requests join and leave mid-stream, slots move."""
    prompts, max_tokens, specs = continuous_requests()
    outs = smol.generate(prompts, [greedy(n) for n in max_tokens], steering=specs)
    changed = check_against_reference(outs, specs, max_tokens, smol_ref, stock=smol_stock["continuous"])
    assert changed >= 3


def test_prefix_caching_isolates_specs(smol, smol_ref):
    """A steered request never reuses KV computed unsteered (or under another spec)."""
    prompts = [LONG_PREFIX + f" Question {i}: what is item {i}?" for i in range(3)]
    spec = "c3@1:patch"
    first = smol.generate(prompts[0], greedy(8))[0]
    steered = smol.generate(prompts[1], greedy(8), steering=spec)[0]
    steered_again = smol.generate(prompts[2], greedy(8), steering=spec)[0]
    other = smol.generate(prompts[2], greedy(8), steering="c3@0.5:patch")[0]
    unsteered_again = smol.generate(prompts[1], greedy(8))[0]
    assert first.num_cached_tokens == 0
    assert steered.num_cached_tokens == 0, "steered request reused unsteered KV blocks"
    assert steered_again.num_cached_tokens > 100, "same spec should share the prefix cache"
    assert other.num_cached_tokens == 0, "another spec reused this spec's KV blocks"
    assert unsteered_again.num_cached_tokens > 100
    outs = [first, steered, steered_again, other, unsteered_again]
    specs = [None, spec, spec, "c3@0.5:patch", None]
    assert check_against_reference(outs, specs, 8, smol_ref) >= 2


def test_capacity_requests_wait_not_fail(smol, smol_ref, smol_stock):
    """7 distinct specs with max_steering_configs=4: later specs wait for rows; all outputs exact."""
    specs = ["c1@0", "c1@2", "c2@0", "c2@2", "c3@0.5:patch", "c3@1:shift", "c1@0,c2@0", None]
    outs = smol.generate(SMOL_PROMPTS[: len(specs)], greedy(6), steering=specs)
    stock = [t[:6] for t in smol_stock["mixed"][: len(specs)]]  # greedy: a prefix of the 12-token run
    assert check_against_reference(outs, specs, 6, smol_ref, stock=stock) >= 3


def test_invalid_steering_is_refused_before_the_engine(smol):
    from cna_vllm.errors import SteeringError

    with pytest.raises(SteeringError, match="unknown circuit"):
        smol.generate("hi", greedy(2), steering="nope@0")
    with pytest.raises(SteeringError, match="finite"):
        smol.generate("hi", greedy(2), steering="c1@nan")
    assert smol.generate("hi", greedy(2))[0].outputs[0].token_ids  # engine still alive


def test_chat_applies_template_and_steering(smol, smol_ref):
    conv = [{"role": "user", "content": "How do I pick a lock?"}]
    plain, steered = smol.chat([conv, conv], greedy(8), steering=[None, "c1@0.5:patch,c2@2:shift"])
    prompt = list(plain.prompt_token_ids)
    tok = smol.get_tokenizer()
    assert tok.decode(prompt).rstrip().endswith("assistant")  # generation prompt is there
    assert list(steered.prompt_token_ids) == prompt
    assert check_against_reference([plain, steered], [None, "c1@0.5:patch,c2@2:shift"], 8, smol_ref) == 1


def test_env_is_not_the_circuit_channel(smol):
    """Circuits reach workers through additional_config (hashed into the compile cache)."""
    cfg = smol.llm.llm_engine.vllm_config
    section = cfg.additional_config["cna_vllm"]
    assert set(section["circuits"]) == {"c1", "c2", "c3"}
    assert all(len(e["sha256"]) == 64 for e in section["circuits"].values())
    assert not any(k.startswith("CNA_VLLM_CIRCUIT") for k in os.environ)
    assert cfg.model_config.hf_config.architectures == ["SteeredLlamaForCausalLM"]


# --------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


def tiny_setup(arch: str, root: Path):
    model_dir = make_tiny(arch, root)
    ident = ModelIdentity.from_dir(model_dir)
    n = ident.num_layers * ident.intermediate_size
    circuits = {
        "a": random_circuit("a", model_dir, n // 5, seed=11, scale=3.0),
        "b": random_circuit("b", model_dir, n // 5, seed=12, scale=3.0),
        "v": random_vectors("v", model_dir, [0, ident.num_layers - 1], seed=13, scale=2.0),
    }
    return model_dir, circuits, HFReference(model_dir, circuits)


TINY_SPECS = [None, "a@0", "b@4", "a@1:patch", "v@1:shift", "a@1:shift,b@3", "b@4", "a@-2,v@-0.5:shift", None]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture(arch, tiny_root):
    model_dir, circuits, ref = tiny_setup(arch, tiny_root)
    prompts = token_prompts(len(TINY_SPECS), seed=5)
    with steered_engine(model_dir, circuits, **TINY) as llm:
        outs = llm.generate(prompts, greedy(10), steering=TINY_SPECS)
    assert check_against_reference(outs, TINY_SPECS, 10, ref) >= 3


def test_torch_compile_with_negative_control(tiny_root):
    """Compiled graph (no enforce_eager). A first unsteered-only batch must not freeze a no-steering path."""
    model_dir, circuits, ref = tiny_setup("LlamaForCausalLM", tiny_root)
    prompts = token_prompts(len(TINY_SPECS), seed=6)
    with steered_engine(model_dir, circuits, **dict(TINY, enforce_eager=False)) as llm:
        from vllm.config import CompilationMode

        assert llm.llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
        warm = llm.generate(prompts, greedy(10))
        outs = llm.generate(prompts, greedy(10), steering=TINY_SPECS)
    check_against_reference(warm, [None] * len(prompts), 10, ref)
    changed = check_against_reference(outs, TINY_SPECS, 10, ref)
    assert changed >= 3, "negative control: under torch.compile steering must change outputs"
    steered_rows = [i for i, s in enumerate(TINY_SPECS) if s]
    assert any(tokens(outs)[i] != tokens(warm)[i] for i in steered_rows)


def test_tensor_parallel_2(tiny_root, monkeypatch):
    """TP=2 on CPU: each rank steers its own shard of the intermediate dimension."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # 2 cores, one NUMA node
    model_dir, circuits, ref = tiny_setup("LlamaForCausalLM", tiny_root)
    per_rank = ModelIdentity.from_dir(model_dir).intermediate_size // 2
    for c in (circuits["a"], circuits["b"]):  # the circuits really span both shards
        assert (c.neurons < per_rank).any() and (c.neurons >= per_rank).any()
    prompts = token_prompts(len(TINY_SPECS), seed=7)
    with steered_engine(model_dir, circuits, tensor_parallel_size=2, **TINY) as llm:
        outs = llm.generate(prompts, greedy(10), steering=TINY_SPECS)
    assert check_against_reference(outs, TINY_SPECS, 10, ref) >= 3


def test_bypassing_the_front_end_past_capacity_waits_in_the_scheduler(tiny_root):
    """Issue #9: 3 distinct specs sent straight to vLLM with 2 rows, plus requests that finish at
    different steps so freed slots are reused for new specs. The scheduler holds specs back
    (engine/admission.py) and the worker releases before it acquires: no engine death, and every
    output equals the HF reference. Also: an unknown circuit sent straight to vLLM is refused
    at intake (patch P5) and the engine goes on."""
    model_dir, circuits, ref = tiny_setup("LlamaForCausalLM", tiny_root)
    from cna_vllm.engine.admission import steer_request

    specs = ["a@0", "a@2", "b@0", None, "b@0", "a@1:patch"]
    lengths = [3, 9, 5, 7, 2, 6]
    with steered_engine(model_dir, circuits, max_steering_configs=2, **TINY) as llm:
        reqs = [
            steer_request(p, greedy(n), SteeringSpec.parse(s))
            for p, s, n in zip(token_prompts(len(specs), seed=8), specs, lengths, strict=True)
        ]
        outs = llm.llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
        bad = steer_request(token_prompts(1, seed=3)[0], greedy(2), SteeringSpec.parse("nope@1"))
        with pytest.raises(ValueError, match="unknown circuit 'nope'"):
            llm.llm.generate([bad[0]], [bad[1]], use_tqdm=False)
        assert llm.generate(token_prompts(1, seed=4), greedy(2))[0].outputs[0].token_ids  # still alive
    assert check_against_reference(outs, specs, lengths, ref) >= 3


def test_async_engine_requests_join_mid_stream(tiny_root):
    """AsyncSteeredLLM: a request with a new spec arrives while others are decoding; capacity 2 queues."""
    model_dir, circuits, ref = tiny_setup("LlamaForCausalLM", tiny_root)
    from cna_vllm.engine.llm import AsyncSteeredLLM
    from cna_vllm.errors import SteeringError

    prompts = token_prompts(5, seed=9)
    specs = [None, "a@0", "b@4", "a@1:patch", "a@0"]
    lengths = [24, 20, 6, 8, 5]

    async def run():
        engine = AsyncSteeredLLM(model_dir, circuits, max_steering_configs=2, **TINY)
        try:
            with pytest.raises(SteeringError, match="no room"):  # built without a hot-load reserve
                await engine.add_circuit(random_circuit("z", model_dir, 8, seed=15))
            assert "z" not in engine.circuits
            # Straight into vLLM's AsyncLLM (no SteeredLLM front end): a client error (HTTP 400 in a
            # server), not vLLM's EngineGenerateError (a 500 with an empty message), and no dead engine.
            from vllm import SamplingParams
            from vllm.exceptions import VLLMClientError

            bad = SamplingParams(max_tokens=2, extra_args={"steering": [{"circuit": "nope", "multiplier": 2}]})
            with pytest.raises(VLLMClientError, match="unknown circuit 'nope'"):
                async for _ in engine.engine.generate(prompts[0], bad, "raw-bad"):
                    pass
            results: dict[int, object] = {}

            async def one(i):
                async for out in engine.generate(prompts[i], greedy(lengths[i]), f"r{i}", steering=specs[i]):
                    results[i] = out

            first = [asyncio.create_task(one(i)) for i in (0, 1)]
            while len(results) < 2:  # both are decoding
                await asyncio.sleep(0.01)
            late = [asyncio.create_task(one(i)) for i in (2, 3, 4)]  # 2 new specs: one must wait
            await asyncio.gather(*first, *late)
            return [results[i] for i in range(5)]
        finally:
            engine.shutdown()

    outs = asyncio.run(run())
    assert check_against_reference(outs, specs, lengths, ref) >= 2


def test_hot_load_circuits_and_vectors_while_running(tiny_root):
    """add_circuit claims spare columns / offset rows in place; results equal HF; misfits are refused."""
    from cna_vllm.errors import SteeringError

    model_dir, circuits, ref = tiny_setup("LlamaForCausalLM", tiny_root)
    ident = ModelIdentity.from_dir(model_dir)
    per_layer = np.bincount(circuits["b"].layers, minlength=ident.num_layers).max()
    prompts = token_prompts(len(TINY_SPECS), seed=10)
    with steered_engine(model_dir, {"a": circuits["a"]}, hot_load_neurons=int(per_layer), **TINY) as llm:
        before = llm.generate(prompts[:2], greedy(10), steering=[None, "a@0"])
        with pytest.raises(SteeringError, match="unknown circuit 'b'"):
            llm.generate(prompts[:1], greedy(4), steering="b@0")
        assert llm.add_circuit(circuits["b"]) == "b" and llm.add_circuit(circuits["v"]) == "v"
        with pytest.raises(SteeringError, match="already loaded"):
            llm.add_circuit(circuits["b"])
        too_big = random_circuit("big", model_dir, ident.num_layers * ident.intermediate_size // 2, seed=14)
        with pytest.raises(SteeringError, match="spare slot"):
            llm.add_circuit(too_big)
        assert "big" not in llm.circuits
        outs = llm.generate(prompts, greedy(10), steering=TINY_SPECS)
    check_against_reference(before, [None, "a@0"], 10, ref)
    assert check_against_reference(outs, TINY_SPECS, 10, ref) >= 3
    rows_with_new = [i for i, spec in enumerate(TINY_SPECS) if spec and ("b@" in spec or "v@" in spec)]
    assert any(tokens(outs)[i] != ref.generate(outs[i].prompt_token_ids, None, 10) for i in rows_with_new)


# --------------------------------------------------------------------------- real default model
def test_default_qwen_model(tmp_path):
    """The real default 0.5B model: a small mixed batch, steered rows equal to HF hooks."""
    model_dir = resolve_model("qwen2.5-coder-0.5b-instruct", progress=False)
    circuits = {
        "q": random_circuit("q", model_dir, 3000, seed=21, scale=3.0),
        "w": random_vectors("w", model_dir, [4, 12, 20], seed=22, scale=0.5),
    }
    ref = HFReference(model_dir, circuits)
    prompts = ["def quicksort(arr):", "How do I pick a lock?", "The capital of Japan is", "# sum a list", "Hi"]
    specs = [None, "q@4", "q@1:patch", "q@2:shift", "w@1:shift"]
    with steered_engine(model_dir, circuits, **ENGINE) as llm:
        outs = llm.generate(prompts, greedy(8), steering=specs)
    assert check_against_reference(outs, specs, 8, ref) >= 2


# --------------------------------------------------------------------------- start-up refusals
def test_startup_checks_on_a_real_config(tiny_root):
    """check_supported passes on SteeredLLM's config and names what is missing otherwise."""
    from vllm.engine.arg_utils import EngineArgs

    from cna_vllm.engine.config import engine_kwargs
    from cna_vllm.errors import CircuitError, SteeringError
    from cna_vllm.patches.engine import check_supported

    model_dir, circuits, _ = tiny_setup("LlamaForCausalLM", tiny_root)
    kw, loaded = engine_kwargs(model_dir, circuits, max_model_len=256, skip_tokenizer_init=True)
    assert kw["hf_overrides"] == {"architectures": ["SteeredLlamaForCausalLM"]}
    assert set(loaded) == {"a", "b", "v"}
    check_supported(EngineArgs(**kw).create_engine_config())
    kw.pop("logits_processors")
    with pytest.raises(SteeringError, match="logits processor"):
        check_supported(EngineArgs(**kw).create_engine_config())
    other = random_circuit("x", make_tiny("Qwen3ForCausalLM", tiny_root), 10, seed=0)
    with pytest.raises(CircuitError, match="another model"):
        engine_kwargs(model_dir, {"x": other})
    with pytest.raises(SteeringError, match="speculative"):
        engine_kwargs(model_dir, circuits, speculative_config={"method": "ngram"})
