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

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from cna_vllm.errors import CircuitError
from cna_vllm.fileformat import SourceFile, write_file
from cna_vllm.identity import ModelIdentity

SITES = ("mlp_out", "residual")
KIND = "caa"


@dataclass(frozen=True, eq=False)
class VectorSet(SourceFile):
    """Per-layer steering vectors (CAA) with the same metadata as a circuit."""

    kind: ClassVar[str] = KIND
    noun: ClassVar[str] = "vector set"
    layers: np.ndarray
    vectors: np.ndarray
    site: str = "mlp_out"

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

    def _check_fit(self, ident: ModelIdentity) -> None:
        if self.layers.max() >= ident.num_layers:
            raise CircuitError(f"vector set {self.name!r}: layer {int(self.layers.max())} is out of range")
        if self.vectors.shape[1] != ident.hidden_size:
            raise CircuitError(
                f"vector set {self.name!r}: vectors have width {self.vectors.shape[1]}, "
                f"the model's hidden size is {ident.hidden_size}"
            )

    def metadata(self) -> dict:
        return {
            **self._common_metadata(),
            "site": self.site,
            "num_layers": len(self),
            "layers": self.layers.tolist(),
            "norms": [round(float(n), 4) for n in np.linalg.norm(self.vectors, axis=1)],
        }

    def summary(self) -> str:
        """Human-readable description: site, layers and vector norms."""
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
    def from_file(cls, path: Path, meta: dict, tensors: dict[str, np.ndarray]) -> VectorSet:
        """The vector set in an already read file (see :func:`cna_vllm.sources.load`)."""
        if meta.get("kind") != KIND:
            raise CircuitError(f"{path} is not a CAA vector file (kind {meta.get('kind', 'cna')!r})")
        for key in ("layers", "vectors"):
            if key not in tensors:
                raise CircuitError(f"{path} lacks the tensor {key!r}")
        try:
            out = cls(
                layers=tensors["layers"],
                vectors=tensors["vectors"],
                site=meta.get("site", "mlp_out"),
                **cls._common_fields(meta),
            )
        except (KeyError, TypeError) as exc:
            raise CircuitError(f"{path} has malformed metadata: {exc}") from exc
        return out
