"""CAA steering vectors: circuit files of the kind ``caa``.

A :class:`VectorSet` holds one vector per chosen layer, the mean difference (positive minus
negative set) of an activation at the last prompt token. Two sites are supported:

============ ==================================================================
site         recorded value at layer l
============ ==================================================================
``mlp_out``  the output of layer l's MLP (the paper's code: every layer)
``residual`` the residual stream after layer l (classic CAA: a few middle layers)
============ ==================================================================

Both are applied the same way by the engine, by adding ``−α·v_l`` to layer l's MLP output
(for ``residual`` this equals adding it to the residual stream after layer l, because the
residual stream after layer l is the residual before the MLP plus the MLP output).

File: tensors ``layers`` (int32 [k]) and ``vectors`` (float32 [k, hidden]); the metadata
JSON has ``kind: "caa"`` and ``site`` beside the fields a CNA circuit has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import numpy as np

from cna_vllm.circuit import Circuit, read_file, tool_version, write_file
from cna_vllm.errors import CircuitError
from cna_vllm.models import ModelIdentity

SITES = ("mlp_out", "residual")
KIND = "caa"


@dataclass(frozen=True, eq=False)
class VectorSet:
    """Per-layer steering vectors (CAA) with the same metadata as a circuit."""

    kind: ClassVar[str] = KIND
    name: str
    layers: np.ndarray
    vectors: np.ndarray
    site: str = "mlp_out"
    model: ModelIdentity | None = None
    description: str = ""
    discovery: dict = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    version: str = field(default_factory=tool_version)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", np.ascontiguousarray(self.layers, dtype=np.int32))
        object.__setattr__(self, "vectors", np.ascontiguousarray(self.vectors, dtype=np.float32))
        self.check()

    def __len__(self) -> int:
        return int(self.layers.shape[0])

    def check(self) -> None:
        if self.site not in SITES:
            raise CircuitError(f"vector set {self.name!r}: unknown site {self.site!r}; known: {SITES}")
        if self.layers.ndim != 1 or self.vectors.ndim != 2 or self.vectors.shape[0] != self.layers.shape[0]:
            raise CircuitError(
                f"vector set {self.name!r}: layers {self.layers.shape} and vectors {self.vectors.shape} disagree"
            )
        if len(self) == 0:
            raise CircuitError(f"vector set {self.name!r} is empty")
        if (self.layers < 0).any() or len(set(self.layers.tolist())) != len(self):
            raise CircuitError(f"vector set {self.name!r} has a negative or repeated layer")
        if not np.isfinite(self.vectors).all():
            raise CircuitError(f"vector set {self.name!r} holds NaN/inf values")

    def validate_for(self, model: ModelIdentity | str | Path, *, check_fingerprint: bool = True) -> VectorSet:
        ident = model if isinstance(model, ModelIdentity) else ModelIdentity.from_dir(model)
        if self.model is not None:
            if (self.model.num_layers, self.model.hidden_size) != (ident.num_layers, ident.hidden_size):
                raise CircuitError(f"vector set {self.name!r} was made for another model (dimensions differ)")
            if check_fingerprint and self.model.fingerprint != ident.fingerprint:
                raise CircuitError(
                    f"vector set {self.name!r} was made for another model: weights fingerprint "
                    f"{self.model.fingerprint} != {ident.fingerprint}"
                )
        if self.layers.max() >= ident.num_layers:
            raise CircuitError(f"vector set {self.name!r}: layer {int(self.layers.max())} is out of range")
        if self.vectors.shape[1] != ident.hidden_size:
            raise CircuitError(
                f"vector set {self.name!r}: vectors have width {self.vectors.shape[1]}, "
                f"the model's hidden size is {ident.hidden_size}"
            )
        return self

    def metadata(self) -> dict:
        return {
            "kind": KIND,
            "name": self.name,
            "site": self.site,
            "description": self.description,
            "model": self.model.to_dict() if self.model else None,
            "discovery": self.discovery,
            "num_layers": len(self),
            "layers": self.layers.tolist(),
            "norms": [round(float(n), 4) for n in np.linalg.norm(self.vectors, axis=1)],
            "created_at": self.created_at,
            "tool_version": self.version,
        }

    def summary(self, top: int = 0) -> str:
        """Human-readable description: site, layers and vector norms (``top`` is unused)."""
        meta = self.metadata()
        lines = [f"CAA vector set {self.name!r} ({self.site}), {len(self)} layer(s)"]
        if self.description:
            lines.append(self.description)
        if self.model:
            m = self.model
            lines.append(f"model: {m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}")
        lines.append("layer  ‖v‖")
        lines += [f"{layer:>5}  {norm:.4f}" for layer, norm in zip(meta["layers"], meta["norms"], strict=True)]
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        return write_file(path, {"layers": self.layers, "vectors": self.vectors}, self.metadata())

    @classmethod
    def load(cls, path: str | Path, model: ModelIdentity | str | Path | None = None) -> VectorSet:
        meta, tensors = read_file(path)
        if meta.get("kind") != KIND:
            raise CircuitError(f"{path} is not a CAA vector file (kind {meta.get('kind', 'cna')!r})")
        for key in ("layers", "vectors"):
            if key not in tensors:
                raise CircuitError(f"{path} lacks the tensor {key!r}")
        try:
            out = cls(
                name=meta["name"],
                layers=tensors["layers"],
                vectors=tensors["vectors"],
                site=meta.get("site", "mlp_out"),
                model=ModelIdentity(**meta["model"]) if meta.get("model") else None,
                description=meta.get("description", ""),
                discovery=meta.get("discovery", {}),
                created_at=meta.get("created_at", ""),
                version=meta.get("tool_version", ""),
            )
        except (KeyError, TypeError) as exc:
            raise CircuitError(f"{path} has malformed metadata: {exc}") from exc
        if model is not None:
            out.validate_for(model)
        return out


def load_any(path: str | Path, model: ModelIdentity | str | Path | None = None) -> Circuit | VectorSet:
    """A :class:`~cna_vllm.circuit.Circuit` or a :class:`VectorSet`, by the file's kind."""
    try:
        return Circuit.load(path, model)
    except CircuitError as exc:
        if "steering vectors" not in str(exc):
            raise
    return VectorSet.load(path, model)
