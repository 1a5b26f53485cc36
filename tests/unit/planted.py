"""Tiny random Llama / Qwen2 models with a planted behaviour, for discovery tests.

Dimension 0 of the residual stream fires only on the trigger token, dimension 1 on
every token. No attention or MLP output writes to either dimension, so at the last
position they equal the last token's embedding. Planted neurons read dimension 0;
the always-on neuron reads dimension 1 (and, more weakly, dimension 0, so its mean
difference is the largest of all: only the universal filter can keep it out).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

TRIGGER = 7
PLANTED = [(3, 40), (2, 17), (1, 5)]
ALWAYS_ON = (2, 9)
DIMS = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def planted_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    model = model_cls(config_cls(**DIMS)).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, :2] = 0.0
        emb[TRIGGER, 0] = 8.0
        emb[:, 1] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:2] = 0.0
            layer.mlp.down_proj.weight[:2] = 0.0
        for rank, (layer, neuron) in enumerate(PLANTED):
            mlp = model.model.layers[layer].mlp
            mlp.gate_proj.weight[neuron] = 0.0
            mlp.up_proj.weight[neuron] = 0.0
            mlp.gate_proj.weight[neuron, 0] = 1.0
            mlp.up_proj.weight[neuron, 0] = 4.0 / 2**rank
        layer, neuron = ALWAYS_ON
        mlp = model.model.layers[layer].mlp
        mlp.gate_proj.weight[neuron] = 0.0
        mlp.up_proj.weight[neuron] = 0.0
        mlp.gate_proj.weight[neuron, :2] = torch.tensor([2.0, 1.0])
        mlp.up_proj.weight[neuron, :2] = torch.tensor([2.0, 1.0])
    return model


def token_sets(n: int = 12, seed: int = 0) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Positive prompts end with the trigger; negative and diverse ones never contain it."""
    rng = random.Random(seed)
    plain = [t for t in range(2, DIMS["vocab_size"]) if t != TRIGGER]

    def seq() -> list[int]:
        return [rng.choice(plain) for _ in range(rng.randint(3, 9))]

    positive = [[*seq(), TRIGGER] for _ in range(n)]
    negative = [seq() for _ in range(n)]
    diverse = [seq() for _ in range(2 * n)]
    return positive, negative, diverse


def circuit_of(name: str, keys: list[tuple[int, int]], seed: int = 0):
    """A model-less circuit on the given ``(layer, neuron)`` pairs, with random means."""
    from cna_vllm.circuit import Circuit

    rng = np.random.default_rng(seed)
    n = len(keys)
    return Circuit(
        name=name,
        layers=[k[0] for k in keys],
        neurons=[k[1] for k in keys],
        score=np.linspace(1, 0.1, n),
        mean_pos=rng.normal(size=n),
        mean_neg=rng.normal(size=n),
    )


CHAT_WORDS = {"<u>": 60, "</u>": 61, "<a>": 62}
WORDS = {"<unk>": 0, "</s>": 1, **CHAT_WORDS, "trigger": TRIGGER}
WORDS |= {f"w{i}": i for i in range(2, DIMS["vocab_size"]) if i not in WORDS.values()}


def planted_tokenizer():
    """A word-level HF tokenizer over the planted vocabulary: ``w<id>`` is token ``id``, ``trigger`` is
    :data:`TRIGGER`; its chat template wraps the prompt in ``<u> … </u>`` and appends ``<a>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(WORDS), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<u> {{ m['content'] }} </u>{% endfor %}{% if add_generation_prompt %} <a>{% endif %}"
    )
    return fast


def prompt_sets(n: int = 12, seed: int = 0):
    """:func:`token_sets` (exactly, token for token) as text prompt sets for :func:`planted_tokenizer`."""
    from cna_vllm.prompts import PromptSet

    word = {i: w for w, i in WORDS.items()}

    def text(ids: list[list[int]]) -> tuple[str, ...]:
        return tuple(" ".join(word[t] for t in p) for p in ids)

    pos, neg, div = token_sets(n, seed)
    return PromptSet("pos", text(pos)), PromptSet("neg", text(neg)), PromptSet("div", text(div))
