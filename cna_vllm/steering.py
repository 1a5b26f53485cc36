"""The steering spec: what one request asks the engine to do to its MLP neurons.

A spec is an ordered list of items, each naming a circuit and one of three modes. Every
mode is the per-neuron affine map ``a ← s·a + b`` applied to the input of ``down_proj``:

======= ========================= ============================ ================
mode    value                     map                          (s, b)
======= ========================= ============================ ================
scale   ``multiplier`` m          a ← m·a (the paper's mode)   (m, 0)
patch   ``alpha`` α               a ← (1−α)·a + α·μ⁻           (1−α, α·μ⁻)
shift   ``alpha`` α               a ← a − α·δ, δ = μ⁺ − μ⁻     (1, −α·δ)
======= ========================= ============================ ================

**CAA vectors.** An item may also name a :class:`~cna_vllm.vectors.VectorSet` (kind
``caa``). Its only mode is ``shift``: layer l's MLP output gets ``−α·v_l`` added at every
token, with ``v`` the positive-minus-negative mean difference, so that α > 0 moves away
from the positive set as ``shift`` does for neurons. Vector items add up.

**Composition.** Items apply in the listed order. Where two items touch the same neuron
the maps compose: after ``(s1, b1)`` then ``(s2, b2)`` the neuron holds
``s2·(s1·a + b1) + b2``, i.e. ``(s2·s1, s2·b1 + b2)``. Order matters only for neurons
that more than one item touches (e.g. ``scale`` then ``shift`` differs from the reverse).

**Signed parts.** An item's circuit may be ``NAME[part]``: only the neurons of circuit
``NAME`` in that signed part (:data:`cna_vllm.circuit.PARTS`): ``pos`` (|μ⁺| > |μ⁻|, driven
harder by the positive set), ``neg`` (the rest), ``up`` (δ > 0) or ``down`` (δ ≤ 0). E.g.
``refusal[pos]@0`` ablates the harm-active neurons of ``refusal``. The part is selected
when the spec is turned into rows, so the engine only sees a smaller neuron set.

Accepted inputs to :meth:`SteeringSpec.parse`: ``None``/``""``/``[]`` (no steering), a
spec, one item dict, a list of item dicts, JSON text of either, or the compact string
``NAME@VALUE[:mode][,NAME@VALUE[:mode]...]`` where VALUE is m for ``scale`` (the default
mode) and α for the other modes. This module does not import vLLM.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cna_vllm.errors import SteeringError

if TYPE_CHECKING:
    from cna_vllm.circuit import Circuit
    from cna_vllm.vectors import VectorSet

MODES: dict[str, str] = {"scale": "multiplier", "patch": "alpha", "shift": "alpha"}
"""Each mode and the name of the number it takes."""
MAX_ABS_VALUE = 100.0
"""Bound on |multiplier| and |alpha|; larger values only produce garbage or inf."""
MAX_ITEMS = 16
SALT_PREFIX = "cna-steer-"
"""Reserved cache-salt prefix: only steered requests carry it (see :mod:`cna_vllm.engine.intake`)."""

VECTOR_MODES = ("shift",)
"""The modes a CAA vector set takes."""

LayerRows = dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
"""``{layer: (neuron_idx int64 ascending, s float32, b float32)}``."""
LayerOffsets = dict[int, np.ndarray]
"""``{layer: float32 [hidden]}``, added to the layer's MLP output."""


PART_NAMES = ("pos", "neg", "up", "down")
"""The signed parts a spec may select with ``NAME[part]`` (see :data:`cna_vllm.circuit.PARTS`)."""
_PART_RE = re.compile(r"^([^\[\]]+)\[([^\[\]]*)\]$")


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


def resolve(circuits: Mapping[str, Any], name: str) -> Any:
    """The circuit (or metadata) an item's ``circuit`` names, its signed part selected.

    Raises :class:`SteeringError` for an unknown name, a part of a CAA vector set, or an empty part.
    """
    base, part = split_part(name)
    if base not in circuits:
        known = ", ".join(sorted(circuits)) or "none loaded"
        raise SteeringError(f"unknown circuit {base!r}; known circuits: {known}")
    obj = circuits[base]
    if part is None:
        return obj
    if is_vector_set(obj):
        raise SteeringError(f"{base!r} is a CAA vector set: it has no signed parts (got {name!r})")
    if isinstance(obj, Mapping):  # metadata: {"kind", "parts": {part: count}}
        if obj.get("parts", {}).get(part, 1) == 0:
            raise SteeringError(f"circuit {base!r} has no neurons in part {part!r}")
        return obj
    counts = obj.part_counts()
    if counts[part] == 0:
        raise SteeringError(f"circuit {base!r} has no neurons in part {part!r}")
    return obj.part(part)


def is_vector_set(obj: Any) -> bool:
    """True for a CAA :class:`~cna_vllm.vectors.VectorSet` (or its metadata dict)."""
    return (obj.get("kind") if isinstance(obj, Mapping) else getattr(obj, "kind", "cna")) == "caa"


@dataclass(frozen=True)
class SteeringItem:
    """One circuit under one mode. ``value`` is m for ``scale`` and α otherwise."""

    circuit: str
    mode: str
    value: float

    def to_dict(self) -> dict[str, Any]:
        return {"circuit": self.circuit, "mode": self.mode, MODES[self.mode]: self.value}

    def affine(self, circuit: Circuit) -> tuple[np.ndarray, np.ndarray]:
        """Per-neuron ``(s, b)`` in the circuit's own neuron order, float64."""
        n = len(circuit)
        v = float(self.value)
        if self.mode == "scale":
            return np.full(n, v), np.zeros(n)
        if self.mode == "patch":
            return np.full(n, 1.0 - v), v * circuit.mean_neg.astype(np.float64)
        return np.ones(n), -v * circuit.delta.astype(np.float64)  # shift

    def __str__(self) -> str:
        return f"{self.circuit}@{self.value:g}" + ("" if self.mode == "scale" else f":{self.mode}")


@dataclass(frozen=True)
class SteeringSpec:
    """An ordered tuple of :class:`SteeringItem`. Empty means "not steered"."""

    items: tuple[SteeringItem, ...] = ()

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, obj: Any) -> SteeringSpec:
        """Build a spec from any accepted form (see the module docstring); check syntax only."""
        if obj is None or isinstance(obj, SteeringSpec):
            return obj or cls()
        if isinstance(obj, str):
            text = obj.strip()
            if not text:
                return cls()
            if text[0] in "[{":
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise SteeringError(f"steering is not valid JSON: {exc}") from exc
            else:
                return cls(tuple(_parse_compact(part) for part in text.split(",")))._checked()
        if isinstance(obj, Mapping):
            obj = [obj]
        if not isinstance(obj, list | tuple):
            raise SteeringError(
                f"steering must be a list of items, an item, JSON or 'NAME@VALUE[:mode]', not {type(obj).__name__}"
            )
        return cls(tuple(_parse_item(i, item) for i, item in enumerate(obj)))._checked()

    def _checked(self) -> SteeringSpec:
        if len(self.items) > MAX_ITEMS:
            raise SteeringError(f"steering has {len(self.items)} items; at most {MAX_ITEMS} are allowed")
        return self

    def validate(self, circuits: Mapping[str, Any]) -> SteeringSpec:
        """Raise :class:`SteeringError` unless every item names a circuit in ``circuits`` in a mode it takes.

        ``circuits`` maps names to circuits, vector sets or their metadata dicts.
        """
        for item in self.items:
            if is_vector_set(resolve(circuits, item.circuit)) and item.mode not in VECTOR_MODES:
                raise SteeringError(
                    f"{item.circuit!r} is a CAA vector set: it takes mode 'shift' with alpha "
                    f"(e.g. {item.circuit}@1:shift), not {item.mode!r}"
                )
        return self

    # ------------------------------------------------------------------ identity
    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.items)

    def to_list(self) -> list[dict[str, Any]]:
        """The canonical JSON-able form; this is what travels in ``extra_args["steering"]``."""
        return [item.to_dict() for item in self.items]

    def fingerprint(self) -> str:
        """Stable 16-hex digest of the canonical form (order-sensitive); ``""`` if empty."""
        if not self.items:
            return ""
        text = json.dumps([[i.circuit, i.mode, repr(float(i.value))] for i in self.items], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def cache_salt(self) -> str | None:
        """The vLLM ``cache_salt`` that isolates this spec's prefix-cache blocks; None if empty."""
        return f"{SALT_PREFIX}{self.fingerprint()}" if self.items else None

    # ------------------------------------------------------------------ engine rows
    def to_rows(self, circuits: Mapping[str, Circuit | VectorSet]) -> LayerRows:
        """Compose the neuron items into per-layer ``(neuron_idx, s, b)`` (see module docstring)."""
        self.validate(circuits)
        acc: dict[int, dict[int, tuple[float, float]]] = {}
        for item in self.items:
            circuit = resolve(circuits, item.circuit)
            if is_vector_set(circuit):
                continue
            s_arr, b_arr = item.affine(circuit)
            for layer, neuron, s, b in zip(
                circuit.layers.tolist(), circuit.neurons.tolist(), s_arr.tolist(), b_arr.tolist(), strict=True
            ):
                s0, b0 = acc.setdefault(layer, {}).get(neuron, (1.0, 0.0))
                acc[layer][neuron] = (s * s0, s * b0 + b)
        rows: LayerRows = {}
        for layer in sorted(acc):
            neurons = sorted(acc[layer])
            sb = np.array([acc[layer][n] for n in neurons], dtype=np.float64).reshape(-1, 2)
            if not np.isfinite(sb).all():
                raise SteeringError(f"steering {self} produces non-finite values at layer {layer}")
            rows[layer] = (
                np.asarray(neurons, dtype=np.int64),
                sb[:, 0].astype(np.float32),
                sb[:, 1].astype(np.float32),
            )
        return rows

    def to_offsets(self, circuits: Mapping[str, Circuit | VectorSet]) -> LayerOffsets:
        """Sum the vector items into per-layer MLP-output offsets ``−Σ α·v_l`` (float32)."""
        self.validate(circuits)
        acc: dict[int, np.ndarray] = {}
        for item in self.items:
            vectors = resolve(circuits, item.circuit)
            if not is_vector_set(vectors):
                continue
            for layer, v in zip(vectors.layers.tolist(), vectors.vectors, strict=True):
                acc[layer] = acc.get(layer, 0.0) - float(item.value) * v.astype(np.float64)
        out = {layer: np.asarray(acc[layer], dtype=np.float32) for layer in sorted(acc)}
        if not all(np.isfinite(v).all() for v in out.values()):
            raise SteeringError(f"steering {self} produces non-finite offsets")
        return out


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise SteeringError(f"{what} must be a number, got {value!r}")
    try:
        out = float(value) + 0.0  # -0.0 -> 0.0: one fingerprint, row and cache namespace per value
    except ValueError as exc:
        raise SteeringError(f"{what} must be a number, got {str(value)[:40]!r}") from exc
    except OverflowError as exc:  # an integer too large for a float
        raise SteeringError(f"{what} must be a finite number, got {str(value)[:40]!r}...") from exc
    if not math.isfinite(out):
        raise SteeringError(f"{what} must be finite, got {value!r}")
    if abs(out) > MAX_ABS_VALUE:
        raise SteeringError(f"{what} is {out:g}; it must lie in [-{MAX_ABS_VALUE:g}, {MAX_ABS_VALUE:g}]")
    return out


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise SteeringError(f"{where}: 'circuit' must be a non-empty string, got {name!r}")
    base, part = split_part(name.strip())
    return base if part is None else f"{base}[{part}]"


def _check_mode(mode: Any, where: str) -> str:
    if mode not in MODES:
        raise SteeringError(f"{where}: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def _parse_item(index: int, item: Any) -> SteeringItem:
    where = f"steering item {index}"
    if isinstance(item, SteeringItem):
        return item
    if isinstance(item, str):
        return _parse_compact(item)
    if not isinstance(item, Mapping):
        raise SteeringError(f"{where} must be an object, got {item!r}")
    extra = set(item) - {"circuit", "mode", "multiplier", "alpha"}
    if extra:
        raise SteeringError(f"{where} has unknown field(s) {sorted(extra)}")
    name = _check_name(item.get("circuit"), where)
    mode = _check_mode(item.get("mode", "scale"), where)
    key = MODES[mode]
    other = "alpha" if key == "multiplier" else "multiplier"
    if other in item:
        hint = " (the paper's α = 1 − m; pass the multiplier m)" if mode == "scale" else ""
        raise SteeringError(f"{where}: mode {mode!r} takes {key!r}, not {other!r}{hint}")
    if key not in item:
        raise SteeringError(f"{where}: mode {mode!r} needs {key!r}")
    return SteeringItem(name, mode, _number(item[key], f"{where} {key}"))


def _parse_compact(text: str) -> SteeringItem:
    where = f"steering {text.strip()!r}"
    name, at, rest = text.strip().partition("@")
    if not at:
        raise SteeringError(f"{where}: expected NAME@VALUE[:mode]")
    value, _, mode = rest.partition(":")
    mode = _check_mode(mode.strip() or "scale", where)
    return SteeringItem(_check_name(name, where), mode, _number(value.strip(), f"{where} {MODES[mode]}"))


def parse_many(steering: Any, n: int) -> list[SteeringSpec]:
    """One spec per prompt: a single spec for all, or a list of ``n`` per-prompt specs.

    A list is per-prompt when every element is itself a list, ``None``, a spec or a
    compact string; a list of item dicts is one spec for all prompts.
    """
    if (
        isinstance(steering, list | tuple)
        and steering
        and all(x is None or isinstance(x, list | tuple | SteeringSpec | str) for x in steering)
    ):
        if len(steering) != n:
            raise SteeringError(f"got {len(steering)} per-prompt steering specs for {n} prompts")
        return [SteeringSpec.parse(x) for x in steering]
    return [SteeringSpec.parse(steering)] * n


def union_neurons(circuits: Iterable[Circuit | VectorSet]) -> dict[int, np.ndarray]:
    """Per layer, the ascending union of neuron indices over the neuron circuits (the sparse index)."""
    acc: dict[int, set[int]] = {}
    for circuit in circuits:
        if is_vector_set(circuit):
            continue
        for layer, neuron in circuit.pairs():
            acc.setdefault(layer, set()).add(neuron)
    return {layer: np.array(sorted(acc[layer]), dtype=np.int64) for layer in sorted(acc)}


def vector_layers(circuits: Iterable[Circuit | VectorSet]) -> list[int]:
    """The layers whose MLP output some CAA vector set offsets."""
    return sorted({layer for c in circuits if is_vector_set(c) for layer in c.layers.tolist()})
