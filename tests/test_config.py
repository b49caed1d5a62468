from pathlib import Path

import pytest
import yaml

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


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "---\n"])
def test_an_empty_config_file_is_refused_not_run_with_every_default(tmp_path, text):
    p = tmp_path / "empty.yaml"
    p.write_text(text)
    for kind in (C.PipelineConfig, C.GenerateConfig, C.TrainConfig):
        with pytest.raises(C.ConfigError, match="empty config") as e:
            C.load_config(kind, p, ["model=x"])  # overrides do not make an empty file a config
        assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "kind, override, message",
    [
        (C.PipelineConfig, "run_dir=", "run_dir: must not be empty"),  # the stages would land at /cots, /prune, …
        (C.PipelineConfig, "model=", "model must not be empty"),
        (C.PipelineConfig, "model=null", "model must not be empty"),
        (C.PipelineConfig, "stages=[]", "pipeline.stages must not be empty"),
        (C.PipelineConfig, "cots.data.name=' '", "cots.data.name must not be empty"),
        (C.TrainConfig, "model=", "train.model must not be empty"),
        (C.EvalConfig, "output_dir=", "evaluate.output_dir: must not be empty"),
        (C.PruneConfig, "scorer_model=", "prune.scorer_model must not be empty"),
    ],
)
def test_a_blank_name_path_or_stage_list_is_refused_naming_file_and_key(kind, override, message):
    path = ROOT / "configs" / "quickstart.yaml"
    with pytest.raises(C.ConfigError) as e:
        C.load_config(kind, path, [override])
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    # an optional path stays blank-able: `evaluate.adapter=` evaluates the base model
    assert C.load_config(C.PipelineConfig, path, ["evaluate.adapter="]).evaluate.adapter == ""


def test_kind_mismatch(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("kind: train\n")
    with pytest.raises(C.ConfigError, match="kind 'train'"):
        C.load_config(C.PruneConfig, p)


def test_pipeline_yaml_gives_stage_sections(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(
        "kind: pipeline\nrun_dir: /tmp/r\nmodel: my/model\nprune:\n  ratios: [0.5]\nbuild_sft:\n  ratios: [1.0, 0.5]\n"
    )
    pcfg = C.load_config(C.PruneConfig, p, ["batch_size=3"])
    assert pcfg.ratios == [0.5] and pcfg.batch_size == 3
    assert pcfg.output_dir == "/tmp/r/prune"
    from pipelines.stages import stage_config  # the stage table wires the inputs

    assert stage_config(C.load_config(C.PipelineConfig, p), "prune").input == "/tmp/r/cots"
    gcfg = C.load_config(C.GenerateConfig, p)
    assert gcfg.model == "my/model" and gcfg.output_dir == "/tmp/r/generate"


def test_a_pipeline_whose_build_sft_wants_a_gamma_prune_does_not_make_is_refused_before_any_stage():
    base = {"prune": {"ratios": [0.7, 0.5]}, "build_sft": {"ratios": [1.0, 0.7, 0.5]}}
    assert C.load_config(C.PipelineConfig, data=base).build_sft.ratios == [1.0, 0.7, 0.5]
    with pytest.raises(C.ConfigError, match=r"build_sft.ratios \[0.6\] are not among prune.ratios \[0.7, 0.5\]"):
        C.load_config(C.PipelineConfig, data=base, overrides=["build_sft.ratios=[1.0, 0.6]"])
    # without build_sft in the run, or with its pruned input given elsewhere, prune.ratios do not bind it
    for extra in (["stages=[generate, prune]"], ["build_sft.pruned=/elsewhere/prune"]):
        C.load_config(C.PipelineConfig, data=base, overrides=["build_sft.ratios=[1.0, 0.6]", *extra])


def test_cots_section_of_a_pipeline(tmp_path):
    """The cots stage has its own section: model, output_dir and (for gold CoTs) the generate
    section's questions filled in like build_sft's were; the cots keys there win."""
    p = tmp_path / "exp.yaml"
    p.write_text(
        "kind: pipeline\nrun_dir: /tmp/r\nmodel: my/model\ngenerate:\n  data: {name: math, limit: 7}\n"
        "cots:\n  cot_source: gold\n  max_cot_tokens: 300\n"
    )
    cfg = C.load_config(C.CotsConfig, p)
    assert isinstance(cfg, C.CotsConfig) and (cfg.cot_source, cfg.max_cot_tokens) == ("gold", 300)
    assert cfg.output_dir == "/tmp/r/cots" and cfg.target_tokenizer == "my/model"
    assert (cfg.data.name, cfg.data.limit) == ("math", 7)
    assert C.load_config(C.CotsConfig, p, ["cots.data.name=math500"]).data == C.DataSourceConfig(name="math500")
    assert C.load_config(C.CotsConfig, p, ["target_tokenizer=t"]).target_tokenizer == "t"
    sft = C.load_config(C.BuildSFTConfig, p)
    assert not hasattr(sft, "cot_source") and sft.output_dir == "/tmp/r/build_sft"
    # a stage YAML of its own, and the keys listed with their help
    q = tmp_path / "cots.yaml"
    q.write_text("kind: cots\ngenerations: /tmp/r/generate\noutput_dir: /tmp/c\n")
    alone = C.load_any(q)
    assert isinstance(alone, C.CotsConfig) and alone.cot_source == "generated" and alone.output_dir == "/tmp/c"
    rows = {k: h for k, _, h in C.describe(C.PipelineConfig)}
    assert {"cots.cot_source", "cots.max_cot_tokens", "cots.data.name", "cots.generations"} <= set(rows)
    assert all(rows[f"cots.{k}"] for k in ("cot_source", "max_cot_tokens", "generations", "target_tokenizer"))
    assert not [k for k in rows if k.startswith("build_sft.") and k.split(".")[1] in ("cot_source", "data")]


@pytest.mark.parametrize("key,value", [("cot_source", "gold"), ("max_cot_tokens", 300), ("generations", "/g"),
                                       ("target_tokenizer", "t"), ("data", {"name": "gsm8k"})])
def test_cots_keys_left_under_build_sft_say_where_they_went(tmp_path, key, value):
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump({"kind": "pipeline", "build_sft": {"ratios": [1.0, 0.5], key: value}}))
    with pytest.raises(C.ConfigError) as e:
        C.load_config(C.PipelineConfig, p)
    assert str(p) in str(e.value) and f"build_sft.{key} moved to cots.{key}" in str(e.value)
    q = tmp_path / "sft.yaml"  # a build_sft stage YAML
    q.write_text(yaml.safe_dump({"kind": "build_sft", key: value}))
    with pytest.raises(C.ConfigError, match=f"{q}: build_sft.{key} moved to cots.{key}"):
        C.load_any(q)
    with pytest.raises(C.ConfigError, match=f"build_sft.{key} moved to cots.{key}"):  # an override too
        C.load_config(C.PipelineConfig, data={}, overrides=[f"build_sft.{key}=x"])
    # any other unknown key keeps the plain message
    with pytest.raises(C.ConfigError, match="unknown key 'build_sft.cot_sorce'"):
        C.load_config(C.PipelineConfig, data={"build_sft": {"cot_sorce": "gold"}})


def test_every_shipped_yaml_loads():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "no configs shipped"
    for f in files:
        cfg = C.load_any(f)
        assert type(cfg).__name__.endswith("Config"), f


def test_describe_lists_nested_keys():
    keys = [k for k, _, _ in C.describe(C.PipelineConfig)]
    assert "generate.data.name" in keys and "train.lora.r" in keys


# --------------------------------------------------------------------------- bad config values (#15.11)


def test_float_written_without_a_dot_is_a_number(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("kind: train\nlearning_rate: 1e-4\nwarmup_ratio: 5e-2\n")  # YAML 1.1 reads both as strings
    cfg = C.load_config(C.TrainConfig, p)
    assert cfg.learning_rate == 1e-4 and cfg.warmup_ratio == 0.05
    assert C.load_config(C.TrainConfig, data={}, overrides=["learning_rate=3e-5"]).learning_rate == 3e-5
    with pytest.raises(C.ConfigError, match="learning_rate has the wrong type"):
        C.load_config(C.TrainConfig, data={"learning_rate": "fast"})


@pytest.mark.parametrize("text,key", [
    ("kind: train\nlearning_rate: .nan\n", "learning_rate"),
    ("kind: train\nepochs: .inf\n", "epochs"),
    ("kind: generate\ntemperature: .nan\n", "temperature"),
    ("kind: generate\nengine_kwargs:\n  gpu_memory_utilization: .nan\n", "engine_kwargs.gpu_memory_utilization"),
    ("kind: pipeline\ntrain:\n  deepspeed:\n    optimizer:\n      params:\n        eps: -.inf\n",
     "train.deepspeed.optimizer.params.eps"),
    ("kind: evaluate\nratios: [1.0, .nan]\n", "ratios"),
])
def test_nan_and_inf_are_refused_everywhere(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(C.ConfigError, match=key.replace(".", r"\.")):
        C.load_any(p)


def test_nan_refused_when_built_directly():
    with pytest.raises(C.ConfigError, match="temperature"):
        C.GenerateConfig(temperature=float("nan"))
    with pytest.raises(C.ConfigError, match="learning_rate"):
        C.TrainConfig(learning_rate=float("inf"))


def test_type_error_while_building_names_the_key(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("kind: train\nlora:\n  target_modules: 5\n")
    with pytest.raises(C.ConfigError, match=r"lora\.target_modules = 5: value of the wrong type") as e:
        C.load_config(C.TrainConfig, p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("override", ["run_dir=s3://bucket/runs/x", "generate.output_dir=gs://b/gen",
                                      "evaluate.output_dir=hdfs://nn/eval", "train.output_dir=az://c/t"])
def test_uri_run_dir_and_output_dir_are_refused(override):
    with pytest.raises(C.ConfigError, match="object storage is not supported"):
        C.load_config(C.PipelineConfig, data={}, overrides=[override])
    # Ray Train's own storage may be a bucket
    assert C.load_config(C.TrainConfig, data={"storage_path": "s3://b/ray"}).storage_path == "s3://b/ray"


def test_max_reject_share_range():
    assert C.GenerateConfig().max_reject_share == 0.5
    with pytest.raises(C.ConfigError, match="max_reject_share"):
        C.load_config(C.PruneConfig, data={"max_reject_share": 1.5})


def test_prune_cut_and_protect_resolve_by_scorer():
    from tokenskip.config import ConfigError, PruneConfig

    si = PruneConfig(scorer="self_info")
    assert (si.resolved_cut(), si.resolved_protect()) == ("budget", "numbers")
    ll = PruneConfig(scorer="llmlingua2")
    assert (ll.resolved_cut(), ll.resolved_protect()) == ("percentile", "none")  # llmlingua parity stays the default
    assert PruneConfig(scorer="self_info", cut="percentile").resolved_protect() == "none"
    with pytest.raises(ConfigError, match="reference_quirks"):
        PruneConfig(scorer="llmlingua2", cut="budget")
    assert PruneConfig(scorer="llmlingua2", cut="budget", reference_quirks=False).resolved_protect() == "numbers"
    with pytest.raises(ConfigError, match="cut must be one of"):
        PruneConfig(cut="middle")
