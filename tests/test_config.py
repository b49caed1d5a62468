from pathlib import Path

import pytest

from tokenskip import config as C

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_overrides(tmp_path):
    p = tmp_path / "prune.yaml"
    p.write_text("kind: prune\nratios: [0.9, 0.5]\nscorer: llmlingua2\n")
    cfg = C.load_config(C.PruneConfig, p, ["batch_size=8", "force_tokens=[Step, ':']"])
    assert cfg.ratios == [0.9, 0.5] and cfg.scorer == "llmlingua2"
    assert cfg.batch_size == 8 and cfg.force_tokens == ["Step", ":"]
    assert cfg.model_batch_size == C.PruneConfig().model_batch_size  # default kept


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("kind: pipeline\ntrain:\n  lora:\n    rank: 8\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.PipelineConfig, p)
    assert "train.lora.rank" in str(e.value) and str(p) in str(e.value)


def test_unknown_override_key_rejected():
    with pytest.raises(C.ConfigError, match="generate.data.nmae"):
        C.load_config(C.PipelineConfig, data={}, overrides=["generate.data.nmae=gsm8k"])


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "x"])
def test_ratio_validation(bad):
    with pytest.raises(C.ConfigError, match="ratios"):
        C.load_config(C.EvalConfig, data={"ratios": [1.0, bad]})


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("concurrency", -1), ("shard_rows", 0)])
def test_positive_sizes(field, value):
    with pytest.raises(C.ConfigError, match=field):
        C.load_config(C.GenerateConfig, data={field: value})


def test_wrong_type_is_reported():
    with pytest.raises(C.ConfigError, match="batch_size"):
        C.load_config(C.GenerateConfig, data={"batch_size": "many"})


def test_kind_mismatch(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("kind: train\n")
    with pytest.raises(C.ConfigError, match="kind 'train'"):
        C.load_config(C.PruneConfig, p)


def test_pipeline_yaml_gives_stage_sections(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("kind: pipeline\nrun_dir: /tmp/r\nmodel: my/model\nprune:\n  ratios: [0.5]\n")
    pcfg = C.load_config(C.PruneConfig, p, ["batch_size=3"])
    assert pcfg.ratios == [0.5] and pcfg.batch_size == 3
    assert pcfg.input == "/tmp/r/cots" and pcfg.output_dir == "/tmp/r/prune"
    gcfg = C.load_config(C.GenerateConfig, p)
    assert gcfg.model == "my/model" and gcfg.output_dir == "/tmp/r/generate"


def test_every_shipped_yaml_loads():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        cfg = C.load_any(f)
        assert type(cfg).__name__.endswith("Config"), f


def test_describe_lists_nested_keys():
    keys = [k for k, _, _ in C.describe(C.PipelineConfig)]
    assert "generate.data.name" in keys and "train.lora.r" in keys
