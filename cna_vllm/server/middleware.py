"""Pure ASGI middleware that turns the ``steering`` field into vLLM's own request fields.

For ``POST /v1/chat/completions`` and ``/v1/completions`` it reads the JSON body, parses
and validates ``steering`` against the engine's catalogue (:func:`~cna_vllm.server.schema.parse_steering`),
and rewrites it into ``vllm_xargs={"steering": <wire form>}``. It is the HTTP edge, not the
safety boundary: intake (:mod:`cna_vllm.engine.intake`) checks every request on every route,
finding this spec already parsed and validated in this process, and the scheduler caps
distinct specs (:mod:`cna_vllm.engine.admission`).
The rewritten request then goes to vLLM's stock handler, so chat templates, streaming,
stop strings, logprobs and disconnect-aborts are vLLM's. A response that was served carries
``x-cna-steering`` (compact spec or ``none``) and ``x-cna-steering-fingerprint``; an error carries
neither.

``model`` naming a steered variant (:mod:`cna_vllm.server.variants`) is rewritten to the
base model plus the variant's spec (then the ``steering`` field's items, validated as one),
and the response names the variant again; ``GET /v1/models`` gets a card per variant.
Unknown model names pass through untouched, so vLLM answers them with its own 404.

A steering request is never answered unsteered (:mod:`cna_vllm.server.guards`): ``steering``
on any other route, in any other place of the body (``Steering``, ``messages[0].steering``,
``metadata``...), in a query parameter or a header, or with an option under which vLLM drops it
(``use_beam_search``) is a 400. Every POST body is capped (413, uploads excepted) and nested at
most :data:`~cna_vllm.server.guards.MAX_JSON_DEPTH` levels; the admin routes take JSON only (415).
A request with a new distinct spec waits while all ``max_steering_configs`` engine rows are
taken (the worker would refuse it); a client that leaves while it waits leaves the queue.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cna_vllm.engine.admission import AdmissionRefused
from cna_vllm.errors import SteeringError
from cna_vllm.server.asgi import BodyTooLarge, read_body, renaming, replay, send_error, until_disconnect, with_length
from cna_vllm.server.guards import check_body, check_query_and_headers, check_supported_options
from cna_vllm.server.schema import ApiError, echo, parse_steering
from cna_vllm.server.state import ServerState, server_state
from cna_vllm.server.variants import Variant
from cna_vllm.steering import SteeringSpec, check_user_salt

STEERED_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
MODELS_PATH = "/v1/models"
VARIANTS_PATH = "/v1/steered-models"
ADMIN_PATHS = frozenset({VARIANTS_PATH, "/v1/circuits"})
"""Routes that change the server (behind --enable-hot-load): JSON bodies only."""
STEERING_FIELD = frozenset({"steering"})
"""Where a body may carry steering: the top-level field."""
ECHO_HEADER = "x-cna-steering"
FINGERPRINT_HEADER = "x-cna-steering-fingerprint"
VARIANT_HEADER = "x-cna-steered-model"


class SteeringMiddleware:
    """See the module docstring. State lives in ``app.state.cna_steering`` (a :class:`ServerState`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        if scope.get("method") == "GET" and path == MODELS_PATH:
            await self._list_models(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        endpoint = STEERED_PATHS.get(path)
        state = server_state(scope["app"])
        content_type = Headers(scope=scope).get("content-type", "").lower()
        try:
            check_query_and_headers(scope)
            if path in ADMIN_PATHS and "application/json" not in content_type:
                raise ApiError(
                    f"{path} takes a JSON body: send it with Content-Type: application/json",
                    status=415,
                    param=None,
                    code="unsupported_media_type",
                )
        except ApiError as err:
            await self._refuse(send, err, state)
            return
        if "json" not in content_type and "multipart/form-data" in content_type:
            await self.app(scope, receive, send)  # uploads: vLLM caps their size itself
            return
        limit = state.max_request_bytes if state else 4 << 20
        try:
            body, gone = await read_body(receive, limit)
        except BodyTooLarge:
            err = ApiError(f"request body exceeds {limit} bytes", status=413, param=None, code="request_too_large")
            await self._refuse(send, err, state)
            return
        if gone:
            return
        if "json" not in content_type:
            await self.app(scope, replay(body, receive), send)  # vLLM refuses non-JSON bodies
            return
        try:
            data = json.loads(body) if body else None
        except RecursionError:
            await self._refuse(send, ApiError("request body is nested too deeply", param=None, code="invalid_json"))
            return
        except ValueError:
            data = None  # not JSON: vLLM answers it
        try:
            if endpoint is None and path not in ADMIN_PATHS:
                _refuse_elsewhere(data, path)
            check_body(body, data, STEERING_FIELD if endpoint or path == VARIANTS_PATH else frozenset())
        except ApiError as err:
            await self._refuse(send, err, state)
            return
        if not isinstance(data, dict) or endpoint is None:
            await self.app(scope, replay(body, receive), send)
            return
        try:
            if state is None:
                raise ApiError("this server has no steering engine", status=503, code="steering_unavailable")
            variant = state.variants.get(data.get("model"))
            spec = self._rewrite(data, state, variant)
        except ApiError as err:
            await self._refuse(send, err, state)
            return
        await self._forward(scope, receive, send, data, spec, state, endpoint, variant)

    @staticmethod
    async def _refuse(send: Send, err: ApiError, state: ServerState | None = None) -> None:
        if state:
            state.metrics.rejected.labels(err.code).inc()
        await send_error(send, err)

    async def _list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        """vLLM's ``/v1/models`` with a card per steered variant appended."""
        state = server_state(scope["app"])
        if state is None or not len(state.variants):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        if start is None:
            return
        body = b"".join(chunks)
        if start["status"] == 200:
            with contextlib.suppress(ValueError, AttributeError):  # not the listing we know: left as it is
                body = json.dumps(state.variants.list_cards(json.loads(body)), separators=(",", ":")).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    @staticmethod
    def _rewrite(data: dict[str, Any], state: ServerState, variant: Variant | None = None) -> SteeringSpec:
        xargs = data.get("vllm_xargs")
        if isinstance(xargs, dict) and "steering" in xargs:
            raise ApiError(
                "pass steering in the top-level 'steering' field, not in vllm_xargs",
                param="vllm_xargs.steering",
            )
        try:  # intake refuses it on every path; here HTTP clients get a 400 with its own code
            check_user_salt(data.get("cache_salt"))
        except SteeringError as exc:
            raise ApiError.of(exc) from None
        raw = data.pop("steering", None)
        if variant is not None:  # the variant's items, then the field's, validated as one
            spec = state.variants.combine(variant, raw, state.limits, state.catalog.catalogue)
            data["model"] = state.variants.base
        else:
            spec = parse_steering(raw, state.limits, state.catalog.catalogue)
        if spec:
            check_supported_options(data)
            xargs = dict(xargs) if isinstance(xargs, dict) else {}
            xargs["steering"] = spec.to_wire()
            data["vllm_xargs"] = xargs  # intake (engine/intake.py) salts it, for every path
        return spec

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        data: dict,
        spec: SteeringSpec,
        state: ServerState,
        endpoint: str,
        variant: Variant | None = None,
    ) -> None:
        m = state.metrics
        m.requests.labels(endpoint, "true" if spec else "false").inc()
        for item in spec.items:
            m.items.labels(item.circuit, item.mode).inc()
        extra = [
            (ECHO_HEADER.encode(), echo(spec).encode()),
            (FINGERPRINT_HEADER.encode(), spec.fingerprint().encode()),
        ]
        if variant is not None:
            m.variants.labels(variant.name).inc()
            extra.append((VARIANT_HEADER.encode(), variant.name.encode()))
            send = renaming(send, state.variants.base, variant.name)

        async def send_with_echo(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status", 200) < 400:
                message = {**message, "headers": [*message.get("headers", []), *extra]}  # served: echo
            await send(message)

        body = json.dumps(data).encode()
        if spec:
            m.waiting.inc()
            start = time.perf_counter()
            try:
                receive, gone = await until_disconnect(state.gate.acquire(spec), receive)
                if gone:  # the client left while queued: its place is freed, nothing is answered
                    m.rejected.labels("client_disconnected").inc()
                    return
                m.row_wait.observe(time.perf_counter() - start)
            except AdmissionRefused as exc:
                m.rejected.labels(exc.code).inc()
                err = ApiError(str(exc), status=exc.status, param=None, code=exc.code)
                await send_error(send, err, [(b"retry-after", str(exc.retry_after).encode())])
                return
            finally:
                m.waiting.dec()
            m.rows_in_use.set(len(state.gate.active))
        try:
            await self.app(with_length(scope, len(body)), replay(body, receive), send_with_echo)
        finally:
            if spec:
                await state.gate.release(spec)
                m.rows_in_use.set(len(state.gate.active))


def _smuggled(data: Any, depth: int = 0) -> bool:
    """Whether ``steering`` sits in any ``vllm_xargs`` / ``extra_args`` object (e.g. nested sampling params)."""
    if depth > 8:
        return False
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("vllm_xargs", "extra_args") and isinstance(value, dict) and "steering" in value:
                return True
            if isinstance(value, dict | list) and _smuggled(value, depth + 1):
                return True
    elif isinstance(data, list):
        return any(_smuggled(v, depth + 1) for v in data[:1024])
    return False


def _refuse_elsewhere(data: Any, path: str) -> None:
    if isinstance(data, dict) and ("steering" in data or _smuggled(data)):
        raise ApiError(
            f"steering is supported on /v1/chat/completions and /v1/completions, not on {path}",
            code="steering_unsupported_endpoint",
        )
