"""Ray Train LoRA SFT on 2 CPU workers (gloo) with the tiny Llama: plain DDP, ZeRO-2 and
ZeRO-3 on the same data and seed; the ZeRO-3 run has a worker SIGKILLed mid-run and
must resume from its last checkpoint (FailureConfig) and still agree with the others."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from tokenskip import artifacts, prompt

pytestmark = pytest.mark.integration

ROWS, WORKERS, GLOBAL_BATCH, EPOCHS = 16, 2, 4, 3
STEPS = (ROWS // WORKERS) // (GLOBAL_BATCH // WORKERS) * EPOCHS  # 12 optimizer steps
CKPT_EVERY, CRASH_AT = 4, 6


def make_sft_dir(path: Path, n: int = ROWS) -> Path:
    """A build_sft-shaped stage dir from GSM8K gold solutions (train.parquet + manifest)."""
    from tokenskip.data import load_questions

    ratios = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    rows = []
    for i, q in enumerate(load_questions("gsm8k", "train", limit=n).rows):
        r = ratios[i % len(ratios)]
        rows.append(
            {
                "id": q["id"],
                "question": q["question"],
                "gold": q["gold"],
                "ratio": r,
                "split": "train",
                "user": prompt.user_content(q["question"], r),
                "completion": prompt.build_target(q["solution"], q["gold"]),
            }
        )
    artifacts.write_rows(path / "train.parquet", rows)
    artifacts.write_manifest(path, "build_sft", counts={"train": len(rows)})
    return path


def _cfg(model: str, data: Path, out: Path, **kw):
    from tokenskip.config import TrainConfig, load_config

    base = dict(
        model=model,
        dataset=str(data),
        output_dir=str(out),
        learning_rate=1e-3,
        epochs=EPOCHS,
        warmup_ratio=0.1,
        global_batch_size=GLOBAL_BATCH,
        micro_batch_size=1,
        cutoff_len=192,
        overlong="truncate",
        checkpoint_every=CKPT_EVERY,
        seed=7,
        scaling={"num_workers": WORKERS, "use_gpu": False, "resources_per_worker": {"CPU": 1}},
    )
    base.update(kw)
    return load_config(TrainConfig, data=base)


@pytest.fixture(scope="module")
def runs(ray_local, tiny_llama, tmp_path_factory):
    from pipelines.train import run_train

    root = tmp_path_factory.mktemp("train")
    data = make_sft_dir(root / "sft")
    out = {}
    out["ddp"] = run_train(_cfg(tiny_llama, data, root / "ddp", strategy="ddp"))
    out["zero2"] = run_train(_cfg(tiny_llama, data, root / "zero2", strategy="deepspeed", zero_stage=2))
    marker = root / "crashed.txt"
    os.environ["TOKENSKIP_FAULT_KILL_AT_STEP"], os.environ["TOKENSKIP_FAULT_MARKER"] = str(CRASH_AT), str(marker)
    try:
        out["zero3"] = run_train(
            _cfg(tiny_llama, data, root / "zero3", strategy="deepspeed", zero_stage=3, max_failures=1)
        )
    finally:
        os.environ.pop("TOKENSKIP_FAULT_KILL_AT_STEP")
        os.environ.pop("TOKENSKIP_FAULT_MARKER")
    out["marker"] = marker
    return out


def _steps(manifest: dict) -> list[dict]:
    path = Path(manifest["config"]["output_dir"]) / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lora(adapter: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter) / "adapter_model.safetensors"))


def test_loss_goes_down_and_manifest(runs):
    for name in ("ddp", "zero2", "zero3"):
        m = runs[name]
        steps = [r for r in _steps(m)]
        last = {r["step"]: r for r in steps}  # after a resume, the re-run step wins
        assert sorted(last) == list(range(1, STEPS + 1)), name
        per_epoch = STEPS // EPOCHS
        first = sum(last[s]["loss"] for s in range(1, per_epoch + 1)) / per_epoch
        final = sum(last[s]["loss"] for s in range(STEPS - per_epoch + 1, STEPS + 1)) / per_epoch
        assert final < first - 0.05, (name, first, final)
        assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in steps)
        assert m["final_metrics"]["step"] == STEPS
        assert m["counts"]["rows"] == ROWS and m["counts"]["truncated"] > 0 and m["counts"]["dropped_overlong"] == 0
        assert m["ratios_trained"] == {"1.0": 3, "0.9": 3, "0.8": 3, "0.7": 3, "0.6": 2, "0.5": 2}
        # the adapter card, beside the copied adapter and in the final checkpoint's adapter (rank 0)
        from tokenskip import card

        c = card.read_card(m["adapter"])
        assert c.rows_per_ratio == m["ratios_trained"] and c.ratios == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
        assert c.base_model == m["base_model"] and c.evaluation is None and c.train["rows"] == ROWS
        assert c.train["data_sha256"] == card.file_sha256(m["inputs"]["train_file"])
        assert card.read_card(Path(m["checkpoint"]) / "adapter") == c
        assert m["inputs"]["data_manifest"]["stage"] == "build_sft" and m["base_model"]
        assert artifacts.is_complete(m["config"]["output_dir"])


def test_adapters_agree_across_ddp_zero2_zero3(runs):

    a, b, c = (_lora(runs[n]["adapter"]) for n in ("ddp", "zero2", "zero3"))
    assert a.keys() == b.keys() == c.keys() and len(a) == 28
    for k in a:
        assert a[k].numel() > 0 and c[k].numel() == a[k].numel(), k  # ZeRO-3 saved gathered, not empty shards
    b_norm = sum(float(t.norm()) for k, t in a.items() if "lora_B" in k)
    assert b_norm > 1e-3  # training moved the zero-initialised B matrices
    for other, name in ((b, "zero2"), (c, "zero3")):
        for k in a:
            diff = float((a[k] - other[k]).norm()) / max(float(a[k].norm()), 1e-8)
            assert diff < 2e-3, (name, k, diff)


def test_worker_killed_resumes_from_last_checkpoint(runs):
    assert runs["marker"].is_file(), "the fault hook never fired"
    steps = _steps(runs["zero3"])
    counts = Counter(r["step"] for r in steps)
    last_ckpt = (CRASH_AT // CKPT_EVERY) * CKPT_EVERY
    repeated = sorted(s for s, n in counts.items() if n > 1)
    assert repeated, "no step was re-run: the worker was not killed mid-run?"
    # only steps after the last checkpoint were repeated, and each at most once
    assert all(last_ckpt < s <= CRASH_AT + 1 and counts[s] == 2 for s in repeated), repeated
    assert all(counts[s] == 1 for s in range(1, last_ckpt + 1))
    assert len({r["pid"] for r in steps}) == 2  # a second rank-0 process took over
    assert runs["zero3"]["final_metrics"]["step"] == STEPS


def test_adapter_loads_with_peft(runs, tiny_llama):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = runs["zero3"]["adapter"]
    conf = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 16 and not conf.get("modules_to_save")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        ref = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)
        got = tuned(ids).logits
    assert not torch.allclose(ref, got, atol=1e-6)  # the adapter is non-empty and changes outputs


def test_adapter_loads_in_vllm(runs, tiny_llama):
    """...in an engine that runs in this process (a small model on CPU: tokenskip.engine.runs_in_process),
    which closing unfreezes so that it can be freed."""
    import gc
    import os

    from tokenskip import engine

    llm = engine.build_llm(tiny_llama, enable_lora=True, max_lora_rank=8)
    try:
        params = engine.sampling_params(8)
        out = engine.generate(llm, ["Hello"], params, lora=engine.lora_request(runs["zero3"]["adapter"]))
        assert out[0].output_tokens > 0
        assert type(llm.llm_engine.engine_core).__name__ == "InprocClient"  # no EngineCore / Worker process
        assert engine.MP_ENV not in os.environ  # set only while the engine was built
        assert gc.get_freeze_count() > 0  # the in-process engine core froze the heap...
    finally:
        engine.close_llm(llm)
        del llm
        gc.collect()
    assert gc.get_freeze_count() == 0  # ...and closing it unfroze it: the engine and its KV cache are freed


def test_restart_resumes_from_latest_checkpoint(ray_local, tiny_llama, tmp_path):
    """A run that dies for good (no retries left) and is started again with the same
    storage_path + run_name continues from its latest checkpoint."""
    from pipelines.train import run_train

    data = make_sft_dir(tmp_path / "sft")
    cfg = _cfg(tiny_llama, data, tmp_path / "run", strategy="deepspeed", zero_stage=2, max_failures=0)
    os.environ["TOKENSKIP_FAULT_KILL_AT_STEP"], os.environ["TOKENSKIP_FAULT_MARKER"] = (
        str(CRASH_AT),
        str(tmp_path / "m"),
    )
    try:
        with pytest.raises(Exception):
            run_train(cfg)
    finally:
        os.environ.pop("TOKENSKIP_FAULT_KILL_AT_STEP")
        os.environ.pop("TOKENSKIP_FAULT_MARKER")
    assert not artifacts.is_complete(tmp_path / "run")
    manifest = run_train(cfg)  # the restart
    counts = Counter(r["step"] for r in _steps(manifest))
    assert sorted(counts) == list(range(1, STEPS + 1))
    assert all(counts[s] == 1 for s in range(1, CKPT_EVERY + 1))
    assert manifest["final_metrics"]["step"] == STEPS
