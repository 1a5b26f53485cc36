"""The HTTP ``steering`` field: a pydantic model, configurable limits and OpenAI-style errors.

Accepted shapes of ``steering`` in a request body:

- one item ``{"circuit": "refusal", "multiplier": 0.0}`` (``mode`` defaults to ``scale``),
- a non-empty list of items, applied in order,
- the compact string ``"refusal@0.0"`` / ``"refusal@0.5:patch,other@2"``,
- ``null`` (same as leaving the field out: not steered).

``scale`` takes ``multiplier``; ``patch`` and ``shift`` take ``alpha`` (see
:mod:`cna_vllm.steering`). Everything else is an :class:`ApiError` (HTTP 400).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from cna_vllm.errors import SteeringError
from cna_vllm.steering import MAX_ABS_VALUE, MAX_ITEMS, MODES, SteeringSpec, split_part


def _finite(value: Any) -> float:
    """A JSON number (not a bool or a string) that is finite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {type(value).__name__} {value!r:.40}")
    try:
        out = float(value)
    except OverflowError:  # a JSON integer too large for a float
        raise ValueError(f"must be a finite number, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(out):
        raise ValueError(f"must be a finite number, got {value!r}")
    return out + 0.0  # -0.0 -> 0.0: one fingerprint per value


Number = Annotated[float, BeforeValidator(_finite)]


class ApiError(Exception):
    """An error answered as OpenAI-style JSON ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = "steering",
        code: str = "invalid_steering",
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SteeringItemModel(BaseModel):
    """One item: a circuit under one mode, with its number."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    circuit: str = Field(min_length=1, max_length=128)
    mode: Literal["scale", "patch", "shift"] = "scale"
    multiplier: Number | None = None
    alpha: Number | None = None


SteeringField = SteeringItemModel | list[SteeringItemModel] | str | None
_ADAPTER: TypeAdapter[Any] = TypeAdapter(SteeringField)


@dataclass(frozen=True)
class SteeringLimits:
    """Server-side bounds (each at most the engine's own :data:`MAX_ABS_VALUE` / :data:`MAX_ITEMS`)."""

    max_items: int = 8
    max_abs_multiplier: float = 20.0
    max_abs_alpha: float = 20.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_items <= MAX_ITEMS:
            raise ValueError(f"max_items must lie in [1, {MAX_ITEMS}], got {self.max_items}")
        for name in ("max_abs_multiplier", "max_abs_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 < value <= MAX_ABS_VALUE):
                raise ValueError(f"{name} must lie in (0, {MAX_ABS_VALUE:g}], got {value}")


def _loc(loc: tuple[Any, ...]) -> str:
    """Turn a pydantic location into ``steering[1].multiplier`` (dropping union branch tags)."""
    out = "steering"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in SteeringItemModel.model_fields:
            out += f".{part}"
    return out


def _pydantic_message(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False)
    # A union reports one error per branch; the most specific (deepest) one is the useful one.
    fields = SteeringItemModel.model_fields
    best = max(errors, key=lambda e: sum(1 for p in e["loc"] if isinstance(p, int) or p in fields))
    where = _loc(best["loc"])
    msg = best["msg"].removeprefix("Value error, ")
    if best["type"] == "extra_forbidden":
        msg = f"unknown field {best['loc'][-1]!r}; an item has circuit, mode, multiplier or alpha"
    elif best["type"] in ("model_type", "model_attributes_type", "dict_type") and where != "steering":
        msg = f"must be an object {{circuit, multiplier|alpha, mode}}, got {type(best.get('input')).__name__}"
    if best["type"].startswith(("model_type", "list_type", "string_type", "dict_type")) and where == "steering":
        msg = (
            "steering must be an object {circuit, multiplier|alpha, mode}, a list of such objects, "
            f"or a string 'NAME@VALUE[:mode]'; got {type(best.get('input')).__name__}"
        )
    return ApiError(f"invalid {where}: {msg}", param=where)


def parse_steering(
    raw: Any,
    limits: SteeringLimits,
    circuits: Mapping[str, Any],
    *,
    foreign: Mapping[str, str] | None = None,
) -> SteeringSpec:
    """Validate the raw JSON ``steering`` value into a :class:`SteeringSpec` (empty if ``null``).

    ``circuits`` are the names this server steers; ``foreign`` maps circuit names known
    only for other models to that model, for a better message.
    """
    if isinstance(raw, bool | int | float):  # the union would not name the type clearly
        raise ApiError(
            "steering must be an object {circuit, multiplier|alpha, mode}, a list of such objects, "
            f"or a string 'NAME@VALUE[:mode]'; got {type(raw).__name__}"
        )
    try:
        value = _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise _pydantic_message(exc) from None
    if value is None:
        return SteeringSpec()
    if isinstance(value, str):
        if not value.strip():
            raise ApiError("steering is an empty string; leave the field out for no steering")
        if value.strip()[0] in "[{":
            raise ApiError("steering must be JSON, not a string holding JSON")
        try:
            spec = SteeringSpec.parse(value)
        except SteeringError as exc:
            raise ApiError(str(exc)) from None
    else:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ApiError("steering is an empty list; leave the field out for no steering")
        dicts = []
        for i, item in enumerate(items):
            key = MODES[item.mode]
            other = "alpha" if key == "multiplier" else "multiplier"
            where = f"steering[{i}]" if isinstance(value, list) else "steering"
            if getattr(item, other) is not None:
                raise ApiError(f"invalid {where}: mode {item.mode!r} takes {key!r}, not {other!r}", param=where)
            if getattr(item, key) is None:
                raise ApiError(f"invalid {where}: mode {item.mode!r} needs {key!r}", param=f"{where}.{key}")
            bound = limits.max_abs_multiplier if key == "multiplier" else limits.max_abs_alpha
            if abs(getattr(item, key)) > bound:
                raise ApiError(
                    f"invalid {where}.{key}: {getattr(item, key):g} is out of bounds; "
                    f"it must lie in [-{bound:g}, {bound:g}]",
                    param=f"{where}.{key}",
                )
            dicts.append({"circuit": item.circuit, "mode": item.mode, key: getattr(item, key)})
        if len(dicts) > limits.max_items:
            raise ApiError(f"steering has {len(dicts)} items; this server allows at most {limits.max_items}")
        try:
            spec = SteeringSpec.parse(dicts)
        except SteeringError as exc:
            raise ApiError(str(exc)) from None
    _check_limits(spec, limits)
    for i, item in enumerate(spec.items):
        base = split_part(item.circuit)[0]  # NAME[part] names a signed part of circuit NAME
        if base not in circuits:
            param = f"steering[{i}].circuit" if len(spec) > 1 else "steering.circuit"
            known = ", ".join(sorted(circuits)) or "none loaded"
            if foreign and base in foreign:
                raise ApiError(
                    f"circuit {base!r} belongs to model {foreign[base]!r}, not to the model "
                    f"this server runs; circuits for this model: {known}",
                    param=param,
                    code="circuit_model_mismatch",
                )
            raise ApiError(
                f"unknown circuit {base!r}; circuits for this model: {known}",
                param=param,
                code="unknown_circuit",
            )
    try:
        spec.validate(circuits)  # the modes each kind takes (CAA vectors: shift only)
    except SteeringError as exc:
        raise ApiError(str(exc), param="steering") from None
    return spec


def _check_limits(spec: SteeringSpec, limits: SteeringLimits) -> None:
    if len(spec) > limits.max_items:
        raise ApiError(f"steering has {len(spec)} items; this server allows at most {limits.max_items}")
    for i, item in enumerate(spec.items):
        key = MODES[item.mode]
        bound = limits.max_abs_multiplier if key == "multiplier" else limits.max_abs_alpha
        if abs(item.value) > bound:
            where = f"steering[{i}].{key}" if len(spec) > 1 else f"steering.{key}"
            raise ApiError(
                f"invalid {where}: {item.value:g} is out of bounds; it must lie in [-{bound:g}, {bound:g}]",
                param=where,
            )


def echo(spec: SteeringSpec) -> str:
    """The ``x-cna-steering`` header value: the compact form, or ``none``."""
    return str(spec) if spec else "none"
