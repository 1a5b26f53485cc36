"""``cna-vllm`` command line: thin subcommands over the package's modules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cna_vllm.errors import CnaError
from cna_vllm.models import DEFAULT_MODEL, EMBEDDED

REPO_CIRCUITS = Path(__file__).resolve().parent.parent / "circuits"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()


# --------------------------------------------------------------------------- commands


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from cna_vllm.models import prepare_model

    names = list(EMBEDDED) if args.name == "all" else [args.name]
    for name in names:
        print(prepare_model(name, progress=not args.quiet))


def cmd_inspect(args: argparse.Namespace) -> None:
    from cna_vllm.circuit import Circuit

    circuit = Circuit.load(args.file)
    if args.model:
        from cna_vllm.models import resolve_model

        circuit.validate_for(resolve_model(args.model))
        print(f"valid for {args.model}")
    if args.json:
        print(json.dumps(circuit.metadata(), indent=2))
    else:
        print(circuit.summary(top=args.top))


def cmd_discover(args: argparse.Namespace) -> None:
    import resource

    from cna_vllm.discover import DiscoveryConfig, discover, load_hf_model
    from cna_vllm.models import ModelIdentity, model_alias, resolve_model
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
    diverse = load_prompts(args.diverse) if config.universal_filter else None
    out = Path(args.out or REPO_CIRCUITS / model_alias(args.model) / f"{args.name}.safetensors")
    model, tokenizer = load_hf_model(model_dir)
    result = discover(
        model,
        tokenizer,
        positive,
        negative,
        name=args.name,
        identity=ModelIdentity.from_dir(model_dir),
        description=args.description or f"{args.name}: {positive.name} vs {negative.name}",
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


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cna-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="build the HF directory of an embedded model (idempotent)")
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
    p.add_argument("--name", default="refusal", help="circuit name (and file stem)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
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
