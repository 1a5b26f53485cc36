"""The HF transformers reference: greedy generation with steering by hooks.

Neuron items: forward pre-hooks on ``mlp.down_proj`` (its input is the steered activation).
CAA vector items: forward hooks on ``mlp`` adding the offset to its output at every position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cna_vllm.rows import to_offsets, to_rows
from cna_vllm.steering import SteeringSpec


class HFReference:
    """An fp32 HF model that generates greedily, one prompt at a time, under any spec."""

    def __init__(self, model_dir: str | Path, circuits: Mapping) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.circuits = circuits
        self._cache: dict[tuple, list[int]] = {}

    def _layers(self):
        return self.model.model.layers

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], spec, max_tokens: int) -> list[int]:
        spec = SteeringSpec.parse(spec)
        key = (tuple(prompt_ids), spec.fingerprint(), max_tokens)
        if key in self._cache:
            return self._cache[key]
        handles = []
        for layer, (idx, s, b) in to_rows(spec, self.circuits).items():
            idx_t, s_t, b_t = torch.from_numpy(idx), torch.from_numpy(s), torch.from_numpy(b)

            def hook(_module, args, idx_t=idx_t, s_t=s_t, b_t=b_t):
                (x,) = args
                x = x.clone()
                x[..., idx_t] = x[..., idx_t] * s_t + b_t
                return (x,)

            handles.append(self._layers()[layer].mlp.down_proj.register_forward_pre_hook(hook))
        for layer, offset in to_offsets(spec, self.circuits).items():
            off_t = torch.from_numpy(offset)

            def out_hook(_module, _args, output, off_t=off_t):
                return output + off_t

            handles.append(self._layers()[layer].mlp.register_forward_hook(out_hook))
        try:
            ids = torch.tensor([list(prompt_ids)])
            result: list[int] = []
            out = self.model(ids, use_cache=True)
            for _ in range(max_tokens):  # plain greedy: EOS neither stops nor is masked (= vLLM ignore_eos)
                token = int(out.logits[0, -1].argmax())
                result.append(token)
                out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        self._cache[key] = result
        return result
