"""MLflow run tracking (tokenskip.tracking): config, the local store, the pipeline's parent
and child runs, a real `mlflow server` on 127.0.0.1, and the tiny pipeline read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenskip import tracking
from tokenskip.config import ConfigError, EvalConfig, PipelineConfig, TrainConfig, load_config
from tokenskip.testing import wait_http


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str) -> list:
    c = _client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return c.search_runs([exp.experiment_id])


def test_config_values():
    assert load_config(PipelineConfig, data={"tracking": "none"}).tracking == "none"
    server = {"uri": "http://127.0.0.1:5000"}
    assert load_config(TrainConfig, data={"tracking": server}).tracking == server
    assert load_config(EvalConfig, data={}).tracking == {}
    with pytest.raises(ConfigError, match="tracking: unknown key 'url'"):
        load_config(PipelineConfig, data={"tracking": {"url": "http://x"}})
    with pytest.raises(ConfigError, match="'none'"):
        load_config(PipelineConfig, data={"tracking": "mlflow"})
    assert tracking.resolve("none", "/tmp/x") is None
    r = tracking.resolve({"experiment": "e"}, "/tmp/x")
    assert r == {"uri": "sqlite:////tmp/x/mlruns/mlflow.db", "experiment": "e"}


def test_tracking_is_not_a_fingerprinted_key():
    from tokenskip.artifacts import config_fingerprint

    a = config_fingerprint(TrainConfig(output_dir="/tmp/t"))
    b = config_fingerprint(TrainConfig(output_dir="/tmp/t", tracking={"uri": "http://h:1", "run_id": "abc"}))
    assert a == b and not any(k.startswith("tracking") for k in a)


def test_local_store_run_metrics_params_artifacts(tmp_path):
    t = tracking.resolve({}, tmp_path, "exp")
    run = tracking.start_run(t, "train")
    for step, loss in enumerate([2.0, 1.5, 1.25], start=1):
        tracking.log_train_step(run, {"step": step, "loss": loss, "lr": 1e-3 / step, "grad_norm": 0.5 * step,
                                      "tokens_per_s": 100.0 + step, "epoch": step / 3, "ignored": "text"})
    run.log_params({"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "long": "x" * 7000})
    (tmp_path / "table.md").write_text("| a |\n")
    run.log_artifact(tmp_path / "table.md")
    run.log_artifact(tmp_path / "missing.png")  # a file that is not there is skipped, not an error
    run.end()
    c = _client(t["uri"])
    assert [m.value for m in c.get_metric_history(run.run_id, "loss")] == [2.0, 1.5, 1.25]
    assert [m.step for m in c.get_metric_history(run.run_id, "grad_norm")] == [1, 2, 3]
    got = c.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["lora.r"] == "8" and got.data.params["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert len(got.data.params["long"]) == 6000
    assert "ignored" not in got.data.metrics
    assert [a.path for a in c.list_artifacts(run.run_id)] == ["table.md"]
    assert (tmp_path / "mlruns" / "mlflow.db").is_file() and (tmp_path / "mlruns" / "artifacts").is_dir()
    assert not (Path.cwd() / "mlruns").exists() or (Path.cwd() / "mlruns").stat().st_mtime < time.time() - 60


def test_log_evaluation_per_gamma(tmp_path):
    out = tmp_path / "evaluate"
    out.mkdir()
    results = {"datasets": {"gsm8k": {"conditions": [
        {"id": "original", "method": "original", "ratio": None, "accuracy": 0.5, "mean_tokens": 200.0,
         "actual_ratio": 1.0},
        {"id": "tokenskip-0.9", "method": "tokenskip", "ratio": 0.9, "accuracy": 0.45, "mean_tokens": 180.0},
        {"id": "tokenskip-0.5", "method": "tokenskip", "ratio": 0.5, "accuracy": 0.25, "mean_tokens": 110.0},
    ]}}}
    (out / "results.json").write_text(json.dumps(results))
    (out / "table.md").write_text("table")
    (out / "accuracy_vs_tokens.png").write_bytes(b"\x89PNG")
    cfg = EvalConfig(output_dir=str(out))
    tracking.log_evaluation(cfg, results, out, ("table.md", "accuracy_vs_tokens.png"))
    (run,) = _runs(tracking.local_uri(tmp_path), tracking.DEFAULT_EXPERIMENT)
    c = _client(tracking.local_uri(tmp_path))
    assert run.data.metrics["gsm8k/original/accuracy"] == 0.5
    assert run.data.metrics["gsm8k/tokenskip-0.5/mean_tokens"] == 110.0
    curve = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, "gsm8k/tokenskip/accuracy"))
    assert curve == [(50, 0.25), (90, 0.45)]
    arts = sorted(a.path for a in c.list_artifacts(run.info.run_id))
    assert arts == ["accuracy_vs_tokens.png", "results.json", "table.md"]
    assert run.data.params["datasets"] == '["gsm8k"]'  # a stage's own run records its config
    assert run.info.status == "FINISHED"


def test_pipeline_parent_and_child_runs(tmp_path):
    from pipelines.stages import plan, stage_config

    pipe = load_config(PipelineConfig, data={"name": "unit", "run_dir": str(tmp_path / "run"),
                                              "stages": ["prune", "build_sft", "train", "evaluate"]})
    steps = [(n, stage_config(pipe, n)) for n in plan(pipe.stages)]
    pt = tracking.PipelineTracking(pipe)
    steps = pt.start(steps)
    cfgs = dict(steps)
    assert cfgs["train"].tracking["run_id"] == pt.children["train"].run_id
    assert cfgs["evaluate"].tracking["run_id"] == pt.children["evaluate"].run_id
    # stage "train" finished (its manifest exists), "evaluate" did not: the pipeline failed there
    train_dir = Path(cfgs["train"].output_dir)
    train_dir.mkdir(parents=True)
    (train_dir / "manifest.json").write_text(json.dumps({"stage": "train", "counts": {"kept": 3}}))
    pt.finish(steps, {"train": {"stage": "train"}}, {"train": 1.5}, error=RuntimeError("evaluate failed"))
    runs = {r.info.run_name: r for r in _runs(tracking.local_uri(tmp_path / "run"), "unit")}
    parent = runs["unit"]
    assert parent.info.status == "FAILED"
    assert parent.data.params["train.lora.r"] == str(pipe.train.lora.r)
    assert set(runs) == {"unit", *[n for n, _ in steps]}
    for name, _ in steps:
        assert runs[name].data.tags[tracking.PARENT_TAG] == parent.info.run_id
    assert runs["train"].info.status == "FINISHED" and runs["evaluate"].info.status == "FAILED"
    c = _client(tracking.local_uri(tmp_path / "run"))
    assert [a.path for a in c.list_artifacts(runs["train"].info.run_id)] == ["manifest.json"]
    assert runs["train"].data.metrics["stage_seconds"] == 1.5
    pt.finish(steps)  # closed already: a second finish (e.g. at exit) changes nothing
    assert _client(tracking.local_uri(tmp_path / "run")).get_run(parent.info.run_id).info.status == "FAILED"


def test_tracking_none_writes_nothing(tmp_path):
    from pipelines.stages import plan, stage_config

    pipe = load_config(PipelineConfig, data={"run_dir": str(tmp_path / "run"), "tracking": "none"})
    steps = tracking.PipelineTracking(pipe).start([(n, stage_config(pipe, n)) for n in plan(pipe.stages)])
    assert dict(steps)["train"].tracking == "none" and dict(steps)["evaluate"].tracking == "none"
    assert tracking.stage_run(dict(steps)["train"], "train") is tracking.NULL
    assert not (tmp_path / "run" / "mlruns").exists()


def test_unreachable_server_is_a_clear_error(tmp_path, monkeypatch):
    from tokenskip.testing import free_ports

    (port,) = free_ports(1)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(tracking.TrackingError, match=f"127.0.0.1:{port}"):
        tracking.start_run(tracking.resolve({"uri": f"http://127.0.0.1:{port}"}, tmp_path), "x")


# --------------------------------------------------------------------------- a real server


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 (a free port, its own backend dir), stopped through its own
    process group (the server and the web workers it started), never by name."""
    from tokenskip.testing import free_ports

    (port,) = free_ports(1)
    home = tmp_path / "server"
    home.mkdir()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts"),
           "--workers", "1"]
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, 120, output=(home / "server.log").read_text, interval=0.5)
        yield url, home
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # this server's own group (it is the group leader)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


@pytest.mark.integration
def test_logs_to_a_real_mlflow_server(mlflow_server, tmp_path):
    url, home = mlflow_server
    t = tracking.resolve({"uri": url, "experiment": "served"}, tmp_path)
    run = tracking.start_run(t, "train")
    for step in (1, 2):
        metrics = {"step": step, "loss": 1.0 / step, "lr": 0.1, "grad_norm": 2.0, "tokens_per_s": 50.0}
        tracking.log_train_step(run, metrics)
    (tmp_path / "results.json").write_text("{}")
    run.log_artifact(tmp_path / "results.json")
    run.end()
    c = _client(url)
    assert [m.value for m in c.get_metric_history(run.run_id, "loss")] == [1.0, 0.5]
    assert c.get_run(run.run_id).info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(run.run_id)] == ["results.json"]
    assert list((home / "artifacts").rglob("results.json")), "the artifact went through the server to its store"
    assert not (tmp_path / "mlruns").exists()  # nothing local when a server is given


# --------------------------------------------------------------------------- the tiny pipeline


@pytest.mark.integration
def test_tiny_pipeline_metrics_read_back(tiny_pipeline):
    """The session's tiny pipeline (run once through `ray job submit`, see tests/conftest.py) read
    back from the local MLflow store it wrote under its run_dir."""
    assert tiny_pipeline.returncode == 0, tiny_pipeline.output[-6000:]
    run_dir = tiny_pipeline.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["adapter"]).is_dir()
    uri = tracking.local_uri(run_dir)
    c = _client(uri)
    every = _runs(uri, "tiny")
    # the first run's parent (tests/test_pipeline_job.py re-runs the same run_dir, which may log another)
    parent = min((r for r in every if tracking.PARENT_TAG not in r.data.tags), key=lambda r: r.info.start_time)
    assert parent.info.run_name == "tiny"
    runs = {r.info.run_name: r for r in every if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.max_steps"] == "3" and parent.data.params["name"] == "tiny"
    assert {"generate", "prune", "build_sft", "train", "evaluate"} <= set(runs)
    for name, r in runs.items():
        assert r.data.tags[tracking.PARENT_TAG] == parent.info.run_id
        assert r.info.status == "FINISHED", name
        assert "manifest.json" in [a.path for a in c.list_artifacts(r.info.run_id)], name
    train = runs["train"].info.run_id
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        hist = c.get_metric_history(train, key)
        assert [m.step for m in hist] == [1, 2, 3], key
        assert all(m.value == m.value and m.value >= 0 for m in hist), key  # no NaN
    assert runs["train"].data.params["max_steps"] == "3"  # the pipeline logs each stage's config
    ev = runs["evaluate"]
    assert 0.0 <= ev.data.metrics["gsm8k/original/accuracy"] <= 1.0
    assert sorted(m.step for m in c.get_metric_history(ev.info.run_id, "gsm8k/tokenskip/mean_tokens")) == [50, 70, 100]
    arts = [a.path for a in c.list_artifacts(ev.info.run_id)]
    assert {"results.json", "table.md", "accuracy_vs_tokens.png", "ratio_adherence.png", "manifest.json"} <= set(arts)
