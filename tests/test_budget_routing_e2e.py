"""End to end, the way a user meets it: the tiny pipeline (the session's ``tiny_pipeline``
fixture, one `ray job submit` run shared with tests/test_pipeline_job.py) trains and evaluates an adapter,
its card records the γ trained and the CoT lengths measured, the adapter is served with the
exact command the pipeline prints, and a ``max_cot_tokens`` request is routed to the largest
γ whose expected CoT tokens fit the budget.

(Before the adapter card, the printed command's ``eval_results:`` gave budget routing an
empty table and every budget was answered 400.)

    flock /tmp/coord/heavy.lock .venv/bin/python -m pytest -q tests/test_budget_routing_e2e.py -s
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenskip import card, gamma
from tokenskip.testing import free_ports, lists_models, wait_http

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EVAL_RATIOS = [1.0, 0.7, 0.5]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def _expected(table: dict[float, float], valid: list[float], budget: float) -> tuple[float, bool]:
    """The documented rule, written out: a γ's expected CoT tokens are its measured mean, else
    γ × the γ = 1 mean; the largest γ that fits wins; if none fits, the smallest γ."""
    est = {g: table[g] if g in table else g * table[1.0] for g in valid}
    fits = [g for g in valid if est[g] <= budget]
    return (max(fits), True) if fits else (min(valid), False)


def test_pipeline_adapter_served_with_printed_command_routes_budgets(tiny_pipeline, tiny_llama, tmp_path):
    # The session's tiny pipeline (tests/conftest.py: run once through `ray job submit`).
    assert tiny_pipeline.returncode == 0, tiny_pipeline.output[-6000:]
    run_dir = tiny_pipeline.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())

    # The card: written by train, completed by evaluate, beside the adapter weights.
    adapter = Path(summary["adapter"])
    c = card.read_card(adapter)
    train_manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert c.base_model == tiny_llama and c.rows_per_ratio == train_manifest["ratios_trained"]
    assert sum(c.rows_per_ratio.values()) == train_manifest["counts"]["rows"]
    assert all("." in k for k in c.rows_per_ratio)  # "1.0", never "1"
    # rank 0 wrote the same card into the final checkpoint's adapter (before evaluate added to the copy)
    in_ckpt = card.read_card(Path(train_manifest["checkpoint"]) / "adapter")
    assert in_ckpt.evaluation is None and in_ckpt.rows_per_ratio == c.rows_per_ratio and in_ckpt.train == c.train
    assert set(c.ratios) <= set(gamma.DEFAULT_RATIOS) and 1.0 in c.ratios
    results_path = Path(summary["evaluation"]["results"])
    results = json.loads(results_path.read_text())
    assert c.evaluation is not None and list(c.evaluation) == ["gsm8k"]
    ev = c.evaluation["gsm8k"]
    assert ev.results == str(results_path.resolve()) and ev.max_new_tokens == 16
    assert set(ev.ratios) == {gamma.key(g) for g in EVAL_RATIOS}
    # ... and the results.json this code wrote is read by serving's eval_results path too
    from serving.routing import table_from_eval_results

    table = table_from_eval_results(results)
    assert table == c.expected_cot_tokens() and set(table) == set(EVAL_RATIOS)
    assert all(0 < t <= 16 for t in table.values())

    # Serve it with the command the pipeline printed (plus a free port and this machine's CPUs).
    cmd = shlex.split(summary["serve_command"])
    assert cmd[:2] == ["tokenskip", "serve"] and any(a.startswith("adapters=") and "eval_results" in a for a in cmd)
    port = free_ports(1)[0]
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(BIN / "tokenskip"), *cmd[1:], "--port", str(port), "--num-cpus", "4"],
            cwd=ROOT,
            env=_env(),
            start_new_session=True,
            stdout=fh,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        t1 = time.time()
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 420, lists_models, log.read_text, interval=2)
        print(f"[e2e] tokenskip serve ready in {time.time() - t1:.0f} s")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=300)
        model = summary["serve_model"]
        assert model in [m.id for m in client.models.list().data]
        est = sorted({g: table[g] if g in table else g * table[1.0] for g in c.ratios}.items())
        budgets = {
            min(t for _, t in est) / 2,  # nothing fits: the smallest γ, flagged
            max(t for _, t in est) + 1,
        }  # everything fits: γ = 1
        budgets |= {t for _, t in est}  # exactly each γ's expected length
        checked = set()
        for budget in sorted(budgets):
            want, fits = _expected(table, c.ratios, budget)
            resp = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "What is 2 + 3?"}],
                max_tokens=4,
                extra_body={"max_cot_tokens": budget},
            )
            extra = resp.model_extra or {}
            assert extra["compression_ratio"] == want, (budget, extra, est)
            assert extra["tokenskip"]["source"] == "budget" and extra["tokenskip"]["budget_fits"] is fits, extra
            assert extra["tokenskip"]["expected_cot_tokens"] == pytest.approx(dict(est)[want])
            checked.add(want)
        assert len(checked) >= 2, (checked, est)  # the budgets really steer γ
        print(f"[e2e] budgets {sorted(budgets)} -> γ {sorted(checked)} (expected CoT tokens {est})")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
