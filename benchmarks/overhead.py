"""Throughput overhead of steering: stock vLLM vs the plugin (unsteered / 8 specs / 50-50 mix) vs HF hooks.

The distinct-config axis (``--configs``, default 1 2 8 32 64) adds the arms
``plugin_specs{N}``: every request steered, request i by spec i mod N (8 circuits at up to 8
multipliers each, so up to 64 distinct rows); ``plugin_steered8`` is the N = 8 point.
With ``--prompts`` below N only that many distinct specs are in flight.

``--hot-load N`` adds a third engine as ``cna-vllm serve`` builds it (N spare neurons per
layer and an offset table on every layer) with one CAA vector set, and the arms
``hotload_unsteered`` and ``hotload_caa`` (every request steered by the vectors).

Arms run interleaved, ``--reps`` times each, for each prompt count in ``--prompts``; the
reported figure is the median over repetitions of generated tokens per second. Writes
``{"arms": {NAME: {"tokens_per_s": ...}}, "ratios": {...}}`` (at the largest prompt
count) plus per-count detail, and prints a table. Not a test: nothing is asserted.

    python benchmarks/overhead.py --out benchmarks/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

TOPICS = ["pick a lock", "bake a cake", "sort a list in Python", "hotwire a car", "write a poem", "plant a tree"]


def make_prompts(n: int) -> list[str]:
    return [f"Explain step by step how to {TOPICS[i % len(TOPICS)]} (variant {i})." for i in range(n)]


def make_circuits(model_dir: Path, k: int, count: int = 8) -> dict:
    from cna_vllm.circuit import Circuit
    from cna_vllm.identity import ModelIdentity

    ident = ModelIdentity.from_dir(model_dir)
    out = {}
    for c in range(count):
        rng = np.random.default_rng(c)
        flat = rng.choice(ident.num_layers * ident.intermediate_size, size=k, replace=False)
        out[f"c{c}"] = Circuit(
            name=f"c{c}",
            layers=flat // ident.intermediate_size,
            neurons=flat % ident.intermediate_size,
            score=np.sort(rng.random(k))[::-1],
            mean_pos=rng.normal(size=k),
            mean_neg=rng.normal(size=k),
            model=ident,
        )
    return out


def plot_configs(result: dict, configs: list[int], out: Path) -> None:
    """Tokens/s against the number of distinct specs, one line per prompt count, stock as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n, by in sorted(result["by_prompts"].items(), key=lambda kv: int(kv[0])):
        arms = by["arms"]
        ys = [arms["plugin_steered8" if c == 8 else f"plugin_specs{c}"] for c in configs]
        line = ax.plot(configs, ys, "o-", label=f"{n} prompts: cna-vllm, distinct specs")[0]
        ax.axhline(arms["stock"], color=line.get_color(), ls="--", lw=1, label=f"{n} prompts: stock vLLM")
        ax.plot([0.7], [arms["plugin_unsteered"]], "s", color=line.get_color(), label=f"{n} prompts: unsteered")
    ax.set(
        xscale="log",
        xlabel="distinct steering specs in the batch",
        ylabel="generated tokens/s",
        title=f"offline throughput ({result['setup']['dtype']})",
    )
    ax.set_xticks(configs, [str(c) for c in configs])
    ax.set_ylim(0, None)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def timed(fn) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--circuit-size", type=int, default=0, help="neurons per circuit (default 0.1%% of all)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers arm")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--configs", type=int, nargs="+", default=[1, 2, 8, 32, 64], help="distinct-spec axis")
    ap.add_argument("--hot-load", type=int, default=0, help="also time an engine with this hot-load reserve")
    ap.add_argument("--out", default="benchmarks/results/overhead.json")
    args = ap.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    from vllm import LLM, SamplingParams

    from cna_vllm.embedded import resolve_model
    from cna_vllm.engine.llm import SteeredLLM
    from cna_vllm.identity import ModelIdentity
    model_dir = resolve_model(args.model)
    ident = ModelIdentity.from_dir(model_dir)
    k = args.circuit_size or max(1, ident.num_layers * ident.intermediate_size // 1000)
    circuits = make_circuits(model_dir, k)
    common = dict(dtype=args.dtype, max_model_len=512, enforce_eager=args.enforce_eager, max_num_seqs=64)
    stock = LLM(model=str(model_dir), **common)
    steered = SteeredLLM(model_dir, circuits, **common)
    hot = None
    if args.hot_load:
        from cna_vllm.vectors import VectorSet

        rng = np.random.default_rng(99)
        shape = (ident.num_layers, ident.hidden_size)
        caa = VectorSet(name="v", layers=range(ident.num_layers), vectors=rng.normal(scale=0.01, size=shape))
        hot = SteeredLLM(model_dir, {**circuits, "v": caa}, hot_load_neurons=args.hot_load, **common)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    specs8 = [f"c{i % 8}@0" for i in range(max(args.prompts))]

    def distinct(n: int) -> list[str]:  # spec j: circuit c(j mod 8) at multiplier 0.1·(j div 8)
        return [f"c{(i % n) % 8}@{0.1 * ((i % n) // 8):g}" for i in range(max(args.prompts))]

    def vllm_arm(llm, steering=None):
        def run(prompts):
            if steering is None:
                outs = llm.generate(prompts, sp, use_tqdm=False)
            else:
                outs = llm.generate(prompts, sp, steering=steering[: len(prompts)])
            return sum(len(o.outputs[0].token_ids) for o in outs)

        return run

    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
        by_layer = circuits["c0"].by_layer()

        def hook_for(idx):
            idx = torch.as_tensor(idx, dtype=torch.long)

            def hook(_m, a):
                x = a[0].clone()
                x[..., idx] = 0.0  # m = 0, as in the steered arms
                return (x,)

            return hook

        for layer, idx in by_layer.items():
            hf.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook_for(idx))

    def hf_arm(prompts):
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = hf.generate(
                **enc,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        return int((out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0])

    arms = {
        "stock": vllm_arm(stock),
        "plugin_unsteered": vllm_arm(steered, steering=[None] * max(args.prompts)),
        "plugin_steered8": vllm_arm(steered, steering=specs8),
        "plugin_mixed": vllm_arm(steered, steering=[s if i % 2 else None for i, s in enumerate(specs8)]),
    }
    for n in args.configs:
        if n != 8:
            arms[f"plugin_specs{n}"] = vllm_arm(steered, steering=distinct(n))
    if hot is not None:
        arms["hotload_unsteered"] = vllm_arm(hot, steering=[None] * max(args.prompts))
        arms["hotload_caa"] = vllm_arm(hot, steering=["v@1:shift"] * max(args.prompts))
    if hf is not None:
        arms["hf_hooks_steered"] = hf_arm
    for name in ("stock", "plugin_unsteered"):  # warm-up
        arms[name](make_prompts(4))

    detail: dict[int, dict[str, list[float]]] = {}
    loads: list[dict] = []  # the machine may be shared: load average at the start of each repetition
    for n in args.prompts:
        prompts = make_prompts(n)
        detail[n] = {name: [] for name in arms}
        for rep in range(args.reps):
            loads.append({"prompts": n, "rep": rep, "loadavg": os.getloadavg()})
            for name, fn in arms.items():
                secs, toks = timed(lambda fn=fn, prompts=prompts: fn(prompts))
                detail[n][name].append(toks / secs)
                print(f"  n={n:<3} rep={rep} {name:<18} {toks / secs:8.1f} tok/s", flush=True)

    def med(n, name):
        return statistics.median(detail[n][name])

    def ratios(n):
        r = {
            "unsteered_vs_stock": med(n, "plugin_unsteered") / med(n, "stock"),
            "steered8_vs_stock": med(n, "plugin_steered8") / med(n, "stock"),
            "mixed_vs_stock": med(n, "plugin_mixed") / med(n, "stock"),
        }
        for c in args.configs:
            name = "plugin_steered8" if c == 8 else f"plugin_specs{c}"
            r[f"specs{c}_vs_stock"] = med(n, name) / med(n, "stock")
        if "hotload_unsteered" in detail[n]:
            r["hotload_unsteered_vs_stock"] = med(n, "hotload_unsteered") / med(n, "stock")
            r["hotload_caa_vs_stock"] = med(n, "hotload_caa") / med(n, "stock")
        if "hf_hooks_steered" in detail[n]:
            r["vllm_steered_vs_hf_hooks"] = med(n, "plugin_steered8") / med(n, "hf_hooks_steered")
        return r

    top = max(args.prompts)
    result = {
        "arms": {name: {"tokens_per_s": med(top, name), "runs": detail[top][name]} for name in arms},
        "ratios": ratios(top),
        "by_prompts": {str(n): {"arms": {a: med(n, a) for a in arms}, "ratios": ratios(n)} for n in args.prompts},
        "setup": {
            "model": args.model,
            "dtype": args.dtype,
            "max_tokens": args.max_tokens,
            "reps": args.reps,
            "circuit_size": k,
            "configs": 8,
            "distinct_configs_axis": args.configs,
            "enforce_eager": args.enforce_eager,
            "hot_load_neurons": args.hot_load,
            "loadavg_per_rep": [*loads, {"end": True, "loadavg": os.getloadavg()}],
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{'arm':<20}" + "".join(f"{f'n={n} tok/s':>14}" for n in args.prompts))
    for name in arms:
        print(f"{name:<20}" + "".join(f"{med(n, name):>14.1f}" for n in args.prompts))
    for key in ratios(top):
        print(f"{key:<26}" + "".join(f"{ratios(n)[key]:>10.3f}" for n in args.prompts))
    plot_configs(result, args.configs, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    steered.shutdown()
    stock.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
