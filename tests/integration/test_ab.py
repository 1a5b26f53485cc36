"""`cna-vllm ab` and `cna-vllm sweep` end to end through the real server on SmolLM2."""

import json
import subprocess
import sys

import pytest

from cna_vllm.embedded import SMALL_MODEL
from cna_vllm.evaluate.judge import is_refusal

from .procs import REPO, _start, _wait_ready

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("ab") / "server.log"
    args = [sys.executable, str(REPO / "server.py"), "--model", SMALL_MODEL, "--host", "127.0.0.1",
            "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "32"]
    proc = _start(args, log)
    try:
        import time

        _wait_ready(proc, time.monotonic() + 600)
        yield proc
    finally:
        proc.stop()


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cna_vllm.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_ab_report_through_the_server(server, tmp_path):
    out = tmp_path / "ab"
    proc = cli("ab", "--base-url", f"{server.url}/v1", "--arms", "baseline,refusal@0.0,refusal@3",
               "--limit", "4", "--mmlu", "6", "--max-tokens", "16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = [a["name"] for a in report["arms"]]
    assert names == ["baseline", "refusal@0", "refusal@3"]
    for arm in report["arms"]:
        assert arm["n"] == 4 and len(arm["outputs"]) == 4
        assert arm["refusal_rate"] == sum(is_refusal(t) for t in arm["outputs"]) / 4
        lo, hi = arm["refusal_ci"]
        assert 0 <= lo <= arm["refusal_rate"] <= hi <= 1
        assert 0 <= arm["quality_paper"] <= 1 and 0 <= arm["quality_robust"] <= 1
        assert arm["mmlu_n"] == 6 and 0 <= arm["mmlu_accuracy"] <= 1
        assert arm["n_harmless"] == 4
    base, ablated, amplified = report["arms"]
    assert "mcnemar_vs_baseline" in ablated and "mcnemar_vs_baseline" not in base
    assert ablated["spec"] == [{"circuit": "refusal", "mode": "scale", "multiplier": 0.0}]
    assert ablated["circuits"]["refusal"]["name"] == "refusal"  # labelled with the circuit's metadata
    assert amplified["outputs"] != base["outputs"], "steering through the server changed nothing"
    assert (out / "report.md").read_text().startswith("# A/B refusal report")
    assert (out / "ab.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_through_the_server(server, tmp_path):
    out = tmp_path / "sweep"
    proc = cli("sweep", "--base-url", f"{server.url}/v1", "--circuit", "refusal", "--values", "0,3",
               "--caa", "refusal-caa", "--caa-alphas", "1", "--limit", "3", "--mmlu", "0", "--harmless", "",
               "--max-tokens", "12", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = report["sweep"]["rows"]
    assert [(r["kind"], r["mode"], r["value"], r["alpha"]) for r in rows] == [
        ("cna", "scale", 0.0, 1.0),
        ("cna", "scale", 3.0, -2.0),
        ("caa", "shift", 1.0, 1.0),
    ]
    caa = report["arms"][-1]
    assert caa["spec"] == [{"circuit": "refusal-caa", "mode": "shift", "alpha": 1.0}]
    assert caa["outputs"] != report["arms"][0]["outputs"], "CAA through the server changed nothing"
    assert all(isinstance(r["meets_target"], bool) for r in rows)
    assert ("recommended:" in proc.stdout) or ("no setting meets the target" in proc.stdout)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((out / "recommended.json").read_text())
    assert rec["meets_target"] == (report["sweep"]["recommended"] is not None)
    assert rec["spec"] is None or rec["spec"] in {r["arm"] for r in rows}


def test_ab_errors_are_readable(server, tmp_path):
    proc = cli("ab", "--base-url", f"{server.url}/v1", "--arms", "baseline,nosuch@0", "--limit", "1",
               "--mmlu", "0", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "unknown circuit" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("ab", "--arms", "baseline,refusal@nan", "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "finite" in proc.stderr
