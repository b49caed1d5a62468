"""Evaluation stage end to end on the tiny Llama + a random adapter (integration), and
bad inputs that must fail before any model loads (fast)."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import pytest

from pipelines.evaluate import EvalInputError, check_dataset, run_evaluate, validate
from tokenskip import artifacts
from tokenskip.config import EvalConfig
from tokenskip.prompt import BASELINE_PROMPTS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_engine(monkeypatch):
    """Any attempt to build an engine fails the test."""
    import tokenskip.engine

    def boom(*a, **k):
        raise AssertionError("an engine was built before the input was validated")

    monkeypatch.setattr(tokenskip.engine, "build_llm", boom)


# --------------------------------------------------------------------------- bad input (fast)


def test_missing_adapter_fails_before_model_load(no_engine, tmp_path):
    cfg = EvalConfig(adapter=str(tmp_path / "nope"), output_dir=str(tmp_path / "out"), limit=2)
    with pytest.raises(EvalInputError, match="nope does not exist"):
        run_evaluate(cfg)
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_base_model_fails_before_any_engine(no_engine, tmp_path, tiny_adapters, tiny_llama):
    """It used to run the base model's conditions, then fail at the merge with a RuntimeError (exit 1)."""
    adapter, _ = tiny_adapters  # trained on the tiny Llama (hidden 128, 2 layers)
    cfg = EvalConfig(model="smollm2-135m-instruct", adapter=adapter, output_dir=str(tmp_path / "out"), limit=2)
    with pytest.raises(EvalInputError, match=r"was trained on another base model: .*smollm2-135m-instruct needs"):
        run_evaluate(cfg)
    assert not (tmp_path / "out").exists()
    validate(EvalConfig(model=tiny_llama, adapter=adapter, output_dir=str(tmp_path / "out")))  # its own base fits
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (broken / "adapter_model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(EvalInputError, match="not a readable safetensors file"):
        validate(EvalConfig(model=tiny_llama, adapter=str(broken), output_dir=str(tmp_path / "out")))


def test_non_peft_adapter_fails(no_engine, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(EvalInputError, match="not a PEFT adapter"):
        run_evaluate(EvalConfig(adapter=str(d), output_dir=str(tmp_path / "out")))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(EvalInputError, match="no adapter weights"):
        run_evaluate(EvalConfig(adapter=str(d), output_dir=str(tmp_path / "out")))
    (d / "adapter_model.safetensors").write_bytes(b"x")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(EvalInputError, match="not LORA"):
        run_evaluate(EvalConfig(adapter=str(d), output_dir=str(tmp_path / "out")))
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(EvalInputError, match="not a directory"):
        run_evaluate(EvalConfig(adapter=str(f), output_dir=str(tmp_path / "out")))


@pytest.mark.parametrize("ratio", [0.0, 1.5, -0.1, "abc"])
def test_ratio_outside_unit_interval(no_engine, tmp_path, ratio):
    with pytest.raises(ValueError, match=r"ratios\[1\].*\(0, 1\]"):
        EvalConfig(ratios=[1.0, ratio], output_dir=str(tmp_path))
    cfg = EvalConfig(output_dir=str(tmp_path))
    cfg.ratios = [0.5, ratio]  # mutated after construction: still caught before the engine
    with pytest.raises(EvalInputError, match=r"ratios\[1\]"):
        run_evaluate(cfg)


@pytest.mark.parametrize(
    "name,match",
    [
        ("gsm9k", "unknown dataset 'gsm9k'"),
        ("./missing.jsonl", "not found"),
        ("/data/x/y.parquet", "not found"),
        ("a/b/c", "not found"),
    ],
)
def test_unknown_dataset(no_engine, tmp_path, name, match):
    with pytest.raises(EvalInputError, match=match):
        run_evaluate(EvalConfig(datasets=["gsm8k", name], output_dir=str(tmp_path / "out")))


def test_dataset_kinds(tmp_path):
    assert check_dataset("gsm8k", "test") == "embedded"
    assert check_dataset("HuggingFaceH4/MATH-500", "test") == "hub"
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "1+1?", "answer": "2"}\n')
    assert check_dataset(str(f), "test") == "file"
    with pytest.raises(EvalInputError, match="no split 'train'"):
        check_dataset("math500", "train")
    validate(EvalConfig(datasets=["gsm8k", "math500", str(f)], output_dir=str(tmp_path)))


def test_cli_reports_bad_input(no_engine, tmp_path, capsys):
    from ray_jobs.evaluate import main

    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"kind: evaluate\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["--config", str(cfg), "ratios=[1.0,1.2]"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert main(["--config", str(cfg), "datasets=[nosuch]", "--limit", "3"]) == 2
    assert "unknown dataset 'nosuch'" in capsys.readouterr().err


def test_shipped_eval_configs_load():
    from tokenskip.config import load_any

    files = sorted(Path(__file__).resolve().parents[1].glob("configs/eval/*.yaml"))
    assert files
    for f in files:
        cfg = load_any(f)
        assert isinstance(cfg, EvalConfig)
        assert f.read_text().startswith("#")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tiny_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    cfg = EvalConfig(
        model=tiny_llama,
        adapter=tiny_adapters[0],
        datasets=["gsm8k"],
        limit=6,
        max_new_tokens=24,
        ratios=[1.0, 0.5],
        baselines=["original", "prompt", "truncation", "budget_forcing"],
        hard_budgets=[12],
        force_answer_tokens=8,
        latency_samples=2,
        output_dir=str(out),
        placement="driver",
    )
    manifest = run_evaluate(cfg)
    return cfg, manifest, out


def _samples(out: Path, cond: str) -> list[dict]:
    return [
        json.loads(line)
        for line in (out / "samples" / "gsm8k" / f"{cond}.jsonl").read_text().splitlines()
        if line.strip()
    ]


@pytest.mark.integration
def test_outputs_exist(tiny_run):
    cfg, manifest, out = tiny_run
    assert manifest["stage"] == "evaluate" and (out / "manifest.json").is_file()
    for name in ("results.json", "table.md", "accuracy_vs_tokens.png", "ratio_adherence.png"):
        assert (out / name).is_file(), name
    for png in ("accuracy_vs_tokens.png", "ratio_adherence.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        from PIL import Image

        with Image.open(out / png) as im:
            im.verify()
    results = json.loads((out / "results.json").read_text())
    ids = [r["id"] for r in results["datasets"]["gsm8k"]["conditions"]]
    assert ids == (
        ["original", "tokenskip-1.0", "tokenskip-0.5"]
        + [f"prompt-{n}" for n in BASELINE_PROMPTS]
        + ["truncation-0.5", "budget_forcing-0.5"]
    )
    table = (out / "table.md").read_text()
    for label in (
        "| Original | - |",
        "| TokenSkip | 1.0 |",
        "| TokenSkip | 0.5 |",
        "| Prompt: concise | - |",
        "| Truncation | 0.5 |",
        "| Budget forcing | 0.5 |",
        "### gsm8k: hard budget",
        "| 12 | TokenSkip (routed) |",
        "| 12 | Base model |",
    ):
        assert label in table
    assert "near zero" in table  # a random model solves nothing, and the caption says so


@pytest.mark.integration
def test_figures_agree_with_samples(tiny_run, tiny_llama):
    cfg, _, out = tiny_run
    from tokenskip.grading import grade

    results = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in results["datasets"]["gsm8k"]["conditions"]}
    for cid, r in rows.items():
        samples = _samples(out, cid)
        assert len(samples) == r["n"] == 6
        assert sum(s["correct"] for s in samples) == r["correct"]
        assert r["accuracy"] == pytest.approx(r["correct"] / 6)
        assert r["mean_tokens"] == pytest.approx(sum(s["output_tokens"] for s in samples) / 6)
        for s in samples:
            assert s["output_tokens"] == len(s["token_ids"])
            assert s["correct"] == grade(s["output"], s["gold"], "gsm8k").correct
        if r["method"] != "truncation":
            assert r["latency_samples"] == 2 and r["latency_s"] > 0 and len(r["latency_each_s"]) == 2
            assert r["throughput"]["wall_s"] > 0
        else:
            assert r["latency_s"] is None
        if r["method"] not in ("truncation", "budget_forcing"):  # a forced answer comes after the cut CoT
            assert max(s["output_tokens"] for s in samples) <= 24
    # actual ratio: TokenSkip rows against TokenSkip γ=1.0, others against the original
    assert rows["tokenskip-0.5"]["actual_ratio"] == pytest.approx(
        rows["tokenskip-0.5"]["mean_tokens"] / rows["tokenskip-1.0"]["mean_tokens"]
    )
    assert rows["truncation-0.5"]["actual_ratio"] == pytest.approx(
        rows["truncation-0.5"]["mean_tokens"] / rows["original"]["mean_tokens"]
    )
    assert rows["prompt-concise"]["actual_ratio"] == pytest.approx(
        rows["prompt-concise"]["mean_tokens"] / rows["original"]["mean_tokens"]
    )
    # prompts: the γ marker only below 1, the adapter changes the outputs
    ts = _samples(out, "tokenskip-0.5")
    assert all(s["prompt"].count("<|eot_id|>0.5<|eot_id|>") == 1 for s in ts)
    assert all("<|eot_id|>" not in s["prompt"] for s in _samples(out, "tokenskip-1.0"))
    assert all(BASELINE_PROMPTS["concise"] in s["prompt"] for s in _samples(out, "prompt-concise"))
    assert [s["output"] for s in _samples(out, "original")] != [s["output"] for s in _samples(out, "tokenskip-1.0")]


@pytest.mark.integration
def test_truncation_cuts_at_gamma_times_length(tiny_run, tiny_llama):
    from transformers import AutoTokenizer

    _, _, out = tiny_run
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    original = {s["id"]: s for s in _samples(out, "original")}
    for s in _samples(out, "truncation-0.5"):
        o = original[s["id"]]
        k = math.floor(0.5 * o["output_tokens"])
        assert s["output_tokens"] == k == len(s["token_ids"]) and s["source_tokens"] == o["output_tokens"]
        assert s["token_ids"] == o["token_ids"][:k]
        assert s["output"] == tok.decode(o["token_ids"][:k], skip_special_tokens=True)
        assert o["output"].startswith(s["output"])


@pytest.mark.integration
def test_rerun_returns_manifest_without_engine(tiny_run, no_engine):
    cfg, manifest, _ = tiny_run
    assert run_evaluate(cfg) == manifest
    # the same output_dir with another limit is refused, not answered with the old results
    with pytest.raises(artifacts.StageError, match=r"limit: \S+ -> 1\b"):
        run_evaluate(dataclasses.replace(cfg, limit=1))
    assert artifacts.read_manifest(cfg.output_dir) == manifest


@pytest.mark.integration
def test_runs_inside_a_ray_task(tiny_llama, ray_local, tmp_path):
    """placement: ray - the body runs in one Ray task (how a GPU cluster gets the engine onto a GPU node)."""
    import os

    out = tmp_path / "ray-run"
    cfg = EvalConfig(
        model=tiny_llama,
        datasets=["gsm8k"],
        limit=2,
        max_new_tokens=8,
        ratios=[0.5],
        baselines=[],
        latency_samples=1,
        output_dir=str(out),
        placement="ray",
        num_cpus=1,
    )
    manifest = run_evaluate(cfg)
    assert manifest["host"] and (out / "manifest.json").is_file() and (out / "table.md").is_file()
    results = json.loads((out / "results.json").read_text())
    rows = results["datasets"]["gsm8k"]["conditions"]
    assert [r["id"] for r in rows] == ["tokenskip-0.5"] and rows[0]["label"] == "TokenSkip (no adapter)"
    assert rows[0]["actual_ratio"] is None  # no γ = 1.0 and no original: nothing to divide by
    assert manifest["pid"] != os.getpid()  # the body ran in a worker process, not here


# --------------------------------------------------------------------------- no deleting what is not ours (#15.7), fast


_NO_TENSORS = struct.pack("<Q", 8) + b"{}      "  # a safetensors file whose header lists no tensor


def _fake_adapter(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(_NO_TENSORS)
    return d


@pytest.mark.parametrize("force", [True, False])
def test_output_dir_holding_the_adapter_is_never_wiped(no_engine, tmp_path, force):
    run = tmp_path / "runs" / "quickstart"
    adapter = _fake_adapter(run / "train" / "adapter")
    (run / "summary.json").write_text("{}")
    cfg = EvalConfig(adapter=str(adapter), output_dir=str(run), limit=2)
    with pytest.raises(artifacts.StageError, match="refusing to delete|not a evaluate directory"):
        run_evaluate(cfg, force=force)
    assert (adapter / "adapter_model.safetensors").read_bytes() == _NO_TENSORS and (run / "summary.json").is_file()


def test_output_dir_dot_is_refused(no_engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(artifacts.StageError, match="working directory"):
        run_evaluate(EvalConfig(output_dir=".", limit=2), force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- resume per condition (#15.10), fake engine


@pytest.fixture
def fake_engine(monkeypatch, tiny_llama):
    """No vLLM: a tokenizer-backed fake engine whose outputs depend on the prompt; counts generations."""
    from transformers import AutoTokenizer

    import pipelines.evaluate as E
    from tokenskip.prompt import ANSWER_OPENING

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    state = {"calls": [], "fail_at": None, "forced": []}

    class FakeLLM:
        def get_tokenizer(self):
            return tok

    def get(self, uses_adapter):
        self.key, self.llm = "base", FakeLLM()
        return self.llm, None

    def generate(llm, prompts, max_tokens, seed, lora, stop=None):
        if max_tokens == 4:  # the warm-up
            return [{"output": "2", "token_ids": [17], "finish_reason": "stop"} for _ in prompts]
        state["calls"].append(len(prompts))
        if state["fail_at"] is not None and len(state["calls"]) >= state["fail_at"]:
            raise RuntimeError("engine crashed")
        out = []
        for p in prompts:
            if p.endswith(ANSWER_OPENING):  # a forced answer: the answer, the closing, then more text
                assert stop == ["}$"]  # the engine stops a forced answer at the end of the sentence
                state["forced"].append((len(prompts), max_tokens, p))
                text = "4}$ and then \\boxed{5}"
            else:
                text = f"The answer is {len(p) % 7}. So {len(p) % 5} + 1 = {len(p) % 5 + 1}."
            full = tok(text, add_special_tokens=False)["input_ids"]
            ids = full[:max_tokens]
            finish = "length" if len(full) > max_tokens else "stop"
            out.append({"output": tok.decode(ids), "token_ids": ids, "finish_reason": finish})
        return out

    monkeypatch.setattr(E._Engines, "get", get)
    monkeypatch.setattr(E, "_generate", generate)
    return state


def test_restart_reuses_the_conditions_already_saved(fake_engine, tmp_path):
    out = tmp_path / "eval"
    cfg = EvalConfig(
        model="smollm2-135m-instruct",
        datasets=["gsm8k"],
        limit=3,
        max_new_tokens=12,
        ratios=[1.0, 0.5],
        baselines=["original", "prompt", "truncation"],
        latency_samples=1,
        output_dir=str(out),
        placement="driver",
    )
    n_prompt = len(BASELINE_PROMPTS)
    # generated in order: original, prompt-*, tokenskip-1.0 (= original's prompts: reused), tokenskip-0.5
    fake_engine["fail_at"] = 4  # original's batch + latency, the first prompt baseline's batch, then a crash
    with pytest.raises(RuntimeError, match="engine crashed"):
        run_evaluate(cfg)
    assert not artifacts.is_complete(out)
    saved = sorted(p.name for p in (out / "samples" / "gsm8k").glob("*.meta.json"))
    assert saved == ["original.meta.json"]
    original = _samples(out, "original")
    fake_engine["calls"].clear()
    fake_engine["fail_at"] = None
    manifest = run_evaluate(cfg)
    # only tokenskip-0.5 and the prompt baselines were generated (a batch + 1 latency sample each)
    assert fake_engine["calls"] == [3, 1] * (1 + n_prompt)
    assert _samples(out, "original") == original
    results = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in results["datasets"]["gsm8k"]["conditions"]}
    assert rows["original"]["latency_samples"] == 1 and rows["original"]["throughput"]["batch_size"] == 3
    assert rows["tokenskip-1.0"]["reused_from"] == "original" and rows["truncation-0.5"]["n"] == 3
    assert manifest["stage"] == "evaluate"
    # a restart with another limit keeps nothing that does not match (other question ids)
    fake_engine["calls"].clear()
    run_evaluate(dataclasses.replace(cfg, limit=2), force=True)
    assert fake_engine["calls"] == [2, 1] * (2 + n_prompt)


# ---------------------------------------------------------------- budget forcing + hard budgets (#16), fake engine


def _forcing_config(out: Path) -> EvalConfig:
    """3 questions, γ 1.0 / 0.5, budget forcing and hard budgets 6 / 40, forced answers of 10 tokens."""
    return EvalConfig(
        model="smollm2-135m-instruct",
        datasets=["gsm8k"],
        limit=3,
        max_new_tokens=40,
        ratios=[1.0, 0.5],
        baselines=["budget_forcing"],
        hard_budgets=[6, 40],
        force_answer_tokens=10,
        latency_samples=1,
        output_dir=str(out),
        placement="driver",
    )


def test_restart_reuses_budget_forcing_and_hard_budgets(fake_engine, tmp_path):
    """A run that dies after its forcing passes does not force them again on restart; a source
    that changed (another γ routed, other outputs) is forced again."""
    out = tmp_path / "eval"
    cfg = _forcing_config(out)
    run_evaluate(cfg)
    first = json.loads((out / "results.json").read_text())["datasets"]["gsm8k"]
    assert fake_engine["forced"], "the first run forces answers"
    (out / "manifest.json").unlink()  # as if it died just before finishing
    fake_engine["calls"].clear()
    fake_engine["forced"].clear()
    run_evaluate(cfg)
    assert fake_engine["calls"] == [] and fake_engine["forced"] == []  # nothing generated, nothing forced
    again = json.loads((out / "results.json").read_text())["datasets"]["gsm8k"]
    assert again["hard_budget"] == first["hard_budget"]
    bf = lambda d: next(r for r in d["conditions"] if r["id"] == "budget_forcing-0.5")  # noqa: E731
    assert bf(again) == bf(first)
    # the base model's source (the original's outputs) changed: its cells and budget forcing are redone
    original = out / "samples" / "gsm8k" / "original.jsonl"
    rows = artifacts.read_rows(original)
    rows[0]["token_ids"] = rows[0]["token_ids"][:-1]
    artifacts.write_rows(original, rows, "jsonl")
    (out / "manifest.json").unlink()
    run_evaluate(cfg)
    # forced again: budget forcing (a batch of 3, then 1 timed) and the base model's cells (B = 6: all 3);
    # all from the base model's plain prompts; TokenSkip's cells (sources unchanged) are reused
    assert [n for n, _, _ in fake_engine["forced"]] == [3, 3, 3, 1, 3, 3, 3]
    plain = tuple(r["prompt"] for r in rows)
    assert all(p.startswith(plain) for _, _, p in fake_engine["forced"])


def test_budget_forcing_and_hard_budgets_fake_engine(fake_engine, tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    from tokenskip import evaluation as ev
    from tokenskip.prompt import ANSWER_OPENING, split_answer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = tmp_path / "eval"
    cfg = _forcing_config(out)
    run_evaluate(cfg)
    results = json.loads((out / "results.json").read_text())
    ds = results["datasets"]["gsm8k"]
    rows = {r["id"]: r for r in ds["conditions"]}
    assert list(rows) == ["original", "tokenskip-1.0", "tokenskip-0.5", "budget_forcing-0.5"]
    assert rows["original"]["label"] == "Original (budget forcing / hard budgets source)"
    assert results["force_answer_tokens"] == 10 and results["hard_budgets"] == [6, 40]

    # budget forcing: ⌊0.5 × the original's CoT tokens⌋ kept, then the answer opening, answer cut at its box
    original = {s["id"]: s for s in _samples(out, "original")}
    bf = _samples(out, "budget_forcing-0.5")
    for s in bf:
        o = original[s["id"]]
        k = math.floor(0.5 * o["cot_tokens"])
        assert s["cot_tokens"] == k and s["token_ids"][:k] == o["token_ids"][:k]
        kept = tok.decode(o["token_ids"][:k], skip_special_tokens=True)
        assert s["output"] == kept.rstrip() + "\n\n" + ANSWER_OPENING + "4}$"
        assert s["extracted"] == "4" and s["answer_closed"] and s["finish_reason"] == "forced"
        assert s["output_tokens"] == len(s["token_ids"]) and s["source_cot_tokens"] == o["cot_tokens"]
    r = rows["budget_forcing-0.5"]
    assert r["mean_cot_tokens"] == pytest.approx(sum(s["cot_tokens"] for s in bf) / 3)
    assert r["actual_ratio"] == pytest.approx(r["mean_cot_tokens"] / rows["original"]["mean_cot_tokens"])
    assert r["throughput"]["batch_size"] == 3 and r["latency_samples"] == 1 and r["latency_s"] > 0
    # the forced answers: one batch of 3 (all questions) with the answer cap, then 1 timed alone
    forced_bf = [f for f in fake_engine["forced"] if f[2].startswith(tuple(s["prompt"] for s in bf))]
    assert [(n, cap) for n, cap, _ in forced_bf][:4] == [(3, 10)] * 3 + [(1, 10)]

    # hard budgets: per B, TokenSkip routed and the base model
    hard = ds["hard_budget"]
    assert [(e["budget"], e["model"]) for e in hard] == [(6, "tokenskip"), (6, "base"), (40, "tokenskip"), (40, "base")]
    by = {(e["budget"], e["model"]): e for e in hard}
    ts_rows = [r for r in ds["conditions"] if r["method"] == "tokenskip"]
    for b in (6, 40):
        assert by[(b, "tokenskip")]["ratio"] == ev.route_budget(ts_rows, b)["ratio"]
    assert by[(6, "tokenskip")]["fits"] is False and by[(6, "tokenskip")]["ratio"] == 0.5  # every CoT is > 6
    assert by[(40, "tokenskip")]["fits"] is True and by[(40, "tokenskip")]["ratio"] == 1.0
    for (b, model), e in by.items():
        samples = [json.loads(x) for x in (out / e["samples_file"]).read_text().splitlines()]
        assert len(samples) == e["n"] == 3 and e["within_budget_share"] == 1.0
        assert all(s["cot_tokens"] <= b for s in samples)
        assert e["forced_share"] == sum(s["forced"] for s in samples) / 3
        assert e["accuracy"] == sum(s["correct"] for s in samples) / 3
        src = {s["id"]: s for s in _samples(out, e["source_condition"])}
        for s in samples:
            o = src[s["id"]]
            assert s["forced"] == (o["output_tokens"] > b) and s["uncapped_cot_tokens"] == o["cot_tokens"]
            if s["forced"]:  # the CoT before the cap, then the forced answer
                cot = split_answer(tok.decode(o["token_ids"][:b], skip_special_tokens=True))[0]
                assert s["output"] == cot.rstrip() + "\n\n" + ANSWER_OPENING + "4}$" and s["extracted"] == "4"
            else:
                assert s["output"] == o["output"]
    assert by[(6, "base")]["forced_share"] == 1.0 and by[(40, "base")]["forced_share"] == 0.0
    table = (out / "table.md").read_text()
    assert "### gsm8k: hard budget" in table and "| 6 | TokenSkip (routed) | 0.5 (none fits) |" in table
    assert "| Budget forcing | 0.5 |" in table and "TokenSkip against the hard-cap baselines" in table


def test_hard_budget_above_the_cap_fails_before_model_load(no_engine, tmp_path):
    cfg = EvalConfig(datasets=["gsm8k"], hard_budgets=[600], output_dir=str(tmp_path / "out"), limit=2)
    with pytest.raises(EvalInputError, match=r"hard_budgets: \[600\] exceed the 512 new tokens"):
        run_evaluate(cfg)


@pytest.mark.integration
def test_budget_forcing_and_hard_budget_real_engine(tiny_run, tiny_llama):
    """vLLM continued each cut CoT + answer opening for at most force_answer_tokens tokens, and the
    hard-budget section holds both models at B = 12 with every CoT within it."""
    from tokenskip.prompt import ANSWER_OPENING

    cfg, _, out = tiny_run
    results = json.loads((out / "results.json").read_text())
    ds = results["datasets"]["gsm8k"]
    rows = {r["id"]: r for r in ds["conditions"]}
    original = {s["id"]: s for s in _samples(out, "original")}
    for s in _samples(out, "budget_forcing-0.5"):
        o = original[s["id"]]
        k = math.floor(0.5 * o["cot_tokens"])
        assert s["cot_tokens"] == k and s["token_ids"][:k] == o["token_ids"][:k]
        assert ANSWER_OPENING in s["output"] and s["finish_reason"] == "forced"
        assert 0 < s["answer_tokens"] <= cfg.force_answer_tokens
        assert s["output_tokens"] == len(s["token_ids"]) > k
    bf = rows["budget_forcing-0.5"]
    assert bf["throughput"]["batch_size"] == 6 and bf["force_answer_tokens"] == 8
    assert bf["actual_ratio"] == pytest.approx(bf["mean_cot_tokens"] / rows["original"]["mean_cot_tokens"])
    hard = ds["hard_budget"]
    assert [(e["budget"], e["model"]) for e in hard] == [(12, "tokenskip"), (12, "base")]
    for e in hard:
        assert e["n"] == 6 and e["within_budget_share"] == 1.0 and 0.0 <= e["forced_share"] <= 1.0
        samples = [json.loads(x) for x in (out / e["samples_file"]).read_text().splitlines()]
        assert all(s["cot_tokens"] <= 12 for s in samples)
        assert sum(s["forced"] for s in samples) / 6 == e["forced_share"]
        assert all(ANSWER_OPENING in s["output"] for s in samples if s["forced"])
    ts = hard[0]
    assert ts["ratio"] in (1.0, 0.5) and ts["source_condition"] == f"tokenskip-{ts['ratio']}"
    assert hard[1]["source_condition"] == "original"
