"""The data pipeline end to end: generate (Ray Data + vLLM) killed mid-run and resumed,
then CoT selection -> prune -> SFT build, from one pipeline YAML."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tokenskip import artifacts
from tokenskip.config import PipelineConfig, load_any, load_config

ROOT = Path(__file__).resolve().parents[1]
N_QUESTIONS = 40


def test_shipped_data_configs_load():
    files = sorted((ROOT / "configs" / "data").glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        cfg = load_any(f)
        assert isinstance(cfg, PipelineConfig) and set(cfg.stages) <= {"generate", "prune", "build_sft"}, f
        first = f.read_text().splitlines()[0]
        assert first.startswith("#"), f"{f}: header comment with the launch command expected"
        assert "ray_jobs.build_dataset" in f.read_text()


def test_plan_adds_cot_selection():
    from ray_jobs.build_dataset import plan

    assert plan(PipelineConfig(stages=["generate", "prune", "build_sft"])) == ["generate", "cots", "prune", "build_sft"]
    assert plan(PipelineConfig(stages=["generate"])) == ["generate"]
    assert plan(PipelineConfig(stages=["build_sft", "train"])) == ["cots", "build_sft"]
    assert plan(PipelineConfig(stages=["generate", "cots"])) == ["generate", "cots"]  # the selection alone


def test_bad_config_exits_2(tmp_path, capsys):
    from ray_jobs.build_dataset import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: pipeline\ngenerate: {batch_sise: 4}\n")
    assert main(["--config", str(bad)]) == 2
    assert "batch_sise" in capsys.readouterr().err


def _session_pids(sid: int, marker: str) -> list[int]:
    """Processes still alive from the killed run: same session, or naming its Ray temp dir."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getsid(int(p.name)) == sid or marker in cmd:
                found.append(int(p.name))
        except (OSError, ProcessLookupError):
            continue
    return found


def _kill_leftovers(sid: int, marker: str) -> list[int]:
    left = _session_pids(sid, marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    while time.time() < deadline and _session_pids(sid, marker):
        time.sleep(0.2)
    return left


def _assert_console_is_short(console: list[str], log: Path, took: float) -> None:
    """The generate stage (a vLLM engine in a Ray Data actor) in a subprocess without a TTY: stage
    lines and a heartbeat on the console, the engine's and Ray Data's output in the stage's log."""
    text = log.read_text()
    print(f"console lines: {len(console)}; generate.log lines: {len(text.splitlines())}")
    # a heartbeat line every 5 s while the engine starts, and a few lines more
    ticks = [ln for ln in console if ln.startswith("generate: ") and ln.endswith("elapsed")]
    assert len(ticks) <= took / 5 + 1, "\n".join(console)
    assert len(console) - len(ticks) <= 12, "\n".join(console)
    assert any(str(log) in ln for ln in console)
    assert any(ln.startswith("[1/1] generate done in") or ln.startswith("generate done in") for ln in console), console
    assert "vLLM" in text or "vllm" in text  # the engine's own output is in the file...
    assert not any("vllm" in ln.lower() and "INFO" in ln for ln in console)  # ...not on the console
    assert not any("Queued blocks" in ln or "Tasks:" in ln for ln in console)  # no Ray Data operator tables


@pytest.mark.integration
def test_kill_mid_generation_then_resume(tmp_path, tiny_llama, ray_local):
    src = tmp_path / "q.jsonl"
    src.write_text(
        "".join(
            json.dumps(
                {
                    "question": f"Sam has {i} pens and gets 3 more. How many pens?",
                    "answer": f"{i}+3=<<{i}+3={i + 3}>>{i + 3} pens.\n#### {i + 3}",
                }
            )
            + "\n"
            for i in range(N_QUESTIONS)
        )
        + json.dumps({"question": "pens " * 600 + "?", "answer": "#### 1"})
        + "\n"  # prompt too long
        + json.dumps({"answer": "#### 2"})
        + "\n"
    )  # no question: unreadable row
    ray_tmp = tempfile.mkdtemp(prefix="tsr", dir="/tmp")  # short: Ray's socket paths have a length limit
    run_dir = tmp_path / "run"
    cfg = {
        "kind": "pipeline",
        "name": "kill-test",
        "run_dir": str(run_dir),
        "model": tiny_llama,
        "stages": ["generate", "prune", "build_sft"],
        "ray": {"num_cpus": 4, "_temp_dir": ray_tmp},
        "generate": {
            "data": {"name": str(src), "kind": "gsm8k"},
            "max_new_tokens": 64,
            "batch_size": 4,
            "shard_rows": 4,
            "backend": "vllm_udf",
            "max_prompt_tokens": 512,
        },
        "prune": {"scorer": "self_info", "scorer_model": tiny_llama, "ratios": [0.9, 0.7, 0.5], "batch_size": 8},
        "cots": {"cot_source": "gold"},
        "build_sft": {
            "ratios": [1.0, 0.9, 0.7, 0.5],
            "ratio_sampling": "all",
            "val_fraction": 0.1,
        },
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "ray_jobs.build_dataset", "--config", str(path), "stages=[generate]"]
    gen = run_dir / "generate"

    # 1. Start, wait for the first committed part, kill the whole process group.
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not list((gen / "parts").glob("part-*.parquet")):
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"run ended before it could be killed:\n{(tmp_path / 'run1.log').read_text()[-3000:]}"
        )
        assert list((gen / "parts").glob("part-*.parquet")), "no part committed within 240 s"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        leftovers = _kill_leftovers(proc.pid, ray_tmp)
        log1.close()
    assert not _session_pids(proc.pid, ray_tmp), "processes of the killed run survived"
    assert not artifacts.is_complete(gen), "killed run must not look finished"
    from tokenskip.artifacts import PartWriter

    done_before = PartWriter(gen).done_ids()
    assert 0 < len(done_before) < N_QUESTIONS, f"kill came too late ({len(done_before)} rows done)"

    # 2. Re-run to completion (through the other backend, ray.data.llm): only the missing
    #    questions are generated. Its console, without a TTY, is checked too (issue 19).
    env2 = {k: v for k, v in env.items() if k != "TOKENSKIP_VERBOSE"}
    env2.update(PYTHONUNBUFFERED="1", TOKENSKIP_PROGRESS_EVERY="5")
    t0 = time.time()
    rerun = subprocess.run(
        cmd + ["generate.backend=ray_data_llm"], cwd=ROOT, env=env2, capture_output=True, text=True, timeout=300
    )
    took = time.time() - t0
    _kill_leftovers(-1, ray_tmp)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    _assert_console_is_short((rerun.stdout + rerun.stderr).splitlines(), run_dir / "logs" / "generate.log", took)
    manifest = artifacts.read_manifest(gen)
    part_rows = PartWriter(gen).read_parts()
    ids = [r["id"] for r in part_rows]
    assert len(ids) == len(set(ids)) == N_QUESTIONS, "duplicates or missing rows across committed parts"
    rows = artifacts.read_rows(gen)
    assert sorted(r["id"] for r in rows) == sorted(f"q-{i}" for i in range(N_QUESTIONS))
    assert manifest["counts"]["generated"] == N_QUESTIONS and manifest["counts"]["rejected"] == 2
    assert manifest["counts"]["total"] == N_QUESTIONS + 2 and manifest["backend"] == "ray_data_llm"
    assert manifest["last_run"]["rows"] == N_QUESTIONS + 1 - len(done_before)
    reasons = sorted(r["reason"].split(":")[0] for r in artifacts.read_rows(gen / "rejects.jsonl"))
    assert reasons == ["prompt too long", "unreadable row"]
    assert all(r["output_tokens"] <= 64 and r["cot_tokens"] is not None for r in rows)
    print(f"killed after {len(done_before)} rows; leftovers killed by pid: {len(leftovers)}")

    # 3. The rest of the data pipeline (in this process, on the session's Ray): generate is
    #    skipped (manifest present), then cots -> prune -> build_sft.
    if importlib.util.find_spec("pipelines.prune") is None:
        pytest.skip("pipelines/prune.py not available yet (issue 3); generate kill/resume verified")
    from ray_jobs.build_dataset import run

    pipe = load_config(PipelineConfig, path)
    results = run(pipe)
    assert results["generate"]["finished_at"] == manifest["finished_at"]
    assert results["cots"]["counts"]["kept"] == N_QUESTIONS
    train = artifacts.read_rows(run_dir / "build_sft" / "train.parquet")
    val = artifacts.read_rows(run_dir / "build_sft" / "validation.parquet")
    assert len(train) + len(val) == 4 * N_QUESTIONS
    assert len({(r["id"], r["ratio"]) for r in train + val}) == 4 * N_QUESTIONS
    assert set(results["build_sft"]["mean_actual_ratio"]) == {"1.0", "0.9", "0.7", "0.5"}
    for g, r in results["build_sft"]["mean_actual_ratio"].items():
        assert abs(r - float(g)) < 0.25, (g, r)
    # 4. The same run_dir with an output-deciding key changed is refused before any work
    #    (the backend above is operational and may change on resume); nothing is lost.
    pipe.generate.max_new_tokens = 32
    with pytest.raises(artifacts.ConfigChanged, match="max_new_tokens: 64 -> 32"):
        run(pipe)
    assert artifacts.read_manifest(gen)["finished_at"] == manifest["finished_at"]
