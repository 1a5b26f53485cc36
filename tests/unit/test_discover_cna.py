"""CNA ranking on tiny random models with planted neurons, and the scores by hand."""

import numpy as np
import pytest
import torch

from cna_vllm.circuit import SIGN_CONVENTION
from cna_vllm.discover.cna import DiscoveryConfig, discover, discover_ids, neuron_scores, select
from cna_vllm.discover.record import ActivationStats
from cna_vllm.errors import CnaError

from .planted import ALWAYS_ON, PLANTED, planted_model, planted_tokenizer, prompt_sets, token_sets

ARCHS = ["llama", "qwen2"]


def found(layers, neurons) -> list[tuple[int, int]]:
    return list(zip(layers.tolist(), neurons.tolist(), strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_finds_exactly_the_planted_neurons(arch):
    model = planted_model(arch)
    pos, neg, div = token_sets()
    cfg = DiscoveryConfig(top_k=len(PLANTED), batch_size=5)
    layers, neurons, *_, report = discover_ids(model, pos, neg, config=cfg, diverse=div, progress=False)
    assert sorted(found(layers, neurons)) == sorted(PLANTED)
    assert report["universal_removed"] >= 1
    assert list(ALWAYS_ON) in report["universal_neurons"]


@pytest.mark.parametrize("arch", ARCHS)
def test_without_the_filter_the_always_on_neuron_wins(arch):
    model = planted_model(arch)
    pos, neg, _ = token_sets()
    cfg = DiscoveryConfig(top_k=len(PLANTED), universal_filter=False)
    layers, neurons, *_ = discover_ids(model, pos, neg, config=cfg, progress=False)
    assert found(layers, neurons)[0] == ALWAYS_ON


def test_fraction_is_global_across_layers():
    model = planted_model()
    pos, neg, div = token_sets()
    total = 4 * 64
    cfg = DiscoveryConfig(fraction=3 / total)
    layers, neurons, *_, report = discover_ids(model, pos, neg, config=cfg, diverse=div, progress=False)
    assert sorted(found(layers, neurons)) == sorted(PLANTED)
    ranked = report["scores"][layers, neurons]
    assert (np.diff(ranked) <= 0).all(), "best first"


def test_skip_layers_and_per_layer_k():
    model = planted_model()
    pos, neg, div = token_sets()
    cfg = DiscoveryConfig(per_layer_k=1, skip_layers=(0, 3))
    layers, neurons, *_ = discover_ids(model, pos, neg, config=cfg, diverse=div, progress=False)
    assert sorted(found(layers, neurons)) == [(1, 5), (2, 17)]
    with pytest.raises(CnaError, match="out of range"):
        discover_ids(model, pos, neg, config=DiscoveryConfig(skip_layers=(9,)), diverse=div, progress=False)


def test_activation_stats_and_scores_by_hand():
    pos, neg = ActivationStats(), ActivationStats()
    pos.update(torch.tensor([[[1.0, 4.0]], [[3.0, 4.0]]]))  # means (2, 4), var (2, 0)
    neg.update(torch.tensor([[[0.0, 1.0]], [[0.0, 3.0]]]))  # means (0, 2), var (0, 2)
    np.testing.assert_allclose(pos.mean, [[2.0, 4.0]])
    np.testing.assert_allclose(pos.var, [[2.0, 0.0]])
    np.testing.assert_allclose(neuron_scores(pos, neg, "delta"), [[2.0, 2.0]])
    # pooled sd = sqrt((1*2 + 1*0) / 2) = 1 for neuron 0, likewise 1 for neuron 1
    np.testing.assert_allclose(neuron_scores(pos, neg, "effect_size"), [[2.0, 2.0]])
    pos.update(torch.tensor([[[2.0, 4.0]]]))  # neuron 0: pos var (1+1+0)/2 = 1, neuron 1 stays 0
    # neuron 0: pooled = sqrt((2*1 + 1*0) / 3), neuron 1: pooled = sqrt((2*0 + 1*2) / 3)
    np.testing.assert_allclose(neuron_scores(pos, neg, "effect_size"), [[2 / np.sqrt(2 / 3)] * 2])
    pos.update(torch.tensor([[[2.0, 4.0]]]))  # more pos samples at the mean: less pooled sd
    es = neuron_scores(pos, neg, "effect_size")
    assert es[0, 0] > 2 / np.sqrt(2 / 3)


def test_select_never_returns_excluded_and_rejects_all_excluded():
    scores = np.array([[5.0, 1.0], [3.0, 4.0]])
    excluded = np.array([[True, False], [False, False]])
    layers, neurons = select(scores, excluded, DiscoveryConfig(top_k=2))
    assert found(layers, neurons) == [(1, 1), (1, 0)]
    with pytest.raises(CnaError, match="excluded"):
        select(scores, np.ones_like(excluded), DiscoveryConfig(top_k=1))


def test_bad_config_is_refused():
    with pytest.raises(CnaError):
        DiscoveryConfig(fraction=0)
    with pytest.raises(CnaError):
        DiscoveryConfig(scoring="zscore")
    with pytest.raises(CnaError):
        DiscoveryConfig(top_k=0)


def test_discover_from_prompt_sets_gives_the_circuit_and_its_record():
    model, tok = planted_model(), planted_tokenizer()
    pos, neg, div = prompt_sets()
    cfg = DiscoveryConfig(top_k=len(PLANTED), chat_template=False, batch_size=5)
    result = discover(model, tok, pos, neg, name="refusal", config=cfg, diverse=div, progress=False)
    c = result.circuit
    assert c.name == "refusal" and c.description == "" and c.model is None
    assert sorted(c.pairs()) == sorted(PLANTED)
    ids_pos, ids_neg, ids_div = token_sets()
    layers, neurons, p_stats, n_stats, report = discover_ids(model, ids_pos, ids_neg, config=cfg, diverse=ids_div,
                                                             progress=False)
    assert c.pairs() == found(layers, neurons)  # the same neurons, in the same order, as from token ids
    np.testing.assert_allclose(c.score, report["scores"][layers, neurons])
    np.testing.assert_allclose(c.mean_pos, p_stats.mean[layers, neurons])
    np.testing.assert_allclose(c.mean_neg, n_stats.mean[layers, neurons])
    d = c.discovery
    assert d["method"] == "cna" and d["positive"] == pos.describe() and d["diverse"] == div.describe()
    assert d["universal_removed"] == report["universal_removed"] >= 1 and d["universal_inputs"] == len(div)
    assert d["skip_layers"] == [] and "batch_size" not in d and d["sign_convention"] == SIGN_CONVENTION
    s = result.summary
    assert list(ALWAYS_ON) in s["universal_neurons"] and s["wall_time_s"] >= 0
    assert [(t["layer"], t["neuron"]) for t in s["top_neurons"]] == c.pairs()
    with pytest.raises(CnaError, match="diverse prompt set"):
        discover(model, tok, pos, neg, name="x", config=cfg, progress=False)
