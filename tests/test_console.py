"""Console output (issue 19): stage lines and progress on the console, everything else in
``<run_dir>/logs/<stage>.log``; errors one line plus the log's path."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipelines import progress
from ray_jobs.console import Console, capture

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TOKENSKIP_VERBOSE")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_non_tty_progress_is_a_line_every_interval():
    err = io.StringIO()
    c = Console(io.StringIO(), err, tty=False, every_s=0.3)
    c.begin("[1/2] generate", "generating", "/x/logs/generate.log")
    for i in range(1, 9):
        c.update({"done": i, "total": 8, "unit": "rows"})
        time.sleep(0.1)
    c.end("done in 0.8 s: generated 8")
    c.close()
    lines = err.getvalue().splitlines()
    assert lines[0] == "[1/2] generate: generating (log: /x/logs/generate.log)"
    assert lines[-1] == "[1/2] generate done in 0.8 s: generated 8"
    ticks = lines[1:-1]
    assert 1 <= len(ticks) <= 4, lines  # ~0.8 s at one line per 0.3 s, not one per update
    assert all("/8 rows" in t and "elapsed" in t for t in ticks), ticks
    assert "\r" not in err.getvalue() and "\x1b" not in err.getvalue()


def test_tty_bar_is_redrawn_in_place_and_cleared():
    err = io.StringIO()
    c = Console(io.StringIO(), err, tty=True)
    c.begin("train", "LoRA SFT", None)
    c.update({"done": 1, "total": 4, "unit": "steps", "loss": 2.5, "tokens_per_s": 120.0})
    time.sleep(0.05)
    c.update({"done": 3, "total": 4, "unit": "steps", "loss": 1.25, "tokens_per_s": 130.0})
    c.end("done in 1.0 s")
    c.close()
    text = err.getvalue()
    assert "\r\x1b[2K" in text and "3/4 steps" in text and "loss 1.2500" in text and "130 tok/s" in text
    assert "ETA" in text
    assert text.rstrip("\n").split("\n")[-1].endswith("train done in 1.0 s")


def test_progress_reaches_the_sink_and_worker_lines_parse():
    got = []
    progress.set_sink(got.append)
    try:
        progress.report(2, 5, "rows", loss=0.5, note=None)
    finally:
        progress.set_sink(None)
    assert got == [{"done": 2, "total": 5, "unit": "rows", "loss": 0.5}]
    progress.report(3, 5)  # no sink, not in a worker: nothing, no error
    assert progress.parse("(pid=1) " + progress.MARK + '{"done": 1, "total": 2, "unit": "steps"}')["done"] == 1
    assert progress.parse(progress.MARK + "{not json") is None


def test_capture_sends_fds_and_child_processes_to_the_log(tmp_path):
    log = tmp_path / "logs" / "x.log"
    c = Console(tty=False)  # under pytest's capture sys.stdout is not fd 1: console writes to it
    with capture(log):
        print("python print", file=sys.__stdout__, flush=True)  # the real fd-1 stream (pytest swaps sys.stdout)
        os.write(2, b"raw fd 2\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
    c.close()
    text = log.read_text()
    assert "python print" in text and "raw fd 2" in text and "child out" in text and "child err" in text


def test_failing_stage_prints_one_line_and_its_log(tmp_path):
    """A data pipeline whose CoT selection has no generations to read: exit 2, the error in
    one line, the stage's log named, and the traceback in that log, not on the console."""
    run_dir = tmp_path / "run"
    cfg = {
        "kind": "pipeline",
        "name": "t",
        "run_dir": str(run_dir),
        "stages": ["build_sft"],
        "cots": {"cot_source": "generated"},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "ray_jobs.build_dataset", "--config", str(path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    log = run_dir / "logs" / "cots.log"
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("[1/2] cots: selecting CoTs") and str(log) in lines[0]
    assert lines[-2].startswith("tokenskip build-sft: ") and "generate" in lines[-2]
    assert lines[-1] == f"  log: {log}"
    assert len(lines) <= 4 and "Traceback" not in r.stderr and r.stdout == ""
    assert "Traceback" in log.read_text()


def test_unexpected_error_exits_1_with_the_log(tmp_path, monkeypatch):
    from pipelines import stages

    def boom(cfg, force=False):
        os.write(1, b"engine says hello\n")
        raise RuntimeError("the engine fell over\nsecond line")

    monkeypatch.setattr(stages.Stage, "function", lambda self: boom)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"kind": "pipeline", "run_dir": str(tmp_path / "run"), "stages": ["build_sft"]}))
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    from ray_jobs.pipeline import main

    assert main(["--config", str(cfg)]) == 1
    lines = err.getvalue().strip().splitlines()
    log = tmp_path / "run" / "logs" / "cots.log"
    assert lines[-2] == "tokenskip pipeline: stage cots failed: RuntimeError: the engine fell over second line"
    assert lines[-1] == f"  log: {log}"
    assert "engine says hello" in log.read_text() and "engine says hello" not in err.getvalue()


# The generate stage's console without a TTY (a vLLM engine in a Ray Data actor, in a subprocess) is
# checked on the resume run of tests/test_build_dataset.py::test_kill_mid_generation_then_resume,
# which starts that engine anyway (one engine start fewer in the suite).


def test_verbose_keeps_logs_on_the_console(tmp_path):
    """``TOKENSKIP_VERBOSE=1`` (as for ``ray job submit``; ``-v`` on the command line): no log
    files, the library's own log lines and the traceback on the console."""
    run_dir = tmp_path / "run"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"kind": "pipeline", "run_dir": str(run_dir), "stages": ["build_sft"]}))
    r = subprocess.run(
        [sys.executable, "-m", "ray_jobs.build_dataset", "--config", str(path)],
        cwd=ROOT,
        env=dict(_env(), TOKENSKIP_VERBOSE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "ERROR tokenskip.runner: stage cots" in r.stderr and "Traceback" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("tokenskip build-sft: ")
    assert not (run_dir / "logs").exists()
