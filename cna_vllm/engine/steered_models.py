"""Steered subclasses of vLLM's stock causal-LM classes.

Each ``Steered<Arch>`` is the stock class plus :class:`SteeredMixin`: after the stock
``__init__`` it loads the circuits named in ``additional_config``, validates them against
the model, wraps the activation of every layer with steerable neurons, gives every layer
with CAA vectors an output offset, and registers the worker's
:class:`~cna_vllm.engine.row_table.SteeringState`. Its ``forward`` writes the step's per-token
rows, then runs the stock forward. Weights, loading and everything else are unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.models.gemma import GemmaForCausalLM
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from cna_vllm import sources
from cna_vllm.engine.config import EngineSteeringConfig
from cna_vllm.engine.context import register_state
from cna_vllm.engine.layers import SteeredActivation
from cna_vllm.engine.row_table import SteeringState
from cna_vllm.identity import ModelIdentity
from cna_vllm.patches import engine as patches

logger = logging.getLogger(__name__)


def _model_identity(vllm_config: Any) -> str | ModelIdentity:
    """The model directory when local (dims + weights fingerprint), else dims from the config."""
    model = vllm_config.model_config.model
    if Path(model).is_dir():
        return model
    text = vllm_config.model_config.hf_text_config
    return ModelIdentity(
        architecture="?",
        num_layers=text.num_hidden_layers,
        intermediate_size=text.intermediate_size,
        hidden_size=text.hidden_size,
        fingerprint="",
    )


class SteeredMixin:
    """Adds per-request MLP-neuron steering to a stock vLLM ``*ForCausalLM``."""

    steering: SteeringState

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        patches.check_supported(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        cfg = EngineSteeringConfig.from_additional_config(vllm_config.additional_config)
        ident = _model_identity(vllm_config)
        circuits = cfg.load_circuits()
        for circuit in circuits.values():
            sources.validate(circuit, ident)
        text = vllm_config.model_config.hf_text_config
        mlps = dict(patches.decoder_mlps(self))
        device = next(self.parameters()).device
        sched = vllm_config.scheduler_config
        self.steering = SteeringState.build(
            circuits,
            mlps,
            intermediate_size=text.intermediate_size,
            hidden_size=text.hidden_size,
            tp_rank=get_tensor_model_parallel_rank(),
            tp_size=get_tensor_model_parallel_world_size(),
            hot_load_neurons=cfg.hot_load_neurons,
            capacity=cfg.max_steering_configs,
            max_num_seqs=sched.max_num_seqs,
            max_num_tokens=max(sched.max_num_batched_tokens, vllm_config.model_config.max_model_len) + 64,
            device=device,
        )
        self.steering.identity = ident  # hot-loaded circuits are validated against it
        for layer, cols in self.steering.columns.items():
            mlp = mlps[layer]
            patches.set_activation(
                mlp,
                SteeredActivation(
                    mlp.act_fn,
                    layer,
                    cols.columns,
                    self.steering.scale[layer],
                    self.steering.bias[layer],
                    self.steering.token_rows,
                ),
            )
        for layer, offset in self.steering.offset.items():
            patches.add_output_offset(mlps[layer], offset, self.steering.token_rows)
        register_state(vllm_config.instance_id, self.steering)
        logger.info("%s", self.steering.describe())

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        self.steering.prepare(positions.shape[-1])
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)


class SteeredLlamaForCausalLM(SteeredMixin, LlamaForCausalLM):
    """Llama (and SmolLM2) with per-request neuron steering."""


class SteeredMistralForCausalLM(SteeredMixin, MistralForCausalLM):
    """Mistral with per-request neuron steering."""


class SteeredQwen2ForCausalLM(SteeredMixin, Qwen2ForCausalLM):
    """Qwen2 / Qwen2.5 with per-request neuron steering."""


class SteeredQwen3ForCausalLM(SteeredMixin, Qwen3ForCausalLM):
    """Qwen3 with per-request neuron steering."""


class SteeredGemmaForCausalLM(SteeredMixin, GemmaForCausalLM):
    """Gemma with per-request neuron steering."""


class SteeredGemma2ForCausalLM(SteeredMixin, Gemma2ForCausalLM):
    """Gemma 2 with per-request neuron steering."""


class SteeredGemma3ForCausalLM(SteeredMixin, Gemma3ForCausalLM):
    """Gemma 3 (text) with per-request neuron steering."""
