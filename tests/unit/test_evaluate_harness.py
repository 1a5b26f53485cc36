"""The evaluation harness without an engine: flags to :class:`Harness`, circuit sizes, prompt sets, and
whole jobs on the scripted backend of test_evaluate_ab or the OpenAI-compatible stub of test_evaluate_backends."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from cna_vllm.circuit import Circuit
from cna_vllm.cli.parser import build_parser
from cna_vllm.embedded import DEFAULT_MODEL
from cna_vllm.errors import CnaError, PromptSetError, SteeringError
from cna_vllm.evaluate.ab import KLConfig, parse_arms
from cna_vllm.evaluate.backends import HARNESS_COMPILE, HARNESS_DTYPE, ServerBackend
from cna_vllm.evaluate.harness import EvalSets, Harness, run_ab_job, run_sweep, run_tune
from cna_vllm.evaluate.sweep import Target
from cna_vllm.identity import ModelIdentity
from cna_vllm.sources import shipped_dir

from .planted import circuit_of
from .test_evaluate_ab import HARMFUL, HARMLESS, Scripted
from .test_evaluate_backends import OpenAIStub
from .test_plots import png_size

IDENT = ModelIdentity("LlamaForCausalLM", num_layers=4, intermediate_size=64, hidden_size=32, fingerprint="abc")


# --------------------------------------------------------------------------- Harness from flags
@pytest.mark.parametrize("command", ["ab", "sweep", "tune"])
def test_every_harness_field_is_a_flag_with_the_same_default(command):
    args = build_parser().parse_args([command, "--out", "o"])
    assert Harness.of(args) == Harness(DEFAULT_MODEL)  # the parser's defaults are the dataclass's


def test_flags_reach_the_harness():
    args = build_parser().parse_args([
        "sweep", "--out", "o", "--model", "m", "--circuits", "c", "--base-url", "http://h/v1", "--served-model", "s",
        "--api-key", "k", "--concurrency", "3", "--dtype", "float32", "--no-compile", "--kl-prompts", "0",
        "--kl-tokens", "5", "--max-model-len", "512", "--kv-cache-gib", "1",
    ])  # fmt: skip
    assert Harness.of(args) == Harness("m", "c", "http://h/v1", "s", "k", 3, "float32", False, 512, 1, 0, 5)
    with pytest.raises(AttributeError):
        Harness.of(SimpleNamespace(model="m"))  # every field must be there


def test_settings_kl_and_circuits_dir():
    engine = Harness("smollm2-135m-instruct")
    assert engine.settings == {"model": "smollm2-135m-instruct", "dtype": HARNESS_DTYPE, "compiled": HARNESS_COMPILE}
    assert replace(engine, dtype="float32", compile=False).settings == {
        "model": "smollm2-135m-instruct", "dtype": "float32", "compiled": False}
    assert replace(engine, base_url="http://h/v1", dtype="float32").settings == {"model": "http://h/v1"}
    assert engine.kl == KLConfig(16, 32)
    assert replace(engine, kl_prompts=0).kl is None and replace(engine, kl_tokens=0).kl is None
    assert engine.circuits_dir == shipped_dir("smollm2-135m-instruct")
    assert replace(engine, circuits="/x/y").circuits_dir.as_posix() == "/x/y"


# --------------------------------------------------------------------------- circuit sizes
@pytest.fixture
def circuits(tmp_path):
    d = tmp_path / "circuits"
    d.mkdir()
    replace(circuit_of("refusal", [(1, 2), (2, 3)]), model=IDENT).save(d / "refusal.safetensors")
    pairs = [(layer, n) for layer in range(4) for n in range(0, 40, 4)]  # 40 neurons, ranked in this order
    wide = replace(circuit_of("wide", pairs), model=IDENT).save(tmp_path / "wide.safetensors")
    return d, wide


def test_sized_circuits_are_top_k_of_the_wide_circuit_named_first(circuits):
    d, wide = circuits
    harness = Harness("m", circuits=str(d))
    loaded, names = harness.sized_circuits(["refusal"], [str(wide)], [0.02, 0.1])
    # 4 layers x 64 neurons: 2% is 5 neurons, 10% is 26
    assert names == ["wide-f0.02", "wide-f0.1", "refusal"]
    assert set(loaded) == {"refusal", "wide-f0.02", "wide-f0.1"}  # the directory's circuits join in
    full = Circuit.load(wide)
    assert loaded["wide-f0.02"].pairs() == full.top(5).pairs() and len(loaded["wide-f0.1"]) == 26
    assert harness.sized_circuits(["refusal"], [], [0.02]) == ({}, ["refusal"])  # no wide circuit: nothing derived


def test_sized_circuits_need_the_in_process_engine(circuits):
    d, wide = circuits
    remote = Harness("m", circuits=str(d), base_url="http://h/v1")
    with pytest.raises(CnaError, match="--wide-circuit .* needs the in-process engine, not --base-url"):
        remote.sized_circuits(["refusal"], [str(wide)], [0.02])
    assert remote.sized_circuits(["refusal"], [], [0.02]) == ({}, ["refusal"])


# --------------------------------------------------------------------------- prompt sets
def test_eval_sets_load_files_and_skip_what_is_off(tmp_path):
    (tmp_path / "harm.txt").write_text("a\nb\nc\n")
    (tmp_path / "ok.txt").write_text("x\ny\nz\n")
    sets = EvalSets.load(str(tmp_path / "harm.txt"), str(tmp_path / "ok.txt"), 0, limit=2)
    assert sets.harmful.prompts == ("a", "b") and sets.harmless.prompts == ("x", "y") and sets.mmlu is None
    alone = EvalSets.load(str(tmp_path / "harm.txt"), "", 0)
    assert alone.harmless is None and len(alone.harmful) == 3
    with pytest.raises(PromptSetError, match="no prompt set 'nope'"):
        EvalSets.load("nope", None, 0)


# --------------------------------------------------------------------------- whole jobs
@pytest.fixture
def scripted(monkeypatch):
    backend = Scripted()
    monkeypatch.setattr(Harness, "backend", lambda self, circuits=None: backend)
    return backend


def test_sweep_job_writes_every_file_and_recommends(scripted, tmp_path):
    harness = Harness("my-model", kl_prompts=0)
    sets = EvalSets(HARMFUL, HARMLESS, None)
    summary, paths = run_sweep(harness, parse_arms("refusal@0,refusal[pos]@2"), sets, 8, Target(), tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md", "ab.png", "sweep.png", "recommended.json"]
    assert scripted.closed
    by_arm = {r["arm"]: r for r in summary["rows"]}
    assert by_arm["refusal@0"]["meets_target"] and by_arm["refusal@0"]["alpha"] == 1.0
    assert not by_arm["refusal[pos]@2"]["meets_target"] and by_arm["refusal[pos]@2"]["part"] == "pos"
    rec = json.loads(paths[-1].read_text())
    assert rec["model"] == "my-model" and rec["spec"] == "refusal@0" and rec["meets_target"]
    report = json.loads(paths[0].read_text())
    assert report["sweep"]["recommended"]["arm"] == "refusal@0" and report["settings"]["sweep"] is True
    assert report["settings"]["model"] == "my-model" and png_size(paths[3])


def test_a_failing_job_still_closes_its_backend(scripted, tmp_path):
    with pytest.raises(SteeringError, match="unknown circuit"):
        run_ab_job(Harness("m"), parse_arms("nope@0"), EvalSets(HARMFUL, None, None), 8, tmp_path)
    assert scripted.closed and not list(tmp_path.iterdir())  # nothing written


def test_tune_refuses_before_building_an_engine(monkeypatch, tmp_path):
    def no_engine(self, circuits=None):
        raise AssertionError("an engine was built")

    monkeypatch.setattr(Harness, "backend", no_engine)
    sets = EvalSets(HARMFUL, HARMLESS, None)
    for harness, s, message in [
        (Harness("m", base_url="http://h/v1"), sets, "not --base-url"),
        (Harness("m"), EvalSets(HARMFUL, None, None), "needs a harmless set"),
        (Harness("m", kl_tokens=0), sets, "--kl-prompts and --kl-tokens must be > 0"),
    ]:
        with pytest.raises(CnaError, match=message):
            run_tune(harness, None, s, 8, Target(), tmp_path, trials=1)


def test_ab_job_through_an_openai_compatible_server(tmp_path):
    with OpenAIStub() as stub:
        harness = Harness("ignored", base_url=stub.url, served_model="other", concurrency=3)
        backend = harness.backend()
        assert isinstance(backend, ServerBackend) and backend.model == "other" and backend.concurrency == 3
        backend.close()
        report, paths = run_ab_job(harness, parse_arms("refusal@0"), EvalSets(HARMFUL, None, None), 5,
                                   tmp_path, extra={"note": "stub"})
    assert report["settings"]["model"] == stub.url and report["settings"]["note"] == "stub"
    base, off = report["arms"]
    assert base["outputs"] == [f"plain: {p}" for p in HARMFUL] and off["outputs"][0] == "refusal@0: h0"
    assert off["circuits"]["refusal"]["num_neurons"] == 46  # the server's catalogue labels the arm
    assert {r["model"] for r in stub.requests} == {"other"}
    assert [p.name for p in paths] == ["report.json", "report.md", "ab.png"]
