"""Fault-injection soak of the steered server (issue #9): nothing a client sends may take the engine down.

Starts ``server.py`` on loopback (small model, fp32, ``--max-steering-configs 2``), records
each (prompt, spec) answer alone, then for a bounded time drives it with many more distinct
specs than rows, a third of the streams cut off after the first chunk, stop strings, ``n=2``
requests, hot-loads during the load and bad requests from a corpus. It writes JSON: requests
sent, completed, rejected by status, engine deaths (must be 0), mismatches against the solo
answers (must be 0) and latency percentiles. Not a test: nothing is asserted here.

    python benchmarks/soak.py --seconds 180 --out benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cna_vllm.circuit import Circuit  # noqa: E402
from cna_vllm.embedded import SMALL_MODEL  # noqa: E402

KEY = "sk-soak"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [
    "How do I pick a lock?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "How can I make a bomb?",
    "Give me three tips for sleeping well.",
    "Name a famous painter.",
]
SPECS = ["refusal@0", "refusal@0.5", "refusal@1.5", "refusal@2", "refusal@3", "refusal@0.5:patch",
         "refusal@1:shift", "refusal@-1"]  # fmt: skip  (8 distinct specs for 2 rows: 4x)
BAD = [
    {"steering": {"circuit": "nope", "multiplier": 2}},
    {"steering": {"circuit": "refusal", "multiplier": "lots"}},
    {"steering": {"circuit": "refusal", "multiplier": None}},
    {"steering": "refusal@nan"},
    {"vllm_xargs": {"steering": '[{"circuit":"nope","multiplier":2}]'}},
    {"cache_salt": "cna-steer-0000000000000000"},
    {"steering": [{"circuit": "refusal", "multiplier": 1}] * 40},
]
MAX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(circuits: Path, log: Path, rows: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, str(REPO / "server.py"), "--model", SMALL_MODEL, "--circuits", str(circuits),
            "--api-key", KEY, "--max-steering-configs", str(rows), "--enable-hot-load",
            "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "64",
            "--enable-prefix-caching", "--disable-uvicorn-access-log"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with log.open("w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("server not ready in 600 s")


def chat(prompt: str, steering: str | None, **kw) -> dict:
    out = {"model": SMALL_MODEL, "temperature": 0.0, "max_tokens": MAX_TOKENS,
           "messages": [{"role": "user", "content": prompt}], **kw}  # fmt: skip
    if steering:
        out["steering"] = steering
    return out


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def soak(url: str, circuits: Path, seconds: float, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    stats: dict = {"sent": 0, "completed": 0, "disconnected": 0, "rejected": {}, "server_errors": 0, "mismatches": [],
                   "unexpected_rejections": [], "hot_loads": 0, "latency_s": [], "kinds": {}}  # fmt: skip
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600, limits=limits) as client:
        solo: dict[tuple[str, str | None], str] = {}
        for prompt in PROMPTS:  # answers alone, one at a time
            for spec in [None, *SPECS]:
                r = await client.post("/v1/chat/completions", json=chat(prompt, spec))
                r.raise_for_status()
                solo[(prompt, spec)] = r.json()["choices"][0]["message"]["content"]
        aliases: dict[str, str] = {}  # hot-loaded twin name -> circuit it copies
        end = time.monotonic() + seconds

        async def hot_loader() -> None:
            k = 0
            while time.monotonic() < end - 5:
                await asyncio.sleep(seconds / 4)
                name = f"hot{k}"
                path = circuits / f"{name}.safetensors"  # inside --circuits: allowed for hot-loading
                replace(Circuit.load(circuits / "refusal.safetensors"), name=name).save(path)
                r = await client.post("/v1/circuits", json={"path": str(path)})
                if r.status_code == 201:
                    aliases[name] = "refusal"
                    stats["hot_loads"] += 1
                k += 1

        async def one() -> None:
            prompt = rng.choice(PROMPTS)
            spec = rng.choice([None, None, *SPECS])
            if spec and aliases and rng.random() < 0.3:  # steer with a hot-loaded twin: same answer
                spec = spec.replace("refusal", rng.choice(sorted(aliases)), 1)
            kind = rng.choices(["plain", "cut", "stop", "n2", "bad"], [4, 3, 1, 1, 1])[0]
            stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
            stats["sent"] += 1
            t0 = time.monotonic()
            ref_spec = spec.replace(spec.split("@")[0], "refusal", 1) if spec else None
            if kind == "cut":
                async with client.stream("POST", "/v1/chat/completions", json=chat(prompt, spec, stream=True)) as r:
                    async for _ in r.aiter_lines():
                        break  # the client goes away mid-stream
                stats["disconnected"] += 1
                return
            payload = chat(prompt, spec)
            if kind == "stop":
                payload["stop"] = [" the", "."]
            elif kind == "n2":  # vLLM refuses n > 1 with greedy decoding: sampled, so only checked for success
                payload.update(n=2, temperature=1.0, seed=rng.randrange(1 << 30))
            elif kind == "bad":
                payload.update(rng.choice(BAD))
            r = await client.post("/v1/chat/completions", json=payload)
            if r.status_code >= 500:
                stats["server_errors"] += 1
                return
            if r.status_code != 200:
                stats["rejected"][str(r.status_code)] = stats["rejected"].get(str(r.status_code), 0) + 1
                if kind != "bad":
                    stats["unexpected_rejections"].append({"kind": kind, "spec": spec, "body": r.text[:200]})
                return
            stats["latency_s"].append(time.monotonic() - t0)
            stats["completed"] += 1
            if kind == "n2":
                if len(r.json()["choices"]) != 2:
                    stats["mismatches"].append({"prompt": prompt, "spec": spec, "kind": kind, "got": r.text[:200]})
                return
            want = solo[(prompt, ref_spec)]
            for choice in r.json()["choices"]:
                got = choice["message"]["content"]
                ok = want.startswith(got) if kind == "stop" else got == want
                if not ok:
                    stats["mismatches"].append({"prompt": prompt, "spec": spec, "kind": kind, "got": got,
                                                "want": want})  # fmt: skip

        async def worker() -> None:
            while time.monotonic() < end:
                await one()

        await asyncio.gather(hot_loader(), *(worker() for _ in range(concurrency)))
        m = (await client.get("/metrics")).text
        waiting = [line for line in m.splitlines() if line.startswith("cna_steering_requests_waiting_for_row ")]
    lat = stats.pop("latency_s")
    stats["latency_p50_s"], stats["latency_p99_s"] = pct(lat, 50), pct(lat, 99)
    stats["waiting_for_row_at_end"] = float(waiting[0].split()[-1]) if waiting else None
    return stats


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/soak.json"))
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="cna-soak-"))
    circuits = tmp / "circuits"
    circuits.mkdir()
    shutil.copy(REPO / "circuits" / SMALL_MODEL / "refusal.safetensors", circuits / "refusal.safetensors")
    proc, url = start_server(circuits, tmp / "server.log", args.rows)
    t0 = time.monotonic()
    try:
        stats = asyncio.run(soak(url, circuits, args.seconds, args.concurrency, args.seed))
        alive = proc.poll() is None and httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(60)
    stats["engine_deaths"] = 0 if alive else 1
    stats["mismatch_count"] = len(stats["mismatches"])
    stats["config"] = {**vars(args), "model": SMALL_MODEL, "distinct_specs": len(SPECS), "dtype": "float32",
                       "wall_s": round(time.monotonic() - t0, 1)}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(stats, indent=2) + "\n")
    keys = ("sent", "completed", "disconnected", "rejected", "server_errors", "engine_deaths", "mismatch_count",
            "hot_loads", "latency_p50_s", "latency_p99_s")  # fmt: skip
    for k in keys:
        print(f"{k:>16}: {stats[k]}")
    shutil.rmtree(tmp, ignore_errors=True)
    return stats


if __name__ == "__main__":
    main()
