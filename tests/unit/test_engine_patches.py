"""The vLLM patches: P1's runner binding covers every V1 runner, P5 answers bad steering as a client error."""

import importlib

import pytest

from cna_vllm.errors import SteeringError

vllm = pytest.importorskip("vllm")


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_v1_runner_binds_its_token_offsets():
    """Issue #9: the token -> request map comes from the runner, so every V1 runner must bind it."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from cna_vllm.patches.engine import install_runner_binding

    for module in ("vllm.v1.worker.cpu_model_runner", "vllm.v1.worker.xpu_model_runner"):
        importlib.import_module(module)
    install_runner_binding()
    install_runner_binding()  # idempotent: wrapped once
    runners = [GPUModelRunner, *_all_subclasses(GPUModelRunner)]
    assert {c.__name__ for c in runners} >= {"GPUModelRunner", "CPUModelRunner", "XPUModelRunner"}
    for cls in runners:
        assert getattr(cls.load_model, "_cna_bound", False), f"{cls.__name__}.load_model does not bind"
        assert not getattr(cls.load_model, "__wrapped__", None) or not getattr(
            cls.load_model.__wrapped__, "_cna_bound", False
        ), f"{cls.__name__}.load_model is wrapped twice"


def test_bad_steering_is_a_vllm_client_error_and_a_steering_error():
    """vLLM's AsyncLLM turns any non-client exception into a 500 with an empty message."""
    from vllm.exceptions import VLLMClientError

    from cna_vllm.patches.requests import client_error

    err = client_error(SteeringError("unknown circuit 'nope'"))
    assert isinstance(err, SteeringError) and isinstance(err, ValueError) and isinstance(err, VLLMClientError)
    assert "unknown circuit 'nope'" in str(err) and err.parameter == "steering"
    assert type(client_error(SteeringError("x"))) is type(err)  # one class, made once
