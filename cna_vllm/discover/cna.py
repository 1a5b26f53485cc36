"""CNA ranking: the universal-neuron filter, per-neuron scores, top-k selection, the circuit.

Neurons are scored by how their last-token ``down_proj`` input (:mod:`.record`) differs
between a positive and a negative prompt set; neurons among the strongest on most diverse
inputs ("universal") are excluded first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from cna_vllm.circuit import SIGN_CONVENTION, Circuit
from cna_vllm.discover.record import (
    ActivationStats,
    collect_stats,
    down_proj_modules,
    encode,
    last_token_activations,
    pad_token_id,
)
from cna_vllm.errors import CnaError
from cna_vllm.identity import ModelIdentity
from cna_vllm.prompts import PromptSet

Scoring = Literal["delta", "effect_size"]


@dataclass(frozen=True)
class DiscoveryConfig:
    """Parameters of CNA discovery; all of them are recorded in the circuit file."""

    fraction: float = 0.001  # global top fraction of all MLP neurons
    top_k: int | None = None  # a hand-set global k instead of the fraction
    per_layer_k: int | None = None  # top k within each layer instead of globally
    scoring: Scoring = "delta"
    skip_layers: tuple[int, ...] = ()
    chat_template: bool = True
    universal_filter: bool = True
    universal_top_fraction: float = 0.001  # "top 0.1% of |activation|" on one prompt
    universal_share: float = 0.8  # ... on at least this share of diverse inputs
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise CnaError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.scoring not in ("delta", "effect_size"):
            raise CnaError(f"scoring must be 'delta' or 'effect_size', got {self.scoring!r}")
        for name in ("top_k", "per_layer_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CnaError(f"{name} must be at least 1, got {value}")


def universal_neurons(
    model, token_ids, *, top_fraction: float, share: float, **kwargs
) -> tuple[np.ndarray, int]:
    """Mask ``[layers, intermediate]`` of neurons in the global top ``top_fraction`` of
    |activation| on at least ``share`` of the inputs; also returns the input count."""
    hits = None
    n = 0
    for acts in last_token_activations(model, token_ids, **kwargs):
        flat = acts.abs().flatten(1)  # [batch, layers * intermediate]
        k = max(1, math.ceil(top_fraction * flat.shape[1]))
        top = flat.topk(k, dim=1).indices
        counts = torch.zeros(flat.shape[1], dtype=torch.long).index_add_(
            0, top.flatten(), torch.ones(top.numel(), dtype=torch.long)
        )
        hits = counts if hits is None else hits + counts
        n += flat.shape[0]
        shape = acts.shape[1:]
    assert hits is not None
    return (hits.numpy() >= share * n).reshape(shape), n


def neuron_scores(pos: ActivationStats, neg: ActivationStats, scoring: Scoring) -> np.ndarray:
    """|delta|, or |delta| over the pooled standard deviation (effect size, Cohen's d)."""
    delta = np.abs(pos.mean - neg.mean)
    if scoring == "delta":
        return delta
    dof = max(pos.n + neg.n - 2, 1)
    pooled = np.sqrt(((pos.n - 1) * pos.var + (neg.n - 1) * neg.var) / dof)
    return delta / np.maximum(pooled, 1e-6)


def select(scores: np.ndarray, excluded: np.ndarray, config: DiscoveryConfig) -> tuple[np.ndarray, np.ndarray]:
    """(layers, neurons) of the chosen neurons, best first; ``excluded`` never chosen."""
    scores = np.where(excluded, -np.inf, scores)
    num_layers, width = scores.shape
    if config.per_layer_k is not None:
        picks = []
        for layer in range(num_layers):
            row = scores[layer]
            order = np.argsort(-row, kind="stable")[: config.per_layer_k]
            picks += [(layer, int(n)) for n in order if np.isfinite(row[n])]
        picks.sort(key=lambda p: -scores[p])
        if not picks:
            raise CnaError("every neuron is excluded: nothing to select")
        return np.array([p[0] for p in picks]), np.array([p[1] for p in picks])
    k = config.top_k or max(1, round(config.fraction * scores.size))
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    order = order[np.isfinite(flat[order])]
    if order.size == 0:
        raise CnaError("every neuron is excluded: nothing to select")
    return order // width, order % width


@dataclass
class DiscoveryResult:
    """A discovered circuit and its JSON-able summary."""

    circuit: Circuit
    summary: dict = field(default_factory=dict)


def discover_ids(
    model: torch.nn.Module,
    positive: Sequence[Sequence[int]],
    negative: Sequence[Sequence[int]],
    *,
    config: DiscoveryConfig = DiscoveryConfig(),
    diverse: Sequence[Sequence[int]] = (),
    pad_id: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, ActivationStats, ActivationStats, dict]:
    """Discovery on token ids. Returns layers, neurons, the two stats and a report."""
    kw = {"batch_size": config.batch_size, "pad_id": pad_id, "progress": progress}
    num_layers = len(down_proj_modules(model))
    bad_skip = [s for s in config.skip_layers if not 0 <= s < num_layers]
    if bad_skip:
        raise CnaError(f"skip_layers {bad_skip} out of range for {num_layers} layers")
    pos = collect_stats(model, positive, desc="positive set", **kw)
    neg = collect_stats(model, negative, desc="negative set", **kw)
    excluded = np.zeros(pos.mean.shape, dtype=bool)
    excluded[list(config.skip_layers)] = True
    report: dict = {"universal_removed": 0, "universal_inputs": 0}
    if config.universal_filter:
        if not diverse:
            raise CnaError("the universal filter needs a diverse prompt set (or disable the filter)")
        universal, n_inputs = universal_neurons(
            model,
            diverse,
            top_fraction=config.universal_top_fraction,
            share=config.universal_share,
            desc="universal filter",
            **kw,
        )
        report["universal_inputs"] = n_inputs
        report["universal_removed"] = int(universal.sum())
        report["universal_neurons"] = [[int(a), int(b)] for a, b in zip(*np.nonzero(universal), strict=True)]
        excluded |= universal
    scores = neuron_scores(pos, neg, config.scoring)
    layers, neurons = select(scores, excluded, config)
    report["scores"] = scores
    return layers, neurons, pos, neg, report


def discover(
    model: torch.nn.Module,
    tokenizer,
    positive: PromptSet,
    negative: PromptSet,
    *,
    name: str,
    identity: ModelIdentity | None = None,
    description: str = "",
    config: DiscoveryConfig = DiscoveryConfig(),
    diverse: PromptSet | None = None,
    progress: bool = True,
) -> DiscoveryResult:
    """Full CNA discovery from prompt sets; returns the circuit and a JSON-able summary."""
    started = time.time()
    chat = config.chat_template

    def ids(prompts: PromptSet, chat_template: bool) -> list[list[int]]:
        return encode(tokenizer, list(prompts), chat_template=chat_template)

    diverse_ids: list[list[int]] = []
    if config.universal_filter and diverse is not None:
        # Raw and chat-formatted, so the filter sees both kinds of last token.
        diverse_ids = ids(diverse, False) + (ids(diverse, True) if chat else [])
    pad_id = pad_token_id(tokenizer)
    layers, neurons, pos, neg, report = discover_ids(
        model,
        ids(positive, chat),
        ids(negative, chat),
        config=config,
        diverse=diverse_ids,
        pad_id=pad_id,
        progress=progress,
    )
    scores = report.pop("scores")
    discovery = {
        "method": "cna",
        "positive": positive.describe(),
        "negative": negative.describe(),
        "diverse": diverse.describe() if diverse is not None and config.universal_filter else None,
        "token_position": "last",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items() if k != "batch_size"},
        "universal_removed": report["universal_removed"],
        "universal_inputs": report["universal_inputs"],
        "sign_convention": SIGN_CONVENTION,
    }
    circuit = Circuit(
        name=name,
        layers=layers,
        neurons=neurons,
        score=scores[layers, neurons],
        mean_pos=pos.mean[layers, neurons],
        mean_neg=neg.mean[layers, neurons],
        model=identity,
        description=description,
        discovery=discovery,
    )
    summary = {
        **circuit.metadata(),
        "universal_neurons": report.get("universal_neurons", []),
        "wall_time_s": round(time.time() - started, 2),
        "top_neurons": [
            {
                "layer": int(circuit.layers[i]),
                "neuron": int(circuit.neurons[i]),
                "score": float(circuit.score[i]),
                "delta": float(circuit.delta[i]),
            }
            for i in range(min(20, len(circuit)))
        ],
    }
    return DiscoveryResult(circuit, summary)
