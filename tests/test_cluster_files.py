"""Every file under cluster/ parses, and what it references exists and fits."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from tokenskip.config import PipelineConfig, load_config, stage_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _load(path: Path):
    return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())


def test_every_cluster_file_parses():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for p in files:
        assert _load(p) is not None, p


def _check_entrypoint(cmd: str) -> PipelineConfig | None:
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", "-m"], cmd
    module = ROOT / (argv[2].replace(".", "/") + ".py")
    assert module.is_file(), f"entrypoint module missing: {module}"
    if "--config" in argv:
        cfg = ROOT / argv[argv.index("--config") + 1]
        assert cfg.is_file(), f"config missing: {cfg}"
        if argv[2] == "ray_jobs.pipeline":
            return load_config(PipelineConfig, cfg)
    return None


def _gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _needs(pipe: PipelineConfig) -> tuple[float, float]:
    """(largest single replica's GPUs, most GPUs used at once) over the stages."""
    gen, pr, tr, ev = (stage_config(pipe, s) for s in ("generate", "prune", "train", "evaluate"))
    gpu_per_worker = tr.scaling.get("resources_per_worker", {}).get("GPU", 1 if tr.scaling.get("use_gpu") else 0)
    per_replica = max(gen.num_gpus, pr.num_gpus, gpu_per_worker, ev.num_gpus)
    at_once = max(gen.num_gpus * gen.concurrency, pr.num_gpus * pr.concurrency,
                  gpu_per_worker * tr.scaling.get("num_workers", 1), ev.num_gpus)
    return per_replica, at_once


def test_rayjob_entrypoint_and_resources_agree():
    job = _load(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["kind"] == "RayJob"
    pipe = _check_entrypoint(job["spec"]["entrypoint"])
    assert pipe is not None
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    per_pod = max(_gpus(g["template"]["spec"]["containers"][0]) for g in groups)
    capacity = sum(_gpus(g["template"]["spec"]["containers"][0]) * g["maxReplicas"] for g in groups)
    per_replica, at_once = _needs(pipe)
    assert per_replica <= per_pod, "a vLLM replica / train worker needs more GPUs than one pod has"
    assert at_once <= capacity, f"stages need {at_once} GPUs at once, cluster max is {capacity}"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "working_dir" in env and any(p.startswith("peft") for p in env["pip"])


def test_raycluster_fits_every_gpu_experiment():
    rc = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    assert rc["kind"] == "RayCluster" and rc["spec"]["enableInTreeAutoscaling"] is True
    groups = rc["spec"]["workerGroupSpecs"]
    per_pod = max(_gpus(g["template"]["spec"]["containers"][0]) for g in groups)
    capacity = sum(_gpus(g["template"]["spec"]["containers"][0]) * g["maxReplicas"] for g in groups)
    for cfg in sorted((ROOT / "configs").glob("*.yaml")):
        pipe = load_config(PipelineConfig, cfg)
        per_replica, at_once = _needs(pipe)
        assert per_replica <= per_pod and at_once <= capacity, cfg.name


def test_launcher_fits_largest_experiment():
    ln = _load(CLUSTER / "launcher" / "aws-gpu.yaml")
    nodes = ln["available_node_types"]
    per_node = max(n["resources"].get("GPU", 0) for n in nodes.values())
    capacity = sum(n["resources"].get("GPU", 0) * n.get("max_workers", 0) for n in nodes.values())
    _, at_once = _needs(load_config(PipelineConfig, ROOT / "configs" / "qwen2.5-32b-gsm8k.yaml"))
    assert per_node >= 8 and at_once <= capacity


def test_runtime_env_matches_pyproject_pins():
    env = _load(CLUSTER / "runtime_env.yaml")
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in env["pip"]:
        m = re.match(r'^([a-z0-9_.-]+)==(.+)$', pin)
        if m:
            assert f'"{m.group(1)}=={m.group(2)}"' in pyproject, pin
    assert ".venv/" in env["excludes"]


def test_deepspeed_files_are_valid_zero_configs():
    for p in (CLUSTER / "deepspeed").glob("*.json"):
        cfg = _load(p)
        assert cfg["zero_optimization"]["stage"] in (2, 3), p


@pytest.mark.parametrize("cfg", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_config_headers_reference_existing_files(cfg):
    header = "".join(line for line in cfg.read_text().splitlines(True) if line.startswith("#"))
    for ref in re.findall(r"((?:configs|cluster|serving)/[\w./-]+\.(?:yaml|json))", header):
        assert (ROOT / ref).is_file(), f"{cfg.name} header references missing {ref}"
    for mod in re.findall(r"python -m ([\w.]+)", header):
        assert (ROOT / (mod.replace(".", "/") + ".py")).is_file(), mod


def test_rayservice_serves_the_shipped_gpu_app():
    svc = _load(CLUSTER / "kuberay" / "rayservice.yaml")
    assert svc["kind"] == "RayService"
    conf = yaml.safe_load(svc["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "serving" / "serve_config.gpu.yaml").read_text())
    app, ref = conf["applications"][0], shipped["applications"][0]
    assert app["import_path"] == ref["import_path"] and app["args"] == ref["args"]
    module = ROOT / (app["import_path"].split(":")[0].replace(".", "/") + ".py")
    assert module.is_file()
    model = app["args"]["model_deployment"]
    gpus_per_replica = model["ray_actor_options"].get("num_gpus", 0)
    assert gpus_per_replica == app["args"]["engine_kwargs"].get("tensor_parallel_size", 1)
    groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    per_pod = max(_gpus(g["template"]["spec"]["containers"][0]) for g in groups)
    capacity = sum(_gpus(g["template"]["spec"]["containers"][0]) * g["maxReplicas"] for g in groups)
    assert gpus_per_replica <= per_pod
    assert gpus_per_replica * model["autoscaling_config"]["max_replicas"] <= capacity
