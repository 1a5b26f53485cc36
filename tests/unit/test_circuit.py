import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cna_vllm.circuit import Circuit
from cna_vllm.errors import CircuitError
from cna_vllm.fileformat import FORMAT
from cna_vllm.identity import ModelIdentity
from cna_vllm.sources import load_dir

from .planted import planted_model

IDENT = ModelIdentity("LlamaForCausalLM", num_layers=4, intermediate_size=64, hidden_size=32, fingerprint="abc")


def make(name="c", layers=(3, 1, 2), neurons=(5, 7, 9), **kw) -> Circuit:
    n = len(layers)
    return Circuit(
        name=name,
        layers=np.array(layers),
        neurons=np.array(neurons),
        score=kw.pop("score", np.linspace(3, 1, n)),
        mean_pos=kw.pop("mean_pos", np.ones(n)),
        mean_neg=kw.pop("mean_neg", np.zeros(n)),
        model=kw.pop("model", IDENT),
        **kw,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    planted_model().save_pretrained(path)
    return path


def test_round_trip_keeps_every_tensor_and_field(tmp_path):
    c = make(description="refusal", discovery={"fraction": 0.001, "positive": {"name": "p"}})
    loaded = Circuit.load(c.save(tmp_path / "c.safetensors"))
    for key in ("layers", "neurons", "score", "mean_pos", "mean_neg"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(c, key))
        assert getattr(loaded, key).dtype == getattr(c, key).dtype
    assert loaded.layers.dtype == np.int32
    assert (loaded.name, loaded.description, loaded.discovery, loaded.model) == (
        c.name, c.description, c.discovery, c.model)
    assert loaded.metadata()["layer_counts"] == {"1": 1, "2": 1, "3": 1}
    np.testing.assert_array_equal(loaded.delta, np.ones(3, dtype=np.float32))


def test_validates_against_a_real_model_directory(model_dir):
    ident = ModelIdentity.from_dir(model_dir)
    assert (ident.num_layers, ident.intermediate_size, ident.hidden_size) == (4, 64, 32)
    make(model=ident).validate_for(model_dir)


def test_wrong_dimensions_are_named(model_dir):
    other = ModelIdentity("LlamaForCausalLM", 4, 128, 32, "abc")
    with pytest.raises(CircuitError, match="intermediate_size is 128"):
        make(model=other).validate_for(model_dir)


def test_fingerprint_mismatch_is_refused(model_dir, tmp_path):
    ident = ModelIdentity.from_dir(model_dir)
    changed = tmp_path / "changed"
    m = planted_model(seed=1)
    m.save_pretrained(changed)
    assert ModelIdentity.from_dir(changed).fingerprint != ident.fingerprint
    with pytest.raises(CircuitError, match="fingerprint"):
        make(model=ident).validate_for(changed)
    make(model=ident).validate_for(changed, check_fingerprint=False)


def test_out_of_range_indices():
    with pytest.raises(CircuitError, match="layer index 4 is out of range"):
        make(layers=(4,), neurons=(0,)).validate_for(IDENT)
    with pytest.raises(CircuitError, match="neuron index 64 is out of range"):
        make(layers=(0,), neurons=(64,)).validate_for(IDENT)
    with pytest.raises(CircuitError, match="negative"):
        make(layers=(0,), neurons=(-1,))


def test_duplicates_nan_inf_and_empty():
    with pytest.raises(CircuitError, match="twice"):
        make(layers=(1, 1), neurons=(2, 2))
    with pytest.raises(CircuitError, match="NaN/inf"):
        make(mean_pos=np.array([1.0, np.nan, 1.0]))
    with pytest.raises(CircuitError, match="NaN/inf"):
        make(score=np.array([np.inf, 1.0, 0.0]))
    with pytest.raises(CircuitError, match="empty"):
        make(layers=(), neurons=())


def _rewrite(path, tensors=None, metadata=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    data = load_file(str(path))
    data = tensors(data) if tensors else data
    save_file(data, str(path), metadata=metadata(meta) if metadata else meta)


def test_file_level_errors(tmp_path):
    path = make().save(tmp_path / "c.safetensors")
    _rewrite(path, tensors=lambda d: {k: v for k, v in d.items() if k != "mean_neg"})
    with pytest.raises(CircuitError, match="lacks the tensor 'mean_neg'"):
        Circuit.load(path)

    path = make().save(tmp_path / "v.safetensors")
    _rewrite(path, metadata=lambda m: {**m, "format_version": "99"})
    with pytest.raises(CircuitError, match="format version '99'"):
        Circuit.load(path)

    path = make().save(tmp_path / "f.safetensors")
    _rewrite(path, metadata=lambda m: {**m, "format": "something-else"})
    with pytest.raises(CircuitError, match="not a cna-vllm circuit"):
        Circuit.load(path)

    path = make().save(tmp_path / "m.safetensors")
    _rewrite(path, metadata=lambda m: {**m, "cna_vllm": json.dumps({"description": "no name"})})
    with pytest.raises(CircuitError, match="metadata"):
        Circuit.load(path)

    path = make().save(tmp_path / "n.safetensors")
    _rewrite(path, tensors=lambda d: {**d, "score": np.array([1, np.nan, 2], dtype=np.float32)})
    with pytest.raises(CircuitError, match="NaN"):
        Circuit.load(path)

    path = make().save(tmp_path / "d.safetensors")
    _rewrite(path, tensors=lambda d: {**d, "neurons": d["neurons"].astype(np.int64)})
    with pytest.raises(CircuitError, match="int64, expected int32"):
        Circuit.load(path)

    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CircuitError, match="not a readable safetensors"):
        Circuit.load(tmp_path / "junk.safetensors")
    with pytest.raises(CircuitError, match="does not exist"):
        Circuit.load(tmp_path / "missing.safetensors")
    assert FORMAT == "cna-vllm/circuit"


def test_load_validates_when_given_a_model(tmp_path):
    path = make(layers=(9,), neurons=(0,)).save(tmp_path / "c.safetensors")
    Circuit.load(path)  # structurally fine
    with pytest.raises(CircuitError, match="out of range"):
        Circuit.load(path, IDENT)


def test_union_and_intersection():
    a = make("a", layers=(1, 2), neurons=(1, 2), score=np.array([5.0, 1.0]))
    b = make("b", layers=(2, 3), neurons=(2, 3), score=np.array([9.0, 2.0]))
    union = a | b
    assert set(union.pairs()) == {(1, 1), (2, 2), (3, 3)}
    assert union.pairs()[0] == (1, 1)  # a's own score wins for the shared (2, 2)
    inter = a & b
    assert inter.pairs() == [(2, 2)] and inter.name == "a&b"
    with pytest.raises(CircuitError, match="empty"):
        a & make("c", layers=(0,), neurons=(0,))
    other_model = make("x", model=ModelIdentity("Qwen2ForCausalLM", 4, 64, 32, "zzz"))
    with pytest.raises(CircuitError, match="different models"):
        a | other_model
    assert a.top(1).pairs() == [(1, 1)]


def test_load_dir_and_summary(tmp_path):
    make("one").save(tmp_path / "one.safetensors")
    make("two").save(tmp_path / "two.safetensors")
    circuits = load_dir(tmp_path)
    assert sorted(circuits) == ["one", "two"]
    text = circuits["one"].summary()
    assert "3 neurons" in text and "L  1" in text and "fingerprint abc" in text
    make("one").save(tmp_path / "again.safetensors")
    with pytest.raises(CircuitError, match="named 'one'"):
        load_dir(tmp_path)
