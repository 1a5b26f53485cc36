"""CAA vectors: discovery on the planted model, file round trip, validation."""

import numpy as np
import pytest
import torch

from cna_vllm import sources
from cna_vllm.circuit import Circuit
from cna_vllm.discover import caa_vectors, decoder_layers
from cna_vllm.errors import CircuitError, CnaError
from cna_vllm.identity import ModelIdentity
from cna_vllm.vectors import VectorSet

from .planted import planted_model, token_sets

IDENT = ModelIdentity("LlamaForCausalLM", 4, 64, 32, "abc")


def test_residual_vectors_see_the_trigger_dimension():
    model = planted_model()
    pos, neg, _ = token_sets()
    layers, vectors = caa_vectors(model, pos, neg, site="residual", layers=[1, 3], progress=False)
    assert layers.tolist() == [1, 3] and vectors.shape == (2, 32)
    # no module writes dims 0 and 1, so the residual there is the last token's embedding
    np.testing.assert_allclose(vectors[:, 0], 8.0, rtol=1e-5)
    np.testing.assert_allclose(vectors[:, 1], 0.0, atol=1e-5)


def test_mlp_out_vectors_equal_a_hand_computed_mean_difference():
    model = planted_model("qwen2")
    pos, neg, _ = token_sets(n=5)
    layers, vectors = caa_vectors(model, pos, neg, site="mlp_out", batch_size=3, progress=False)
    assert layers.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(vectors[:, :2], 0.0, atol=1e-6)  # down_proj never writes dims 0, 1
    outs: list[torch.Tensor] = []
    handle = decoder_layers(model)[2].mlp.register_forward_hook(lambda m, i, o: outs.append(o[0, -1]))
    with torch.no_grad():
        for ids in pos + neg:
            model(torch.tensor([ids]))
    handle.remove()
    expected = torch.stack(outs[:5]).double().mean(0) - torch.stack(outs[5:]).double().mean(0)
    np.testing.assert_allclose(vectors[2], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    model = planted_model()
    pos, neg, _ = token_sets(n=2)
    with pytest.raises(CnaError, match="out of range"):
        caa_vectors(model, pos, neg, layers=[7], progress=False)
    with pytest.raises(CnaError, match="unknown CAA site"):
        caa_vectors(model, pos, neg, site="attn", progress=False)


def test_round_trip_kind_dispatch_and_validation(tmp_path):
    vs = VectorSet("caa", layers=[0, 2], vectors=np.ones((2, 32)), site="residual", model=IDENT)
    path = vs.save(tmp_path / "caa.safetensors")
    loaded = VectorSet.load(path, IDENT)
    np.testing.assert_array_equal(loaded.vectors, vs.vectors)
    assert loaded.site == "residual" and loaded.metadata()["kind"] == "caa"
    assert isinstance(sources.load(path), VectorSet) and sources.kind_of(path) == "caa"
    with pytest.raises(CircuitError, match="steering vectors, not a neuron circuit"):
        Circuit.load(path)
    with pytest.raises(CircuitError, match="hidden size"):
        VectorSet("x", [0], np.ones((1, 16))).validate_for(IDENT)
    with pytest.raises(CircuitError, match="another model"):
        vs.validate_for(ModelIdentity("LlamaForCausalLM", 4, 64, 32, "zzz"))
    with pytest.raises(CircuitError, match="NaN"):
        VectorSet("x", [0], np.full((1, 32), np.nan))
    with pytest.raises(CircuitError, match="repeated"):
        VectorSet("x", [1, 1], np.ones((2, 32)))
    with pytest.raises(CircuitError, match="unknown site"):
        VectorSet("x", [1], np.ones((1, 32)), site="attn")
