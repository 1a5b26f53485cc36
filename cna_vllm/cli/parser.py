"""The ``cna-vllm`` flags: one sub-parser per command of :mod:`.commands`."""

from __future__ import annotations

import argparse

from cna_vllm.cli.commands import (
    cmd_ab,
    cmd_discover,
    cmd_export,
    cmd_inspect,
    cmd_overlap,
    cmd_prepare_model,
    cmd_sweep,
    cmd_tune,
)
from cna_vllm.embedded import DEFAULT_MODEL, EMBEDDED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cna-vllm", description="Steered serving with Contrastive Neuron Attribution circuits."
    )
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
    p.add_argument("--target-quality", type=float, default=0.97,
                   help="minimum paper quality, as a ratio to the baseline's")
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
    p.add_argument("--target-quality", type=float, default=0.97,
                   help="the constraint: minimum paper quality, as a ratio to the baseline's")
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
