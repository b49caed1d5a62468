"""Measured per-GPU peak memory of one LoRA SFT step on 7B/14B/32B-shaped models.

Ground truth for `tokenskip plan-memory` (single GPU, no ZeRO): builds a randomly
initialised model with the real architecture numbers (the Hub is unreachable, weights
don't matter for memory), wraps it in PEFT LoRA (r 8, all linear layers), and runs
forward + backward + AdamW step at cutoff 2048 with bf16, printing the peak allocated
memory next to the planner's estimate. Needs a CUDA GPU (run on the lent device):

    python benchmarks/gpu_lora_memory.py --models qwen2.5-7b qwen2.5-14b qwen2.5-32b
"""

from __future__ import annotations

import argparse
import gc
import json
import time

ARCH = {  # public config.json numbers
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "qwen2.5-32b": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


def measure(name: str, seq: int, micro: int, ckpt: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, **ARCH[name])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly (an fp32 build would dominate the peak)
    try:
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=5e-5)
    ids = torch.randint(0, cfg.vocab_size, (micro, seq), device="cuda")
    t0 = time.time()
    for i in range(3):
        if i == 1:  # the first step is warm-up
            torch.cuda.synchronize()
            t0 = time.time()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    step_s = (time.time() - t0) / 2
    peak = torch.cuda.max_memory_allocated()
    del model, opt, out, params
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "model": name,
        "seq": seq,
        "micro_batch": micro,
        "grad_ckpt": ckpt,
        "lora_params": n_lora,
        "weights_gib": round(weights / 2**30, 2),
        "peak_gib": round(peak / 2**30, 2),
        "step_s": round(step_s, 3),
        "tokens_per_s": round(micro * seq / step_s),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=list(ARCH))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    for m in args.models:
        for micro, ckpt in ((1, True), (4, True), (1, False)):
            try:
                rows.append(measure(m, args.seq, micro, ckpt))
            except Exception as e:  # OOM is a result too
                import torch

                rows.append(
                    {
                        "model": m,
                        "micro_batch": micro,
                        "grad_ckpt": ckpt,
                        "error": f"{type(e).__name__}: {str(e)[:120]}",
                    }
                )
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
