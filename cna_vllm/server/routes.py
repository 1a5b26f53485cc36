"""``/v1/circuits``: the catalogue of circuits this server steers with.

No ``from __future__ import annotations`` here: FastAPI must see the real ``Request`` type.
"""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cna_vllm.server.schema import ApiError

router = APIRouter()


class HotLoadRequest(BaseModel):
    """``POST /v1/circuits`` body: an absolute path on the server to a circuit file."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096)


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _state(request: Request) -> Any:
    state = getattr(request.app.state, "cna_steering", None)
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


@router.post("/v1/circuits")
async def load_circuit(request: Request) -> JSONResponse:
    """Validate a server-side circuit file; loading a new one needs an engine restart (501)."""
    try:
        state = _state(request)
        try:
            body = HotLoadRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(
                f"invalid request: {param or 'body'}: {first['msg']}", param=param, code="invalid_request"
            ) from None
        circuit, loaded = state.catalog.check_hot_load(body.path)
        if loaded:
            return JSONResponse({"status": "already_loaded", **state.catalog.describe(circuit.name)})
        raise ApiError(
            f"circuit {circuit.name!r} is valid for this model, but this engine cannot add circuits "
            "while running (its steering table is sized at start-up); restart the server with "
            "--circuits pointing at a directory that holds it",
            status=501,
            param="path",
            code="hot_load_not_supported",
            type="not_implemented_error",
        )
    except ApiError as err:
        return _error(err)
