"""The stage table (pipelines/stages.py): one declaration per stage, consistent with itself."""

from __future__ import annotations

import pytest

from pipelines.stages import STAGES, plan, stage_config
from tokenskip import config
from tokenskip.config import KINDS, PipelineConfig


def test_every_stage_resolves_and_reads_only_earlier_stages():
    order = list(STAGES)
    for i, st in enumerate(STAGES.values()):
        assert callable(st.function()), st.name
        assert all(issubclass(e, BaseException) for e in st.error_types()), st.name
        assert st.section == st.name and st.section in KINDS, st.name  # every stage has a config of its own
        for field, upstream in st.inputs.items():
            assert hasattr(KINDS[st.section](), field), (st.name, field)
            assert order.index(upstream.split("/")[0]) < i, (st.name, upstream)


def test_pipeline_wiring_follows_the_table():
    pipe = PipelineConfig(run_dir="/r", model="m", stages=["generate", "prune", "build_sft", "train", "evaluate"])
    cfg = {name: stage_config(pipe, name) for name in plan(pipe.stages)}
    assert list(cfg) == ["generate", "cots", "prune", "build_sft", "train", "evaluate"]
    assert cfg["cots"].generations == "/r/generate" and cfg["prune"].input == "/r/cots"
    assert (cfg["build_sft"].cots_dir, cfg["build_sft"].pruned) == ("/r/cots", "/r/prune")
    assert {name: type(c) for name, c in cfg.items()} == {name: KINDS[name] for name in cfg}
    assert cfg["train"].dataset == "/r/build_sft" and cfg["evaluate"].adapter == "/r/train/adapter"
    assert cfg["train"].model == "m" and cfg["generate"].output_dir == "/r/generate"
    # a path set in the YAML wins; without a train stage evaluate keeps its own adapter (none)
    pipe2 = PipelineConfig(run_dir="/r", stages=["prune", "evaluate"])
    pipe2.prune.input = "/data/cots.jsonl"
    assert stage_config(pipe2, "prune").input == "/data/cots.jsonl"
    assert stage_config(pipe2, "evaluate").adapter is None
    assert plan(pipe2.stages) == ["cots", "prune", "evaluate"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_summary_never_raises_on_a_sparse_manifest(stage):
    assert isinstance(STAGES[stage].summary({"counts": {}}), str)


def test_config_stage_names_are_the_table():
    assert config.STAGES == tuple(STAGES)  # what pipeline.stages may name (tokenskip cannot import the table)
    assert plan(["cots"]) == ["cots"] and plan(["generate", "cots"]) == ["generate", "cots"]


def test_pipeline_yaml_wires_cots_prune_build_sft(tmp_path):
    """Each stage reads the directory the stage before it writes, all from one pipeline YAML."""
    p = tmp_path / "exp.yaml"
    p.write_text(
        f"kind: pipeline\nrun_dir: {tmp_path / 'run'}\nmodel: m\nstages: [generate, prune, build_sft]\n"
        "generate:\n  data: {name: gsm8k, limit: 5}\ncots:\n  cot_source: gold\n"
        "prune:\n  ratios: [0.5]\nbuild_sft:\n  ratios: [1.0, 0.5]\n"
    )
    pipe = config.load_config(PipelineConfig, p)
    cfg = {name: stage_config(pipe, name) for name in plan(pipe.stages)}
    run = str(tmp_path / "run")
    assert cfg["generate"].output_dir == cfg["cots"].generations == f"{run}/generate"
    assert cfg["cots"].output_dir == cfg["prune"].input == cfg["build_sft"].cots_dir == f"{run}/cots"
    assert cfg["prune"].output_dir == cfg["build_sft"].pruned == f"{run}/prune"
    assert cfg["build_sft"].output_dir == f"{run}/build_sft"
    assert cfg["cots"].cot_source == "gold" and cfg["cots"].data.limit == 5 and cfg["cots"].target_tokenizer == "m"
    # a directory set in the YAML wins over the wiring
    pipe.build_sft.cots_dir = "/elsewhere/cots"
    assert stage_config(pipe, "build_sft").cots_dir == "/elsewhere/cots"
