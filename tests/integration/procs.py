"""Real server processes for integration tests: start on a free loopback port, wait, stop."""

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    proc: subprocess.Popen
    url: str
    log: Path

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, unset: tuple[str, ...] = (), **env_extra: str) -> Proc:
    """Start ``args`` on a free port with a 1 GiB CPU KV cache, unless ``unset`` drops that."""
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env_extra}
    for name in unset:
        env.pop(name, None)
    with log.open("w") as f:
        proc = subprocess.Popen([*args, "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return Proc(proc, f"http://127.0.0.1:{port}", log)


def _wait_ready(p: Proc, deadline: float) -> None:
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            pytest.fail(f"server exited with {p.proc.returncode}:\n{p.tail()}")
        try:
            if httpx.get(f"{p.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"server not ready in time:\n{p.tail()}")
