"""Recording with HF hooks: the ``down_proj`` input of every layer at the last prompt token.

The recorded value is the input of each layer's ``mlp.down_proj`` (``act(gate) * up``)
at the last prompt token, captured by a forward pre-hook. Prompts are batched with left
padding and explicit position ids, so the last position is the last prompt token and
each prompt sees the positions it would see alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cna_vllm.errors import CnaError


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers, in order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return list(decoder.layers)


def down_proj_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's ``mlp.down_proj``, in layer order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise CnaError(f"{type(model).__name__} has no decoder layers to hook")
    try:
        return [layer.mlp.down_proj for layer in layers]
    except AttributeError as exc:
        raise CnaError(f"{type(model).__name__}: a decoder layer has no mlp.down_proj") from exc


def encode(tokenizer, prompts: Sequence[str], *, chat_template: bool) -> list[list[int]]:
    """Token ids per prompt; with the chat template the generation prompt is appended."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise CnaError("the tokenizer has no chat template; pass chat_template=False (--no-chat-template)")
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return [tokenizer(p)["input_ids"] for p in prompts]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def left_padded(batch: Sequence[Sequence[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Model inputs for a left-padded batch, with position ids that ignore the padding."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


@torch.no_grad()
def last_token_activations(
    model: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "activations",
    progress: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield float32 ``[batch, layers, intermediate]`` down_proj inputs at the last token."""
    if not token_ids or any(len(ids) == 0 for ids in token_ids):
        raise CnaError("cannot record activations of an empty prompt")
    modules = down_proj_modules(model)
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def hook_for(index: int):
        def hook(_module, args):
            captured[index] = args[0][:, -1, :].float()

        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        with tqdm(total=len(token_ids), desc=desc, unit="prompt", disable=not progress) as bar:
            for start in range(0, len(token_ids), batch_size):
                batch = token_ids[start : start + batch_size]
                model(**left_padded(batch, pad_id, device), use_cache=False)
                yield torch.stack(captured, dim=1).cpu()  # type: ignore[arg-type]
                bar.update(len(batch))
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ActivationStats:
    """Running per-neuron count, mean and variance (float64) over prompts."""

    n: int = 0
    total: np.ndarray | None = None
    total_sq: np.ndarray | None = None

    def update(self, acts: torch.Tensor) -> None:
        a = acts.double().numpy()
        if self.total is None:
            self.total, self.total_sq = np.zeros(a.shape[1:]), np.zeros(a.shape[1:])
        self.n += a.shape[0]
        self.total += a.sum(0)
        self.total_sq += (a * a).sum(0)

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.n

    @property
    def var(self) -> np.ndarray:
        """Unbiased sample variance (0 for a single prompt)."""
        if self.n < 2:
            return np.zeros_like(self.total)
        return np.maximum(self.total_sq - self.n * self.mean**2, 0.0) / (self.n - 1)


def collect_stats(model, token_ids, **kwargs) -> ActivationStats:
    """:class:`ActivationStats` of the last-token activations (``kwargs``: :func:`last_token_activations`)."""
    stats = ActivationStats()
    for acts in last_token_activations(model, token_ids, **kwargs):
        stats.update(acts)
    return stats


def load_hf_model(model_dir, *, dtype: torch.dtype = torch.float32):
    """The HF model (eval mode, on the GPU when there is one) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, tokenizer
