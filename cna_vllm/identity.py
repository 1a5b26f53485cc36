"""``ModelIdentity``: what a circuit or vector set records about its model and is checked against."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from cna_vllm.errors import ModelError


@dataclass(frozen=True)
class ModelIdentity:
    """What a circuit must agree with: dimensions and a cheap weights fingerprint."""

    architecture: str
    num_layers: int
    intermediate_size: int
    hidden_size: int
    fingerprint: str

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelIdentity:
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ModelError(f"{model_dir} has no config.json")
        config = json.loads(config_path.read_text())
        text = config.get("text_config") or config
        try:
            return cls(
                architecture=(config.get("architectures") or ["?"])[0],
                num_layers=int(text["num_hidden_layers"]),
                intermediate_size=int(text["intermediate_size"]),
                hidden_size=int(text["hidden_size"]),
                fingerprint=weights_fingerprint(model_dir),
            )
        except KeyError as exc:
            raise ModelError(f"{config_path} lacks {exc.args[0]!r}") from exc

    def to_dict(self) -> dict:
        return asdict(self)


FINGERPRINT_SAMPLES = 32
FINGERPRINT_SAMPLE_BYTES = 1 << 14


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 over every safetensors header plus evenly spaced samples of the data.

    Reads about 0.5 MiB per file whatever the model size, so it is cheap on 70B models.
    Any change to a tensor's name, shape, dtype or layout changes it, and so does any
    re-quantization or fine-tune that touches the sampled bytes (in practice: all of them).
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir} holds no *.safetensors files to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(path.name.encode())
            digest.update(f.read(header_len))
            start = 8 + header_len
            span = max(size - start - FINGERPRINT_SAMPLE_BYTES, 0)
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(start + span * i // max(FINGERPRINT_SAMPLES - 1, 1))
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def identity_of(model: ModelIdentity | str | Path) -> ModelIdentity:
    """``model`` itself, or the identity of the HF model directory it names."""
    return model if isinstance(model, ModelIdentity) else ModelIdentity.from_dir(model)
