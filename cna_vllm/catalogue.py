"""The catalogue one engine steers with: sources by name, and the specs already validated against it.

Each process that admits requests keeps one :class:`Catalogue` per engine (the API process's is
registered by :mod:`cna_vllm.engine.intake` and shared with the server). A spec is validated
against it once: :meth:`Catalogue.validate` remembers the fingerprints it has passed, and a
catalogue only grows (hot-loading adds sources, nothing removes one), so a spec that was
valid stays valid.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cna_vllm.steering import SteeringSpec


@dataclass
class Catalogue(Mapping[str, Any]):
    """``{name: source}`` (circuits, vector sets, or their metadata dicts) plus foreign-name hints."""

    sources: dict[str, Any] = field(default_factory=dict)
    foreign: dict[str, str] = field(default_factory=dict)
    """Names known only for other models -> that model, for a better message."""
    _valid: set[str] = field(default_factory=set, repr=False)

    def __getitem__(self, name: str) -> Any:
        return self.sources[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def add(self, name: str, source: Any) -> None:
        self.sources[name] = source
        self.foreign.pop(name, None)

    def validate(self, spec: SteeringSpec) -> SteeringSpec:
        """``spec`` if it names sources, parts and modes this catalogue has (checked once per spec)."""
        key = spec.fingerprint()
        if key and key not in self._valid:
            spec.validate(self.sources, self.foreign)
            self._valid.add(key)
        return spec


def as_catalogue(sources: Mapping[str, Any], foreign: Mapping[str, str] | None = None) -> Catalogue:
    """``sources`` itself when it is a :class:`Catalogue`, else a new one over it."""
    if isinstance(sources, Catalogue):
        return sources
    return Catalogue(dict(sources), dict(foreign or {}))
