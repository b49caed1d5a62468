"""SFT construction: pure helpers (tokenskip.sft) and the cots (select_cots) / build_sft
(run_build_sft) stages on hand-made generate and prune directories (no Ray, no vLLM)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tokenskip import artifacts, prompt, sft
from tokenskip.config import BuildSFTConfig, ConfigError, CotsConfig, DataSourceConfig, load_config

RATIOS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]


def test_draw_is_seeded_order_free_and_uniform():
    ids = [f"q{i}" for i in range(3000)]
    a = [sft.draw_ratio(i, RATIOS, 42) for i in ids]
    b = [sft.draw_ratio(i, RATIOS, 42) for i in reversed(ids)][::-1]
    assert a == b
    assert a != [sft.draw_ratio(i, RATIOS, 43) for i in ids]
    counts = Counter(a)
    assert set(counts) == set(RATIOS)
    assert all(400 < c < 600 for c in counts.values()), counts


def test_sft_row_uses_prompt_module():
    c = {"id": "q1", "question": "How many?", "gold": "7", "kind": "gsm8k"}
    r = sft.sft_row(c, 0.7, "a b c", cot_tokens=10, pruned_tokens=7)
    assert r["user"] == prompt.user_content("How many?", 0.7)
    assert r["completion"] == prompt.build_target("a b c", "7")
    assert r["actual_ratio"] == 0.7 and r["ratio"] == 0.7
    r1 = sft.sft_row(c, 1.0, "full", cot_tokens=10)
    assert prompt.SEPARATOR not in r1["user"] and r1["pruned_tokens"] == 10
    with pytest.raises(ValueError, match="gold"):
        sft.sft_row({"id": "x", "question": "q"}, 1.0, "c", 1)


def test_splits_by_question():
    rows = [{"id": f"q{i}", "ratio": r} for i in range(50) for r in (1.0, 0.5)]
    train, val = sft.assign_splits(rows, 0.1, 0)
    assert len(val) == 10 and len(train) == 90
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert sft.assign_splits(rows, 0.1, 0)[1] == val
    assert sft.assign_splits(rows, 0.0, 0)[1] == []


def test_config_validation():
    with pytest.raises(ConfigError, match="cot_source"):
        load_config(CotsConfig, data={"cot_source": "model"})
    with pytest.raises(ConfigError, match="max_cot_tokens"):
        load_config(CotsConfig, data={"max_cot_tokens": 0})
    with pytest.raises(ConfigError, match="ratios"):
        load_config(BuildSFTConfig, data={"ratios": [1.0, 1.2]})
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(BuildSFTConfig, data={"val_fraction": 1.0})


# ----------------------------------------------------------------------------- stage tests


def _generate_dir(path: Path, tiny_llama: str) -> Path:
    """A finished generate stage dir: 6 rows, 4 correct, one of them too long."""
    rows = []
    for i in range(6):
        rows.append(
            {
                "id": f"g-{i}",
                "question": f"What is {i}+1?",
                "gold": str(i + 1),
                "kind": "gsm8k",
                "prompt": "p",
                "output": f"{i}+1={i + 1}. \\boxed{{{i + 1}}}",
                "extracted": str(i + 1),
                "correct": i < 4,
                "cot": f"{i}+1={i + 1}. \\boxed{{{i + 1}}}",
                "cot_tokens": 900 if i == 3 else 12,
                "output_tokens": 12,
                "finish_reason": "stop",
            }
        )
    artifacts.write_rows(path / "data.parquet", rows)
    artifacts.write_manifest(path, "generate", counts={"total": 6})
    return path


def _prune_dir(path: Path, cots_dir: Path, ratios=(0.9, 0.8, 0.7, 0.6, 0.5), skip: tuple = ()) -> Path:
    rows = []
    for c in artifacts.read_rows(cots_dir):
        for r in ratios:
            if (c["id"], r) in skip:
                continue
            n = max(1, round(c["cot_tokens"] * r))
            rows.append(
                {
                    "id": c["id"],
                    "ratio": r,
                    "pruned": " ".join(c["cot"].split()[: max(1, int(len(c["cot"].split()) * r))]),
                    "cot_tokens": c["cot_tokens"],
                    "pruned_tokens": n,
                    "actual_ratio": n / c["cot_tokens"],
                }
            )
    artifacts.write_rows(path / "data.parquet", rows)
    artifacts.write_manifest(path, "prune", counts={"rows": len(rows)})
    return path


def test_select_cots_generated(tmp_path, tiny_llama):
    gen = _generate_dir(tmp_path / "generate", tiny_llama)
    cfg = CotsConfig(
        generations=str(gen), output_dir=str(tmp_path / "cots"), max_cot_tokens=500, target_tokenizer=tiny_llama
    )
    from pipelines.build_sft import select_cots

    m = select_cots(cfg)
    assert m["counts"]["total"] == 6 and m["counts"]["correct"] == 4 and m["counts"]["kept"] == 3
    kept = artifacts.read_rows(tmp_path / "cots")
    assert [r["id"] for r in kept] == ["g-0", "g-1", "g-2"]
    assert set(kept[0]) == {"id", "question", "gold", "kind", "cot", "cot_tokens"}
    reasons = Counter(r["reason"].split(":")[0] for r in artifacts.read_rows(tmp_path / "cots" / "rejects.jsonl"))
    assert reasons == {"incorrect answer": 2, "cot too long": 1}


def test_select_cots_gold_counts_target_tokens(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    from pipelines.build_sft import select_cots

    src = tmp_path / "q.jsonl"
    src.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"question": "A has 2, gets 3. Total?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
                {"question": "B?", "answer": "#### 4"},  # no worked solution
                {"question": "C has 1, gets 1?", "answer": "1+1=<<1+1=2>>2\n#### 2"},
            ]
        )
    )
    cfg = CotsConfig(
        cot_source="gold",
        data=DataSourceConfig(name=str(src), kind="gsm8k"),
        output_dir=str(tmp_path / "cots"),
        target_tokenizer=tiny_llama,
    )
    m = select_cots(cfg)
    assert m["counts"] == {
        "total": 3,
        "correct": 2,
        "kept": 2,
        "rejected": 1,
        "mean_cot_tokens": m["counts"]["mean_cot_tokens"],
    }
    rows = artifacts.read_rows(tmp_path / "cots")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert rows[0]["cot"] == "2+3=5" and rows[0]["cot_tokens"] == len(
        tok("2+3=5", add_special_tokens=False)["input_ids"]
    )


def test_build_sft_random_and_all(tmp_path, tiny_llama):
    from pipelines.build_sft import run_build_sft, select_cots

    gen = _generate_dir(tmp_path / "generate", tiny_llama)
    select_cots(CotsConfig(generations=str(gen), output_dir=str(tmp_path / "cots"), target_tokenizer=tiny_llama))
    base = dict(cots_dir=str(tmp_path / "cots"), val_fraction=0.34)
    pruned = _prune_dir(tmp_path / "prune", tmp_path / "cots")

    cfg = BuildSFTConfig(**base, pruned=str(pruned), output_dir=str(tmp_path / "sft"), seed=3)
    m = run_build_sft(cfg)
    train = artifacts.read_rows(tmp_path / "sft" / "train.parquet")
    val = artifacts.read_rows(tmp_path / "sft" / "validation.parquet")
    rows = train + val
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3 and len(val) == 1
    for r in rows:
        assert r["ratio"] == sft.draw_ratio(r["id"], RATIOS, 3)
        assert r["user"] == prompt.user_content(r["question"], r["ratio"])
        assert r["completion"].endswith(prompt.answer_sentence(r["gold"]))
    assert sum(m["counts"]["per_ratio"].values()) == 3
    assert set(m["mean_actual_ratio"]) == set(m["ratio_stats"])

    cfg_all = BuildSFTConfig(
        **dict(base, val_fraction=0.0),
        pruned=str(pruned),
        output_dir=str(tmp_path / "sft_all"),
        ratio_sampling="all",
        format="jsonl",
    )
    m_all = run_build_sft(cfg_all)
    rows = artifacts.read_rows(tmp_path / "sft_all" / "train.jsonl")
    assert len(rows) == 18 and m_all["counts"]["per_ratio"] == {
        k: 3 for k in ("1.0", "0.9", "0.8", "0.7", "0.6", "0.5")
    }
    assert m_all["mean_actual_ratio"]["1.0"] == 1.0
    assert abs(m_all["mean_actual_ratio"]["0.5"] - 0.5) < 0.1
    # Finished stages are skipped; force redoes them.
    assert run_build_sft(cfg_all)["finished_at"] == m_all["finished_at"]
    assert run_build_sft(cfg_all, force=True)["finished_at"] != m_all["finished_at"]


def test_build_sft_missing_pruned_rows_are_rejected(tmp_path, tiny_llama):
    from pipelines.build_sft import run_build_sft, select_cots

    gen = _generate_dir(tmp_path / "generate", tiny_llama)
    select_cots(CotsConfig(generations=str(gen), output_dir=str(tmp_path / "cots"), target_tokenizer=tiny_llama))
    base = dict(cots_dir=str(tmp_path / "cots"))
    pruned = _prune_dir(tmp_path / "prune", tmp_path / "cots", skip=(("g-1", 0.5),))
    m = run_build_sft(
        BuildSFTConfig(**base, pruned=str(pruned), output_dir=str(tmp_path / "sft"), ratio_sampling="all")
    )
    rej = artifacts.read_rows(tmp_path / "sft" / "rejects.jsonl")
    assert m["counts"]["rejected"] == 1 and rej[0]["id"] == "g-1" and "ratio 0.5" in rej[0]["reason"]
    assert m["counts"]["rows"] == 17


def test_build_sft_requires_finished_inputs(tmp_path, tiny_llama):
    from pipelines.build_sft import run_build_sft, select_cots

    with pytest.raises(artifacts.StageError, match="not finished"):
        select_cots(CotsConfig(generations=str(tmp_path / "nope"), output_dir=str(tmp_path / "cots")))
    with pytest.raises(artifacts.StageError, match="not finished"):
        run_build_sft(BuildSFTConfig(cots_dir=str(tmp_path / "cots"), output_dir=str(tmp_path / "sft")))


# ----------------------------------------------------------------------------- the cots stage's own config


def _pipeline(tmp_path: Path, model: str, *overrides: str):
    from tokenskip.config import PipelineConfig

    data = {"run_dir": str(tmp_path / "run"), "model": model, "stages": ["generate", "prune", "build_sft"]}
    return load_config(PipelineConfig, data=data, overrides=list(overrides))


def test_cots_stage_is_fingerprinted_by_its_own_config(tmp_path, tiny_llama):
    """Changing build_sft's keys does not refuse a finished cots stage; changing its own does."""
    from pipelines.build_sft import select_cots
    from pipelines.stages import stage_config

    _generate_dir(tmp_path / "run" / "generate", tiny_llama)
    cfg = stage_config(_pipeline(tmp_path, tiny_llama), "cots")
    assert isinstance(cfg, CotsConfig) and cfg.output_dir == str(tmp_path / "run" / "cots")
    first = select_cots(cfg)
    assert first["counts"]["kept"] == 3 and first["config"]["output_dir"] == cfg.output_dir
    assert artifacts.read_manifest(tmp_path / "run" / "cots")["stage"] == "cots"

    other_sft = _pipeline(tmp_path, tiny_llama, "build_sft.ratios=[1.0, 0.5]", "build_sft.seed=7")
    assert select_cots(stage_config(other_sft, "cots"))["finished_at"] == first["finished_at"]

    shorter = _pipeline(tmp_path, tiny_llama, "cots.max_cot_tokens=10")
    with pytest.raises(artifacts.ConfigChanged, match="max_cot_tokens: 500 -> 10"):
        select_cots(stage_config(shorter, "cots"))
    assert artifacts.read_manifest(tmp_path / "run" / "cots")["finished_at"] == first["finished_at"]


def test_build_sft_finished_before_the_cots_split_is_reused(tmp_path, tiny_llama):
    """A build_sft directory whose fingerprint still holds the cots keys (and cots_dir unset,
    which meant <output_dir>/../cots) is reused; a real change is refused naming only it."""
    import dataclasses

    from pipelines.build_sft import run_build_sft, select_cots
    from pipelines.stages import stage_config

    _generate_dir(tmp_path / "run" / "generate", tiny_llama)
    pipe = _pipeline(tmp_path, tiny_llama, "build_sft.ratio_sampling=all", "prune.ratios=[0.9, 0.8, 0.7, 0.6, 0.5]")
    select_cots(stage_config(pipe, "cots"))
    _prune_dir(tmp_path / "run" / "prune", tmp_path / "run" / "cots")
    cfg = stage_config(pipe, "build_sft")
    assert cfg.cots_dir == str(tmp_path / "run" / "cots") and cfg.pruned == str(tmp_path / "run" / "prune")
    first = run_build_sft(cfg)
    assert first["counts"]["rows"] == 18 and first["inputs"]["cots"] == cfg.cots_dir

    # the fingerprint the previous layout wrote: build_sft's config with the cots keys in it
    cots = stage_config(pipe, "cots")
    old = dict(dataclasses.asdict(cfg), cots_dir=None)
    old.update({k: getattr(cots, k) for k in ("generations", "cot_source", "max_cot_tokens", "target_tokenizer")})
    old["data"] = dataclasses.asdict(cots.data)
    fp = tmp_path / "run" / "build_sft" / artifacts.FINGERPRINT
    fp.write_text(json.dumps(artifacts.config_fingerprint(old, "build_sft")))
    assert "cot_source" in json.loads(fp.read_text())

    assert run_build_sft(cfg)["finished_at"] == first["finished_at"]
    upgraded = json.loads(fp.read_text())
    assert "cot_source" not in upgraded and "data.name" not in upgraded
    assert upgraded == artifacts.config_fingerprint(cfg, "build_sft")
    with pytest.raises(artifacts.ConfigChanged) as e:
        run_build_sft(dataclasses.replace(cfg, seed=1))
    assert "seed: 42 -> 1" in str(e.value) and "cot_source" not in str(e.value)


def test_cots_runs_as_a_single_stage(tmp_path, tiny_llama, capsys):
    """``tokenskip cots`` with a ``kind: cots`` YAML and with a pipeline YAML (its cots section)."""
    from ray_jobs import cli

    gen = _generate_dir(tmp_path / "run" / "generate", tiny_llama)
    stage_yaml = tmp_path / "cots.yaml"
    stage_yaml.write_text(f"kind: cots\ngenerations: {gen}\noutput_dir: {tmp_path / 'alone'}\nmax_cot_tokens: 20\n")
    assert cli.main(["cots", "--config", str(stage_yaml)]) == 0
    assert artifacts.read_manifest(tmp_path / "alone")["counts"]["kept"] == 3
    assert '"kept": 3' in capsys.readouterr().out

    pipe_yaml = tmp_path / "pipe.yaml"
    pipe_yaml.write_text(
        f"kind: pipeline\nrun_dir: {tmp_path / 'run'}\nmodel: {tiny_llama}\ncots: {{max_cot_tokens: 5}}\n"
    )
    assert cli.main(["cots", "--config", str(pipe_yaml), "max_cot_tokens=1000"]) == 0  # override: the cots section
    m = artifacts.read_manifest(tmp_path / "run" / "cots")
    assert m["counts"]["kept"] == 4 and m["config"]["max_cot_tokens"] == 1000
    assert m["inputs"]["generations"] == str(gen)
    bad = tmp_path / "old.yaml"
    bad.write_text(f"kind: pipeline\nrun_dir: {tmp_path / 'run'}\nbuild_sft: {{cot_source: gold}}\n")
    assert cli.main(["cots", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "build_sft.cot_source moved to cots.cot_source" in err
