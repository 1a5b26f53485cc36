"""The steered server against stock ``vllm serve``, driven by vLLM's own benchmark client.

Starts the stock vLLM OpenAI server (``python -m vllm.entrypoints.openai.api_server``) and
then ``cna-vllm serve`` (``python -m cna_vllm.cli serve``), one at a time, on the same model
with the same flags, and drives each with ``vllm bench serve`` (its ``main(args)``, called
in this process: the ``vllm`` console script does not start on the CPU build). Random
dataset, fixed seed, a fixed request count, at an unbounded rate and at one fixed rate below
saturation (half the stock server's unbounded request throughput unless ``--rate`` is given).

Arms: ``stock``; on the plugin ``unsteered``, ``one_spec`` (every request steered by one
spec, sent with the client's own ``--extra-body``), ``specs8`` and ``specs64`` (8 / 64
distinct specs, request i gets spec i mod n), and ``mixed`` (every other request steered,
8 distinct specs). Distinct specs per request use the client's per-request
``SampleRequest.request_overrides`` (merged into the body by the client, per-request keys
win): a thin wrapper around its ``get_samples`` sets ``{"steering": spec}`` on each sample.

Recorded per arm: output token and request throughput, TTFT and TPOT p50/p99, the queue
wait (vLLM's ``vllm:request_queue_time_seconds``, i.e. time in the scheduler's waiting
queue, where steered requests wait for a row, and the server's
``cna_steering_row_wait_seconds``, the admission gate's wait), both as the mean over the
arm's requests from ``/metrics``, and the load average before and after (the machine may be
shared), and the CPU seconds of the server's processes per output token (less sensitive to
other jobs than wall-clock figures). After each server start a full-size unbounded pass warms
it up, unrecorded. With ``--reps N`` the stock/plugin pair runs N times, alternately; each figure is
the median over repetitions. Also times the steering middleware in-process on 32k-character
request bodies. Writes ``--out`` (JSON), a PNG beside it and prints a table. Not a test:
nothing is asserted.

    python benchmarks/serve.py --out benchmarks/results/serve.json
    python benchmarks/serve.py --quick --out /tmp/serve-quick.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cna_vllm.embedded import SMALL_MODEL, model_alias, resolve_model  # noqa: E402

CIRCUIT = "refusal"
PLUGIN_ARMS = ("unsteered", "one_spec", "specs8", "specs64", "mixed")
DISTINCT = {"stock": 0, "unsteered": 0, "one_spec": 1, "specs8": 8, "specs64": 64, "mixed": 8}
RATIO_ARMS = {
    "unsteered": "unsteered",
    "one_spec": "one_spec",
    "specs8": "specs8",
    "specs64": "specs64",
    "mixed": "mixed",
}


def spec(i: int) -> str:
    """The i-th distinct spec: the shipped circuit at its own multiplier (one row each)."""
    return f"{CIRCUIT}@{0.25 + 0.01 * i:.2f}"


def assignment(arm: str) -> Callable[[int], str | None] | None:
    """Request index -> steering (None: unsteered); None for arms that need no per-request hook."""
    if arm == "specs8":
        return lambda i: spec(i % 8)
    if arm == "specs64":
        return lambda i: spec(i % 64)
    if arm == "mixed":
        return lambda i: spec((i // 2) % 8) if i % 2 else None
    return None


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process on a free loopback port; ``with`` waits for /health and stops it."""

    def __init__(self, kind: str, argv: list[str], log: Path) -> None:
        self.kind, self.port, self.log = kind, free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with log.open("w") as f:
            self.proc = subprocess.Popen(
                [*argv, "--port", str(self.port)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO
            )

    def __enter__(self) -> Server:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 900:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited ({self.proc.returncode}); log: {self.log}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    print(f"[{self.kind}] ready in {time.monotonic() - t0:.0f} s ({self.url})", flush=True)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"{self.kind} server not ready in 900 s; log: {self.log}")

    def __exit__(self, *_: Any) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def server_argv(kind: str, model_dir: Path, alias: str, args: argparse.Namespace) -> list[str]:
    common = [
        "--host",
        "127.0.0.1",
        "--served-model-name",
        alias,
        "--dtype",
        args.dtype,
        "--max-model-len",
        str(args.max_model_len),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--seed",
        "0",
        "--disable-uvicorn-access-log",
        *args.server_arg,
    ]
    if kind == "stock":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *common]
    return [sys.executable, "-m", "cna_vllm.cli", "serve", "--model", str(model_dir), *common]


# --------------------------------------------------------------------------- /metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfINFNa]+)$")


def scrape(url: str) -> dict[str, float]:
    """Sum of each sample name over its label sets (``/metrics``)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def mean_delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    n = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    if n <= 0:
        return None
    return (after[f"{name}_sum"] - before.get(f"{name}_sum", 0.0)) / n


# --------------------------------------------------------------------------- the client
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a server process and all its children (API, engine core, worker)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def bench(
    url: str, pid: int, model_dir: Path, alias: str, args: argparse.Namespace, arm: str, rate: float, num_prompts: int
) -> dict[str, Any]:
    """One ``vllm bench serve`` run against ``url`` for ``arm``; the figures this benchmark records."""
    from vllm.benchmarks import serve as vb
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vb.add_cli_args(parser)
    argv = [
        "--backend",
        "vllm",
        "--base-url",
        url,
        "--endpoint",
        "/v1/completions",
        "--model",
        str(model_dir),
        "--served-model-name",
        alias,
        "--tokenizer",
        str(model_dir),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(num_prompts),
        "--seed",
        str(args.seed),
        "--request-rate",
        str(rate),
        "--temperature",
        "0",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--ready-check-timeout-sec",
        "0",
    ]
    if arm == "one_spec":
        argv += ["--extra-body", json.dumps({"steering": spec(0)})]  # the client's own option
    ns = parser.parse_args(argv)
    assign = assignment(arm)
    original = vb.get_samples

    def with_steering(a: Any, tokenizer: Any) -> list[Any]:
        samples = original(a, tokenizer)
        for i, sample in enumerate(samples):
            steering = assign(i) if assign else None
            if steering is not None:
                sample.request_overrides = {**(sample.request_overrides or {}), "steering": steering}
        return samples

    load0, m0, cpu0 = os.getloadavg(), scrape(url), cpu_seconds(pid)
    vb.get_samples = with_steering
    try:
        r = vb.main(ns)
    finally:
        vb.get_samples = original
    cpu1, load1, m1 = cpu_seconds(pid), os.getloadavg(), scrape(url)
    return {
        "output_throughput": r["output_throughput"],
        "request_throughput": r["request_throughput"],
        "ttft_p50_ms": r["p50_ttft_ms"],
        "ttft_p99_ms": r["p99_ttft_ms"],
        "tpot_p50_ms": r["p50_tpot_ms"],
        "tpot_p99_ms": r["p99_tpot_ms"],
        "e2el_p50_ms": r["p50_e2el_ms"],
        "queue_wait_mean_ms": _ms(mean_delta(m0, m1, "vllm:request_queue_time_seconds")),
        "row_wait_mean_ms": _ms(mean_delta(m0, m1, "cna_steering_row_wait_seconds")),
        "server_cpu_ms_per_output_token": (cpu1 - cpu0) * 1e3 / max(r["total_output_tokens"], 1),
        "completed": r["completed"],
        "failed": r["failed"],
        "duration_s": r["duration"],
        "distinct_specs": DISTINCT[arm],
        "loadavg_before": load0,
        "loadavg_after": load1,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


# --------------------------------------------------------------------------- middleware cost
def middleware_cost(alias: str, iters: int = 400) -> dict[str, Any]:
    """Median / p99 milliseconds of the steering middleware's whole pass on 32k-character bodies, in-process.

    The full ASGI pass: read the body, parse, validate and rewrite ``steering``, re-encode,
    take and give back the admission gate, forward to a downstream app that does nothing.
    """
    from types import SimpleNamespace

    from cna_vllm.engine.admission import SpecGate
    from cna_vllm.engine.config import engine_kwargs
    from cna_vllm.server.catalog import Catalog
    from cna_vllm.server.metrics import metrics
    from cna_vllm.server.middleware import SteeringMiddleware
    from cna_vllm.server.state import ServerState
    from cna_vllm.sources import REPO_CIRCUITS
    from cna_vllm.steering import SteeringLimits

    kw, _ = engine_kwargs(alias, REPO_CIRCUITS / alias)
    engine = SimpleNamespace(instance_id="serve-bench", additional_config=kw["additional_config"],
                             model_config=SimpleNamespace(model=kw["model"]))
    catalog = Catalog.from_engine(engine, alias, REPO_CIRCUITS)
    state = ServerState(catalog, SteeringLimits(), SpecGate(catalog.capacity), metrics())
    app = SimpleNamespace(state=SimpleNamespace(cna_steering=state))

    async def downstream(_scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    mw = SteeringMiddleware(downstream)
    steer = [{"circuit": CIRCUIT, "multiplier": 0.5}, {"circuit": CIRCUIT, "mode": "patch", "alpha": 0.5}]
    bodies = {
        "chat_one_message_steered": {
            "model": alias,
            "max_tokens": 16,
            "steering": steer,
            "messages": [{"role": "user", "content": "x" * 32000}],
        },
        "chat_300_messages_steered": {
            "model": alias,
            "max_tokens": 16,
            "steering": steer,
            "messages": [{"role": "user" if i % 2 else "assistant", "content": "y" * 70} for i in range(300)],
        },
        "completion_unsteered": {"model": alias, "max_tokens": 16, "prompt": "z" * 32000},
    }

    async def one(path: str, body: bytes) -> float:
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "app": app,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(_m: dict) -> None:
            return None

        t = time.perf_counter()
        await mw(scope, receive, send)
        return time.perf_counter() - t

    async def run() -> dict[str, Any]:
        out = {}
        for name, data in bodies.items():
            path = "/v1/completions" if "prompt" in data else "/v1/chat/completions"
            body = json.dumps(data).encode()
            for _ in range(50):
                await one(path, body)
            ts = sorted([await one(path, body) for _ in range(iters)])
            out[name] = {
                "body_chars": len(body),
                "median_ms": statistics.median(ts) * 1e3,
                "p99_ms": ts[int(0.99 * len(ts))] * 1e3,
            }
        return out

    return asyncio.run(run())


# --------------------------------------------------------------------------- report
def ratios(arms: dict[str, dict[str, Any]], rate_key: str, ttft_key: str) -> dict[str, float]:
    inf, fixed = arms[rate_key], arms[ttft_key]
    out = {}
    for name, arm in RATIO_ARMS.items():
        out[f"{name}_vs_stock"] = inf[arm]["output_throughput"] / inf["stock"]["output_throughput"]
    for name, arm in RATIO_ARMS.items():
        out[f"ttft_p50_{name}_vs_stock"] = fixed[arm]["ttft_p50_ms"] / fixed["stock"]["ttft_p50_ms"]
    return out


def plot(arms: dict[str, dict[str, dict[str, Any]]], rate_label: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [0, 1, 8, 64]
    names = ["unsteered", "one_spec", "specs8", "specs64"]
    inf, fixed = arms["unbounded"], arms[rate_label]
    ax1.plot(xs, [inf[n]["output_throughput"] for n in names], "o-", label="cna-vllm serve")
    ax1.axhline(inf["stock"]["output_throughput"], color="grey", ls="--", label="stock vllm serve")
    ax1.plot([8], [inf["mixed"]["output_throughput"]], "s", label="50/50 mix (8 specs)")
    ax1.set(
        xscale="symlog",
        xlabel="distinct steering specs in the load (0 = unsteered)",
        ylabel="output tokens/s",
        title="throughput, unbounded rate",
    )
    ax1.set_ylim(0, None)
    ax2.plot(xs, [fixed[n]["ttft_p50_ms"] for n in names], "o-", label="cna-vllm serve p50")
    ax2.plot(xs, [fixed[n]["ttft_p99_ms"] for n in names], "o:", label="cna-vllm serve p99")
    ax2.axhline(fixed["stock"]["ttft_p50_ms"], color="grey", ls="--", label="stock p50")
    ax2.axhline(fixed["stock"]["ttft_p99_ms"], color="grey", ls=":", label="stock p99")
    ax2.set(
        xscale="symlog",
        xlabel="distinct steering specs (0 = unsteered)",
        ylabel="TTFT ms",
        title=f"time to first token at {rate_label}",
    )
    ax2.set_ylim(0, None)
    for ax in (ax1, ax2):
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def print_table(arms: dict[str, dict[str, dict[str, Any]]], rate_label: str) -> None:
    u, f = "unbounded", rate_label
    cols = [
        (u, "output_throughput", "tok/s", ".1f"),
        (u, "request_throughput", "req/s", ".2f"),
        (u, "ttft_p50_ms", "TTFT50", ".0f"),
        (u, "ttft_p99_ms", "TTFT99", ".0f"),
        (u, "tpot_p50_ms", "TPOT50", ".1f"),
        (u, "tpot_p99_ms", "TPOT99", ".1f"),
        (u, "queue_wait_mean_ms", "queue", ".0f"),
        (u, "server_cpu_ms_per_output_token", "cpu/tok", ".2f"),
        (f, "ttft_p50_ms", "TTFT50", ".0f"),
        (f, "ttft_p99_ms", "TTFT99", ".0f"),
        (f, "tpot_p50_ms", "TPOT50", ".1f"),
        (f, "queue_wait_mean_ms", "queue", ".0f"),
    ]
    print(f"\ncolumns 2-9: unbounded rate; 10-13: at {rate_label} (ms, queue = mean wait in vLLM's queue)")
    print(f"{'arm':<10} {'specs':>5}" + "".join(f"{c[2]:>9}" for c in cols))
    for arm in ("stock", *PLUGIN_ARMS):
        cells = "".join(f"{arms[rate][arm][key] or 0.0:>9{fmt}}" for rate, key, _, fmt in cols)
        print(f"{arm:<10} {arms['unbounded'][arm]['distinct_specs']:>5}" + cells)


def median_arm(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs]
        if isinstance(value, float | int) and not isinstance(value, bool) and all(v is not None for v in values):
            out[key] = statistics.median(values)
        else:
            out[key] = value
    keys = ("output_throughput", "ttft_p50_ms", "server_cpu_ms_per_output_token", "loadavg_before")
    out["runs"] = {k: [r[k] for r in runs] for k in keys}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=SMALL_MODEL, help="embedded alias or model directory (e.g. the 0.5B default)")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rate", type=float, default=None, help="the fixed rate (default: half stock's unbounded req/s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=2, help="stock/plugin server pairs, alternately (median)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--server-arg", action="append", default=[], help="one more flag for both servers (repeatable)")
    ap.add_argument(
        "--quick", action="store_true", help="32 requests of 64+32 tokens, eager, one pair (a check in minutes)"
    )
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    if args.quick:  # a check, not a measurement: eager servers start in a fraction of the time
        args.num_prompts, args.input_len, args.output_len, args.reps = 32, 64, 32, 1
        args.server_arg = [*args.server_arg, "--enforce-eager"]

    model_dir = Path(resolve_model(args.model))
    alias = model_alias(args.model)
    print("middleware cost on 32k-character bodies:", flush=True)
    mw = middleware_cost(alias)
    for name, m in mw.items():
        print(f"  {name:<28} {m['body_chars']:>6} chars  median {m['median_ms']:.3f} ms  p99 {m['p99_ms']:.3f} ms")

    logs = Path(tempfile.mkdtemp(prefix="cna-serve-bench-"))
    rate = args.rate
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"unbounded": {}, "fixed": {}}
    started = time.time()
    for rep in range(args.reps):
        for kind in ("stock", "plugin"):
            arms = ["stock"] if kind == "stock" else list(PLUGIN_ARMS)
            log = logs / f"{kind}-{rep}.log"
            with Server(kind, server_argv(kind, model_dir, alias, args), log) as srv:
                bench(
                    srv.url, srv.proc.pid, model_dir, alias, args, arms[0], float("inf"), args.num_prompts
                )  # warm-up, not recorded
                for arm in arms:
                    r = bench(srv.url, srv.proc.pid, model_dir, alias, args, arm, float("inf"), args.num_prompts)
                    runs["unbounded"].setdefault(arm, []).append(r)
                    print(
                        f"[rep {rep}] {arm:<10} unbounded: {r['output_throughput']:.1f} tok/s, "
                        f"TTFT p50 {r['ttft_p50_ms']:.0f} ms, load {r['loadavg_before'][0]:.2f}",
                        flush=True,
                    )
                    if rate is None:  # below saturation: half of what stock sustains unbounded
                        rate = float(f"{0.5 * r['request_throughput']:.2g}")
                        print(f"fixed rate: {rate} req/s", flush=True)
                    r = bench(srv.url, srv.proc.pid, model_dir, alias, args, arm, rate, args.num_prompts)
                    runs["fixed"].setdefault(arm, []).append(r)
                    print(
                        f"[rep {rep}] {arm:<10} {rate} req/s: TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                        f"TPOT p50 {r['tpot_p50_ms']:.1f} ms",
                        flush=True,
                    )

    rate_label = f"{rate:g} req/s"
    arms_out = {
        "unbounded": {a: median_arm(rs) for a, rs in runs["unbounded"].items()},
        rate_label: {a: median_arm(rs) for a, rs in runs["fixed"].items()},
    }
    rat = ratios(arms_out, "unbounded", rate_label)
    result = {
        "arms": arms_out,
        "ratios": rat,
        "ratios_note": (
            "throughput ratios: output tokens/s at the unbounded rate; TTFT ratios: p50 at the fixed rate "
            f"({rate_label}, below saturation; lower is better). At the unbounded rate every request "
            "arrives at once and TTFT is mostly queueing: see ttft_p50_unbounded"
        ),
        "ttft_p50_unbounded": {
            f"{n}_vs_stock": arms_out["unbounded"][a]["ttft_p50_ms"] / arms_out["unbounded"]["stock"]["ttft_p50_ms"]
            for n, a in RATIO_ARMS.items()
        },
        "server_cpu_per_token_vs_stock": {
            f"{n}_vs_stock": arms_out["unbounded"][a]["server_cpu_ms_per_output_token"]
            / arms_out["unbounded"]["stock"]["server_cpu_ms_per_output_token"]
            for n, a in RATIO_ARMS.items()
        },
        "server_cpu_note": (
            "CPU seconds (user+system) of the server's processes per output token at the unbounded rate, "
            "plugin arm over stock (lower is better): the work done, much less sensitive than wall-clock "
            "throughput to other jobs on a shared machine"
        ),
        "middleware_32k_body": mw,
        "setup": {
            "model": alias,
            "model_dir": str(model_dir),
            "dtype": args.dtype,
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "seed": args.seed,
            "fixed_rate_req_s": rate,
            "reps": args.reps,
            "max_num_seqs": args.max_num_seqs,
            "max_model_len": args.max_model_len,
            "server_args": args.server_arg,
            "client": "vllm.benchmarks.serve.main (vllm bench serve), backend vllm, /v1/completions, random dataset",
            "specs": {"one_spec": spec(0), "distinct": f"{spec(0)} .. {spec(63)} (scale mode, shipped circuit)"},
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "shared_machine_note": "loadavg_before/after per arm: other jobs share these cores",
            "wall_s": time.time() - started,
            "vllm": __import__("vllm").__version__,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(arms_out, rate_label, out.with_suffix(".png"))

    print_table(arms_out, rate_label)
    for key, value in rat.items():
        print(f"{key:<32} {value:.3f}")
    for key, value in result["server_cpu_per_token_vs_stock"].items():
        print(f"cpu/token {key:<22} {value:.3f}")
    print(f"wrote {out} and {out.with_suffix('.png')} (server logs in {logs})")


if __name__ == "__main__":
    main()
