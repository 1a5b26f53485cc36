"""The steering spec: what one request asks the engine to do to its MLP neurons.

A spec is an ordered list of items, each naming a source (circuit or CAA vector set) and
one of three modes. Every mode is the per-neuron affine map ``a ← s·a + b`` applied to the
input of ``down_proj`` (:mod:`cna_vllm.rows` turns a spec into those rows):

======= ========================= ============================ ================
mode    value                     map                          (s, b)
======= ========================= ============================ ================
scale   ``multiplier`` m          a ← m·a (the paper's mode)   (m, 0)
patch   ``alpha`` α               a ← (1−α)·a + α·μ⁻           (1−α, α·μ⁻)
shift   ``alpha`` α               a ← a − α·δ, δ = μ⁺ − μ⁻     (1, −α·δ)
======= ========================= ============================ ================

A CAA vector set takes ``shift`` only: layer l's MLP output gets ``−α·v_l`` added.
Items apply in order; where two touch one neuron their maps compose. An item may name a
signed part, ``NAME[part]`` (:data:`PART_NAMES`, see :data:`cna_vllm.circuit.PARTS`).

This module owns the two checks a spec passes, each once per process:

1. :meth:`SteeringSpec.parse`: syntax and bounds (:class:`SteeringLimits`). ``strict=True``
   is the JSON-body form of the HTTP field (numbers must be JSON numbers; no empty list,
   empty string or JSON inside a string); the default also takes JSON text, numeric
   strings, compact item strings and ``None``/``""``/``[]`` for "not steered".
2. :meth:`SteeringSpec.validate`: names, parts and modes against a catalogue of sources.

Every error is a :class:`~cna_vllm.errors.SteeringError` naming its ``param`` and ``code``.
A spec travels in one wire form, :meth:`SteeringSpec.to_wire` (canonical JSON text in
``SamplingParams.extra_args["steering"]``), read back by :meth:`SteeringSpec.from_params`
(memoised per process); its fingerprint is computed once and keys the cache salt.
This module does not import vLLM.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cna_vllm.errors import SteeringError
from cna_vllm.spec_syntax import (
    ENGINE_LIMITS,
    MAX_ABS_VALUE,
    MAX_ITEMS,
    MAX_JSON_TEXT,
    MODES,
    PART_NAMES,
    SteeringLimits,
    compact_items,
    parse_compact,
    parse_item,
    split_part,
    where_of,
)

__all__ = [  # the spec's vocabulary is spelled in spec_syntax; callers import it from here
    "ENGINE_LIMITS", "MAX_ABS_VALUE", "MAX_ITEMS", "MODES", "PART_NAMES", "SALT_PREFIX", "VECTOR_MODES",
    "SteeringItem", "SteeringLimits", "SteeringSpec", "check_user_salt", "is_vector_set", "parse_many",
    "resolve", "split_part",
]  # fmt: skip

VECTOR_MODES = ("shift",)
"""The modes a CAA vector set takes."""
SALT_PREFIX = "cna-steer-"
"""Reserved cache-salt prefix: only steered requests carry it."""
_SHAPES = "a list of items {circuit, multiplier|alpha, mode}, one such item, or a string 'NAME@VALUE[:mode]'"


# --------------------------------------------------------------------------- names and parts
def is_vector_set(obj: Any) -> bool:
    """True for a CAA vector set (or its metadata dict)."""
    return (obj.get("kind") if isinstance(obj, Mapping) else getattr(obj, "kind", "cna")) == "caa"


def resolve(sources: Mapping[str, Any], name: str) -> Any:
    """The source an item's ``circuit`` names, its signed part selected (objects with ``part()``)."""
    base, part = split_part(name)
    if base not in sources:
        known = ", ".join(sorted(sources)) or "none loaded"
        raise SteeringError(f"unknown circuit {base!r}; known circuits: {known}", code="unknown_circuit")
    obj = sources[base]
    if part is None:
        return obj
    if is_vector_set(obj):
        raise SteeringError(f"{base!r} is a CAA vector set: it has no signed parts (got {name!r})")
    counts = obj.get("parts", {}) if isinstance(obj, Mapping) else obj.part_counts()
    if counts.get(part, 1) == 0:
        raise SteeringError(f"circuit {base!r} has no neurons in part {part!r}")
    return obj.part(part) if hasattr(obj, "part") else obj


# --------------------------------------------------------------------------- the types
@dataclass(frozen=True)
class SteeringItem:
    """One source under one mode. ``value`` is m for ``scale`` and α otherwise."""

    circuit: str
    mode: str
    value: float

    def to_dict(self) -> dict[str, Any]:
        return {"circuit": self.circuit, "mode": self.mode, MODES[self.mode]: self.value}

    def __str__(self) -> str:
        return f"{self.circuit}@{self.value:g}" + ("" if self.mode == "scale" else f":{self.mode}")


@dataclass(frozen=True)
class SteeringSpec:
    """An ordered tuple of :class:`SteeringItem`. Empty means "not steered"."""

    items: tuple[SteeringItem, ...] = ()

    @classmethod
    def parse(cls, obj: Any, limits: SteeringLimits = ENGINE_LIMITS, *, strict: bool = False) -> SteeringSpec:
        """Check syntax and bounds of any accepted form (see the module docstring)."""
        if isinstance(obj, SteeringSpec):
            return obj._bounded(limits)
        if obj is None:
            return cls()
        if isinstance(obj, str):
            if len(obj) > MAX_JSON_TEXT:
                raise SteeringError(f"steering string has {len(obj)} characters; at most {MAX_JSON_TEXT} are allowed")
            text = obj.strip(" ")
            if not text:
                if strict:
                    raise SteeringError("steering is an empty string; leave the field out for no steering")
                return cls()
            if text[0] in "[{":
                if strict:
                    raise SteeringError("steering must be JSON, not a string holding JSON")
                try:
                    obj = json.loads(text)
                except (json.JSONDecodeError, RecursionError) as exc:
                    raise SteeringError(f"steering is not valid JSON: {str(exc)[:200]}") from None
            else:
                parts = compact_items(text, limits.max_items)
                items = (SteeringItem(*parse_compact(p, where_of(i, len(parts)))) for i, p in enumerate(parts))
                return cls(tuple(items))._bounded(limits)
        single = isinstance(obj, Mapping)
        if single:
            obj = [obj]
        if not isinstance(obj, list | tuple):
            raise SteeringError(f"steering must be {_SHAPES}; got {type(obj).__name__}")
        if strict and not obj:
            raise SteeringError("steering is an empty list; leave the field out for no steering")
        if len(obj) > limits.max_items:
            raise SteeringError(f"steering has {len(obj)} items; at most {limits.max_items} are allowed")
        return cls(
            tuple(_item(item, "steering" if single else f"steering[{i}]", strict) for i, item in enumerate(obj))
        )._bounded(limits)

    def _bounded(self, limits: SteeringLimits) -> SteeringSpec:
        if len(self.items) > limits.max_items:
            raise SteeringError(f"steering has {len(self.items)} items; at most {limits.max_items} are allowed")
        for i, item in enumerate(self.items):
            key = MODES[item.mode]
            bound = limits.bound(key)
            if abs(item.value) > bound:
                where = f"{where_of(i, len(self.items))}.{key}"
                raise SteeringError(
                    f"invalid {where}: {item.value:g} is out of bounds; it must lie in [-{bound:g}, {bound:g}]",
                    param=where,
                )
        return self

    def validate(self, sources: Mapping[str, Any], foreign: Mapping[str, str] | None = None) -> SteeringSpec:
        """Raise unless every item names a source in ``sources`` (objects or metadata dicts), an existing
        signed part, and a mode its kind takes. ``foreign`` maps names known only for other models to
        that model, for a better message."""
        for i, item in enumerate(self.items):
            base = split_part(item.circuit)[0]
            if base not in sources:
                param = f"{where_of(i, len(self.items))}.circuit"
                known = ", ".join(sorted(sources)) or "none loaded"
                if foreign and base in foreign:
                    raise SteeringError(
                        f"circuit {base!r} belongs to model {foreign[base]!r}, not to the model "
                        f"this server runs; circuits for this model: {known}",
                        param=param,
                        code="circuit_model_mismatch",
                    )
                raise SteeringError(
                    f"unknown circuit {base!r}; known circuits: {known}", param=param, code="unknown_circuit"
                )
            if is_vector_set(resolve(sources, item.circuit)) and item.mode not in VECTOR_MODES:
                raise SteeringError(
                    f"{item.circuit!r} is a CAA vector set: it takes mode 'shift' with alpha "
                    f"(e.g. {item.circuit}@1:shift), not {item.mode!r}"
                )
        return self

    # ------------------------------------------------------------------ identity and wire form
    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.items)

    def to_list(self) -> list[dict[str, Any]]:
        """The canonical JSON-able form (a variant's card, reports)."""
        return [item.to_dict() for item in self.items]

    def to_wire(self) -> str:
        """The one wire form: canonical compact JSON of :meth:`to_list` (``extra_args["steering"]``).

        The spec is remembered under its wire text, so the same process reads it back without parsing.
        """
        text = json.dumps(self.to_list(), separators=(",", ":"))
        _remember(text, self)
        return text

    @staticmethod
    def from_wire(text: str) -> SteeringSpec:
        """The spec of a wire string (or any accepted text), parsed at most once per process (engine bounds)."""
        spec = _WIRE.get(text)
        if spec is None:
            spec = SteeringSpec.parse(text)
            _remember(text, spec)
        return spec

    @classmethod
    def from_params(cls, params: Any) -> SteeringSpec:
        """The spec carried by a ``SamplingParams`` (empty when none)."""
        raw = (getattr(params, "extra_args", None) or {}).get("steering")
        if not raw:
            return cls()
        return cls.from_wire(raw) if isinstance(raw, str) else cls.parse(raw)

    def fingerprint(self) -> str:
        """Stable 16-hex digest of the canonical form (order-sensitive), computed once; ``""`` if empty."""
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            text = json.dumps([[i.circuit, i.mode, repr(float(i.value))] for i in self.items], separators=(",", ":"))
            fp = hashlib.sha256(text.encode()).hexdigest()[:16] if self.items else ""
            object.__setattr__(self, "_fingerprint", fp)
        return fp

    def cache_salt(self, user_salt: str | None = None) -> str | None:
        """The request's vLLM ``cache_salt``: the user's when unsteered, steering-keyed otherwise.

        ``cna-steer-<fingerprint>[|<hash of the user's salt>]`` has a fixed length under vLLM's
        cap, and a user salt with the reserved prefix is refused, so no request reuses KV blocks
        computed under a steering it did not ask for.
        """
        check_user_salt(user_salt)
        if not self.items:
            return user_salt
        salt = f"{SALT_PREFIX}{self.fingerprint()}"
        if user_salt:
            salt += "|" + hashlib.sha256(user_salt.encode()).hexdigest()[:16]
        return salt


_WIRE: dict[str, SteeringSpec] = {}
"""Per-process memo: wire text -> spec (bounded; oldest out first)."""
_WIRE_SIZE = 4096


def _remember(text: str, spec: SteeringSpec) -> None:
    if text not in _WIRE:
        if len(_WIRE) >= _WIRE_SIZE:
            del _WIRE[next(iter(_WIRE))]
        _WIRE[text] = spec


def check_user_salt(user_salt: object) -> None:
    """Refuse a client's cache salt that starts with the reserved :data:`SALT_PREFIX`."""
    if isinstance(user_salt, str) and user_salt.startswith(SALT_PREFIX):
        raise SteeringError(
            f"cache_salt may not start with {SALT_PREFIX!r}: that prefix is reserved for steering",
            param="cache_salt",
            code="reserved_cache_salt",
        )


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


def _item(obj: Any, where: str, strict: bool) -> SteeringItem:
    return obj if isinstance(obj, SteeringItem) else SteeringItem(*parse_item(obj, where, strict))
