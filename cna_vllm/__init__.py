"""cna-vllm: Contrastive Neuron Attribution circuits and per-request steered serving on vLLM."""

from cna_vllm.circuit import Circuit
from cna_vllm.models import DEFAULT_MODEL, SMALL_MODEL, ModelIdentity, resolve_model

__all__ = ["DEFAULT_MODEL", "SMALL_MODEL", "Circuit", "ModelIdentity", "resolve_model"]
