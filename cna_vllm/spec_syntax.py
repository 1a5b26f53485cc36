"""The syntax of one steering item (names, signed parts, modes, numbers) and the bounds on a spec.

:class:`~cna_vllm.steering.SteeringSpec` builds on this; every error names its ``param``
(``steering[1].multiplier``) so the server can answer with it.

The grammar is strict and ASCII-only (sizes are checked before anything is parsed)::

    spec    := item ("," item)*                      at most MAX_COMPACT characters
    item    := SP* name SP* "@" SP* number SP* (":" SP* mode SP*)?
    name    := base ("[" part "]")?
    base    := [A-Za-z0-9][A-Za-z0-9._-]{0,127}
    number  := a JSON number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?
    SP      := " "

A ``circuit`` in the object form follows ``name``, and a number given as a string (accepted
outside the strict HTTP form) follows ``number``. No other character is accepted: no control
characters, no ``_`` inside numbers, no non-ASCII digits.
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
MAX_COMPACT = 4096
"""The longest compact string accepted (checked before it is parsed)."""
MAX_JSON_TEXT = 4 * MAX_COMPACT
"""The longest string accepted as a spec (JSON text, outside the strict HTTP form); checked before parsing."""
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A source's name: ASCII letters, digits, ``.``, ``_`` and ``-``, at most :data:`MAX_NAME` characters."""
NUMBER_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
"""A JSON number."""
_PART_RE = re.compile(r"([^\[\]]+)\[([^\[\]]*)\]")


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
    m = _PART_RE.fullmatch(name)
    if not m:
        parts = ", ".join(PART_NAMES)
        raise SteeringError(f"circuit {name!r:.60}: expected NAME or NAME[part] with part one of {parts}")
    base, part = m.group(1), m.group(2).strip(" ")
    if part not in PART_NAMES:
        raise SteeringError(f"circuit {name!r:.60}: unknown part {part!r:.20}; use one of {', '.join(PART_NAMES)}")
    return base, part


def where_of(index: int, count: int) -> str:
    return "steering" if count == 1 else f"steering[{index}]"


def number(value: Any, where: str, strict: bool) -> float:
    """A finite float from a JSON number (or, unless ``strict``, a string holding one)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str) or (strict and isinstance(value, str)):
        raise SteeringError(f"invalid {where}: must be a number, got {value!r:.40}", param=where)
    if isinstance(value, str):
        if value.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise SteeringError(f"invalid {where}: must be a finite number, got {value!r:.40}", param=where)
        if not NUMBER_RE.fullmatch(value):
            raise SteeringError(
                f"invalid {where}: must be a number, got {value!r:.40} (a JSON number such as 0.5)", param=where
            )
    try:
        out = float(value) + 0.0  # -0.0 -> 0.0: one fingerprint, row and cache namespace per value
    except OverflowError:  # an integer too large for a float
        msg = f"invalid {where}: must be a finite number, got {str(value)[:40]!r}..."
        raise SteeringError(msg, param=where) from None
    if not math.isfinite(out):
        raise SteeringError(f"invalid {where}: must be a finite number, got {value!r:.40}", param=where)
    return out


def check_name(name: Any, where: str) -> str:
    """``name`` if it is ``NAME`` or ``NAME[part]`` by the grammar (see the module docstring)."""
    param = f"{where}.circuit"
    problem = None
    if name is None:
        problem = "Field required: 'circuit' must be a non-empty string"
    elif not isinstance(name, str):
        problem = f"'circuit' must be a valid string, got {type(name).__name__}"
    elif not name:
        problem = "'circuit' must be a non-empty string (at least 1 character)"
    elif len(name) > MAX_NAME + 8:
        problem = f"'circuit' must have at most {MAX_NAME} characters (plus a [part])"
    if problem:
        raise SteeringError(f"invalid {param}: {problem}", param=param)
    try:
        base, part = split_part(name)
    except SteeringError as exc:
        raise SteeringError(f"invalid {param}: {exc}", param=param) from None
    if not NAME_RE.fullmatch(base):
        raise SteeringError(
            f"invalid {param}: {base!r:.60} is not a circuit name (ASCII letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit, at most {MAX_NAME} characters)",
            param=param,
        )
    return base if part is None else f"{base}[{part}]"


def check_mode(mode: Any, where: str) -> str:
    param = f"{where}.mode"
    use = ", ".join(repr(m) for m in MODES)
    if not isinstance(mode, str):
        raise SteeringError(f"invalid {param}: must be a string, one of {use}; got {type(mode).__name__}", param=param)
    if mode not in MODES:
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
    extra = sorted((str(k) for k in set(item) - {"circuit", "mode", "multiplier", "alpha"}), key=str)
    if extra:
        raise SteeringError(
            f"invalid {where}: unknown field {extra[0]!r:.40}; an item has circuit, mode, multiplier or alpha",
            param=where,
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


def compact_items(text: str, max_items: int) -> list[str]:
    """The items of a compact string, its size and item count checked before anything is parsed."""
    if len(text) > MAX_COMPACT:
        raise SteeringError(f"steering string has {len(text)} characters; at most {MAX_COMPACT} are allowed")
    count = text.count(",") + 1
    if count > max_items:
        raise SteeringError(f"steering has {count} items; at most {max_items} are allowed")
    return text.split(",")


def parse_compact(text: str, where: str) -> tuple[str, str, float]:
    """One compact item ``NAME@VALUE[:mode]`` by the strict grammar."""
    label = f"steering {text.strip(' ')!r:.80}"
    if len(text) > MAX_COMPACT:
        raise SteeringError(f"{label}: at most {MAX_COMPACT} characters are allowed", param=where)
    name, at, rest = text.partition("@")
    if not at:
        raise SteeringError(f"{label}: expected NAME@VALUE[:mode]", param=where)
    text_value, colon, mode = rest.partition(":")
    name, text_value, mode = name.strip(" "), text_value.strip(" "), mode.strip(" ")
    if not name:
        raise SteeringError(f"{label}: the circuit name must be non-empty", param=f"{where}.circuit")
    if colon and not mode:
        raise SteeringError(f"{label}: the mode after ':' must be non-empty", param=f"{where}.mode")
    mode = check_mode(mode or "scale", where)
    try:
        value = number(text_value, f"{where}.{MODES[mode]}", strict=False)
    except SteeringError as exc:
        raise SteeringError(f"{label}: {exc}", param=exc.param) from None
    return check_name(name, where), mode, value
