"""vLLM general-plugin entry point: registers the ``Steered*`` architectures.

Stock names are never replaced: a deployment opts in per model with
``hf_overrides={"architectures": ["SteeredLlamaForCausalLM"]}`` (SteeredLLM does this).
"""

from __future__ import annotations

from cna_vllm.engine.config import STEERED


def register() -> None:
    """Register every steered class lazily (by ``module:Class``), once per process."""
    from vllm import ModelRegistry

    from cna_vllm import patches

    patches.install()

    supported = ModelRegistry.get_supported_archs()
    for name in STEERED.values():
        if name not in supported:
            ModelRegistry.register_model(name, f"cna_vllm.engine.steered_models:{name}")
