"""Make the blind labelling set of docs/evaluation/labels/ from the committed A/B reports (reproducible).

Samples answers by SHA-256 of ``set:index`` (no choice by content), splits them by prompt into
*dev* and *test* halves, shuffles them with a fixed seed, and writes, outside the repository:

- ``key.json``: every sampled answer with its model, arm, prompt set and index (the readers never see it);
- ``blind-A.jsonl`` / ``blind-B.jsonl``: ``{id, request, answer}`` only, in shuffled order, two halves.

Each half was labelled by two readers independently following docs/evaluation/labelling.md, and the
disagreements by a third (``blind-C.jsonl``); see docs/evaluation/labels/README.md.

    python benchmarks/label_set.py --out /tmp/labels
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from cna_vllm.prompts import load_prompts

REPO = Path(__file__).resolve().parents[1]
SOURCES = [  # (report, model, arms, harmful prompts, harmless prompts, max tokens)
    ("headline", "qwen2.5-coder-0.5b-instruct",
     ["baseline", "refusal@0", "refusal[neg]@-1:shift", "refusal[pos]@2", "refusal-caa@0.5:shift"], 100, 50, 128),
    ("qwen1.5b-headline", "qwen2.5-coder-1.5b-instruct",
     ["baseline", "refusal@0", "refusal[pos]@0", "refusal-caa@0.5:shift"], 100, 50, 128),
    ("sweep", "qwen2.5-coder-0.5b-instruct", ["refusal-caa@2:shift", "refusal@-1", "refusal@3"], 40, 0, 64),
]  # fmt: skip
SEED = 20261204


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def first(n_total: int, n: int, name: str) -> list[int]:
    """The ``n`` indices of ``range(n_total)`` with the smallest SHA-256 of ``name:index``."""
    return sorted(range(n_total), key=lambda i: digest(f"{name}:{i}"))[:n]


def split_of(name: str, index: int) -> str:
    return "dev" if int(digest(f"split:{name}:{index}"), 16) % 2 == 0 else "test"


def sample() -> list[dict]:
    harm, benign = load_prompts("harmbench-eval").prompts, load_prompts("benign-eval").prompts
    items = []
    for report, model, arms, n_harm, n_benign, max_tokens in SOURCES:
        data = json.loads((REPO / "docs" / "results" / report / "report.json").read_text())
        h_idx = first(n_harm, 50 if n_harm == 100 else 20, "harmbench-eval")
        b_idx = first(n_benign, 10, "benign-eval") if n_benign else []
        for arm_data in [a for a in data["arms"] if a["name"] in arms]:  # the report's order
            arm = arm_data["name"]
            for name, prompts, idx, key in (("harmbench-eval", harm, h_idx, "outputs"),
                                            ("benign-eval", benign, b_idx, "harmless_outputs")):  # fmt: skip
                for i in idx:
                    items.append({"model": model, "arm": arm, "set": name, "index": i, "max_tokens": max_tokens,
                                  "source": f"docs/results/{report}", "prompt": prompts[i],
                                  "answer": arm_data[key][i], "split": split_of(name, i)})  # fmt: skip
    random.Random(SEED).shuffle(items)
    for n, item in enumerate(items):
        item["id"] = f"L{n:04d}"
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a directory outside the repository")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    items = sample()
    (out / "key.json").write_text(json.dumps(items, indent=0))
    for part, chosen in (("A", items[0::2]), ("B", items[1::2])):
        with (out / f"blind-{part}.jsonl").open("w") as f:
            for it in chosen:
                f.write(json.dumps({"id": it["id"], "request": it["prompt"], "answer": it["answer"]}) + "\n")
    print(f"{len(items)} answers -> {out}")


if __name__ == "__main__":
    main()
