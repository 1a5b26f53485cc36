"""``cna-vllm serve``'s command line: vLLM's server flags plus the steering ones, checked and resolved.

:func:`prepare_args` turns the parsed flags into a steered engine's arguments (through
:func:`cna_vllm.engine.config.engine_kwargs`) before vLLM sees them; every error is a
one-line :class:`~cna_vllm.errors.CnaError` that ``main`` prints with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from cna_vllm.engine.config import DEFAULT_MAX_STEERING_CONFIGS, has_cuda
from cna_vllm.server.state import DEFAULT_MAX_REQUEST_BYTES
from cna_vllm.server.variants import validate_spec
from cna_vllm.sources import REPO_CIRCUITS
from cna_vllm.steering import SteeringLimits

logger = logging.getLogger("cna_vllm.server.app")

DEFAULT_HOT_LOAD_NEURONS = 256
DEFAULT_MAX_WAITING = 1024
DEFAULT_WAIT_TIMEOUT = 600.0


def limits_of(args: argparse.Namespace) -> SteeringLimits:
    return SteeringLimits(
        max_items=getattr(args, "steering_max_items", SteeringLimits.max_items),
        max_abs_multiplier=getattr(args, "steering_max_multiplier", SteeringLimits.max_abs_multiplier),
        max_abs_alpha=getattr(args, "steering_max_alpha", SteeringLimits.max_abs_alpha),
    )


def lora_names(args: argparse.Namespace) -> list[str]:
    """The names of the LoRA modules given at start-up (``--lora-modules``)."""
    return [getattr(m, "name", None) or str(m) for m in (getattr(args, "lora_modules", None) or [])]


def steered_models(args: argparse.Namespace, circuits: Any, served: list[str]) -> list[tuple[str, Any]]:
    """Parse and check every ``--steered-model NAME=SPEC``: names unique and free, specs valid here."""
    from cna_vllm.server.variants import check_name, parse_flag

    out: list[tuple[str, Any]] = []
    limits = limits_of(args)
    for text in getattr(args, "steered_model", None) or []:
        name, raw = parse_flag(text)
        check_name(name, [*served, *lora_names(args), *(n for n, _ in out)])
        spec = validate_spec(raw, limits, circuits, f"--steered-model {name}")
        out.append((name, spec.to_list()))
    return out


# --------------------------------------------------------------------------- command line
def make_parser() -> Any:
    """vLLM's own server parser plus the cna-vllm options; ``--model`` defaults to the embedded model."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from cna_vllm.embedded import DEFAULT_MODEL

    parser = make_arg_parser(FlexibleArgumentParser(prog="cna-vllm serve", description=__doc__))
    g = parser.add_argument_group("cna-vllm steering")
    g.add_argument("--circuits", help="directory of circuit files (default: the shipped circuits/<model>/)")
    g.add_argument(
        "--max-steering-configs",
        type=int,
        default=DEFAULT_MAX_STEERING_CONFIGS,
        help="steering-table rows: distinct specs in flight at once (others wait)",
    )
    g.add_argument(
        "--hot-load-neurons",
        type=int,
        default=DEFAULT_HOT_LOAD_NEURONS,
        help="spare steerable neurons reserved per layer so POST /v1/circuits can add circuits while "
        "serving (it also gives every layer an offset table for CAA vectors); 0 disables hot-loading",
    )
    g.add_argument(
        "--enable-hot-load",
        action="store_true",
        help="enable POST /v1/circuits (off by default); files must lie in --circuits or a --hot-load-dir, "
        "and a server listening beyond loopback needs --api-key for it",
    )
    g.add_argument(
        "--hot-load-dir",
        action="append",
        default=[],
        help="a directory POST /v1/circuits may read circuit files from (repeatable; --circuits always is one)",
    )
    g.add_argument(
        "--steering-max-items", type=int, default=SteeringLimits.max_items, help="most items in one request's steering"
    )
    g.add_argument(
        "--steering-max-multiplier",
        type=float,
        default=SteeringLimits.max_abs_multiplier,
        help="bound on |multiplier| (scale mode)",
    )
    g.add_argument(
        "--steering-max-alpha",
        type=float,
        default=SteeringLimits.max_abs_alpha,
        help="bound on |alpha| (patch / shift modes)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest completion request body accepted (HTTP 413 above)",
    )
    g.add_argument(
        "--steering-max-waiting",
        type=int,
        default=DEFAULT_MAX_WAITING,
        help="most steered requests waiting for a steering row (first come, first served); HTTP 429 beyond",
    )
    g.add_argument(
        "--steering-wait-timeout",
        type=float,
        default=DEFAULT_WAIT_TIMEOUT,
        help="seconds a steered request may wait for a row before HTTP 503 (0: no limit)",
    )
    g.add_argument(
        "--steered-model",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="serve NAME as the model steered with SPEC (any form of the steering field: refusal@0, "
        'or JSON \'[{"circuit": "refusal", "multiplier": 0}]\'); listed in /v1/models (repeatable)',
    )
    g.add_argument(  # playground hook (issue #12)
        "--no-playground",
        action="store_true",
        help="do not serve the steering playground page at GET /playground",
    )
    parser.set_defaults(model=DEFAULT_MODEL)
    return parser


def prepare_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve the model and circuits and set the steered-engine arguments on ``args``."""
    from cna_vllm.embedded import EMBEDDED, model_alias
    from cna_vllm.engine.config import engine_kwargs

    limits_of(args)  # fail early on bad bounds
    from cna_vllm.errors import SteeringError

    if args.max_steering_configs < 1:
        raise SteeringError(f"--max-steering-configs must be at least 1, got {args.max_steering_configs}")
    if args.steering_max_waiting < 0 or args.steering_wait_timeout < 0:
        raise SteeringError("--steering-max-waiting and --steering-wait-timeout must be at least 0")
    if args.hot_load_neurons < 0:
        raise SteeringError(f"--hot-load-neurons must be at least 0, got {args.hot_load_neurons}")
    cpu_defaults(args)
    if args.enable_hot_load and args.host not in ("127.0.0.1", "localhost", "::1") and not api_tokens(args):
        raise SteeringError(
                "--enable-hot-load on a server that listens beyond loopback needs --api-key "
                "(or --host 127.0.0.1): it reads files on the server"
            )
    model = args.model_tag or args.model
    alias = model_alias(model)
    circuits = args.circuits
    if circuits is None:
        shipped = REPO_CIRCUITS / alias
        circuits = shipped if any(shipped.glob("*.safetensors")) else None
        if circuits is None:
            logger.warning("no shipped circuits for %s; serving with none (pass --circuits DIR)", alias)
    kw, _ = engine_kwargs(
        model,
        circuits,
        max_steering_configs=args.max_steering_configs,
        hot_load_neurons=args.hot_load_neurons,
        worker_extension_cls=args.worker_extension_cls or None,
        hf_overrides=args.hf_overrides,
        additional_config=args.additional_config,
        logits_processors=args.logits_processors,
        speculative_config=args.speculative_config,
        scheduler_cls=getattr(args, "scheduler_cls", None),
    )
    args.model, args.model_tag = kw["model"], None
    args.hf_overrides = kw["hf_overrides"]
    args.additional_config = kw["additional_config"]
    args.logits_processors = kw["logits_processors"]
    args.worker_extension_cls = kw["worker_extension_cls"]
    args.scheduler_cls = kw["scheduler_cls"]
    mode = (kw.get("compilation_config") or {}).get("cudagraph_mode")
    if mode and getattr(args.compilation_config, "cudagraph_mode", "set") is None:
        from vllm.config.compilation import CUDAGraphMode

        args.compilation_config.cudagraph_mode = CUDAGraphMode[mode]
    if not args.served_model_name:  # the name the user gave, not the prepared directory
        args.served_model_name = [alias if model in EMBEDDED else model]
    if args.steered_model:
        from cna_vllm.engine.config import EngineSteeringConfig

        circuits_now = EngineSteeringConfig.from_additional_config(args.additional_config).load_circuits()
        served = args.served_model_name
        args.cna_steered_models = steered_models(args, circuits_now, [served] if isinstance(served, str) else served)
    args.cna_circuits_root = REPO_CIRCUITS
    roots = [circuits, *args.hot_load_dir] if circuits is not None else list(args.hot_load_dir)
    args.cna_hot_load_roots = [Path(r).resolve() for r in roots]
    return args


CPU_KV_CACHE_GIB = "4"
CPU_MAX_MODEL_LEN = 8192


def cpu_defaults(args: argparse.Namespace) -> None:
    """On a CPU-only host, size the KV cache for the model instead of reserving 92% of host memory.

    vLLM's CPU backend otherwise reserves ``gpu_memory_utilization`` (0.92) of host memory and
    fails to start when anything else holds 2 GiB. Here: a 4 GiB KV cache
    (``VLLM_CPU_KVCACHE_SPACE``) and an 8192-token context, unless the user set either.
    """
    if has_cuda():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    if args.max_model_len is None:
        args.max_model_len = CPU_MAX_MODEL_LEN


def api_tokens(args: Any) -> list[str]:
    """The server's API keys, as vLLM reads them (``--api-key`` or ``VLLM_API_KEY``)."""
    from vllm import envs

    keys = getattr(args, "api_key", None)
    keys = [keys] if isinstance(keys, str) else (keys or [envs.VLLM_API_KEY])
    return [k for k in keys if k]
