"""Every place cna-vllm touches vLLM internals (beyond public APIs), in vllm-ascend's form.

Each patch says **why** it exists, **how** it works, the **related upstream** gap and **when it
can go**; the code is in :mod:`.engine` (P1-P4, P7), :mod:`.requests` (P5, P6) and
:mod:`.server` (S2-S4). S1, a copy of vLLM's ``run_server``, is gone: ``cna-vllm serve`` runs
vLLM's own ``serve`` command, which attaches the endpoint plugin once ``VLLM_PLUGINS`` names it
(:func:`cna_vllm.server.app.allow_plugin`). Pinned to vllm 0.32.0. The general plugin installs
P1, P5 and P6 in every process (:func:`install`).

Public APIs used elsewhere and not listed: ``ModelRegistry.register_model``, the V1
``LogitsProcessor`` interface, ``SamplingParams.extra_args``, ``additional_config``,
``hf_overrides``, prompt ``cache_salt``, ``LLM`` / ``AsyncLLM``, ``worker_extension_cls`` with
``collective_rpc`` (hot-loading), ``scheduler_cls`` (row admission, a subclass of vLLM's
``Scheduler``, :mod:`cna_vllm.engine.admission`).

===== ========================================== ===============================================
patch what                                       when it can go
===== ========================================== ===============================================
P1    runner ``load_model`` binds its             vLLM passes per-request token offsets (or a
      ``query_start_loc`` buffer to the state     model-state hook) to model code on V1
P2    ``mlp.act_fn`` replaced per layer           vLLM offers an MLP-activation hook
P3    start-up refusals (V2 runner, FULL graphs,  each configuration is supported and tested
      DBO, spec decode, quantization, scheduler)
P4    MLP output offset by class swap (CAA)       vLLM offers an MLP-output / residual hook
P5    ``InputProcessor.process_inputs`` wrapped:  vLLM offers a request-level validation hook
      validate, canonicalise and salt steering
P6    dense prompt log-probabilities as arrays    vLLM returns prompt log-probs as arrays
P7    ``llm.llm_engine.engine_core.shutdown()``   ``vllm.LLM`` has a public ``shutdown()``
S2    ``app.user_middleware`` appended (and the   the endpoint-plugin protocol can add middleware
      Starlette stack rebuilt if already built)
S3    ``GuardEveryRoute`` subclasses vLLM's       vLLM's API key guards ``/invocations``,
      ``AuthenticationMiddleware``                ``/tokenize``, ``/metrics``
S4    reading vLLM's app state                    the endpoint-plugin protocol hands plugins the
      (``engine_client``, the served LoRA names)  engine client and the served model names
===== ========================================== ===============================================

The long-form why/how of each patch sits beside its code.
"""

from __future__ import annotations


def install() -> None:
    """Install the process-wide patches (idempotent): P5 intake, P1 runner binding, P6 dense log-probs."""
    from cna_vllm.patches.engine import install_runner_binding
    from cna_vllm.patches.requests import install_dense_logprobs, install_input_check

    install_input_check()  # P5: steering validated and salted for every request, on every path
    install_runner_binding()  # P1: per-token rows from the runner's offsets, whatever the backend
    install_dense_logprobs()  # P6: full-vocabulary prompt log-probabilities as arrays, on request
