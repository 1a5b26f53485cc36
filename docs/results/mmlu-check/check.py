"""Is MMLU informative on the default model? An independent HF-transformers check (no vLLM).

Scores the first 60 questions of the 100-question seeded subset four ways, by the
highest next-token log-probability among the letters A-D ('A' and ' A' forms):
the cna-vllm chat prompt, raw zero-shot, raw 5-shot (shots from other questions of the
same topic, outside the subset), and the chat prompt prefilled with "The answer is".

    python docs/results/mmlu-check/check.py     # about 5 minutes on 2 CPU cores
"""

from collections import Counter

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cna_vllm.embedded import resolve_model
from cna_vllm.evaluate.mmlu import LETTERS, load_mmlu

N = 60
model_dir = resolve_model("qwen2.5-coder-0.5b-instruct")
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
subset = load_mmlu(100)[:N]
asked = {q.question for q in load_mmlu(100)}
pool = [q for q in load_mmlu(100_000) if q.question not in asked]
letter_ids = {L: [tok.encode(f, add_special_tokens=False)[0] for f in (L, " " + L)] for L in LETTERS}


def block(q, answer: bool) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q.choices, strict=True))
    return f"{q.question}\n{options}\nAnswer:" + (f" {q.answer}\n\n" if answer else "")


def chat(q) -> str:
    messages = [{"role": "user", "content": q.prompt()}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def shots(q, k: int = 5) -> list:
    return [p for p in pool if p.topic == q.topic][:k]


def header(q) -> str:
    return f"The following are multiple choice questions (with answers) about {q.topic}.\n\n"


FORMATS = {
    "cna-vllm chat prompt": chat,
    "raw 0-shot": lambda q: header(q) + block(q, False),
    "raw 5-shot": lambda q: header(q) + "".join(block(p, True) for p in shots(q)) + block(q, False),
    "chat + 'The answer is'": lambda q: chat(q) + "The answer is",
}

for name, render in FORMATS.items():
    picks = Counter()
    correct = 0
    for q in subset:
        with torch.no_grad():
            logits = model(**tok(render(q), return_tensors="pt")).logits[0, -1]
        logp = torch.log_softmax(logits, -1)
        pick = max(LETTERS, key=lambda L: max(float(logp[i]) for i in letter_ids[L]))
        picks[pick] += 1
        correct += pick == q.answer
    print(f"{name:<24} accuracy {correct / N:.3f}  picks {dict(sorted(picks.items()))}", flush=True)
