"""Every place cna-vllm touches vLLM internals (beyond public APIs), with why / how / when-it-can-go.

Public APIs used elsewhere and not listed here: ``ModelRegistry.register_model``, the V1
``LogitsProcessor`` interface, ``SamplingParams.extra_args``, ``additional_config``,
``hf_overrides``, prompt ``cache_salt``, ``LLM`` / ``AsyncLLM``, ``worker_extension_cls`` with
``collective_rpc`` (hot-loading), ``scheduler_cls`` (row admission, :mod:`cna_vllm.engine.admission`,
a subclass of vLLM's ``Scheduler``, whose interface vLLM calls not yet public). Pinned to vllm 0.32.0.

The engine patches P1-P6 are below (the general plugin installs P1, P5 and P6 in every
process). The server touches vLLM internals in four more places,
listed here so that this file is the one inventory (issue #9):

- S1 ``cna_vllm.server.app.run_server`` is a copy of vLLM's single-process ``run_server``
  built from its launcher modules (``vllm.entrypoints.launchers.*``).
  why: the steering plugin must be attached between ``build_app`` and ``init_app_state``.
  when it can go: when ``vllm.endpoint_plugins`` is loaded by ``vllm serve`` itself on the CPU
  build (then ``VLLM_PLUGINS=cna_vllm vllm serve`` with the engine arguments is enough).
- S2 ``SteeringEndpointPlugin.attach_router`` appends to ``app.user_middleware`` and rebuilds
  ``app.middleware_stack`` (Starlette internals) because ``build_app`` already built it.
  when it can go: when vLLM's endpoint-plugin protocol can add middleware before the build.
- S3 ``cna_vllm.server.auth.GuardEveryRoute`` subclasses vLLM's ``AuthenticationMiddleware``
  (``vllm.entrypoints.serve.middleware.authenticate``) to guard every route, not only ``/v1``.
  when it can go: when vLLM's API key guards ``/invocations``, ``/tokenize``, ``/metrics``.
- S4 ``SteeredLLM.shutdown`` calls ``llm.llm_engine.engine_core.shutdown()`` to stop the
  engine-core process at once instead of at garbage collection.
  when it can go: when ``vllm.LLM`` has a public ``shutdown()``.
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
        from cna_vllm.engine.state import find_state

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


# --------------------------------------------------------------------------- P5
# P5 checking and salting steering in ``InputProcessor.process_inputs`` (API process).
#   why:  every request reaches the engine through this method, whatever the route
#         (``/v1/...``, ``/invocations``, ``vllm_xargs``), the header spelling, or the API
#         (offline ``LLM``, ``AsyncLLM``). Validating there, not in an HTTP middleware, means
#         no path can hand a worker an unknown circuit (which used to kill the engine) or
#         steer without the steering-keyed cache salt (which poisoned the prefix cache).
#         Custom logits processors' ``validate_params`` is called there too, but it sees only
#         the sampling params, not the request's cache salt nor the engine's circuits.
#   how:  wrap the method; after the stock processing, :func:`cna_vllm.engine.intake.check_request`
#         validates the spec against the engine's catalogue, rewrites it to the canonical
#         wire form and composes the cache salt. Bad input raises an error that is both a
#         ``SteeringError`` and vLLM's ``VLLMValidationError``: ``AsyncLLM.generate`` lets only
#         ``VLLMClientError`` through as a 400 and turns any other exception, ``ValueError``
#         included, into an ``EngineGenerateError`` (HTTP 500, empty message).
#         Installed once per process by the general plugin.
#         Not covered: an ``EngineCoreRequest`` passed directly to ``AsyncLLM.generate``
#         (deprecated in vLLM 0.32); the scheduler's row cap (engine/admission.py) still holds.
#   related upstream: vLLM has no per-request input hook for plugins (only
#         ``LogitsProcessor.validate_params``, which cannot see the request).
#   when it can go: when vLLM offers a request-level validation/rewrite hook to plugins.


_CLIENT_ERROR: list[type] = []


def client_error(exc: SteeringError) -> SteeringError:
    """``exc`` as a ``SteeringError`` that vLLM also treats as a client error (HTTP 400, param ``steering``)."""
    from vllm.exceptions import VLLMValidationError

    if not _CLIENT_ERROR:
        _CLIENT_ERROR.append(type("SteeringRequestError", (SteeringError, VLLMValidationError), {}))
    err = _CLIENT_ERROR[0].__new__(_CLIENT_ERROR[0], str(exc))
    VLLMValidationError.__init__(err, str(exc), parameter="steering")
    return err


def install_input_check() -> None:
    """Wrap ``InputProcessor.process_inputs`` with :func:`~cna_vllm.engine.intake.check_request` (idempotent)."""
    import functools

    from vllm.v1.engine.input_processor import InputProcessor

    stock = InputProcessor.process_inputs
    if getattr(stock, "_cna_checked", False):
        return

    @functools.wraps(stock)
    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = stock(self, *args, **kwargs)
        from cna_vllm.engine.intake import check_request
        from cna_vllm.engine.state import CONFIG_KEY

        if CONFIG_KEY in (self.vllm_config.additional_config or {}):
            try:
                check_request(self.vllm_config, request)
            except SteeringError as exc:
                raise client_error(exc) from None
        return request

    process_inputs._cna_checked = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs


# --------------------------------------------------------------------------- P6
# P6 dense full-vocabulary prompt log-probabilities (the KL referee).
#   why:  ``prompt_logprobs=-1`` returns every vocabulary entry at every position, but the API
#         process turns them into Python lists one element at a time (``FlatLogprobs.append_fast``):
#         about 0.4 s per position for a 152k vocabulary, 20x the model's own time.
#   how:  wrap ``LogprobsProcessor.from_new_request`` to mark a request whose
#         ``extra_args[DENSE_LOGPROBS_KEY]`` is set, and ``_update_prompt_logprobs`` to keep such a
#         request's rows as one float32 array ``[positions, vocab]`` in vocabulary order (attribute
#         ``cna_dense`` of the returned ``prompt_logprobs``) instead of pythonizing them.
#         Requests without the key are untouched.
#   when it can go: when vLLM returns prompt log-probabilities as arrays (or a request-level
#         option to skip pythonizing them).

DENSE_LOGPROBS_KEY = "cna_dense_prompt_logprobs"


def install_dense_logprobs() -> None:
    """Install P6 (idempotent)."""
    import functools

    import numpy as np
    from vllm.v1.engine.logprobs import LogprobsProcessor

    if getattr(LogprobsProcessor._update_prompt_logprobs, "_cna_dense", False):
        return
    stock_new = LogprobsProcessor.from_new_request.__func__
    stock_update = LogprobsProcessor._update_prompt_logprobs

    @functools.wraps(stock_new)
    def from_new_request(cls: Any, tokenizer: Any, request: Any) -> Any:
        proc = stock_new(cls, tokenizer, request)
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        proc.cna_dense = bool(extra.get(DENSE_LOGPROBS_KEY)) and request.sampling_params.prompt_logprobs == -1
        return proc

    @functools.wraps(stock_update)
    def _update_prompt_logprobs(self: Any, tensors: Any) -> None:
        if not getattr(self, "cna_dense", False):
            return stock_update(self, tensors)
        token_ids, logprobs, *_ = tensors
        ids = np.asarray(token_ids)[:, 1:]  # column 0 is the prompt token itself, then the full top-k
        lps = np.asarray(logprobs, dtype=np.float32)[:, 1:]
        dense = np.full((ids.shape[0], ids.shape[1]), -np.inf, dtype=np.float32)
        np.put_along_axis(dense, ids.astype(np.int64), lps, axis=1)
        previous = getattr(self.prompt_logprobs, "cna_dense", None)
        self.prompt_logprobs.cna_dense = dense if previous is None else np.concatenate([previous, dense])
        return None

    _update_prompt_logprobs._cna_dense = True  # type: ignore[attr-defined]
    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    LogprobsProcessor._update_prompt_logprobs = _update_prompt_logprobs
