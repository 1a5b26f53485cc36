"""cna-vllm: Contrastive Neuron Attribution circuits and per-request steered serving on vLLM."""

from typing import Any

from cna_vllm.circuit import Circuit
from cna_vllm.embedded import DEFAULT_MODEL, SMALL_MODEL, resolve_model
from cna_vllm.identity import ModelIdentity
from cna_vllm.steering import SteeringSpec

__all__ = [
    "DEFAULT_MODEL",
    "SMALL_MODEL",
    "AsyncSteeredLLM",
    "Circuit",
    "ModelIdentity",
    "SteeredLLM",
    "SteeringSpec",
    "resolve_model",
]


def __getattr__(name: str) -> Any:
    """``SteeredLLM`` and ``AsyncSteeredLLM`` import vLLM, so they load on first use."""
    if name in ("SteeredLLM", "AsyncSteeredLLM"):
        from cna_vllm.engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'cna_vllm' has no attribute {name!r}")
