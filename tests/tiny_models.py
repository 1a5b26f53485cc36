"""Tiny random checkpoints of every steerable architecture, written to disk via transformers.

The weights are drawn with a large ``initializer_range`` so greedy logits have clear
margins: fp32 vLLM and HF then agree token for token despite different kernels. There is
no tokenizer; tests pass token ids (``skip_tokenizer_init=True`` on the vLLM side).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=512,
    initializer_range=0.15,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_GEMMA2 = {"sliding_window": 32, "query_pre_attn_scalar": 32}
ARCHS: dict[str, tuple[str, dict]] = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": None}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {}),
    # vLLM's Gemma classes always tie the LM head to the embeddings
    "GemmaForCausalLM": ("GemmaConfig", {"hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True}),
    "Gemma2ForCausalLM": ("Gemma2Config", {**_GEMMA2, "tie_word_embeddings": True}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {**_GEMMA2, "tie_word_embeddings": True}),
}


def make_tiny(arch: str, root: str | Path, seed: int = 0) -> Path:
    """Write (once) a tiny random fp32 checkpoint of ``arch`` under ``root/arch``; return its path."""
    import transformers

    out = Path(root) / arch
    if (out / "config.json").is_file():
        return out
    config_name, extra = ARCHS[arch]
    kwargs = {**COMMON, **extra}
    config = getattr(transformers, config_name)(**kwargs)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(torch.float32).eval()
    model.save_pretrained(out)
    return out
