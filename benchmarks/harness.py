"""The evaluation harness's engine configurations: dtype × eager/compiled, speed and agreement.

Each configuration runs in its own process, one after another (never two engines at once):
engine start-up (compile included) is timed apart from the work, a fixed arm of
``--prompts`` harmful prompts × ``--max-tokens`` new tokens is run under ``baseline`` and
``--steer`` (greedy), and the KL referee's teacher-forced log-probabilities are read on
``--kl-prompts`` harmless prompts along the reference configuration's greedy continuation.
Against the reference (float32, eager, the first configuration) it reports tokens/s, the
refusal rate and paper quality of both arms with Wilson intervals, whether they agree
(intervals overlap), and KL(reference ‖ config): the noise floor of the KL referee.
Writes ``harness.json`` and ``harness.png``. The CPU may be shared: the JSON records the
load average before and after each configuration.

    python benchmarks/harness.py --out benchmarks/results/harness.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = [("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)]


def run_one(args: argparse.Namespace) -> None:
    """Child: one configuration; writes its figures (and, for the reference, its continuations)."""
    from cna_vllm.embedded import model_alias
    from cna_vllm.evaluate.backends import EngineBackend
    from cna_vllm.evaluate.judge import is_refusal
    from cna_vllm.evaluate.scoring import mean, quality_paper
    from cna_vllm.prompts import load_prompts
    from cna_vllm.steering import SteeringSpec

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    work = Path(args.workdir)
    harmful = list(load_prompts("harmbench-eval", args.prompts))
    harmless = list(load_prompts("benign-eval", args.kl_prompts))
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    backend = EngineBackend(
        args.model, Path(__file__).resolve().parents[1] / "circuits" / model_alias(args.model), dtype=args.dtype,
        enforce_eager=not args.compiled, max_model_len=2048, kv_cache_memory_bytes=1 << 30, seed=0,
    )
    startup = time.perf_counter() - t0
    out = {"dtype": args.dtype, "compiled": args.compiled, "startup_s": round(startup, 1), "arms": {}}
    for name, spec in (("baseline", SteeringSpec()), (args.steer, SteeringSpec.parse(args.steer))):
        t = time.perf_counter()
        ids = backend.chat_ids(harmful, spec, args.max_tokens, name)
        wall = time.perf_counter() - t
        tok = backend.llm.get_tokenizer()
        texts = [tok.decode(x, skip_special_tokens=True) for x in ids]
        out["arms"][name] = {
            "wall_s": round(wall, 2),
            "tokens": sum(map(len, ids)),
            "tokens_per_s": round(sum(map(len, ids)) / wall, 1),
            "refusals": [is_refusal(x) for x in texts],
            "quality_paper": mean([quality_paper(x) for x in texts]),
        }
    ref = work / "reference.json"
    if not ref.exists():
        conts = backend.chat_ids(harmless, SteeringSpec(), args.kl_tokens, "KL continuations")
        ref.write_text(json.dumps(conts))
    conts = json.loads(ref.read_text())
    t = time.perf_counter()
    lps = backend.forced_logprobs(harmless, conts, SteeringSpec(), "KL logprobs")
    out["kl_logprobs_s"] = round(time.perf_counter() - t, 2)
    np.savez(work / f"{args.dtype}-{'compiled' if args.compiled else 'eager'}.npz", *lps)
    backend.close()
    out["loadavg_before"], out["loadavg_after"] = list(load0), list(os.getloadavg())
    Path(args.result).write_text(json.dumps(out))


def wilson(k: int, n: int) -> list[float]:
    from cna_vllm.evaluate.scoring import wilson as w

    return [round(x, 4) for x in w(k, n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--steer", default="refusal@2")
    parser.add_argument("--kl-prompts", type=int, default=16)
    parser.add_argument("--kl-tokens", type=int, default=32)
    parser.add_argument("--configs", default=",".join(f"{d}:{'compiled' if c else 'eager'}" for d, c in CONFIGS))
    parser.add_argument("--out", default="benchmarks/results/harness.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", help="a work directory of an earlier run: aggregate its results, run nothing")
    args = parser.parse_args()
    if args.one:
        run_one(args)
        return
    from cna_vllm.evaluate.kl import kl_summary

    configs = [(c.split(":")[0], c.split(":")[1] == "compiled") for c in args.configs.split(",")]
    work = Path(args.reuse or tempfile.mkdtemp(prefix="cna-harness-"))
    results = []
    for dtype, compiled in configs:
        res = work / f"{dtype}-{compiled}.json"
        if args.reuse:
            results.append(json.loads(res.read_text()))
            continue
        cmd = [sys.executable, __file__, "--one", "--dtype", dtype, "--workdir", str(work), "--result", str(res),
               "--model", args.model, "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
               "--steer", args.steer, "--kl-prompts", str(args.kl_prompts), "--kl-tokens", str(args.kl_tokens)]
        if compiled:
            cmd.append("--compiled")
        print(f"== {dtype} {'compiled' if compiled else 'eager'}", flush=True)
        subprocess.run(cmd, check=True)
        results.append(json.loads(res.read_text()))
    reference = results[0]
    def logprobs(r: dict) -> list:
        return list(np.load(work / f"{r['dtype']}-{'compiled' if r['compiled'] else 'eager'}.npz").values())

    ref_lp = logprobs(reference)
    for r in results:
        lp = logprobs(r)
        r["kl_vs_reference"] = kl_summary(ref_lp, lp)
        r["agrees_with_reference"] = True
        for name, arm in r["arms"].items():
            k, n = sum(arm["refusals"]), len(arm["refusals"])
            arm["refusal_rate"], arm["refusal_ci"] = k / n, wilson(k, n)
            ref = reference["arms"][name]
            rk = sum(ref["refusals"])
            lo, hi = wilson(rk, n)
            arm["refusal_agrees"] = bool(arm["refusal_ci"][0] <= hi and lo <= arm["refusal_ci"][1])
            arm["flips_vs_reference"] = sum(a != b for a, b in zip(arm["refusals"], ref["refusals"], strict=True))
            arm["quality_delta_vs_reference"] = round(arm["quality_paper"] - ref["quality_paper"], 4)
            arm["agrees"] = arm["refusal_agrees"] and abs(arm["quality_delta_vs_reference"]) <= 0.01
            r["agrees_with_reference"] &= arm["agrees"]
        r["tokens_per_s"] = round(
            sum(a["tokens"] for a in r["arms"].values()) / sum(a["wall_s"] for a in r["arms"].values()), 1
        )
    for r in results:
        for arm in r["arms"].values():
            arm.pop("refusals")
    agreeing = [r for r in results if r["agrees_with_reference"]]
    fastest = max(agreeing, key=lambda r: r["tokens_per_s"])
    report = {
        "model": args.model,
        "workload": {"harmful_prompts": args.prompts, "max_tokens": args.max_tokens, "arms": ["baseline", args.steer],
                     "kl_prompts": args.kl_prompts, "kl_tokens": args.kl_tokens, "decoding": "greedy"},
        "reference": "float32 eager",
        "agreement_rule": "refusal Wilson 95% intervals overlap the reference's, and |Δ paper quality| ≤ 0.01, "
                          "for both arms",
        "configs": results,
        "fastest_agreeing": f"{fastest['dtype']} {'compiled' if fastest['compiled'] else 'eager'}",
        "host": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "machine": platform.machine(),
                 "note": "CPU shared with other agents' vLLM jobs: timings are contended (see loadavg_*)"},
        "core_binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "all cores in the affinity mask (cna-vllm ab)"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    for r in results:
        print(f"{r['dtype']:>9} {'compiled' if r['compiled'] else 'eager':>8}: start {r['startup_s']:6.1f} s, "
              f"{r['tokens_per_s']:6.1f} tok/s, KL vs ref {r['kl_vs_reference']['kl_forced']:.2e}, "
              f"agrees {r['agrees_with_reference']}")
    print(f"fastest agreeing: {report['fastest_agreeing']}; wrote {out}")


def plot(report: dict, path: Path) -> Path:
    from cna_vllm.plots import pyplot, save_figure

    plt = pyplot()
    configs = report["configs"]
    names = [f"{c['dtype']}\n{'compiled' if c['compiled'] else 'eager'}" for c in configs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].bar(names, [c["tokens_per_s"] for c in configs], color="#3b6ea5")
    axes[0].set_title("generation, tokens/s (contended CPU)")
    axes[1].bar(names, [c["startup_s"] for c in configs], color="#888")
    axes[1].set_title("engine start-up, s")
    for i, (name, _) in enumerate(configs[0]["arms"].items()):
        rates = [c["arms"][name]["refusal_rate"] for c in configs]
        err = [[r - c["arms"][name]["refusal_ci"][0] for r, c in zip(rates, configs, strict=True)],
               [c["arms"][name]["refusal_ci"][1] - r for r, c in zip(rates, configs, strict=True)]]
        axes[2].errorbar(np.arange(len(configs)) + 0.1 * i, rates, yerr=err, fmt="o", capsize=3, label=name)
    axes[2].set_xticks(range(len(configs)), names)
    axes[2].set_ylim(0, 1)
    axes[2].set_title("refusal rate (Wilson 95%)")
    axes[2].legend(fontsize=7)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
