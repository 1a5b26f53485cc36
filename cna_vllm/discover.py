"""CNA discovery: record ``down_proj`` inputs with HF hooks, filter universal neurons, rank.

The recorded value is the input of each layer's ``mlp.down_proj`` (``act(gate) * up``)
at the last prompt token, captured by a forward pre-hook. Prompts are batched with left
padding and explicit position ids, so the last position is the last prompt token and
each prompt sees the positions it would see alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from cna_vllm.circuit import SIGN_CONVENTION, Circuit
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


# --------------------------------------------------------------------------- recording


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


def _left_padded(batch: Sequence[Sequence[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
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
                model(**_left_padded(batch, pad_id, device), use_cache=False)
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
    stats = ActivationStats()
    for acts in last_token_activations(model, token_ids, **kwargs):
        stats.update(acts)
    return stats


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


# --------------------------------------------------------------------------- ranking


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


# --------------------------------------------------------------------------- driver


@dataclass
class DiscoveryResult:
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


# --------------------------------------------------------------------------- CAA


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return list(decoder.layers)


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
                    model(**_left_padded(batch, pad_id, device), use_cache=False)
                    acts = torch.stack([captured[layer].sum(0) for layer in chosen]).cpu()
                    total = acts if total is None else total + acts
                    bar.update(len(batch))
            means.append(total / len(ids))
    finally:
        for handle in handles:
            handle.remove()
    return np.array(chosen), (means[0] - means[1]).float().numpy()


def discover_caa(
    model: torch.nn.Module,
    tokenizer,
    positive: PromptSet,
    negative: PromptSet,
    *,
    name: str,
    identity: ModelIdentity | None = None,
    description: str = "",
    site: str = "mlp_out",
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


def load_hf_model(model_dir, *, dtype: torch.dtype = torch.float32):
    """The HF model (eval mode, on the GPU when there is one) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, tokenizer
