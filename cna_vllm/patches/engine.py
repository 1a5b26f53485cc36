"""Engine patches P1-P4 and P7: the model runner, the stock MLPs, the start-up refusals, engine shutdown.

See :mod:`cna_vllm.patches` for the inventory. Pinned to vllm 0.32.0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cna_vllm.errors import SteeringError

# --------------------------------------------------------------------------- P1
# P1 binding the model runner's ``query_start_loc`` buffer to the steering state.
#   why:  the activation must know which request each flattened token belongs to. The
#         logits processor gives slot -> request; the token offsets per slot are built by
#         the model runner each step. Reading them from the attention metadata (as before)
#         tied steering to backends that expose ``query_start_loc`` (FlashInfer's metadata
#         has none, issue #9); the runner's own buffer exists for every backend.
#   how:  wrap ``load_model`` of ``GPUModelRunner`` and of each runner class that overrides
#         it (``CPUModelRunner``); after the stock load, the steered model's state (found by
#         the vLLM instance id) keeps a view of ``runner.query_start_loc.gpu``, a persistent
#         ``[max_num_reqs + 1]`` buffer the runner rewrites in place before every forward
#         (``_prepare_inputs``; the tail repeats the total, so padding maps to no request).
#         A runner that never binds makes the first forward (the start-up profile run) fail
#         with a clear message. Micro-batching (DBO / ubatching) splits one step into two
#         forwards over one buffer, so it is refused at start-up (P3).
#   related upstream: vLLM has no public per-token request index for model code.
#   when it can go: when vLLM passes per-request token offsets (or request ids) to the
#         model forward or exposes them through a public model-state hook on V1.

_RUNNER_CLASSES = ("vllm.v1.worker.gpu_model_runner:GPUModelRunner", "vllm.v1.worker.cpu_model_runner:CPUModelRunner")


def _binding_load_model(stock: Any) -> Any:
    import functools

    @functools.wraps(stock)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = stock(self, *args, **kwargs)
        from cna_vllm.engine.context import find_state

        state = find_state(self.vllm_config.instance_id)
        if state is not None:
            state.bind_request_offsets(self.query_start_loc.gpu)
        return out

    load_model._cna_bound = True  # type: ignore[attr-defined]
    return load_model


def install_runner_binding() -> None:
    """Wrap the V1 runners' ``load_model`` so a steered model sees the runner's token offsets (idempotent)."""
    import importlib

    for path in _RUNNER_CLASSES:
        module, name = path.split(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError:  # a vLLM build without this runner
            continue
        stock = cls.__dict__.get("load_model")
        if stock is not None and not getattr(stock, "_cna_bound", False):
            cls.load_model = _binding_load_model(stock)


# --------------------------------------------------------------------------- P2
# P2 replacing ``layers[i].mlp.act_fn`` of stock decoder layers.
#   why:  the input of ``down_proj`` is produced by this weightless module in every
#         supported MLP (Llama, Qwen2/3, Mistral, Gemma 1/2/3); wrapping it changes
#         neither weight names nor loading. Gemma may share one act object between
#         layers, so each layer gets its own wrapper.
#   how:  walk ``model.model.layers`` in ``[start_layer, end_layer)`` (pipeline ranks
#         hold a slice; the rest are ``PPMissingLayer``), set ``mlp.act_fn``.
#   when it can go: when vLLM offers an MLP-activation hook or steering vector API.


def decoder_mlps(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """``(global layer index, mlp)`` for each decoder layer this pipeline rank holds."""
    from vllm.model_executor.models.utils import PPMissingLayer

    inner = model.model
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(inner.layers))
    for i in range(start, end):
        layer = inner.layers[i]
        if isinstance(layer, PPMissingLayer):
            continue
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not hasattr(mlp, "act_fn") or not hasattr(mlp, "down_proj"):
            raise SteeringError(f"layer {i} of {type(model).__name__} has no mlp.act_fn/down_proj to steer")
        yield i, mlp


def set_activation(mlp: nn.Module, act: nn.Module) -> None:
    mlp.act_fn = act


# --------------------------------------------------------------------------- P3
# P3 start-up refusals, read from ``VllmConfig``.
#   why:  configurations in which steering would silently not apply must fail at start:
#         - Model Runner V2 never calls V1 logits processors' update_state (and rejects
#           them); cna-vllm supports the V1 runner only -> VLLM_USE_V2_MODEL_RUNNER=0.
#         - FULL CUDA graphs replay the outer forward without running Python, so the
#           per-token rows would go stale -> PIECEWISE or NONE only.
#         - speculative decoding: vLLM rejects custom logits processors with it.
#         - micro-batching (DBO / ubatching) runs one step as two forwards over one
#           token-offset buffer (P1), so per-token rows would be wrong.
#         - quantized checkpoints: ``maybe_fused_act_quant`` looks the activation up by
#           type; wrapping loses the fused act+quant kernel, and other quant methods
#           are untested -> refused.
#         - the steering logits processor must be registered, or no request gets a row.
#         - the scheduler must be a SteeringAdmission one, or a step could need more rows
#           than the tables hold.
#   how:  check ``use_v2_model_runner``, ``compilation_config.cudagraph_mode``, ``use_ubatching``,
#         ``speculative_config``, ``quant_config``, ``model_config.logits_processors``.
#   when it can go: V2 -> when a ``get_model_state_cls`` implementation lands here;
#         the rest when each is supported and tested.


def check_supported(vllm_config: Any) -> None:
    """Raise :class:`SteeringError` for configurations where steering could silently not apply."""
    from cna_vllm.engine.config import LOGITS_PROCESSOR_FQCN
    from cna_vllm.engine.processor import SteeringLogitsProcessor

    problems = []
    if vllm_config.use_v2_model_runner:
        problems.append(
            "Model Runner V2 is selected; cna-vllm needs the V1 runner: set VLLM_USE_V2_MODEL_RUNNER=0 "
            "(SteeredLLM does this)"
        )
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    if mode is not None and mode.has_full_cudagraphs():
        problems.append(
            f"cudagraph_mode={mode.name} replays the whole forward without Python; use "
            "compilation_config={'cudagraph_mode': 'PIECEWISE'} (SteeredLLM does this)"
        )
    if vllm_config.parallel_config.use_ubatching:
        problems.append("micro-batching (--enable-dbo / ubatch_size > 1) is not supported with steering")
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported with steering")
    if vllm_config.quant_config is not None:
        problems.append(
            f"quantized models ({vllm_config.model_config.quantization}) are not supported: the steered "
            "activation replaces the fused activation+quantization path"
        )
    from cna_vllm.engine.admission import SteeringAdmission

    if not issubclass(vllm_config.scheduler_config.get_scheduler_cls(), SteeringAdmission):
        problems.append(
            "the scheduler does not cap distinct steering specs; set scheduler_cls="
            "'cna_vllm.engine.admission.SteeringScheduler' (SteeredLLM and cna-vllm serve do this)"
        )
    procs = vllm_config.model_config.logits_processors or ()
    if not any(p is SteeringLogitsProcessor or p == LOGITS_PROCESSOR_FQCN for p in procs):
        problems.append(f"the logits processor {LOGITS_PROCESSOR_FQCN!r} is not registered (logits_processors=)")
    if problems:
        raise SteeringError("cna-vllm cannot steer this configuration:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- P4
# P4 giving a stock MLP module an output offset (CAA vectors) by class swap.
#   why:  CAA adds a vector to each layer's MLP output. Wrapping ``layers[i].mlp`` in a new
#         module would rename its weights (``mlp.inner.gate_up_proj``) and break loading;
#         a forward hook is not guaranteed under torch.compile.
#   how:  after the stock ``__init__``, set ``mlp.__class__`` to a cached subclass
#         ``(MLPOutputOffset, StockMLP)`` and register two non-persistent buffers. The
#         stock forward runs unchanged via ``super()``.
#   when it can go: when vLLM offers a residual-stream / MLP-output hook or steering API.

_OFFSET_CLASSES: dict[type, type] = {}


def add_output_offset(mlp: nn.Module, offset: torch.Tensor, token_rows: torch.Tensor) -> None:
    """Make ``mlp`` add ``offset[token_rows[t]]`` to its output for every token t."""
    from cna_vllm.engine.layers import MLPOutputOffset

    stock = type(mlp)
    if issubclass(stock, MLPOutputOffset):
        raise SteeringError(f"{stock.__name__} already has an output offset")
    cls = _OFFSET_CLASSES.get(stock)
    if cls is None:
        cls = _OFFSET_CLASSES[stock] = type(f"Offset{stock.__name__}", (MLPOutputOffset, stock), {})
    mlp.__class__ = cls
    mlp.register_buffer("cna_offset", offset, persistent=False)
    mlp.register_buffer("cna_token_rows", token_rows, persistent=False)


# --------------------------------------------------------------------------- P7
def shutdown_engine_core(llm: Any) -> None:
    """P7: stop an offline ``vllm.LLM``'s engine-core process now, not at garbage collection."""
    llm.llm_engine.engine_core.shutdown()
