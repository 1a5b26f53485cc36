"""Discovery from prompt sets: CNA neuron circuits (:mod:`.cna`) and CAA vectors (:mod:`.caa`).

:mod:`.record` records activations with HF hooks; :mod:`.outputs` writes what the
``discover`` command leaves beside the file.
"""

from cna_vllm.discover.caa import caa_vectors, discover_caa
from cna_vllm.discover.cna import (
    DiscoveryConfig,
    DiscoveryResult,
    Scoring,
    discover,
    discover_ids,
    neuron_scores,
    select,
    universal_neurons,
)
from cna_vllm.discover.record import (
    ActivationStats,
    collect_stats,
    decoder_layers,
    down_proj_modules,
    encode,
    last_token_activations,
    load_hf_model,
    pad_token_id,
)

__all__ = [
    "ActivationStats",
    "DiscoveryConfig",
    "DiscoveryResult",
    "Scoring",
    "caa_vectors",
    "collect_stats",
    "decoder_layers",
    "discover",
    "discover_caa",
    "discover_ids",
    "down_proj_modules",
    "encode",
    "last_token_activations",
    "load_hf_model",
    "neuron_scores",
    "pad_token_id",
    "select",
    "universal_neurons",
]
