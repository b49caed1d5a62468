"""The stage table (pipelines/stages.py): one declaration per stage, consistent with itself."""

from __future__ import annotations

import pytest

from pipelines.stages import STAGES, plan, stage_config
from tokenskip.config import KINDS, PipelineConfig


def test_every_stage_resolves_and_reads_only_earlier_stages():
    order = list(STAGES)
    for i, st in enumerate(STAGES.values()):
        assert callable(st.function()), st.name
        assert all(issubclass(e, BaseException) for e in st.error_types()), st.name
        assert st.section in KINDS, st.name
        for field, upstream in st.inputs.items():
            assert hasattr(KINDS[st.section](), field), (st.name, field)
            assert order.index(upstream.split("/")[0]) < i, (st.name, upstream)


def test_pipeline_wiring_follows_the_table():
    pipe = PipelineConfig(run_dir="/r", model="m", stages=["generate", "prune", "build_sft", "train", "evaluate"])
    cfg = {name: stage_config(pipe, name) for name in plan(pipe.stages)}
    assert list(cfg) == ["generate", "cots", "prune", "build_sft", "train", "evaluate"]
    assert cfg["cots"].generations == "/r/generate" and cfg["prune"].input == "/r/cots"
    assert (cfg["build_sft"].generations, cfg["build_sft"].pruned) == ("/r/generate", "/r/prune")
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
