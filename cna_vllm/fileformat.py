"""The safetensors container every steering source is stored in, and their shared base.

A file holds numpy tensors plus three string metadata entries: ``format``
(:data:`FORMAT`), ``format_version`` (:data:`FORMAT_VERSION`) and ``cna_vllm``, one JSON
document with ``kind`` (``cna`` for a neuron circuit, ``caa`` for a vector set), the name,
the model identity and the kind's own fields. :class:`SourceFile` is what
:class:`~cna_vllm.circuit.Circuit` and :class:`~cna_vllm.vectors.VectorSet` share: those
common fields, their metadata and the model check. This module knows no kind.
"""

from __future__ import annotations

import json
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from cna_vllm.errors import CircuitError
from cna_vllm.identity import ModelIdentity, identity_of

FORMAT = "cna-vllm/circuit"
FORMAT_VERSION = 1


def tool_version() -> str:
    """The installed cna-vllm version, recorded in every file written."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cna-vllm")
    except PackageNotFoundError:
        return "0+unknown"


def write_file(path: str | Path, tensors: dict[str, np.ndarray], meta: dict) -> Path:
    """Write tensors plus the versioned JSON metadata."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "cna_vllm": json.dumps(meta, sort_keys=True)}
    save_file(tensors, str(path), metadata=header)
    return path


def _check_header(path: Path, header: dict[str, str]) -> dict[str, Any]:
    if header.get("format") != FORMAT:
        raise CircuitError(f"{path} is not a cna-vllm circuit (format={header.get('format')!r})")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise CircuitError(
            f"{path} has format version {header.get('format_version')!r}; this cna-vllm reads version {FORMAT_VERSION}"
        )
    try:
        meta = json.loads(header["cna_vllm"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CircuitError(f"{path} has missing or malformed metadata: {exc!r}") from exc
    if not isinstance(meta, dict):
        raise CircuitError(f"{path} has malformed metadata (not a JSON object)")
    return meta


def read_file(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(metadata JSON, tensors)`` of a file of any kind, format checked."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CircuitError(f"circuit file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CircuitError(f"{path} is not a readable safetensors file: {exc}") from exc
    return _check_header(path, header), tensors


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata JSON of a file, format checked, without reading its tensors."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(size, 1 << 24)))
    except (OSError, ValueError) as exc:
        raise CircuitError(f"{path} is not a readable safetensors file: {exc}") from exc
    return _check_header(path, header.get("__metadata__") or {})


@dataclass(frozen=True, eq=False)
class SourceFile:
    """What every stored steering source has: name, model identity, provenance, one model check.

    Subclasses are frozen dataclasses that add their tensors (positional, after ``name``) and
    :attr:`kind`; they add their tensors to :meth:`metadata` and their shape checks to
    :meth:`validate_for` through :meth:`_check_fit`. The provenance fields are keyword-only.
    """

    kind: ClassVar[str]
    noun: ClassVar[str] = "circuit"
    name: str
    _: KW_ONLY
    model: ModelIdentity | None = None
    description: str = ""
    discovery: dict = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    version: str = field(default_factory=tool_version)

    def _common_metadata(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "description": self.description,
            "model": self.model.to_dict() if self.model else None,
            "discovery": self.discovery,
            "created_at": self.created_at,
            "tool_version": self.version,
        }

    @staticmethod
    def _common_fields(meta: dict[str, Any]) -> dict[str, Any]:
        """The constructor arguments every kind reads from its metadata (KeyError/TypeError if malformed)."""
        return {
            "name": meta["name"],
            "model": ModelIdentity(**meta["model"]) if meta.get("model") else None,
            "description": meta.get("description", ""),
            "discovery": meta.get("discovery", {}),
            "created_at": meta.get("created_at", ""),
            "version": meta.get("tool_version", ""),
        }

    @classmethod
    def load(cls, path: str | Path, model: ModelIdentity | str | Path | None = None) -> Any:
        """Read and strictly check a file of this kind; validate it for ``model`` if given."""
        path = Path(path)
        source = cls.from_file(path, *read_file(path))
        return source if model is None else source.validate_for(model)

    @classmethod
    def from_file(cls, path: Path, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> Any:
        """The source in an already read file (each kind checks its own tensors)."""
        raise NotImplementedError

    def validate_for(self, model: ModelIdentity | str | Path, *, check_fingerprint: bool = True) -> Any:
        """Raise :class:`CircuitError` unless this source fits ``model`` (an identity or HF directory); return self."""
        ident = identity_of(model)
        if self.model is not None:
            for dim in self._dims:
                mine, theirs = getattr(self.model, dim), getattr(ident, dim)
                if mine != theirs:
                    raise CircuitError(
                        f"{self.noun} {self.name!r} was made for another model: its {dim} is {mine}, "
                        f"the model's is {theirs}"
                    )
            if check_fingerprint and self.model.fingerprint != ident.fingerprint:
                raise CircuitError(
                    f"{self.noun} {self.name!r} was made for another model: weights fingerprint "
                    f"{self.model.fingerprint} != {ident.fingerprint} (same shape, different weights)"
                )
        self._check_fit(ident)
        return self

    _dims: ClassVar[tuple[str, ...]] = ("num_layers", "hidden_size")

    def _check_fit(self, ident: ModelIdentity) -> None:
        """Indices within the model's dimensions (each kind's own)."""
        raise NotImplementedError
