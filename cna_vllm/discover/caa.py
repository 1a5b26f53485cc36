"""CAA: per-layer steering vectors, mean(positive) − mean(negative) at the last prompt token."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cna_vllm.discover.record import decoder_layers, encode, left_padded, pad_token_id
from cna_vllm.errors import CnaError
from cna_vllm.identity import ModelIdentity
from cna_vllm.prompts import PromptSet


@torch.no_grad()
def caa_vectors(
    model: torch.nn.Module,
    positive: Sequence[Sequence[int]],
    negative: Sequence[Sequence[int]],
    *,
    site: str = "mlp_out",
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(layers, vectors [k, hidden])``: mean(positive) − mean(negative) at the last token of
    each chosen layer's MLP output (``mlp_out``) or output residual stream (``residual``)."""
    blocks = decoder_layers(model)
    chosen = list(range(len(blocks))) if layers is None else list(layers)
    if any(not 0 <= layer < len(blocks) for layer in chosen):
        raise CnaError(f"CAA layers {chosen} out of range for {len(blocks)} layers")
    if site not in ("mlp_out", "residual"):
        raise CnaError(f"unknown CAA site {site!r}; use 'mlp_out' or 'residual'")
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured[layer] = hidden[:, -1, :].double()

        return hook

    modules = [blocks[layer].mlp if site == "mlp_out" else blocks[layer] for layer in chosen]
    handles = [m.register_forward_hook(hook_for(layer)) for m, layer in zip(modules, chosen, strict=True)]
    device = next(model.parameters()).device
    means = []
    try:
        for ids, desc in ((positive, "CAA positive"), (negative, "CAA negative")):
            total = None
            with tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress) as bar:
                for start in range(0, len(ids), batch_size):
                    batch = ids[start : start + batch_size]
                    model(**left_padded(batch, pad_id, device), use_cache=False)
                    acts = torch.stack([captured[layer].sum(0) for layer in chosen]).cpu()
                    total = acts if total is None else total + acts
                    bar.update(len(batch))
            means.append(total / len(ids))
    finally:
        for handle in handles:
            handle.remove()
    return np.array(chosen), (means[0] - means[1]).float().numpy()


def discover_caa(
    model: torch.nn.Module, tokenizer, positive: PromptSet, negative: PromptSet, *, name: str,
    identity: ModelIdentity | None = None, description: str = "", site: str = "mlp_out",
    layers: Sequence[int] | None = None,
    chat_template: bool = True,
    batch_size: int = 8,
    progress: bool = True,
):
    """CAA vectors from prompt sets, as a :class:`~cna_vllm.vectors.VectorSet`."""
    from cna_vllm.vectors import VectorSet

    pad_id = pad_token_id(tokenizer)
    chosen, vectors = caa_vectors(
        model,
        encode(tokenizer, list(positive), chat_template=chat_template),
        encode(tokenizer, list(negative), chat_template=chat_template),
        site=site,
        layers=layers,
        batch_size=batch_size,
        pad_id=pad_id,
        progress=progress,
    )
    return VectorSet(
        name=name,
        layers=chosen,
        vectors=vectors,
        site=site,
        model=identity,
        description=description,
        discovery={
            "method": "caa",
            "site": site,
            "positive": positive.describe(),
            "negative": negative.describe(),
            "token_position": "last",
            "chat_template": chat_template,
        },
    )
