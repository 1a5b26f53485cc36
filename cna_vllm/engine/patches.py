"""Every place cna-vllm touches vLLM internals (beyond public APIs), with why / how / when-it-can-go.

Public APIs used elsewhere and not listed here: ``ModelRegistry.register_model``, the V1
``LogitsProcessor`` interface, ``SamplingParams.extra_args``, ``additional_config``,
``hf_overrides``, prompt ``cache_salt``, ``LLM`` / ``AsyncLLM``, ``worker_extension_cls`` with
``collective_rpc`` (hot-loading). Pinned to vllm 0.32.0.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cna_vllm.errors import SteeringError

# --------------------------------------------------------------------------- P1
# P1 query_start_loc from the forward context.
#   why:  the activation must know which request each flattened token belongs to. The
#         logits processor gives slot -> request; the token offsets per slot are only in
#         the attention metadata of the current step.
#   how:  read ``get_forward_context().attn_metadata`` (dict layer -> metadata) and take
#         ``query_start_loc`` of any entry: all KV-cache groups share the token layout.
#   when it can go: when vLLM passes per-request token offsets (or request ids) to the
#         model forward or exposes them through a public model-state hook on V1.


def query_start_loc() -> torch.Tensor | None:
    """``query_start_loc`` of the current step, or None outside a real step (profiling)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not metadata:
        return None
    if isinstance(metadata, list):
        raise SteeringError("cna-vllm steering does not support micro-batching (DBO / ubatching)")
    for entry in metadata.values():
        qsl = getattr(entry, "query_start_loc", None)
        if qsl is not None:
            return qsl
    raise SteeringError("attention metadata carries no query_start_loc; this backend is unsupported")


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
#         - quantized checkpoints: ``maybe_fused_act_quant`` looks the activation up by
#           type; wrapping loses the fused act+quant kernel, and other quant methods
#           are untested -> refused.
#         - the steering logits processor must be registered, or no request gets a row.
#   how:  check ``use_v2_model_runner``, ``compilation_config.cudagraph_mode``,
#         ``speculative_config``, ``quant_config``, ``model_config.logits_processors``.
#   when it can go: V2 -> when a ``get_model_state_cls`` implementation lands here;
#         the rest when each is supported and tested.


def check_supported(vllm_config: Any) -> None:
    """Raise :class:`SteeringError` for configurations where steering could silently not apply."""
    from cna_vllm.engine.state import LOGITS_PROCESSOR_FQCN, SteeringLogitsProcessor

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
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported with steering")
    if vllm_config.quant_config is not None:
        problems.append(
            f"quantized models ({vllm_config.model_config.quantization}) are not supported: the steered "
            "activation replaces the fused activation+quantization path"
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
