"""What one server shows of its engine's sources: ``/v1/circuits`` cards and hot-load checks.

The sources themselves are the engine's :class:`~cna_vllm.catalogue.Catalogue` in this process
(:func:`cna_vllm.engine.intake.catalogue`, read once from the engine's ``additional_config``);
this class adds the pinned file entries, the model and capacity, and foreign-name hints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cna_vllm import sources
from cna_vllm.catalogue import Catalogue, as_catalogue
from cna_vllm.engine.config import EngineSteeringConfig
from cna_vllm.errors import CnaError
from cna_vllm.server.schema import ApiError
from cna_vllm.sources import Source
from cna_vllm.steering import MODES, VECTOR_MODES, is_vector_set


@dataclass
class Catalog:
    """Sources loaded in the engine (by name, with their pinned file entries) plus foreign-name hints."""

    circuits: dict[str, Source]
    entries: dict[str, dict[str, str]]
    model_dir: str
    model_name: str
    capacity: int
    foreign: dict[str, str] = field(default_factory=dict)
    hot_load_neurons: int = 0
    catalogue: Catalogue = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.catalogue = as_catalogue(self.circuits, self.foreign)
        self.catalogue.foreign.update(self.foreign)
        self.circuits, self.foreign = self.catalogue.sources, self.catalogue.foreign  # one dict each, shared

    @classmethod
    def from_engine(cls, vllm_config: Any, model_name: str, circuits_root: Path | None = None) -> Catalog:
        """The catalogue of the engine this process serves (the single source of truth)."""
        from cna_vllm.engine.intake import catalogue

        cfg = EngineSteeringConfig.from_additional_config(vllm_config.additional_config)
        shared = catalogue(vllm_config)
        if circuits_root:
            shared.foreign.update(sources.scan_foreign(circuits_root, model_name, set(shared)))
        return cls(
            shared,  # type: ignore[arg-type] - a Catalogue is the mapping it wraps
            dict(cfg.circuits),
            vllm_config.model_config.model,
            model_name,
            cfg.max_steering_configs,
            hot_load_neurons=cfg.hot_load_neurons,
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

    def add(self, name: str, circuit: Source, entry: sources.Entry) -> None:
        self.catalogue.add(name, circuit)
        self.entries[name] = entry.to_dict()

    def listing(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.describe(n) for n in sorted(self.circuits)]}

    def check_hot_load(self, path: str, roots: Sequence[Path] = ()) -> tuple[Source, sources.Entry, bool]:
        """Validate a server-side circuit file for this model: ``(circuit, entry, already_loaded)``.

        The file must lie (after resolving links) inside one of ``roots``; that is checked before
        anything about the file is looked at, so the answer says nothing about other paths.
        """
        p = _checked_path(path)
        try:
            real = p.resolve()
        except (OSError, RuntimeError):  # a link loop, or a name the file system refuses
            raise ApiError("path cannot be resolved on this server", param="path", code="invalid_path") from None
        if not any(real.is_relative_to(root) for root in roots):
            raise ApiError(
                "path must lie inside the server's circuit directories (--circuits, --hot-load-dir)",
                status=403,
                param="path",
                code="path_not_allowed",
            )
        p = real
        try:
            is_file = p.is_file()
        except OSError:
            is_file = False
        if not is_file:  # missing, a directory, a device: one answer, no oracle for what exists
            raise ApiError("no readable circuit file at this path", param="path", code="invalid_circuit")
        try:
            circuit = sources.validate(sources.load(p), self.model_dir)
            entry = sources.Entry.of(p)
        except OSError:
            raise ApiError("no readable circuit file at this path", param="path", code="invalid_circuit") from None
        except CnaError as exc:
            code = "circuit_model_mismatch" if "another model" in str(exc) else "invalid_circuit"
            raise ApiError(str(exc), param="path", code=code) from None
        loaded = self.entries.get(circuit.name)
        same = loaded is not None and loaded.get("sha256") == entry.sha256
        if loaded is not None and not same:
            raise ApiError(
                f"a different circuit named {circuit.name!r} is already loaded; pick another name",
                status=409,
                param="path",
                code="circuit_exists",
            )
        return circuit, entry, same


MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


def _checked_path(path: str) -> Path:
    """``path`` as an absolute :class:`Path`, or a 400 naming ``path`` (NUL byte, over-long name, relative)."""
    if "\x00" in path:
        raise ApiError("path must not contain a NUL byte", param="path", code="invalid_path")
    encoded = path.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_PATH_BYTES:
        raise ApiError(f"path is longer than {MAX_PATH_BYTES} bytes", param="path", code="invalid_path")
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in path.split("/")):
        raise ApiError(
            f"path has a file or directory name longer than {MAX_NAME_BYTES} bytes", param="path", code="invalid_path"
        )
    p = Path(path)
    if not p.is_absolute():
        raise ApiError("path must be an absolute server-side path", param="path", code="invalid_path")
    return p
