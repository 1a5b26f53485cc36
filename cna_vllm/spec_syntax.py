"""The syntax of one steering item (names, signed parts, modes, numbers) and the bounds on a spec.

:class:`~cna_vllm.steering.SteeringSpec` builds on this; every error names its ``param``
(``steering[1].multiplier``) so the server can answer with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cna_vllm.errors import SteeringError

MODES: dict[str, str] = {"scale": "multiplier", "patch": "alpha", "shift": "alpha"}
"""Each mode and the name of the number it takes."""
PART_NAMES = ("pos", "neg", "up", "down")
"""The signed parts a spec may select with ``NAME[part]`` (see :data:`cna_vllm.circuit.PARTS`)."""
MAX_NAME = 128
MAX_ABS_VALUE = 100.0
"""The engine's bound on |multiplier| and |alpha|; larger values only produce garbage or inf."""
MAX_ITEMS = 16
_PART_RE = re.compile(r"^([^\[\]]+)\[([^\[\]]*)\]$")


@dataclass(frozen=True)
class SteeringLimits:
    """Bounds on a spec: item count and |value| per number (a server may set them tighter)."""

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

    def bound(self, key: str) -> float:
        return self.max_abs_multiplier if key == "multiplier" else self.max_abs_alpha


ENGINE_LIMITS = SteeringLimits(MAX_ITEMS, MAX_ABS_VALUE, MAX_ABS_VALUE)
"""What the engine accepts from any path (the server's defaults are tighter)."""


def split_part(name: str) -> tuple[str, str | None]:
    """``"refusal[pos]"`` → ``("refusal", "pos")``; ``"refusal"`` → ``("refusal", None)``."""
    if "[" not in name and "]" not in name:
        return name, None
    m = _PART_RE.match(name)
    if not m:
        raise SteeringError(f"circuit {name!r}: expected NAME or NAME[part] with part one of {', '.join(PART_NAMES)}")
    base, part = m.group(1).strip(), m.group(2).strip()
    if part not in PART_NAMES:
        raise SteeringError(f"circuit {name!r}: unknown part {part!r}; use one of {', '.join(PART_NAMES)}")
    return base, part


def where_of(index: int, count: int) -> str:
    return "steering" if count == 1 else f"steering[{index}]"


def number(value: Any, where: str, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str) or (strict and isinstance(value, str)):
        raise SteeringError(f"invalid {where}: must be a number, got {value!r:.40}", param=where)
    try:
        out = float(value) + 0.0  # -0.0 -> 0.0: one fingerprint, row and cache namespace per value
    except ValueError:
        raise SteeringError(f"invalid {where}: must be a number, got {str(value)[:40]!r}", param=where) from None
    except OverflowError:  # an integer too large for a float
        msg = f"invalid {where}: must be a finite number, got {str(value)[:40]!r}..."
        raise SteeringError(msg, param=where) from None
    if not math.isfinite(out):
        raise SteeringError(f"invalid {where}: must be a finite number, got {value!r}", param=where)
    return out


def check_name(name: Any, where: str) -> str:
    param = f"{where}.circuit"
    problem = None
    if name is None:
        problem = "Field required: 'circuit' must be a non-empty string"
    elif not isinstance(name, str):
        problem = f"'circuit' must be a valid string, got {type(name).__name__}"
    elif not name.strip():
        problem = "'circuit' must be a non-empty string (at least 1 character)"
    elif len(name) > MAX_NAME:
        problem = f"'circuit' must have at most {MAX_NAME} characters"
    if problem:
        raise SteeringError(f"invalid {param}: {problem}", param=param)
    base, part = split_part(name.strip())
    return base if part is None else f"{base}[{part}]"


def check_mode(mode: Any, where: str) -> str:
    if mode not in MODES:
        param = f"{where}.mode"
        use = ", ".join(repr(m) for m in MODES)
        raise SteeringError(f"invalid {param}: unknown mode {mode!r:.40}; use one of {use}", param=param)
    return mode


def parse_item(item: Any, where: str, strict: bool) -> tuple[str, str, float]:
    if isinstance(item, str) and not strict:
        return parse_compact(item, where)
    if not isinstance(item, Mapping):
        raise SteeringError(
            f"invalid {where}: must be an object {{circuit, multiplier|alpha, mode}}, got {type(item).__name__}",
            param=where,
        )
    extra = sorted(set(item) - {"circuit", "mode", "multiplier", "alpha"}, key=str)
    if extra:
        raise SteeringError(
            f"invalid {where}: unknown field {extra[0]!r}; an item has circuit, mode, multiplier or alpha", param=where
        )
    name = check_name(item.get("circuit"), where)
    mode = check_mode(item.get("mode", "scale"), where)
    key = MODES[mode]
    other = "alpha" if key == "multiplier" else "multiplier"
    if item.get(other) is not None or (other in item and not strict):
        hint = " (the paper's α = 1 − m; pass the multiplier m)" if mode == "scale" else ""
        raise SteeringError(f"invalid {where}: mode {mode!r} takes {key!r}, not {other!r}{hint}", param=where)
    if item.get(key) is None:
        raise SteeringError(
            f"invalid {where}.{key}: mode {mode!r} needs {key!r}, which must be a number, got None",
            param=f"{where}.{key}",
        )
    return name, mode, number(item[key], f"{where}.{key}", strict)


def parse_compact(text: str, where: str) -> tuple[str, str, float]:
    label = f"steering {text.strip()!r}"
    name, at, rest = text.strip().partition("@")
    if not at:
        raise SteeringError(f"{label}: expected NAME@VALUE[:mode]")
    text_value, _, mode = rest.partition(":")
    mode = check_mode(mode.strip() or "scale", where)
    if not name.strip():
        raise SteeringError(f"{label}: the circuit name must be non-empty")
    try:
        value = number(text_value.strip(), f"{where}.{MODES[mode]}", strict=False)
    except SteeringError as exc:
        raise SteeringError(f"{label}: {exc}", param=where) from None
    return check_name(name, where), mode, value
