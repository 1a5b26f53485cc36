"""Server patches S1-S4: start-up, the middleware stack, authentication and vLLM's app state.

See :mod:`cna_vllm.patches` for the inventory (why / how / upstream / when each can go).
Pinned to vllm 0.32.0.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

logger = logging.getLogger("cna_vllm.server.app")


# --------------------------------------------------------------------------- S1
async def run_server(args: Any, plugin: Any, **uvicorn_kwargs: Any) -> None:
    """S1: vLLM's single-process ``run_server``, with ``plugin`` attached between build and init."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
    from vllm.envs import VLLM_HTTP_TIMEOUT_KEEP_ALIVE

    def _interrupt_init(*_: Any) -> None:
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = setup_server(args, reuse_port=False)
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        uvicorn_kwargs["log_config"] = log_config
    async with build_async_engine_client(args) as engine_client:
        supported_tasks = await engine_client.get_supported_tasks()
        app = build_app(args, supported_tasks, engine_client.model_config)
        plugin.attach_router(app)
        await init_app_state(engine_client, app.state, args, supported_tasks)
        await plugin.init_state(engine_client, app.state, args)
        logger.info("cna-vllm server on %s", listen_address)
        shutdown_task = await serve_http(
            app,
            sock=sock,
            enable_ssl_refresh=args.enable_ssl_refresh,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
            **uvicorn_kwargs,
        )
    try:
        await shutdown_task
    finally:
        sock.close()


# --------------------------------------------------------------------------- S2
def add_middleware(app: Any, inner: Middleware, outer: Middleware | None = None) -> None:
    """S2: add ``inner`` innermost and ``outer`` outermost to an app ``build_app`` already built."""
    app.user_middleware.append(inner)
    if outer is not None:
        app.user_middleware.insert(0, outer)
    if app.middleware_stack is not None:  # build_app's SageMaker bootstrap already built it
        app.middleware_stack = app.build_middleware_stack()


# --------------------------------------------------------------------------- S3
OPEN_PATHS = ("/health", "/ping", "/version", "/playground")
"""Paths (and their sub-paths) served without a key."""


def is_open(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPEN_PATHS)


class GuardEveryRoute(AuthenticationMiddleware):
    """vLLM's bearer-token check on every path but :data:`OPEN_PATHS`."""

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        if not is_open(path) and not self.verify_token(Headers(scope=scope)):
            return JSONResponse(content={"error": "Unauthorized"}, status_code=401)(scope, receive, send)
        return self.app(scope, receive, send)


# --------------------------------------------------------------------------- S4
def engine_client(app: Any) -> Any:
    """S4: the engine client vLLM's ``init_app_state`` keeps in ``app.state.engine_client``."""
    return app.state.engine_client


def served_lora_names(app: Any) -> set[str]:
    """S4: the LoRA adapters vLLM serves now (also those loaded at run time), from its app state."""
    models = getattr(app.state, "openai_serving_models", None)
    return set(getattr(models, "lora_requests", None) or {})
