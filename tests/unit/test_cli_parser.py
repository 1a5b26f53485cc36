"""The ``cna-vllm`` flags: every command, its handler and the defaults that differ between commands."""

from __future__ import annotations

import argparse

import pytest

from cna_vllm.cli import commands
from cna_vllm.cli.parser import build_parser
from cna_vllm.embedded import DEFAULT_MODEL, EMBEDDED
from cna_vllm.evaluate.sweep import KL_CEILING

HANDLERS = {
    "prepare-model": commands.cmd_prepare_model,
    "inspect": commands.cmd_inspect,
    "discover": commands.cmd_discover,
    "ab": commands.cmd_ab,
    "sweep": commands.cmd_sweep,
    "tune": commands.cmd_tune,
    "overlap": commands.cmd_overlap,
    "export": commands.cmd_export,
}
MINIMAL = {"inspect": ["f"], "ab": ["--out", "o"], "sweep": ["--out", "o"], "tune": ["--out", "o"],
           "overlap": ["a", "b"], "export": ["refusal@0", "--out", "o"]}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_is_listed_and_dispatches_to_its_handler():
    parser = build_parser()
    assert set(subcommands(parser)) == {*HANDLERS, "serve"}  # serve is handed to vLLM's parser by main()
    for name, handler in HANDLERS.items():
        args = parser.parse_args([name, *MINIMAL.get(name, [])])
        assert args.command == name and args.func is handler
    with pytest.raises(SystemExit):
        parser.parse_args([])  # a command is required


def test_model_defaults_and_choices():
    parser = build_parser()
    assert parser.parse_args(["prepare-model"]).name == DEFAULT_MODEL
    assert parser.parse_args(["prepare-model", "all"]).name == "all"
    (name,) = [a for a in subcommands(parser)["prepare-model"]._actions if a.dest == "name"]
    assert set(name.choices) == {*EMBEDDED, "all"}
    for name in ("discover", "ab", "sweep", "tune", "export"):
        assert parser.parse_args([name, *MINIMAL.get(name, [])]).model == DEFAULT_MODEL


def test_evaluation_defaults_that_differ_between_commands():
    parser = build_parser()
    ab, sweep, tune = (parser.parse_args([c, "--out", "o"]) for c in ("ab", "sweep", "tune"))
    assert ab.arms == "baseline,refusal@0.0" and ab.mmlu == 500
    assert tune.mmlu == 0  # the search runs without MMLU unless asked
    assert sweep.modes == "scale" and sweep.parts == "all" and sweep.signs == "both" and sweep.alphas == ""
    assert tune.modes == "scale,patch,shift" and tune.parts == "all,pos,neg" and tune.alpha_range == "-2,2"
    assert sweep.target_kl is None and tune.target_kl is None  # None means KL_CEILING (0 turns the check off)
    assert commands._target(sweep).max_kl == KL_CEILING
    assert commands._target(parser.parse_args(["sweep", "--out", "o", "--target-kl", "0"])).max_kl is None
    assert commands._target(parser.parse_args(["sweep", "--out", "o", "--target-kl", "0.5"])).max_kl == 0.5
    assert ab.compile is None and parser.parse_args(["ab", "--out", "o", "--no-compile"]).compile is False
    assert not hasattr(ab, "circuit")  # ab takes whole specs in --arms
    assert sweep.circuit == [] and parser.parse_args(["sweep", "--out", "o", "--circuit", "a", "--circuit", "b"]
                                                     ).circuit == ["a", "b"]


def test_discover_defaults():
    args = build_parser().parse_args(["discover"])
    assert (args.method, args.site, args.scoring, args.fraction) == ("cna", "mlp_out", "delta", 0.001)
    assert (args.positive, args.negative, args.diverse) == ("harmbench-discover", "benign-discover", "diverse")
    assert args.out is None and args.name is None and not args.no_universal_filter
    with pytest.raises(SystemExit):
        build_parser().parse_args(["discover", "--method", "pca"])
