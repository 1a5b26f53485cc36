"""The circuits catalogue one server steers with, and hints about circuits of other models."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cna_vllm.engine.state import CONFIG_KEY, EngineSteeringConfig, Source, file_sha256
from cna_vllm.errors import CnaError
from cna_vllm.server.schema import ApiError
from cna_vllm.steering import MODES, VECTOR_MODES, is_vector_set
from cna_vllm.vectors import load_any


@dataclass
class Catalog:
    """Circuits loaded in the engine (name -> circuit or vector set, and file entry) plus foreign-name hints."""

    circuits: dict[str, Source]
    entries: dict[str, dict[str, str]]
    model_dir: str
    model_name: str
    capacity: int
    foreign: dict[str, str] = field(default_factory=dict)
    hot_load_neurons: int = 0

    @classmethod
    def from_additional_config(
        cls, additional: Any, model_dir: str, model_name: str, circuits_root: Path | None = None
    ) -> Catalog:
        """Read the engine's own ``additional_config`` section (the single source of truth)."""
        cfg = EngineSteeringConfig.from_additional_config(additional)
        circuits = cfg.load_circuits()
        foreign = scan_foreign(circuits_root, model_name, set(circuits)) if circuits_root else {}
        return cls(
            circuits, dict(cfg.circuits), model_dir, model_name, cfg.max_steering_configs, foreign, cfg.hot_load_neurons
        )

    def describe(self, name: str) -> dict[str, Any]:
        circuit = self.circuits[name]
        meta = circuit.metadata()
        meta["object"] = "circuit"
        meta["id"] = name
        meta["kind"] = circuit.kind
        if not is_vector_set(circuit):
            meta["layers"] = sorted(int(k) for k in meta["layer_counts"])
        meta["sha256"] = self.entries.get(name, {}).get("sha256")
        meta["modes"] = list(VECTOR_MODES if is_vector_set(circuit) else MODES)
        return meta

    def add(self, name: str, circuit: Source, entry: dict[str, str]) -> None:
        self.circuits[name] = circuit
        self.entries[name] = entry

    def listing(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.describe(n) for n in sorted(self.circuits)]}

    def check_hot_load(self, path: str, roots: Sequence[Path] = ()) -> tuple[Source, dict[str, str], bool]:
        """Validate a server-side circuit file for this model: ``(circuit, entry, already_loaded)``.

        The file must lie (after resolving links) inside one of ``roots``; that is checked before
        anything about the file is looked at, so the answer says nothing about other paths.
        """
        p = Path(path)
        if not p.is_absolute():
            raise ApiError("path must be an absolute server-side path", param="path", code="invalid_path")
        real = p.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            raise ApiError(
                "path must lie inside the server's circuit directories (--circuits, --hot-load-dir)",
                status=403,
                param="path",
                code="path_not_allowed",
            )
        p = real
        if not p.is_file():  # missing, a directory, a device: one answer, no oracle for what exists
            raise ApiError("no readable circuit file at this path", param="path", code="invalid_circuit")
        try:
            circuit = load_any(p)
            circuit.validate_for(self.model_dir)
            entry = {"path": str(p), "sha256": file_sha256(p)}
        except OSError:
            raise ApiError("no readable circuit file at this path", param="path", code="invalid_circuit") from None
        except CnaError as exc:
            code = "circuit_model_mismatch" if "another model" in str(exc) else "invalid_circuit"
            raise ApiError(str(exc), param="path", code=code) from None
        loaded = self.entries.get(circuit.name)
        same = loaded is not None and loaded.get("sha256") == entry["sha256"]
        if loaded is not None and not same:
            raise ApiError(
                f"a different circuit named {circuit.name!r} is already loaded; pick another name",
                status=409,
                param="path",
                code="circuit_exists",
            )
        return circuit, entry, same


def scan_foreign(root: Path, model_name: str, mine: set[str]) -> dict[str, str]:
    """``{circuit name: model alias}`` for circuits shipped under ``root/<alias>/`` for other models."""
    out: dict[str, str] = {}
    if not root.is_dir():
        return out
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name != model_name):
        for path in sorted(sub.glob("*.safetensors")):
            name = _header_name(path) or path.stem
            if name not in mine:
                out.setdefault(name, sub.name)
    return out


def _header_name(path: Path) -> str | None:
    """The circuit name from a safetensors header, without reading tensors."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(size, 1 << 20)))
        meta: Mapping[str, str] = header.get("__metadata__", {})
        return json.loads(meta.get("cna_vllm", "{}")).get("name")
    except (OSError, ValueError):
        return None


__all__ = ["CONFIG_KEY", "Catalog", "scan_foreign"]
