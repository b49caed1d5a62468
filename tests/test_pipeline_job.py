"""End to end: a real `ray start --head` on 127.0.0.1 with its own temp dir and ports,
`ray job submit --working-dir . -- python -m ray_jobs.pipeline --config <tiny>` (the session's
``tiny_pipeline`` fixture, whose run tests/test_tracking.py and tests/test_budget_routing_e2e.py
read too), the artifacts checked, a re-run resumed from manifests, and the cluster stopped
through its own head process (never `ray stop`, which would hit every Ray on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration

# ray job submit's own lines (~35 with its packaging notes), six stages with a start, a done
# and a progress line or two each, and the final summary with the evaluation table (~25).
CONSOLE_LINE_BUDGET = 100


def test_ray_job_submit_runs_pipeline(tiny_pipeline):
    run_dir, cfg_path, env, out = tiny_pipeline.run_dir, tiny_pipeline.config, tiny_pipeline.env, tiny_pipeline.output
    took = tiny_pipeline.seconds
    assert tiny_pipeline.returncode == 0 and "succeeded" in out, out[-6000:]
    print(f"ray job submit took {took:.1f} s")
    summary = json.loads((run_dir / "summary.json").read_text())
    for stage in ("generate", "cots", "prune", "build_sft", "train", "evaluate"):
        assert (run_dir / stage / "manifest.json").is_file(), stage
    assert (run_dir / "train" / "adapter" / "adapter_config.json").is_file()
    assert Path(summary["evaluation"]["table"]).is_file() and summary["evaluation"]["plots"]
    assert "serve" in summary["serve_command"] and summary["adapter"].endswith("adapter")
    assert "| Method" in out or "Method" in out  # the table is printed at the end of the job log

    # Issue 19: the job log (a non-TTY console) tells the story in a few lines; vLLM, Ray
    # Data and Ray Train output is in <run_dir>/logs/<stage>.log, each named on the console.
    lines = out.splitlines()
    print(f"console lines: {len(lines)}")
    assert len(lines) <= CONSOLE_LINE_BUDGET, out
    logs = run_dir / "logs"
    for i, stage in enumerate(("generate", "cots", "prune", "build_sft", "train", "evaluate"), 1):
        assert any(ln.startswith(f"[{i}/6] {stage}: ") and str(logs / f"{stage}.log") in ln for ln in lines), stage
        assert any(ln.startswith(f"[{i}/6] {stage} done in ") for ln in lines), stage
    assert "vllm" in (logs / "generate.log").read_text().lower()
    assert "Started a local Ray" not in out and "logging_progress" not in out and "Queued blocks" not in out
    assert not [ln for ln in lines if "vllm" in ln.lower() and ("INFO" in ln or "WARNING" in ln)], out
    train_log = (logs / "train.log").read_text()
    assert "RayTrainWorker" in train_log or "TorchTrainer" in train_log or "tokenskip.train" in train_log

    # A re-run (a local driver, same run_dir) finds every manifest and recomputes nothing.
    before = {s: (run_dir / s / "manifest.json").stat().st_mtime for s in ("generate", "prune", "train", "evaluate")}
    r2 = subprocess.run(
        [str(BIN / "python"), "-m", "ray_jobs.pipeline", "--config", str(cfg_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-4000:]
    after = {s: (run_dir / s / "manifest.json").stat().st_mtime for s in before}
    assert before == after
