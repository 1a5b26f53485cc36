"""``/v1/circuits`` (the catalogue of circuits this server steers with) and ``POST /v1/steered-models``.

No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type.
"""

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cna_vllm.engine.worker import add_to_engine
from cna_vllm.errors import SteeringError
from cna_vllm.patches.server import engine_client, served_lora_names
from cna_vllm.server.schema import ApiError, parse_steering
from cna_vllm.server.state import ServerState, server_state

router = APIRouter()


class SteeredModelRequest(BaseModel):
    """``POST /v1/steered-models`` body: a variant name and its spec (any form of ``steering``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    steering: Any


class HotLoadRequest(BaseModel):
    """``POST /v1/circuits`` body: an absolute path on the server to a circuit file."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096)


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _state(request: Request) -> ServerState:
    state = server_state(request.app)
    if state is None:
        raise ApiError("this server has no steering engine", status=503, param=None, code="steering_unavailable")
    return state


@router.get("/v1/circuits")
async def list_circuits(request: Request) -> JSONResponse:
    try:
        state = _state(request)
    except ApiError as err:
        return _error(err)
    out = state.catalog.listing()
    out["model"] = state.catalog.model_name
    out["max_steering_configs"] = state.catalog.capacity
    out["limits"] = {
        "max_items": state.limits.max_items,
        "max_abs_multiplier": state.limits.max_abs_multiplier,
        "max_abs_alpha": state.limits.max_abs_alpha,
    }
    return JSONResponse(out)


@router.get("/v1/circuits/{name}")
async def get_circuit(name: str, request: Request) -> JSONResponse:
    try:
        state = _state(request)
        if name not in state.catalog.circuits:
            known = ", ".join(sorted(state.catalog.circuits)) or "none loaded"
            raise ApiError(
                f"unknown circuit {name!r}; circuits: {known}", status=404, param="name", code="unknown_circuit"
            )
        return JSONResponse(state.catalog.describe(name))
    except ApiError as err:
        return _error(err)


def _check_hot_load(state: ServerState, what: str) -> None:
    if not state.hot_load_enabled:
        raise ApiError(
            f"{what} while serving is off; start the server with --enable-hot-load",
            status=403,
            param=None,
            code="hot_load_not_enabled",
        )


async def _admin_request(request: Request, model: type[BaseModel], what: str) -> tuple[ServerState, Any]:
    """``(server state, validated body)`` for an admin route behind ``--enable-hot-load``."""
    state = _state(request)
    try:
        body = model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _body_error(exc) from None
    _check_hot_load(state, what)
    return state, body


def _body_error(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return ApiError(f"invalid request: {param or 'body'}: {first['msg']}", param=param, code="invalid_request")


@router.post("/v1/steered-models")
async def add_steered_model(request: Request) -> JSONResponse:
    """Add a steered variant (``model=NAME`` -> base model + spec) to the running server."""
    try:
        state, body = await _admin_request(request, SteeredModelRequest, "adding steered models")
        if body.steering is None:
            raise ApiError("a steered model needs a non-empty steering spec", code="invalid_steering")
        spec = parse_steering(body.steering, state.limits, state.catalog.catalogue)
        variants = state.variants
        old = variants.get(body.name)
        if old is not None and old.spec != spec:
            raise ApiError(
                f"a steered model named {body.name!r} already exists with steering {old.spec}",
                param="name",
                code="model_exists",
            )
        taken = {*variants.reserved, *served_lora_names(request.app)} - ({body.name} if old else set())
        if body.name in taken:
            raise ApiError(
                f"{body.name!r} is the name of a model this server already serves (base model or LoRA adapter)",
                param="name",
                code="model_exists",
            )
        try:
            variant, added = variants.add(body.name, spec, taken)
        except SteeringError as exc:
            raise ApiError(str(exc), param="name", code="invalid_model_name") from None
        listing = {"status": "created" if added else "already_exists", **variant.card({}, variants.base)}
        return JSONResponse(listing, status_code=201 if added else 200)
    except ApiError as err:
        return _error(err)


@router.post("/v1/circuits")
async def load_circuit(request: Request) -> JSONResponse:
    """Add a server-side circuit file (neuron circuit or CAA vectors) to the running engine."""
    try:
        state, body = await _admin_request(request, HotLoadRequest, "loading circuits")
        async with state.hot_load_lock:
            circuit, entry, loaded = await asyncio.to_thread(  # file I/O off the event loop
                state.catalog.check_hot_load, body.path, state.hot_load_roots
            )
            if loaded:
                return JSONResponse({"status": "already_loaded", **state.catalog.describe(circuit.name)})
            if not state.catalog.hot_load_neurons:
                raise ApiError(
                    "this server was started with --hot-load-neurons 0, so it has no room for new circuits; "
                    "restart it with a reserve, or with --circuits pointing at a directory that holds this one",
                    status=409,
                    param="path",
                    code="hot_load_disabled",
                )
            try:
                await add_to_engine(engine_client(request.app), circuit.name, entry, circuit)
            except SteeringError as exc:
                raise ApiError(str(exc), status=409, param="path", code="hot_load_refused") from None
            state.catalog.add(circuit.name, circuit, entry)
        state.metrics.circuits_loaded.set(len(state.catalog.circuits))
        return JSONResponse({"status": "loaded", **state.catalog.describe(circuit.name)}, status_code=201)
    except ApiError as err:
        return _error(err)
