"""Request patches P5-P6: intake validation and dense prompt log-probabilities (API process).

See :mod:`cna_vllm.patches` for the inventory. Pinned to vllm 0.32.0.
"""

from __future__ import annotations

from typing import Any

from cna_vllm.errors import SteeringError

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
        from cna_vllm.engine.config import CONFIG_KEY
        from cna_vllm.engine.intake import check_request

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
