"""``cna-vllm serve``: vLLM's OpenAI API server with the steering layer attached.

Start-up only (the flags are :mod:`cna_vllm.server.args`). It reuses vLLM's own pieces (arg
parser, engine client, ``build_app``, ``init_app_state``, ``serve_http``); the only additions
are the engine keyword arguments of
:func:`cna_vllm.engine.config.engine_kwargs` (Steered* architecture, circuits, logits
processor) and :class:`SteeringEndpointPlugin` (``/v1/circuits`` plus the steering
middleware). The plugin also satisfies vLLM's ``vllm.endpoint_plugins`` protocol, so a
plain ``vllm serve`` with ``VLLM_PLUGINS=cna_vllm`` and the same engine arguments gets it
when the entry point is registered.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from cna_vllm.engine.admission import SpecGate
from cna_vllm.engine.config import CONFIG_KEY
from cna_vllm.server.args import (
    DEFAULT_MAX_WAITING,
    DEFAULT_WAIT_TIMEOUT,
    api_tokens,
    limits_of,
    lora_names,
    make_parser,
    prepare_args,
)
from cna_vllm.server.catalog import Catalog
from cna_vllm.server.metrics import metrics
from cna_vllm.server.state import DEFAULT_MAX_REQUEST_BYTES, ServerState
from cna_vllm.server.variants import Variants, validate_spec
from cna_vllm.sources import REPO_CIRCUITS

logger = logging.getLogger(__name__)
class SteeringEndpointPlugin:
    """A ``vllm.endpoint_plugins`` plugin: steering middleware + ``/v1/circuits``."""

    name = "cna_vllm"
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        from starlette.middleware import Middleware

        from cna_vllm.server.middleware import SteeringMiddleware
        from cna_vllm.server.routes import router

        if getattr(app.state, "cna_attached", False):
            return
        args = getattr(app.state, "args", None)
        if CONFIG_KEY not in (getattr(args, "additional_config", None) or {}):
            logger.warning("cna-vllm endpoint plugin: no %r in additional_config; not attaching", CONFIG_KEY)
            return
        app.include_router(router)
        if not getattr(args, "no_playground", False):  # playground hook (issue #12): GET /playground
            from cna_vllm.server.playground import router as playground_router

            app.include_router(playground_router)
        from cna_vllm.patches.server import GuardEveryRoute, add_middleware

        # Innermost: vLLM's authentication (and CORS) run before any steering validation;
        # outermost, with a key: no route that runs the model is open.
        tokens = api_tokens(args)
        guard = Middleware(GuardEveryRoute, tokens=tokens) if tokens else None
        add_middleware(app, Middleware(SteeringMiddleware), guard)
        app.state.cna_attached = True

    async def init_state(self, engine_client: Any, state: Any, args: argparse.Namespace) -> None:
        if engine_client is None or getattr(state, "cna_steering", None) is not None:
            return
        if CONFIG_KEY not in (getattr(args, "additional_config", None) or {}):
            return
        names = getattr(args, "served_model_name", None) or [args.model]
        catalog = Catalog.from_engine(
            engine_client.vllm_config, names[0], getattr(args, "cna_circuits_root", REPO_CIRCUITS)
        )
        m = metrics()
        m.rows_capacity.set(catalog.capacity)
        m.circuits_loaded.set(len(catalog.circuits))
        limits = limits_of(args)
        variants = Variants(names[0], frozenset([*names, *lora_names(args)]))
        for name, raw in getattr(args, "cna_steered_models", ()):  # checked at start-up (prepare_args)
            variants.add(name, validate_spec(raw, limits, catalog.catalogue, f"--steered-model {name}"))
        state.cna_steering = ServerState(
            catalog=catalog,
            limits=limits,
            gate=SpecGate(
                catalog.capacity,
                max_waiting=getattr(args, "steering_max_waiting", DEFAULT_MAX_WAITING),
                wait_timeout=getattr(args, "steering_wait_timeout", DEFAULT_WAIT_TIMEOUT) or None,
            ),
            metrics=m,
            max_request_bytes=getattr(args, "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
            hot_load_enabled=bool(getattr(args, "enable_hot_load", False)),
            hot_load_roots=tuple(getattr(args, "cna_hot_load_roots", ())),
            variants=variants,
        )
        logger.info(
            "cna-vllm steering: %d circuit(s) %s, %d rows, steered models %s",
            len(catalog.circuits),
            sorted(catalog.circuits),
            catalog.capacity,
            {v.name: str(v.spec) for v in variants.by_name.values()},
        )


PLUGIN_NAME = "cna_vllm"
"""The name of both entry points (``vllm.general_plugins`` and ``vllm.endpoint_plugins``)."""
_PLUGIN_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.io_processor_plugins",
                  "vllm.stat_logger_plugins", "vllm.logits_processors")  # fmt: skip
"""The groups vLLM loads in full while ``VLLM_PLUGINS`` is unset."""


def allow_plugin(env: dict[str, str] | None = None) -> str:
    """Name cna-vllm in ``VLLM_PLUGINS``, so that vLLM attaches its endpoint plugin in every API server.

    vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them; setting the variable
    also limits every other plugin group to the names it lists, so an unset variable becomes
    every plugin vLLM would have loaded anyway, plus this one. Returns the new value.
    """
    from importlib.metadata import entry_points

    env = os.environ if env is None else env
    if env.get("VLLM_PLUGINS") is None:
        names = {ep.name for group in _PLUGIN_GROUPS for ep in entry_points(group=group)}
    else:
        names = {n.strip() for n in env["VLLM_PLUGINS"].split(",") if n.strip()}
    env["VLLM_PLUGINS"] = ",".join(sorted(names | {PLUGIN_NAME}))
    return env["VLLM_PLUGINS"]


def check_scale_out(args: argparse.Namespace) -> None:
    """Refuse what several API-server processes cannot share: run-time additions to one process's catalogue."""
    from cna_vllm.errors import SteeringError

    servers = args.api_server_count if args.api_server_count is not None else (args.data_parallel_size or 1)
    if servers > 1 and args.enable_hot_load:
        raise SteeringError(
            f"--enable-hot-load needs one API server (this start has {servers}): POST /v1/circuits and "
            "/v1/steered-models change only the process that answers them. Put the circuits in --circuits "
            "and the variants in --steered-model, or run replicas of one API server each behind a router"
        )


def main(argv: list[str] | None = None) -> int:
    """Parse vLLM's and cna-vllm's flags, prepare the steered engine and serve with vLLM's own ``serve``.

    vLLM's ``serve`` command starts one API server, several (``--api-server-count``) or data-parallel
    engines (``--data-parallel-size``); each API server attaches :class:`SteeringEndpointPlugin`
    through ``vllm.endpoint_plugins`` and each engine admits its own steered requests in its scheduler.
    """
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    from cna_vllm.errors import CnaError

    allow_plugin()
    cli_env_setup()
    args = make_parser().parse_args(argv)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    if args.headless or args.grpc:
        print("cna-vllm serve: --headless and --grpc are not supported", flush=True)
        return 2
    try:
        check_scale_out(args)
        prepare_args(args)
    except (CnaError, ValueError) as exc:
        print(f"cna-vllm serve: error: {exc}", flush=True)
        return 2
    ServeSubcommand.cmd(args)
    return 0
