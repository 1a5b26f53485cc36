"""Discovery end to end on the real SmolLM2, and the shipped circuits against their models."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cna_vllm.circuit import Circuit
from cna_vllm.embedded import DEFAULT_MODEL, SMALL_MODEL, resolve_model
from cna_vllm.identity import ModelIdentity
from cna_vllm.sources import scan_dir

pytestmark = pytest.mark.slow
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cna_vllm.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("disc")
    args = ["discover", "--model", SMALL_MODEL, "--limit", "12", "--name", "refusal-test"]
    runs = []
    for i in range(2):
        proc = run_cli(*args, "--out", str(out / f"run{i}.safetensors"))
        assert proc.returncode == 0, proc.stderr
        runs.append(out / f"run{i}.safetensors")
    return runs


def test_discovery_writes_a_valid_circuit_summary_and_plot(two_runs):
    path = two_runs[0]
    circuit = Circuit.load(path, resolve_model(SMALL_MODEL))
    ident = ModelIdentity.from_dir(resolve_model(SMALL_MODEL))
    assert circuit.model == ident
    assert len(circuit) == round(0.001 * ident.num_layers * ident.intermediate_size)
    d = circuit.discovery
    assert d["positive"]["n"] == d["negative"]["n"] == 12
    assert d["chat_template"] is True and d["token_position"] == "last"
    assert d["universal_inputs"] == 2 * 64 and d["universal_removed"] >= 0
    summary = json.loads(path.with_suffix(".summary.json").read_text())
    assert summary["num_neurons"] == len(circuit) and summary["wall_time_s"] > 0
    assert path.with_suffix(".layers.png").read_bytes()[:4] == b"\x89PNG"


def test_same_inputs_give_the_same_circuit(two_runs):
    a, b = (Circuit.load(p) for p in two_runs)
    assert a.pairs() == b.pairs()
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.mean_neg, b.mean_neg)


@pytest.mark.parametrize("alias", [SMALL_MODEL, DEFAULT_MODEL])
def test_shipped_circuit_loads_and_validates(alias):
    path = REPO / "circuits" / alias / "refusal.safetensors"
    circuit = Circuit.load(path, resolve_model(alias))
    assert circuit.name == "refusal" and len(circuit) > 0
    proc = run_cli("inspect", str(path), "--model", alias)
    assert proc.returncode == 0, proc.stderr
    assert f"valid for {alias}" in proc.stdout and "neurons per layer" in proc.stdout
    shipped = scan_dir(REPO / "circuits" / alias, resolve_model(alias))  # every file, of either kind
    assert {"refusal", "refusal-caa"} <= set(shipped) and shipped["refusal-caa"][1].kind == "caa"
    proc = run_cli("inspect", str(shipped["refusal-caa"][0]), "--model", alias)
    assert proc.returncode == 0 and "CAA vector set 'refusal-caa' (mlp_out)" in proc.stdout, proc.stderr


def test_cli_errors_are_readable(tmp_path):
    proc = run_cli("inspect", str(tmp_path / "missing.safetensors"))
    assert proc.returncode == 2
    assert "error: circuit file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("discover", "--model", SMALL_MODEL, "--positive", "nope.txt")
    assert proc.returncode == 2 and "no prompt set 'nope.txt'" in proc.stderr
    # a circuit of one model inspected against the other
    proc = run_cli("inspect", str(REPO / "circuits" / SMALL_MODEL / "refusal.safetensors"), "--model", DEFAULT_MODEL)
    assert proc.returncode == 2 and "made for another model" in proc.stderr
