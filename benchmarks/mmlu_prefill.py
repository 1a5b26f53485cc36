"""Prompt throughput of the in-process engine on MMLU prompts (max_tokens=1), under the CPU binding in effect.

vLLM's CPU backend binds its worker to all cores but one by default; ``cna-vllm ab/sweep``
bind every core. Run twice to compare, and compare the two files' ``prompt_tokens_per_s``:

    VLLM_CPU_OMP_THREADS_BIND=auto python benchmarks/mmlu_prefill.py --out benchmarks/results/mmlu-prefill-auto.json
    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
        python benchmarks/mmlu_prefill.py --out benchmarks/results/mmlu-prefill-all.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import SamplingParams

    from cna_vllm.engine.llm import SteeredLLM
    from cna_vllm.evaluate.mmlu import load_mmlu

    msgs = [[{"role": "user", "content": q.prompt()}] for q in load_mmlu(args.questions)]
    model = "qwen2.5-coder-0.5b-instruct"
    llm = SteeredLLM(model, None, dtype="float32", enforce_eager=True, enable_prefix_caching=False)
    runs = []
    for logprobs in (None, 20):
        t = time.perf_counter()
        outs = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=1, logprobs=logprobs))
        secs = time.perf_counter() - t
        tokens = sum(len(o.prompt_token_ids) for o in outs)
        runs.append({"logprobs": logprobs, "seconds": secs, "prompt_tokens": tokens,
                     "prompt_tokens_per_s": tokens / secs})
        print(runs[-1], flush=True)
    llm.shutdown()
    result = {"bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"), "questions": args.questions, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
