"""The registry of steering sources on disk: find, read once, hash, validate.

A *source* is what a steering item names: a neuron :class:`~cna_vllm.circuit.Circuit` or a
CAA :class:`~cna_vllm.vectors.VectorSet`. Every caller that touches a source file (the
offline engine, the workers, the server's catalogue, hot-loading, export, the CLI) goes
through these functions:

- :func:`load` reads a file once and dispatches on the ``kind`` its metadata records;
- :func:`scan_dir` / :func:`load_dir` find every source in a directory;
- :class:`Entry` is a file pinned by its content hash (what travels in the engine config),
  and :meth:`Entry.load` refuses a file that changed or carries another name;
- :func:`validate` checks a source against the served model;
- :data:`REPO_CIRCUITS` is where the shipped circuits live.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from cna_vllm.circuit import Circuit
from cna_vllm.errors import CircuitError, SteeringError
from cna_vllm.fileformat import read_file, read_metadata
from cna_vllm.identity import ModelIdentity
from cna_vllm.vectors import VectorSet

Source = Circuit | VectorSet
"""What a steering item names: a neuron circuit or a CAA vector set."""
SourcesArg = Mapping[str, str | Path | Circuit | VectorSet] | str | Path | None
"""How callers name an engine's sources: a directory, ``{name: file or object}``, or none."""

KINDS: dict[str, type[Circuit] | type[VectorSet]] = {"cna": Circuit, "caa": VectorSet}

REPO_CIRCUITS = Path(os.environ.get("CNA_VLLM_CIRCUITS_ROOT") or Path(__file__).resolve().parent.parent / "circuits")
"""Where the shipped ``<model alias>/*.safetensors`` circuits live (the repo's, or ``$CNA_VLLM_CIRCUITS_ROOT``)."""


def shipped_dir(model: str | Path) -> Path:
    """``REPO_CIRCUITS/<alias>``: the shipped circuits of a model (which may not exist)."""
    from cna_vllm.embedded import model_alias

    return REPO_CIRCUITS / model_alias(model)


# --------------------------------------------------------------------------- reading
def load(path: str | Path, model: ModelIdentity | str | Path | None = None) -> Source:
    """Read a source file once, as the kind its metadata records; validate it for ``model`` if given."""
    path = Path(path)
    meta, tensors = read_file(path)
    cls = KINDS.get(meta.get("kind", "cna"))
    if cls is None:
        raise CircuitError(f"{path} holds an unknown kind {meta.get('kind')!r}; known: {', '.join(KINDS)}")
    source = cls.from_file(path, meta, tensors)
    return source if model is None else source.validate_for(model)


def kind_of(path: str | Path) -> str:
    """The kind a file records, from its header alone."""
    return read_metadata(path).get("kind", "cna")


def scan_dir(directory: str | Path, model: ModelIdentity | str | Path | None = None) -> dict[str, tuple[Path, Source]]:
    """``{name: (file, source)}`` for every ``*.safetensors`` source in a directory."""
    out: dict[str, tuple[Path, Source]] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        source = load(path, model)
        if source.name in out:
            raise CircuitError(f"two circuits in {directory} are named {source.name!r}")
        out[source.name] = (path.resolve(), source)
    return out


def load_dir(directory: str | Path, model: ModelIdentity | str | Path | None = None) -> dict[str, Source]:
    """Every source in a directory, by name."""
    return {name: source for name, (_, source) in scan_dir(directory, model).items()}


def scan_foreign(root: Path, model_name: str, mine: set[str]) -> dict[str, str]:
    """``{circuit name: model alias}`` for circuits shipped under ``root/<alias>/`` for other models (headers only)."""
    out: dict[str, str] = {}
    if not root.is_dir():
        return out
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name != model_name):
        for path in sorted(sub.glob("*.safetensors")):
            try:
                name = read_metadata(path).get("name") or path.stem
            except CircuitError:
                name = path.stem
            if name not in mine:
                out.setdefault(name, sub.name)
    return out


# --------------------------------------------------------------------------- pinned files
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    """A source file pinned by its content hash: what the engine config carries per source."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> Entry:
        path = Path(path).resolve()
        return cls(str(path), file_sha256(path))

    @classmethod
    def from_dict(cls, entry: Mapping[str, str]) -> Entry:
        return cls(str(entry["path"]), str(entry.get("sha256", "")))

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}

    def load(self, name: str) -> Source:
        """The source, if the file is unchanged and carries ``name``."""
        path = Path(self.path)
        digest = file_sha256(path) if path.is_file() else "missing"
        if self.sha256 and digest != self.sha256:
            raise SteeringError(
                f"circuit {name!r}: {path} changed since the engine was configured "
                f"(sha256 {digest[:12]} != {self.sha256[:12]})"
            )
        source = load(path)
        if source.name != name:
            raise SteeringError(f"circuit file {path} is named {source.name!r}, registered as {name!r}")
        return source


def cache_copy(name: str, source: Source) -> Path:
    """A content-addressed file of ``source`` named ``name`` in the cache (stable across runs)."""
    from cna_vllm.embedded import cache_dir

    root = cache_dir() / "engine-circuits"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        path = replace(source, name=name).save(Path(tmp) / "c.safetensors")
        final = root / f"{name}-{file_sha256(path)[:16]}.safetensors"
        if not final.exists():
            path.rename(final)
    return final


# --------------------------------------------------------------------------- validation
def validate(source: Source, model: ModelIdentity | str | Path) -> Source:
    """``source`` if it fits ``model``: a model directory is checked with its weights fingerprint,
    an identity (a model known only by its config) by its dimensions."""
    return source.validate_for(model, check_fingerprint=not isinstance(model, ModelIdentity))


def pin(name: str, source: Source, model_dir: str | Path, path: Path | None = None) -> Entry:
    """Validate ``source`` for the model; the :class:`Entry` of its file (a cached copy if it has none)."""
    validate(source, model_dir)
    return Entry.of(path or cache_copy(name, source))


def resolve(sources: SourcesArg, model_dir: str | Path) -> tuple[dict[str, Source], dict[str, Entry]]:
    """Load, validate against the model and pin an engine's sources: ``(by name, entries)``."""
    if sources is None:
        return {}, {}
    if isinstance(sources, str | Path):
        found = scan_dir(sources)
        if not found:
            raise SteeringError(f"no circuits (*.safetensors) in {sources}")
        loaded = {name: source for name, (_, source) in found.items()}
        files = {name: path for name, (path, _) in found.items()}
    else:
        loaded, files = {}, {}
        for name, value in sources.items():
            if isinstance(value, Circuit | VectorSet):
                loaded[name] = value
            else:
                loaded[name] = load(value)
                if loaded[name].name == name:
                    files[name] = Path(value).resolve()
    return loaded, {name: pin(name, source, model_dir, files.get(name)) for name, source in loaded.items()}


def for_hot_load(source: str | Path | Source, model_dir: str | Path) -> tuple[str, Source, Entry]:
    """``(name, source, entry)`` of a source to add to a running engine (validated for the model)."""
    if isinstance(source, Circuit | VectorSet):
        return source.name, source, pin(source.name, source, model_dir)
    path = Path(source).resolve()
    loaded = load(path)
    return loaded.name, loaded, pin(loaded.name, loaded, model_dir, path)
