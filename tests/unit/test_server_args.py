"""``cna-vllm serve`` flags beyond tests/unit/test_server_app.py: bounds, names, keys, and a full
:func:`prepare_args` on a planted model directory (no engine is started)."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from cna_vllm.errors import SteeringError
from cna_vllm.identity import ModelIdentity
from cna_vllm.server.args import (
    DEFAULT_HOT_LOAD_NEURONS,
    DEFAULT_MAX_WAITING,
    DEFAULT_WAIT_TIMEOUT,
    api_tokens,
    limits_of,
    lora_names,
    make_parser,
    prepare_args,
    steered_models,
)
from cna_vllm.server.state import DEFAULT_MAX_REQUEST_BYTES
from cna_vllm.sources import file_sha256
from cna_vllm.steering import SteeringLimits

from .planted import circuit_of, planted_model

CIRCUITS = {"refusal": object(), "other": object()}


def test_steering_flags_and_their_defaults():
    args = make_parser().parse_args([])
    assert (args.circuits, args.hot_load_dir, args.enable_hot_load, args.steered_model) == (None, [], False, [])
    assert args.hot_load_neurons == DEFAULT_HOT_LOAD_NEURONS and args.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    assert (args.steering_max_waiting, args.steering_wait_timeout) == (DEFAULT_MAX_WAITING, DEFAULT_WAIT_TIMEOUT)
    assert limits_of(args) == SteeringLimits() and args.no_playground is False
    args = make_parser().parse_args(["--steering-max-items", "2", "--steering-max-multiplier", "4",
                                     "--steering-max-alpha", "1.5", "--hot-load-dir", "a", "--hot-load-dir", "b"])
    assert limits_of(args) == SteeringLimits(max_items=2, max_abs_multiplier=4.0, max_abs_alpha=1.5)
    assert args.hot_load_dir == ["a", "b"]
    assert limits_of(argparse.Namespace()) == SteeringLimits()  # a namespace without the flags: the defaults


def test_lora_names_and_api_keys(monkeypatch):
    args = make_parser().parse_args(["--lora-modules", "ad1=/p1", '{"name": "ad2", "path": "/p2"}'])
    assert lora_names(args) == ["ad1", "ad2"] and lora_names(argparse.Namespace()) == []
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert api_tokens(make_parser().parse_args([])) == []
    assert api_tokens(make_parser().parse_args(["--api-key", "k"])) == ["k"]
    assert api_tokens(argparse.Namespace(api_key=["a", "", "b"])) == ["a", "b"]
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert api_tokens(make_parser().parse_args([])) == ["from-env"]  # as vLLM reads it


def test_steered_model_flags_are_checked_against_names_and_circuits():
    def parse(*flags: str):
        return steered_models(make_parser().parse_args(list(flags)), CIRCUITS, ["base"])

    got = parse("--steered-model", "off=refusal@0", "--steered-model", 'mix=[{"circuit": "other", "mode": "shift", '
                '"alpha": 1}]')  # fmt: skip
    assert got == [("off", [{"circuit": "refusal", "mode": "scale", "multiplier": 0.0}]),
                   ("mix", [{"circuit": "other", "mode": "shift", "alpha": 1.0}])]
    for flags, message in [
        (["--steered-model", "base=refusal@0"], "already taken"),
        (["--steered-model", "a=refusal@0", "--steered-model", "a=refusal@1"], "already taken"),
        (["--lora-modules", "ad=/p", "--steered-model", "ad=refusal@0"], "already taken"),
        (["--steered-model", "x=nope@1"], "--steered-model x: unknown circuit 'nope'"),
        (["--steering-max-multiplier", "2", "--steered-model", "x=refusal@3"], "--steered-model x: .*out of bounds"),
        (["--steered-model", "no-spec"], "NAME=SPEC"),
    ]:
        with pytest.raises(SteeringError, match=message):
            parse(*flags)


# --------------------------------------------------------------------------- prepare_args
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A planted model directory and a circuits directory with one circuit made for it."""
    root = tmp_path_factory.mktemp("serve")
    planted_model().save_pretrained(root / "model")
    (root / "circuits").mkdir()
    circuit = replace(circuit_of("refusal", [(3, 40), (1, 5)]), model=ModelIdentity.from_dir(root / "model"))
    circuit.save(root / "circuits" / "refusal.safetensors")
    (root / "hot").mkdir()
    return root


def prepare(planted, *flags: str) -> argparse.Namespace:
    return prepare_args(make_parser().parse_args(["--model", str(planted / "model"), "--circuits",
                                                  str(planted / "circuits"), *flags]))


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # prepare_args' CPU defaults must not leak out of a test


def test_prepare_args_turns_the_flags_into_a_steered_engine(planted):
    args = prepare(planted, "--max-steering-configs", "3", "--hot-load-neurons", "8", "--steered-model",
                   "off=refusal@0", "--enable-hot-load", "--host", "127.0.0.1", "--hot-load-dir", str(planted / "hot"))
    assert args.model == str(planted / "model") and args.model_tag is None
    assert args.served_model_name == [str(planted / "model")]  # a directory serves under its own path
    assert args.hf_overrides == {"architectures": ["SteeredLlamaForCausalLM"]}
    section = args.additional_config["cna_vllm"]
    assert (section["max_steering_configs"], section["hot_load_neurons"]) == (3, 8)
    entry = section["circuits"]["refusal"]  # circuits travel pinned by content hash
    assert entry["sha256"] == file_sha256(planted / "circuits" / "refusal.safetensors")
    assert args.worker_extension_cls.endswith("SteeringWorkerExtension")
    assert args.scheduler_cls.endswith("SteeringScheduler") and args.logits_processors
    assert args.cna_steered_models == [("off", [{"circuit": "refusal", "mode": "scale", "multiplier": 0.0}])]
    assert args.cna_hot_load_roots == [(planted / "circuits").resolve(), (planted / "hot").resolve()]


def test_prepare_args_keeps_a_given_served_name_and_checks_variants_against_it(planted):
    args = prepare(planted, "--served-model-name", "tiny")
    assert args.served_model_name == ["tiny"] and not getattr(args, "cna_steered_models", None)
    with pytest.raises(SteeringError, match="already taken"):
        prepare(planted, "--served-model-name", "tiny", "--steered-model", "tiny=refusal@0")
    with pytest.raises(SteeringError, match="--steered-model x: unknown circuit 'nope'"):
        prepare(planted, "--steered-model", "x=nope@0")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steering-max-waiting", "-1"], "--steering-max-waiting and --steering-wait-timeout must be at least 0"),
        (["--steering-wait-timeout", "-1"], "--steering-max-waiting and --steering-wait-timeout must be at least 0"),
        (["--enable-hot-load"], "needs --api-key"),  # the default host listens on every interface
    ],
)
def test_prepare_args_refuses_bad_settings(planted, flags, message):
    with pytest.raises(SteeringError, match=message):
        prepare(planted, *flags)


def test_hot_load_beyond_loopback_is_allowed_with_a_key(planted):
    args = prepare(planted, "--enable-hot-load", "--host", "0.0.0.0", "--api-key", "k")
    assert args.enable_hot_load and args.cna_hot_load_roots == [(planted / "circuits").resolve()]
