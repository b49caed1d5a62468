"""The GPU paths: vLLM on CUDA (base + LoRA), LoRA SFT with DeepSpeed over NCCL in bf16,
and DDP bf16 training. Marked ``gpu`` (deselected by default; ``pytest -m gpu`` runs them)
and skipped cleanly where no CUDA device is visible, e.g. on the CPU test machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")]


def test_vllm_generates_on_cuda_with_and_without_lora(tiny_llama, tiny_adapters):
    from tokenskip import engine

    llm = engine.build_llm(tiny_llama, {"dtype": "bfloat16", "gpu_memory_utilization": 0.2, "max_model_len": 512,
                                        "enforce_eager": True}, enable_lora=True, max_lora_rank=8)
    assert "cuda" in str(llm.llm_engine.vllm_config.device_config.device).lower()
    params = engine.sampling_params(8)
    base = engine.generate(llm, ["Hello", "What is 2+2?"], params)
    tuned = engine.generate(llm, ["Hello", "What is 2+2?"], params, lora=engine.lora_request(tiny_adapters[0]))
    assert all(c.output_tokens > 0 for c in base + tuned)
    assert [c.text for c in base] != [c.text for c in tuned]  # the adapter was applied on the GPU


def _train(tmp_path: Path, tiny_llama: str, **kw):
    from test_train_ray import _cfg, make_sft_dir

    from pipelines.train import run_train

    data = make_sft_dir(tmp_path / "sft", n=8)
    cfg = _cfg(tiny_llama, data, tmp_path / "run", epochs=1, checkpoint_every=2,
               scaling={"num_workers": 1, "use_gpu": True, "resources_per_worker": {"GPU": 1, "CPU": 1}},
               global_batch_size=2, **kw)
    return run_train(cfg)


def _steps(manifest: dict) -> list[dict]:
    path = Path(manifest["config"]["output_dir"]) / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deepspeed_zero2_nccl_bf16(ray_local, tiny_llama, tmp_path):
    """DeepSpeed ZeRO-2 on a GPU worker: Ray Train's process group is NCCL with use_gpu."""
    m = _train(tmp_path, tiny_llama, strategy="deepspeed", zero_stage=2, precision="bf16")
    steps = _steps(m)
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    assert m["final_metrics"]["step"] == len({r["step"] for r in steps})
    assert (Path(m["adapter"]) / "adapter_model.safetensors").is_file()


def test_ddp_bf16_training_on_gpu(ray_local, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    m = _train(tmp_path, tiny_llama, strategy="ddp", precision="bf16")
    steps = _steps(m)
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    weights = load_file(str(Path(m["adapter"]) / "adapter_model.safetensors"))
    assert weights and all(t.numel() > 0 for t in weights.values())
