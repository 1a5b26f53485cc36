"""vLLM general-plugin entry point: registers the ``Steered*`` architectures.

Stock names are never replaced: a deployment opts in per model with
``hf_overrides={"architectures": ["SteeredLlamaForCausalLM"]}`` (SteeredLLM does this).
"""

from __future__ import annotations

STEERED: dict[str, str] = {
    base: f"Steered{base}"
    for base in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
    )
}
"""Stock architecture name -> steered architecture name."""


def register() -> None:
    """Register every steered class lazily (by ``module:Class``), once per process."""
    from vllm import ModelRegistry

    from cna_vllm.engine.patches import install_dense_logprobs, install_input_check, install_runner_binding

    install_input_check()  # P5: steering validated and salted for every request, on every path
    install_runner_binding()  # P1: per-token rows from the runner's offsets, whatever the backend
    install_dense_logprobs()  # P6: full-vocabulary prompt log-probabilities as arrays, on request

    supported = ModelRegistry.get_supported_archs()
    for name in STEERED.values():
        if name not in supported:
            ModelRegistry.register_model(name, f"cna_vllm.engine.models:{name}")
