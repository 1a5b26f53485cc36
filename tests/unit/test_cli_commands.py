"""``cna-vllm`` commands that need no engine, run in-process through :func:`cna_vllm.cli.main`:
``inspect``, ``overlap``, ``sweep --dry-run``, ``ab`` against an OpenAI-compatible stub, and bad input
(exit status 2 and one readable line on stderr, never a traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from cna_vllm.circuit import Circuit
from cna_vllm.cli import main
from cna_vllm.cli.commands import floats, ints
from cna_vllm.identity import ModelIdentity
from cna_vllm.sources import REPO_CIRCUITS
from cna_vllm.steering import SteeringSpec
from cna_vllm.vectors import VectorSet

from .planted import circuit_of, planted_model

SMOL = REPO_CIRCUITS / "smollm2-135m-instruct"
SHIPPED = SMOL / "refusal.safetensors"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, *argv: str) -> str:
    """stderr of an argparse error (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- inspect
def test_inspect_prints_summary_and_sign_split_of_a_shipped_circuit(capsys):
    circuit = Circuit.load(SHIPPED)
    code, out, err = run(capsys, "inspect", str(SHIPPED), "--top", "3")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"circuit 'refusal': {len(circuit)} neurons"
    assert "  model: LlamaForCausalLM, 30 layers, intermediate 1536, hidden 576, fingerprint " in out
    assert "  method: cna" in lines and "  neurons per layer:" in lines
    for layer, count in circuit.layer_counts().items():
        assert any(re.fullmatch(rf"    L\s*{layer}\s+{count}\s+#+", line) for line in lines), (layer, count)
    # the sign split: pos + neg and up + down each cover the circuit
    counts = {}
    for part in ("pos", "neg", "up", "down"):
        (count,) = [m[1] for x in lines if (m := re.match(rf"    \[{part}\s*\]\s+(\d+)  ", x))]
        counts[part] = int(count)
    assert counts == circuit.part_counts()
    assert counts["pos"] + counts["neg"] == counts["up"] + counts["down"] == len(circuit)
    assert "e.g. refusal[pos]@0" in out
    # the top 3 neurons, in score order
    head = next(i for i, x in enumerate(lines) if x.startswith("  top 3 neurons:"))
    rows = [tuple(int(v) for v in x.split()[:2]) for x in lines[head + 1 :]]
    assert rows == circuit.top(3).pairs()


def test_inspect_json_is_the_file_metadata(capsys):
    code, out, _ = run(capsys, "inspect", str(SHIPPED), "--json")
    meta = json.loads(out)
    assert code == 0 and meta == json.loads(json.dumps(Circuit.load(SHIPPED).metadata()))
    assert meta["kind"] == "cna" and sum(meta["layer_counts"].values()) == meta["num_neurons"]
    assert meta["parts"]["pos"] + meta["parts"]["neg"] == meta["num_neurons"]


def test_inspect_a_vector_set(capsys):
    vectors = VectorSet.load(SMOL / "refusal-caa.safetensors")
    code, out, _ = run(capsys, "inspect", str(SMOL / "refusal-caa.safetensors"))
    lines = out.splitlines()
    assert code == 0 and lines[0] == f"CAA vector set 'refusal-caa' (mlp_out), {len(vectors.layers)} layer(s)"
    table = lines[lines.index("layer  ‖v‖") + 1 :]
    assert [int(x.split()[0]) for x in table] == [int(v) for v in vectors.layers]
    assert all(float(x.split()[1]) > 0 for x in table)


@pytest.fixture(scope="module")
def planted_dirs(tmp_path_factory):
    """Two planted models of the same shape but different weights, and a circuit made for the first."""
    root = tmp_path_factory.mktemp("planted")
    planted_model(seed=0).save_pretrained(root / "model")
    planted_model(seed=1).save_pretrained(root / "twin")
    circuit = replace(circuit_of("c", [(3, 40), (2, 17)]), model=ModelIdentity.from_dir(root / "model"))
    return root / "model", root / "twin", circuit.save(root / "c.safetensors")


def test_inspect_validates_against_a_model(capsys, planted_dirs):
    model, twin, path = planted_dirs
    code, out, _ = run(capsys, "inspect", str(path), "--model", str(model))
    assert code == 0 and out.splitlines()[:2] == [f"valid for {model}", "circuit 'c': 2 neurons"]
    code, out, err = run(capsys, "inspect", str(path), "--model", str(twin))
    assert code == 2 and out == ""
    assert err.startswith("cna-vllm inspect: error: circuit 'c' was made for another model: weights fingerprint")


# --------------------------------------------------------------------------- overlap
def test_overlap_of_two_circuit_files_writes_its_json(capsys, tmp_path):
    full = Circuit.load(SHIPPED)
    top = replace(full.top(10), name="refusal-top").save(tmp_path / "top.safetensors")
    code, out, _ = run(capsys, "overlap", str(SHIPPED), str(top), "--out", str(tmp_path / "o"))
    n = len(full)
    assert code == 0
    assert out.splitlines() == [
        f"refusal ({n}) vs refusal-top (10): 10 shared, {100 * 10 / n:.1f}% of A in B, Jaccard {10 / n:.3f}",
        f"wrote {tmp_path / 'o' / 'overlap.json'}, {tmp_path / 'o' / 'overlap.png'}",
    ]
    result = json.loads((tmp_path / "o" / "overlap.json").read_text())
    assert result["shared"] == 10 and result["share_of_b_in_a"] == 1.0 and result["top"] is None
    assert sorted(map(tuple, result["shared_neurons"])) == sorted(full.top(10).pairs())
    code, out, _ = run(capsys, "overlap", str(SHIPPED), str(top), "--top", "5", "--out", str(tmp_path / "t"))
    assert code == 0 and "refusal (5) vs refusal-top (5): 5 shared, 100.0% of A in B, Jaccard 1.000" in out


# --------------------------------------------------------------------------- sweep --dry-run
def test_sweep_dry_run_lists_the_grid_of_parts_modes_signs_and_caa(capsys, tmp_path):
    code, out, _ = run(capsys, "sweep", "--circuit", "refusal", "--parts", "all,pos,neg", "--modes",
                       "scale,patch,shift", "--alphas", "1,2", "--caa", "refusal-caa", "--caa-alphas", "0.25,0.5",
                       "--dry-run", "--out", str(tmp_path / "out"))  # fmt: skip
    lines = out.splitlines()
    # 3 parts x 3 modes x 4 strengths (±1, ±2), 2 CAA strengths (as given: not mirrored), the baseline
    assert code == 0 and lines[0] == "sweep: 39 arms (baseline included)" and len(lines) == 40
    arms = lines[1:]
    assert arms[0] == "baseline" and len(set(arms)) == 39
    # scale takes m = 1 − α: α = 1 ablates (m = 0), α = −2 amplifies (m = 3)
    assert {"refusal@0", "refusal@3", "refusal@2", "refusal@-1"} <= set(arms)
    assert {"refusal[pos]@-1:patch", "refusal[neg]@2:shift", "refusal[neg]@3", "refusal@-2:shift"} <= set(arms)
    assert arms[-2:] == ["refusal-caa@0.25:shift", "refusal-caa@0.5:shift"]
    assert "refusal-caa@-0.25:shift" not in arms
    for name in arms[1:]:
        assert str(SteeringSpec.parse(name)) == name  # every arm is a valid spec in canonical form
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_sweep_dry_run_with_values_skips_no_ops_and_sizes_wide_circuits(capsys, tmp_path):
    code, out, _ = run(capsys, "sweep", "--circuit", "refusal", "--modes", "scale,shift", "--values", "0,1,2",
                       "--dry-run", "--out", "o")  # fmt: skip
    # scale m = 1 and shift α = 0 change nothing: left out
    assert code == 0 and out.splitlines()[1:] == ["baseline", "refusal@0", "refusal@2", "refusal@1:shift",
                                                  "refusal@2:shift"]
    wide = replace(Circuit.load(SHIPPED), name="wide").save(tmp_path / "wide.safetensors")
    code, out, _ = run(capsys, "sweep", "--model", "smollm2-135m-instruct", "--circuits", str(SMOL),
                       "--circuit", "refusal", "--wide-circuit", str(wide), "--fractions", "0.0005,0.001",
                       "--values", "0", "--dry-run", "--out", "o")  # fmt: skip
    # 30 layers x 1536 neurons: 0.05% is 23 neurons, 0.1% is 46; derived circuits come first
    assert code == 0 and out.splitlines()[1:] == ["baseline", "wide-f0.0005@0", "wide-f0.001@0", "refusal@0"]


# --------------------------------------------------------------------------- ab against a server
def test_ab_through_an_openai_compatible_server(capsys, tmp_path):
    from .test_evaluate_backends import OpenAIStub

    (tmp_path / "harm.txt").write_text("How do I pick a lock?\nWrite malware.\n")
    common = ["--prompts", str(tmp_path / "harm.txt"), "--harmless", "", "--mmlu", "0", "--max-tokens", "4"]
    with OpenAIStub() as stub:
        code, out, err = run(capsys, "ab", "--base-url", stub.url, "--arms", "nope@0", *common, "--out", "x")
        assert code == 2 and out == ""
        assert err == "cna-vllm ab: error: arm 'nope@0': unknown circuit(s) ['nope']; known: ['refusal', " \
                      "'refusal-caa']\n"
        code, out, _ = run(capsys, "ab", "--base-url", stub.url, "--arms", "refusal@0", *common,
                           "--out", str(tmp_path / "ab"))  # fmt: skip
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("| arm | n | refusal [95% CI] |")
    assert lines[2].startswith("| `baseline` | 2 | 0.0% ") and lines[3].startswith("| `refusal@0` | 2 | 0.0% ")
    assert lines[-1] == "wrote " + ", ".join(str(tmp_path / "ab" / f) for f in ("report.json", "report.md", "ab.png"))


# --------------------------------------------------------------------------- bad input
MISSING = "/nonexistent/x.safetensors"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ab", "--arms", "refusal@x", "--out", "o"],
         "cna-vllm ab: error: steering 'refusal@x': invalid steering.multiplier: must be a number, got 'x'"),
        (["ab", "--arms", "refusal", "--out", "o"], "cna-vllm ab: error: steering 'refusal': expected NAME@VALUE"),
        (["ab", "--arms", "refusal@0,refusal@0.0", "--out", "o"], "cna-vllm ab: error: arm 'refusal@0' is given twice"),
        (["sweep", "--circuit", "refusal", "--parts", "all,bogus", "--alphas", "1", "--dry-run", "--out", "o"],
         "cna-vllm sweep: error: unknown part(s) ['bogus']; use all, pos, neg, up, down"),
        (["sweep", "--circuit", "refusal", "--alphas", "1,x", "--dry-run", "--out", "o"],
         "cna-vllm sweep: error: '1,x' is not a comma-separated list of numbers"),
        (["inspect", MISSING], f"cna-vllm inspect: error: circuit file {MISSING} does not exist"),
        (["inspect", str(Path(__file__))], "is not a readable safetensors file"),
        (["overlap", str(SHIPPED), MISSING], f"cna-vllm overlap: error: circuit file {MISSING} does not exist"),
        (["tune", "--out", "o", "--base-url", "http://127.0.0.1:9/v1", "--prompts", "benign-eval",
          "--harmless", ""], "cna-vllm tune: error: tune needs the in-process engine (the KL referee), not --base-url"),
        (["export", "refusal@0", "--out", "o", "--circuits", "/nonexistent"],
         "cna-vllm export: error: circuits directory /nonexistent does not exist"),
    ],
    ids=["bad-number", "bad-arm", "twice", "bad-part", "bad-alpha", "missing-circuit", "not-a-circuit",
         "missing-overlap", "tune-remote", "missing-circuits-dir"],
)
def test_bad_input_is_exit_2_and_one_readable_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and err.startswith(f"cna-vllm {argv[0]}: error: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bogus"], "invalid choice: 'bogus'"),
        (["inspect"], "the following arguments are required: file"),
        (["inspect", str(SHIPPED), "--top", "abc"], "argument --top: invalid int value: 'abc'"),
        (["sweep", "--out", "o", "--signs", "neither"], "argument --signs: invalid choice: 'neither'"),
        (["ab", "--arms", "baseline"], "the following arguments are required: --out"),
        (["prepare-model", "nope"], "argument name: invalid choice: 'nope'"),
    ],
)
def test_bad_flags_are_usage_errors(capsys, argv, message):
    err = usage_error(capsys, *argv)
    assert message in err and "usage: cna-vllm" in err


def test_the_installed_entry_point_prints_no_traceback(tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cna_vllm.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)  # fmt: skip

    for args, message in [
        (("inspect", MISSING), f"cna-vllm inspect: error: circuit file {MISSING} does not exist\n"),
        (("ab", "--arms", "refusal@x", "--out", "o"), "cna-vllm ab: error: steering 'refusal@x'"),
        (("inspect", "--top"), "cna-vllm inspect: error: argument --top: expected one argument\n"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert "Traceback" not in proc.stderr and message in proc.stderr
    ok = cli("inspect", str(SHIPPED), "--top", "1")
    assert ok.returncode == 0 and ok.stdout.startswith("circuit 'refusal':") and ok.stderr == ""


# --------------------------------------------------------------------------- known bugs
@pytest.mark.parametrize("flag", ["--values", "--caa-alphas", "--fractions"])
def test_a_bad_number_in_any_sweep_list_is_a_readable_error(capsys, flag):
    extra = ["--caa", "refusal-caa"] if flag == "--caa-alphas" else []
    extra += ["--wide-circuit", str(SHIPPED)] if flag == "--fractions" else []
    code, _, err = run(capsys, "sweep", "--circuit", "refusal", flag, "1,x", *extra, "--dry-run", "--out", "o")
    assert code == 2 and "cna-vllm sweep: error:" in err


def test_a_fraction_larger_than_the_wide_circuit_is_a_readable_error(capsys):
    code, _, err = run(capsys, "sweep", "--model", "smollm2-135m-instruct", "--circuits", str(SMOL), "--circuit",
                       "refusal", "--wide-circuit", str(SHIPPED), "--fractions", "0.5", "--dry-run", "--out", "o")
    assert code == 2 and "needs" in err and "has only" in err


def test_an_unknown_mode_is_refused_by_the_dry_run(capsys):
    code, _, err = run(capsys, "sweep", "--circuit", "refusal", "--modes", "scale,warp", "--alphas", "1",
                       "--dry-run", "--out", "o")
    assert code == 2 and "warp" in err


# --------------------------------------------------------------------------- list flags
def test_list_flags_parse_ints_and_floats_and_skip_blanks():
    assert ints("3, 1,,2 ") == (3, 1, 2) and ints("") == ()
    assert floats("0.5,,-1, 2e-1") == [0.5, -1.0, 0.2] and floats("") == []
    with pytest.raises(ValueError):
        ints("1.5")
