import subprocess
import sys

import pytest

from tokenskip import assets


def test_passthrough_names():
    for name in ("Qwen/Qwen2.5-7B-Instruct", "/models/llama", "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"):
        assert assets.resolve_model(name) == name


def test_embedded_files_present():
    assert (assets.minilm_path() / "config.json").is_file()
    assert assets.dataset_file("math500", "test").name == "test.jsonl"
    with pytest.raises(assets.AssetError, match="no split 'train'"):
        assets.dataset_file("math500", "train")
    with pytest.raises(assets.AssetError, match="unknown embedded dataset"):
        assets.dataset_file("mmlu", "test")


def test_tiktoken_file_placed(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    p = assets.ensure_tiktoken()
    assert p.parent == tmp_path and p.stat().st_size > 1_000_000
    import tiktoken

    assert tiktoken.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]


def test_smollm2_is_real_and_chat_templated(smollm2):
    import json
    from pathlib import Path

    cfg = json.loads((Path(smollm2) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["head_dim"] == 64 and "quantization_config" not in cfg
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(smollm2).chat_template


@pytest.mark.integration
def test_concurrent_conversion_is_atomic(tmp_path):
    """Several processes asking at once: one converts, all get the same finished folder."""
    code = "from tokenskip import assets; print(assets.ensure_smollm2())"
    env = {**__import__("os").environ, "TOKENSKIP_HOME": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        for _ in range(3)
    ]
    # last line: the path (libraries may log to stdout before it)
    outs = [(p.communicate(timeout=600)[0].strip().splitlines() or [""])[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == [outs[0].split("/")[-1]]  # no leftover temporaries
