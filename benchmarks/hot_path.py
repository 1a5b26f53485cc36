"""Per-step host cost of the worker's steering bookkeeping, in-process (no engine).

At the largest batch the issue names (256 sequences, 64 distinct specs, every layer of the
served model steerable as ``cna-vllm serve`` builds it with its hot-load reserve), times:

- ``apply_batch_update`` for the step that adds all 256 requests (64 new rows written);
- ``apply_batch_update`` for a steady decode step in which 8 requests finish and 8 start
  (new specs, so rows are released and written) and 4 slots move;
- ``prepare()``, which expands slot→row into the per-token row index, for a decode step
  (256 tokens) and a prefill-heavy step (8 192 tokens);
- ``prepare()`` with nothing steered (the unsteered fast path);
- writing one row (the first request of a spec no running request has).

Writes ``{"cases": {name: {"median_us", "p99_us"}}}`` to ``--out``. Compare with a decode
step of the engine (e.g. ``benchmarks/results/overhead.json``: 64 sequences per step at the
recorded tokens/s). Not a test: nothing is asserted.

    python benchmarks/hot_path.py --out benchmarks/results/hot_path.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cna_vllm.embedded import SMALL_MODEL, resolve_model  # noqa: E402
from cna_vllm.identity import ModelIdentity  # noqa: E402


def timeit(fn: Any, setup: Any = None, iters: int = 200) -> dict[str, float]:
    """Median and p99 microseconds of ``fn(setup())`` (setup untimed)."""
    ts = []
    for _ in range(iters):
        arg = setup() if setup else None
        t = time.perf_counter()
        fn(arg)
        ts.append(time.perf_counter() - t)
    ts.sort()
    return {"median_us": statistics.median(ts) * 1e6, "p99_us": ts[int(0.99 * (len(ts) - 1))] * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SMALL_MODEL)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--specs", type=int, default=64)
    ap.add_argument("--hot-load-neurons", type=int, default=256, help="cna-vllm serve's default reserve")
    ap.add_argument("--prefill-tokens", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/results/hot_path.json")
    args = ap.parse_args()

    from cna_vllm import sources
    from cna_vllm.engine.row_table import SteeringState
    from cna_vllm.steering import SteeringSpec

    torch.set_num_threads(1)
    model_dir = resolve_model(args.model)
    ident = ModelIdentity.from_dir(model_dir)
    circuits = sources.load_dir(sources.REPO_CIRCUITS / args.model)
    neuron_circuit = next(n for n, c in circuits.items() if getattr(c, "kind", "cna") != "caa")

    def fresh() -> SteeringState:
        return SteeringState.build(
            circuits,
            range(ident.num_layers),
            intermediate_size=ident.intermediate_size,
            hidden_size=ident.hidden_size,
            hot_load_neurons=args.hot_load_neurons,
            capacity=args.specs,
            max_num_seqs=args.seqs,
            max_num_tokens=max(args.prefill_tokens, args.seqs),
            device=torch.device("cpu"),
        )

    specs = [[{"circuit": neuron_circuit, "multiplier": round(0.25 + 0.01 * i, 2)}] for i in range(args.specs)]

    def params(i: int) -> Any:  # what the worker sees: SamplingParams.extra_args after intake
        return SimpleNamespace(extra_args={"steering": specs[i % args.specs]})

    def update(removed: list[int], added: list[tuple[int, int]], moved: list[tuple[int, int, Any]]) -> Any:
        return SimpleNamespace(
            batch_size=args.seqs,
            removed=removed,
            moved=moved,
            added=[(slot, params(i), [], []) for slot, i in added],
        )

    from vllm.v1.sample.logits_processor import MoveDirectionality

    cases: dict[str, dict[str, float]] = {}
    fill = update([], [(s, s) for s in range(args.seqs)], [])
    cases["batch_update_add_all"] = timeit(lambda st: st.apply_batch_update(fill), fresh, iters=30)

    state = fresh()
    state.apply_batch_update(fill)
    step = {"n": 0}

    def churn(_: Any) -> None:  # 8 finish, 8 start with a spec that needs a new row, 4 swaps
        n = step["n"] = step["n"] + 1
        slots = [(n * 8 + j) % args.seqs for j in range(8)]
        swaps = [((n * 4 + j) % args.seqs, (n * 4 + j + 128) % args.seqs, MoveDirectionality.SWAP) for j in range(4)]
        state.apply_batch_update(update(slots, [(s, n * 8 + j) for j, s in enumerate(slots)], swaps))

    cases["batch_update_decode_churn"] = timeit(churn, iters=300)
    qsl_decode = torch.arange(args.seqs + 1, dtype=torch.int32)
    cases["prepare_decode_256_tokens"] = timeit(lambda _: state.prepare(args.seqs, qsl_decode), iters=500)
    per = args.prefill_tokens // args.seqs
    qsl_prefill = torch.arange(0, args.seqs + 1, dtype=torch.int32) * per
    cases[f"prepare_prefill_{args.prefill_tokens}_tokens"] = timeit(
        lambda _: state.prepare(args.prefill_tokens, qsl_prefill), iters=200
    )
    rows = fresh()
    k = {"n": 0}

    def new_row(_: Any) -> None:  # first request of a spec no running request has: its row is written
        k["n"] += 1
        rows.release(rows.acquire(SteeringSpec.from_params(params(k["n"]))))

    cases["acquire_new_row"] = timeit(new_row, iters=100)
    idle = fresh()
    cases["prepare_unsteered"] = timeit(lambda _: idle.prepare(args.seqs, qsl_decode), iters=500)

    result = {
        "cases": cases,
        "setup": {
            "model": args.model,
            "seqs": args.seqs,
            "distinct_specs": args.specs,
            "hot_load_neurons": args.hot_load_neurons,
            "steerable_layers": len(state.columns),
            "columns_per_layer": max(len(c) for c in state.columns.values()),
            "torch_threads": 1,
            "loadavg": os.getloadavg(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name, c in cases.items():
        print(f"{name:<34} median {c['median_us']:9.1f} us   p99 {c['p99_us']:9.1f} us")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
