"""The server's catalogue: ``/v1/circuits`` cards and the hot-load checks on a real (planted) model directory."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from cna_vllm.identity import ModelIdentity
from cna_vllm.server.catalog import Catalog
from cna_vllm.server.schema import ApiError
from cna_vllm.sources import Entry
from cna_vllm.steering import MODES
from cna_vllm.vectors import VectorSet

from .planted import circuit_of, planted_model


def planted_models(root):
    """A planted model directory and a twin of the same shape with other weights, under ``root``."""
    planted_model(seed=0).save_pretrained(root / "model")
    planted_model(seed=1).save_pretrained(root / "twin")
    return root / "model", root / "twin"


def planted_catalog(model, tmp_path, hot_load_neurons: int = 16):
    """``(catalog, allowed directory, outside directory)`` with ``refusal`` loaded from the allowed one."""
    ident = ModelIdentity.from_dir(model)
    allowed, outside = tmp_path / "circuits", tmp_path / "elsewhere"
    allowed.mkdir(parents=True)
    outside.mkdir(parents=True)
    refusal = replace(circuit_of("refusal", [(3, 40), (1, 5), (3, 2)]), model=ident)
    refusal.save(allowed / "refusal.safetensors")
    vectors = VectorSet("caa", [0, 2], np.ones((2, ident.hidden_size)), model=ident)
    catalog = Catalog(
        {"refusal": refusal, "caa": vectors},
        {"refusal": Entry.of(allowed / "refusal.safetensors").to_dict()},
        str(model), "planted", 4, {"alien": "other-model"}, hot_load_neurons=hot_load_neurons,
    )  # fmt: skip
    return catalog, allowed, outside


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return planted_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def setup(models, tmp_path):
    return planted_catalog(models[0], tmp_path)


def test_cards_describe_each_kind(setup):
    catalog, allowed, _ = setup
    card = catalog.describe("refusal")
    assert (card["object"], card["id"], card["kind"], card["name"]) == ("circuit", "refusal", "cna", "refusal")
    assert card["layers"] == [1, 3] and card["num_neurons"] == 3 and card["modes"] == list(MODES)
    assert card["sha256"] == Entry.of(allowed / "refusal.safetensors").sha256
    caa = catalog.describe("caa")
    assert (caa["kind"], caa["modes"], caa["layers"], caa["sha256"]) == ("caa", ["shift"], [0, 2], None)
    listing = catalog.listing()
    assert listing["object"] == "list" and [c["id"] for c in listing["data"]] == ["caa", "refusal"]
    with pytest.raises(KeyError):
        catalog.describe("nope")


def test_one_catalogue_is_shared_and_adding_clears_a_foreign_hint(setup, models):
    catalog, allowed, _ = setup
    assert catalog.circuits is catalog.catalogue.sources and catalog.foreign is catalog.catalogue.foreign
    alien = replace(circuit_of("alien", [(0, 1)]), model=ModelIdentity.from_dir(models[0]))
    path = alien.save(allowed / "alien.safetensors")
    catalog.add("alien", alien, Entry.of(path))
    assert "alien" in catalog.circuits and "alien" not in catalog.foreign
    assert catalog.entries["alien"] == Entry.of(path).to_dict() and catalog.describe("alien")["sha256"]
    assert "alien" in catalog.catalogue  # the spec validator sees it at once


def error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


def test_hot_load_paths_must_be_absolute_and_inside_the_roots(setup):
    catalog, allowed, outside = setup
    replace(catalog.circuits["refusal"], name="other").save(outside / "other.safetensors")
    roots = (allowed.resolve(),)
    err = error(catalog.check_hot_load, "refusal.safetensors", roots)
    assert (err.status, err.code, err.param) == (400, "invalid_path", "path")
    for path in (outside / "other.safetensors", outside / "missing.safetensors", allowed / ".." / "elsewhere",
                 "/etc/passwd"):  # fmt: skip
        err = error(catalog.check_hot_load, str(path), roots)
        assert (err.status, err.code) == (403, "path_not_allowed"), path  # same answer whether it exists or not
    os.symlink(outside / "other.safetensors", allowed / "link.safetensors")  # a link out of the root
    err = error(catalog.check_hot_load, str(allowed / "link.safetensors"), roots)
    assert (err.status, err.code) == (403, "path_not_allowed")
    assert error(catalog.check_hot_load, str(allowed / "refusal.safetensors"), ()).status == 403  # no roots


def test_hot_load_path_problems_are_4xx_naming_path(setup):
    """A 300-character file name was a 500 (Errno 36); a NUL byte a 400 that named neither field nor rule."""
    catalog, allowed, _ = setup
    roots = (allowed.resolve(),)
    for path, words in (
        (str(allowed / ("a" * 300 + ".safetensors")), "longer than 255 bytes"),
        (str(allowed / "ref\x00usal.safetensors"), "NUL byte"),
        ("/" + "d/" * 2100 + "x.safetensors", "longer than 4096 bytes"),
    ):
        err = error(catalog.check_hot_load, path, roots)
        assert (err.status, err.param, err.code) == (400, "path", "invalid_path") and words in err.message
    loop = allowed / "loop.safetensors"
    os.symlink(loop, loop)  # a link to itself
    err = error(catalog.check_hot_load, str(loop), roots)
    assert 400 <= err.status < 500 and err.param == "path"


def test_hot_load_file_checks(setup, models):
    catalog, allowed, _ = setup
    roots = (allowed.resolve(),)
    for path in (allowed / "missing.safetensors", allowed):  # missing, or a directory: one answer
        err = error(catalog.check_hot_load, str(path), roots)
        assert (err.status, err.code, err.message) == (400, "invalid_circuit", "no readable circuit file at this path")
    (allowed / "junk.safetensors").write_bytes(b"not a safetensors file")
    err = error(catalog.check_hot_load, str(allowed / "junk.safetensors"), roots)
    assert (err.status, err.code) == (400, "invalid_circuit") and "not a readable safetensors file" in err.message
    twin = replace(circuit_of("twin", [(0, 1)]), model=ModelIdentity.from_dir(models[1]))
    twin.save(allowed / "twin.safetensors")
    err = error(catalog.check_hot_load, str(allowed / "twin.safetensors"), roots)
    assert (err.status, err.code) == (400, "circuit_model_mismatch") and "weights fingerprint" in err.message


def test_hot_load_names_new_same_and_clashing_files(setup):
    catalog, allowed, _ = setup
    roots = (allowed.resolve(),)
    new = replace(catalog.circuits["refusal"], name="fresh").save(allowed / "fresh.safetensors")
    circuit, entry, loaded = catalog.check_hot_load(str(new), roots)
    assert (circuit.name, loaded) == ("fresh", False) and entry == Entry.of(new)
    assert "fresh" not in catalog.circuits  # checking adds nothing
    circuit, _, loaded = catalog.check_hot_load(str(allowed / "refusal.safetensors"), roots)
    assert (circuit.name, loaded) == ("refusal", True)  # the very file that is loaded: idempotent
    replace(catalog.circuits["refusal"].top(1)).save(allowed / "refusal-v2.safetensors")  # same name, new content
    err = error(catalog.check_hot_load, str(allowed / "refusal-v2.safetensors"), roots)
    assert (err.status, err.code) == (409, "circuit_exists") and "'refusal' is already loaded" in err.message
    vectors = replace(catalog.circuits["caa"], name="caa2").save(allowed / "caa2.safetensors")
    assert catalog.check_hot_load(str(vectors), roots)[0].kind == "caa"  # vector sets hot-load too
