"""With an API key, every route that runs the model or reveals its state needs it (issue #9).

vLLM's ``AuthenticationMiddleware`` guards only ``/v1``, ``/v2``, ``/inference`` and
``/cohere``: ``/invocations`` (the SageMaker route) served a full completion without a key,
and ``/tokenize``, ``/detokenize`` and ``/metrics`` were open. This subclass (same token
check, same 401 body) guards every path except the liveness probes and the playground page,
which asks for the key itself.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

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


def api_tokens(args: Any) -> list[str]:
    """The server's API keys, as vLLM reads them (``--api-key`` or ``VLLM_API_KEY``)."""
    from vllm import envs

    keys = getattr(args, "api_key", None)
    keys = [keys] if isinstance(keys, str) else (keys or [envs.VLLM_API_KEY])
    return [k for k in keys if k]
