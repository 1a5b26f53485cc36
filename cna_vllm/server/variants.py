"""Steered variants: model names that stand for the base model under a fixed steering spec.

``cna-vllm serve --steered-model NAME=SPEC`` (repeatable) or ``POST /v1/steered-models``
(with ``--enable-hot-load``) registers ``NAME``. A completion request with ``model=NAME`` is
served as the base model with ``SPEC``; ``GET /v1/models`` lists ``NAME`` beside the base
model with ``parent`` = the base model's id and the spec under ``steering``, as vLLM lists
LoRA adapters.

**Combination rule.** A request that names a variant *and* sends ``steering`` gets the
variant's items first, then the field's items (concatenated, in that order, so on shared
neurons the field's items compose after the variant's), and the combined spec is validated
as one (the server's item count and bounds apply to the whole).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cna_vllm.errors import SteeringError
from cna_vllm.server.schema import ApiError, parse_steering
from cna_vllm.steering import SteeringLimits, SteeringSpec

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}")
"""A variant name: 1-128 characters, letters, digits and ``._:/+-``, starting with a letter or digit."""


def check_name(name: Any, taken: Iterable[str] = ()) -> str:
    """The name if it is a valid variant name not in ``taken``; :class:`SteeringError` otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SteeringError(
            f"invalid steered model name {name!r:.60}: use 1-128 letters, digits and '._:/+-', "
            "starting with a letter or digit"
        )
    if name in set(taken):
        raise SteeringError(f"the model name {name!r} is already taken (base model, LoRA adapter or variant)")
    return name


def parse_flag(text: str) -> tuple[str, Any]:
    """``NAME=SPEC`` -> ``(NAME, raw SPEC)``: SPEC is JSON (object or list) or the compact string."""
    name, sep, raw = text.partition("=")
    if not sep or not raw.strip():
        raise SteeringError(
            f"--steered-model takes NAME=SPEC (e.g. no-refusal=refusal@0 or "
            f'\'careful=[{{"circuit":"refusal","multiplier":2}}]\'), got {text!r}'
        )
    raw = raw.strip()
    if raw[0] in "[{":
        import json

        try:
            return name.strip(), json.loads(raw)
        except ValueError as exc:
            raise SteeringError(f"--steered-model {name.strip()}: SPEC is not valid JSON: {exc}") from None
    return name.strip(), raw


def validate_spec(raw: Any, limits: SteeringLimits, circuits: Mapping[str, Any], where: str) -> SteeringSpec:
    """A variant's spec, checked as a request's ``steering`` is; :class:`SteeringError` naming ``where``."""
    try:
        spec = parse_steering(raw, limits, circuits)
    except ApiError as err:
        raise SteeringError(f"{where}: {err.message}") from None
    if not spec:
        raise SteeringError(f"{where}: the steering spec is empty")
    return spec


@dataclass(frozen=True)
class Variant:
    name: str
    spec: SteeringSpec
    created: int = field(default_factory=lambda: int(time.time()))

    def card(self, base: Mapping[str, Any], base_id: str) -> dict[str, Any]:
        """The ``/v1/models`` entry: the base model's card, renamed, with ``parent`` and ``steering``."""
        return {
            **base,
            "id": self.name,
            "created": self.created,
            "parent": base_id,
            "steering": self.spec.to_list(),
        }


@dataclass
class Variants:
    """The variants of one server, by name. ``base`` is the model name requests are rewritten to."""

    base: str
    reserved: frozenset[str] = frozenset()
    """Names requests may already use: the served model names and LoRA modules."""
    by_name: dict[str, Variant] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: object) -> Variant | None:
        return self.by_name.get(name) if isinstance(name, str) else None

    def add(self, name: str, spec: SteeringSpec, taken: Iterable[str] = ()) -> tuple[Variant, bool]:
        """Register ``name`` (``(variant, True)``); the same name with the same spec is ``(existing, False)``."""
        old = self.by_name.get(name)
        if old is not None and old.spec == spec:
            return old, False
        check_name(name, {*self.reserved, *self.by_name, *taken})
        variant = Variant(name, spec)
        self.by_name[name] = variant
        return variant, True

    def combine(
        self,
        variant: Variant,
        raw: Any,
        limits: SteeringLimits,
        circuits: Mapping[str, Any],
        foreign: Mapping[str, str] | None = None,
    ) -> SteeringSpec:
        """The variant's items, then those of the request's ``steering`` field, checked as one spec."""
        if raw is None:
            return variant.spec
        extra = parse_steering(raw, limits, circuits, foreign=foreign)
        try:
            return parse_steering(SteeringSpec(variant.spec.items + extra.items), limits, circuits, foreign=foreign)
        except ApiError as err:
            message = (
                f"model {variant.name!r} steers with {variant.spec}; with the request's steering "
                f"({extra}) after it: {err.message}"
            )
            raise ApiError(message, status=err.status, param=err.param, code=err.code, type=err.type) from None

    def list_cards(self, listing: Mapping[str, Any]) -> dict[str, Any]:
        """vLLM's ``/v1/models`` answer with a card per variant appended."""
        data = list(listing.get("data") or [])
        base = next((c for c in data if isinstance(c, dict) and c.get("id") == self.base), None)
        if base is None:
            return dict(listing)
        return {**listing, "data": [*data, *(v.card(base, self.base) for v in self.by_name.values())]}
