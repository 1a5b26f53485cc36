"""Server patches S2-S4: the middleware stack, authentication and vLLM's app state.

See :mod:`cna_vllm.patches` for the inventory (why / how / upstream / when each can go).
Pinned to vllm 0.32.0.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware


# --------------------------------------------------------------------------- S2
def add_middleware(app: Any, inner: Middleware, outer: Middleware | None = None) -> None:
    """S2: add ``inner`` innermost and ``outer`` before every middleware added so far.

    Called from ``attach_router``, i.e. inside vLLM's ``build_app`` before it adds CORS and
    authentication (which then wrap both), or on an app it already built (stack rebuilt).
    """
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
