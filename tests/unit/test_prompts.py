import pytest

from cna_vllm.errors import PromptSetError
from cna_vllm.prompts import PACKAGED, load_prompts


def test_packaged_sets_have_the_documented_sizes_and_do_not_overlap():
    sizes = {name: len(load_prompts(name)) for name in PACKAGED}
    assert sizes["harmbench"] == 200 and sizes["harmbench-test"] == 159
    assert sizes["harmbench-discover"] == sizes["harmbench-eval"] == 100
    assert sizes["benign"] >= 150 and sizes["benign-discover"] == 100
    assert sizes["diverse"] >= 40
    assert not set(load_prompts("harmbench-discover")) & set(load_prompts("harmbench-eval"))
    assert not set(load_prompts("benign-discover")) & set(load_prompts("benign-eval"))
    assert len(set(load_prompts("benign"))) == sizes["benign"], "no duplicate prompts"


def test_txt_jsonl_csv_files(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert load_prompts(tmp_path / "p.txt").prompts == ("first", "second")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n"b"\n{"text": "c", "prompt": "d"}\n')
    assert load_prompts(tmp_path / "p.jsonl").prompts == ("a", "b", "d")
    (tmp_path / "q.jsonl").write_text('{"text": "x"}\n')
    assert load_prompts(f"{tmp_path / 'q.jsonl'}:text").prompts == ("x",)
    (tmp_path / "p.csv").write_text('id,Behavior\n1,"hello, world"\n2,bye\n')
    assert load_prompts(tmp_path / "p.csv").prompts == ("hello, world", "bye")
    assert load_prompts(f"{tmp_path / 'p.csv'}:id", limit=1).prompts == ("1",)


def test_hash_is_stable_and_content_sensitive(tmp_path):
    (tmp_path / "a.txt").write_text("x\ny\n")
    (tmp_path / "b.txt").write_text("x\nz\n")
    assert load_prompts(tmp_path / "a.txt").sha256 == load_prompts(tmp_path / "a.txt").sha256
    assert load_prompts(tmp_path / "a.txt").sha256 != load_prompts(tmp_path / "b.txt").sha256


def test_readable_errors(tmp_path):
    with pytest.raises(PromptSetError, match="not a file, and not one of"):
        load_prompts("no-such-set")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(PromptSetError, match="bad.jsonl:2: not valid JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(PromptSetError, match="no string field 'prompt'"):
        load_prompts(tmp_path / "nofield.jsonl")
    (tmp_path / "c.csv").write_text("a,b\n1,2\n")
    with pytest.raises(PromptSetError, match="no column 'prompt'"):
        load_prompts(tmp_path / "c.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptSetError, match="empty"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "x.pdf").write_text("x")
    with pytest.raises(PromptSetError, match="unknown prompt file type"):
        load_prompts(tmp_path / "x.pdf")
