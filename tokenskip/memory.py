"""Per-GPU memory plan for LoRA SFT: frozen weights, ZeRO-3 gather buffer, LoRA model
states (DeepSpeed's own estimators), activations, logits.

``tokenskip plan-memory`` prints it for a model / ZeRO stage / GPU count, or for a train
YAML (``--config``), and says whether it fits. Model sizes come from a built-in table of
architecture numbers (the Hub is not needed) or from a local ``config.json``.

Model states follow DeepSpeed (``estimate_zero2_model_states_mem_needs`` /
``estimate_zero3_model_states_mem_needs``), applied to the *trainable* LoRA parameters
(18 bytes each: 16-bit grads, fp32 master, Adam m and v) because the frozen base has no
grads or optimizer state; the frozen base costs 2 bytes/param (bf16), divided by the GPU
count under ZeRO-3 only.

>>> a = ARCHS["qwen2.5-7b-instruct"]
>>> round(count_params(a) / 1e9, 2), round(lora_params(a, 8) / 1e6, 1)
(7.62, 20.2)
>>> p = plan(a, zero_stage=3, num_gpus=8, micro_batch=1, seq_len=2048, gradient_checkpointing=True)
>>> p["fits"], p["total_gib"] < 20
(True, True)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

GIB = 1024**3

# Architecture numbers from each model's config.json (hidden, intermediate, layers,
# attention heads, KV heads, head dim, vocab, tied embeddings, q/k/v bias).
ARCHS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": dict(
        hidden=576,
        intermediate=1536,
        layers=30,
        heads=9,
        kv_heads=3,
        head_dim=64,
        vocab=49152,
        tied=True,
        qkv_bias=False,
    ),
    "qwen2.5-7b-instruct": dict(
        hidden=3584,
        intermediate=18944,
        layers=28,
        heads=28,
        kv_heads=4,
        head_dim=128,
        vocab=152064,
        tied=False,
        qkv_bias=True,
    ),
    "qwen2.5-14b-instruct": dict(
        hidden=5120,
        intermediate=13824,
        layers=48,
        heads=40,
        kv_heads=8,
        head_dim=128,
        vocab=152064,
        tied=False,
        qkv_bias=True,
    ),
    "qwen2.5-32b-instruct": dict(
        hidden=5120,
        intermediate=27648,
        layers=64,
        heads=40,
        kv_heads=8,
        head_dim=128,
        vocab=152064,
        tied=False,
        qkv_bias=True,
    ),
    "llama-3.1-8b-instruct": dict(
        hidden=4096,
        intermediate=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=128256,
        tied=False,
        qkv_bias=False,
    ),
}


class UnknownModel(ValueError):
    """A model whose architecture numbers cannot be found (named in the message with what was tried)."""


def arch_for(model: str, local_only: bool = False) -> dict[str, Any]:
    """Architecture numbers for a model name (hub id or table key) or a local dir / config.json.
    A hub id not in the table is read from its ``config.json`` on the Hub (or the local Hub
    cache when offline, or with ``local_only``); what cannot be found raises :class:`UnknownModel`.

    >>> arch_for("Qwen/Qwen2.5-32B-Instruct")["layers"]
    64
    >>> arch_for("meta-llama/Llama-3.1-8B-Instruct")["vocab"]
    128256
    """
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UnknownModel(f"{model}: a directory without config.json (give a model directory or its config.json)")
        return _arch_from_file(p / "config.json")
    if p.is_file():
        return _arch_from_file(p)
    key = model.rstrip("/").split("/")[-1].lower().replace("meta-llama-", "llama-")
    if key in ARCHS:
        return dict(ARCHS[key])
    from tokenskip import assets

    if model == assets.SMOLLM2:
        return dict(ARCHS[model])
    known = ", ".join(ARCHS)
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise UnknownModel(f"unknown model {model!r}: not a file or directory; give a hub id, a model directory, "
                           f"its config.json, or one of {known}")
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, "config.json", local_files_only=local_only)  # HF_HUB_OFFLINE: cache only
    except Exception as e:  # offline without a cached copy, no such repo, a gated repo without a token
        raise UnknownModel(
            f"unknown model {model!r}: its config.json could not be read from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); give a model directory, "
            f"its config.json, or one of {known}"
        ) from None
    return _arch_from_file(Path(path))


def _arch_from_file(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnknownModel(f"{path}: not a readable JSON model config ({e})") from None
    if not isinstance(cfg, dict):
        raise UnknownModel(f"{path}: not a model config (a JSON object with the decoder's sizes)")
    try:
        return arch_from_config(cfg.get("text_config") or cfg)  # a multimodal config keeps its decoder here
    except KeyError as e:
        raise UnknownModel(f"{path}: the model config has no {e.args[0]!r} (not a decoder LM config?)") from None


def arch_from_config(c: dict) -> dict[str, Any]:
    heads = c["num_attention_heads"]
    hidden = c["hidden_size"]
    return dict(
        hidden=hidden,
        intermediate=c["intermediate_size"],
        layers=c["num_hidden_layers"],
        heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or hidden // heads,
        vocab=c["vocab_size"],
        tied=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bool(c.get("attention_bias", False)) or c.get("model_type") == "qwen2",
    )


def _linears(a: dict) -> list[tuple[int, int]]:
    """(in, out) of each linear projection in one decoder layer."""
    h, q, kv, i = a["hidden"], a["heads"] * a["head_dim"], a["kv_heads"] * a["head_dim"], a["intermediate"]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_mismatch(adapter_dir: str | os.PathLike, model: str) -> str | None:
    """Why a LoRA adapter cannot apply to ``model`` (a LoRA matrix whose shape or layer the model does
    not have: it was trained on another base), or None when it fits or the model's sizes are not at
    hand (a hub id in neither the built-in table nor the local Hub cache). Reads only the adapter's
    safetensors header and the model's config, so it runs before any engine does.

    >>> import tempfile, numpy as np
    >>> from safetensors.numpy import save_file
    >>> d = Path(tempfile.mkdtemp())
    >>> key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    >>> save_file({key: np.zeros((8, 128), np.float32)}, str(d / "adapter_model.safetensors"))
    >>> msg = adapter_mismatch(d, "Qwen/Qwen2.5-7B-Instruct")
    >>> msg[msg.index("has shape") : msg.index(" (hidden")]
    'has shape [8, 128]; Qwen/Qwen2.5-7B-Instruct needs input size 3584'
    """
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    try:
        a = arch_for(model, local_only=True)  # no network call: a check before the engine, not a download
    except UnknownModel:
        return None
    from safetensors import SafetensorError, safe_open

    sizes = dict(zip(_PROJ, _linears(a)))
    try:
        with safe_open(str(weights), "numpy") as fh:  # the header only: no tensor is read
            shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    except (OSError, SafetensorError) as e:
        return f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})"
    for key, shape in shapes.items():
        m = re.search(r"layers\.(\d+)\..*?(\w+_proj)\.lora_([AB])\b", key)
        if not m or m.group(2) not in sizes or len(shape) != 2:
            continue
        layer, (fan_in, fan_out) = int(m.group(1)), sizes[m.group(2)]
        if m.group(3) == "A":
            bad = f"input size {fan_in}" if shape[1] != fan_in else None
        else:
            bad = f"output size {fan_out}" if shape[0] != fan_out else None
        if layer >= a["layers"]:
            bad = f"at most {a['layers']} layers"
        if bad:
            return (
                f"{adapter_dir}: was trained on another base model: {key} has shape {list(shape)}; {model} needs "
                f"{bad} (hidden {a['hidden']}, {a['layers']} layers). Use it with the model it was trained on "
                "(its adapter_config.json's base_model_name_or_path)"
            )
    return None


def count_params(a: dict) -> int:
    per_layer = sum(i * o for i, o in _linears(a)) + 2 * a["hidden"]
    if a.get("qkv_bias"):
        per_layer += (a["heads"] + 2 * a["kv_heads"]) * a["head_dim"]
    emb = a["vocab"] * a["hidden"]
    return a["layers"] * per_layer + emb * (1 if a["tied"] else 2) + a["hidden"]


def lora_params(a: dict, r: int = 8) -> int:
    """Trainable LoRA parameters on every linear projection (not lm_head)."""
    return a["layers"] * sum(r * (i + o) for i, o in _linears(a))


def largest_layer_params(a: dict) -> int:
    """The largest single module ZeRO-3 gathers at once (embedding / lm_head, or an MLP matrix)."""
    return max(a["vocab"] * a["hidden"], a["hidden"] * a["intermediate"])


def _deepspeed_attr(module: str, name: str):
    """``module.name`` from DeepSpeed. Its first import builds DeepSpeed's logger with a handler
    on whatever ``sys.stdout`` is at that moment and logs "Setting accelerator to CPU" there; a
    caller that swapped ``sys.stdout`` (doctest, a capture) would get that line in its output and
    keep receiving DeepSpeed's later logs. Imported with the process's own stdout in place."""
    import contextlib
    import importlib
    import sys

    with contextlib.redirect_stdout(sys.__stdout__ or sys.stdout):
        return getattr(importlib.import_module(module), name)


def _ds_states(
    trainable: int, largest_trainable: int, stage: int, gpus: int, offload_opt: bool, offload_params: bool
) -> tuple[int, str]:
    """GPU bytes for the trainable params' model states, from DeepSpeed's estimators."""
    try:
        if stage == 3:
            estimate_zero3_model_states_mem_needs = _deepspeed_attr(
                "deepspeed.runtime.zero.stage3", "estimate_zero3_model_states_mem_needs"
            )
            _cpu, gpu, _largest = estimate_zero3_model_states_mem_needs(
                trainable,
                largest_trainable,
                gpus,
                1,
                cpu_offload=offload_opt,
                cpu_offload_params=offload_params,
                additional_buffer_factor=1.0,
            )
            return gpu, "deepspeed.estimate_zero3_model_states_mem_needs"
        if stage in (1, 2):
            estimate_zero2_model_states_mem_needs = _deepspeed_attr(
                "deepspeed.runtime.zero.stage_1_and_2", "estimate_zero2_model_states_mem_needs"
            )
            _cpu, gpu = estimate_zero2_model_states_mem_needs(
                trainable, gpus, 1, cpu_offload=offload_opt, additional_buffer_factor=1.0
            )
            return gpu, "deepspeed.estimate_zero2_model_states_mem_needs"
    except ImportError:  # same formulas without DeepSpeed installed
        pass
    if stage == 3:
        return (
            4 * largest_trainable + (2 * trainable // gpus if offload_opt else 18 * trainable // gpus)
            if not offload_params
            else 4 * largest_trainable
        ), "formula (ZeRO-3)"
    if stage in (1, 2):
        return 2 * trainable + (0 if offload_opt else 18 * trainable // gpus), "formula (ZeRO-1/2)"
    return 20 * trainable, "formula (DDP: 16-bit weights + grads, fp32 master + Adam)"


def plan(
    a: dict,
    zero_stage: int = 3,
    num_gpus: int = 8,
    micro_batch: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    lora_r: int = 8,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    gpu_gib: float = 80.0,
    weight_bytes: int = 2,
    overhead_gib: float = 2.0,
) -> dict[str, Any]:
    """Per-GPU memory estimate (GiB) for LoRA SFT; ``fits`` compares with 95% of ``gpu_gib``."""
    P, L = count_params(a), lora_params(a, lora_r)
    h, i, kv = a["hidden"], a["intermediate"], a["kv_heads"] * a["head_dim"]
    tokens = micro_batch * seq_len
    if zero_stage == 3:
        weights = 0 if offload_params else weight_bytes * P / num_gpus
        gather = 2 * weight_bytes * largest_layer_params(a)  # current + prefetched module
    else:
        weights, gather = weight_bytes * P, 0
    largest_lora = max(lora_r * (x + y) for x, y in _linears(a))
    states, states_src = _ds_states(L, largest_lora, zero_stage, num_gpus, offload_optimizer, offload_params)
    # Bytes saved per token by one decoder layer (16-bit, Llama/Qwen layout): two RMSNorms
    # with their fp32 upcasts (12h each), q/k/v and their RoPE copies, attention and o_proj
    # inputs, the residual, and gate/up/act/product of the MLP; SDPA keeps O(S), not O(S^2).
    # Calibrated on measured H100 peaks (benchmarks/results/gpu_lora_memory_h100.json).
    layer_act = tokens * (38 * h + 10 * kv + 8 * i)
    if gradient_checkpointing:
        acts = a["layers"] * tokens * h * 2 + layer_act  # layer inputs + one layer recomputed
    else:
        acts = a["layers"] * layer_act
    logits = tokens * a["vocab"] * 10  # 16-bit logits, their fp32 upcast and its gradient in the loss
    total = weights + gather + states + acts + logits
    total_gib = total / GIB + overhead_gib
    return {
        "params_b": round(P / 1e9, 3),
        "lora_params_m": round(L / 1e6, 2),
        "zero_stage": zero_stage,
        "num_gpus": num_gpus,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "gradient_checkpointing": gradient_checkpointing,
        "offload_optimizer": offload_optimizer,
        "offload_params": offload_params,
        "weights_gib": round(weights / GIB, 2),
        "zero3_gather_gib": round(gather / GIB, 2),
        "lora_states_gib": round(states / GIB, 3),
        "lora_states_source": states_src,
        "activations_gib": round(acts / GIB, 2),
        "logits_gib": round(logits / GIB, 2),
        "overhead_gib": overhead_gib,
        "total_gib": round(total_gib, 2),
        "gpu_gib": gpu_gib,
        "fits": total_gib <= 0.95 * gpu_gib,
    }


def plan_for_config(cfg: Any, gpu_gib: float = 80.0) -> dict[str, Any]:
    """Plan for a TrainConfig (its model, ZeRO stage, workers, micro-batch, cutoff, offload)."""
    stage = cfg.zero_stage if cfg.strategy == "deepspeed" else 0
    p = plan(
        arch_for(cfg.model),
        stage,
        int(cfg.scaling.get("num_workers", 1)),
        cfg.micro_batch_size,
        cfg.cutoff_len,
        cfg.gradient_checkpointing,
        cfg.lora.r,
        cfg.offload_optimizer,
        cfg.offload_params,
        gpu_gib,
        weight_bytes=4 if cfg.precision == "fp32" else 2,
    )
    return {"model": cfg.model, **p}


def format_plan(name: str, p: dict) -> str:
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    return (
        f"{name}: {p['params_b']}B params, LoRA {p['lora_params_m']}M | ZeRO-{p['zero_stage']} x {p['num_gpus']} GPUs, "
        f"micro-batch {p['micro_batch']} x {p['seq_len']} tokens, grad-ckpt {p['gradient_checkpointing']}\n"
        f"  weights {p['weights_gib']} + ZeRO-3 gather {p['zero3_gather_gib']} + LoRA states {p['lora_states_gib']} "
        f"({p['lora_states_source']}) + activations {p['activations_gib']} + logits {p['logits_gib']} "
        f"+ overhead {p['overhead_gib']}"
        f" = {p['total_gib']} GiB per GPU -> {verdict} on {p['gpu_gib']:g} GiB"
    )


DEFAULT_CONFIGS = (
    "qwen2.5-7b-zero2.yaml",
    "llama3.1-8b-zero2.yaml",
    "qwen2.5-14b-zero3.yaml",
    "qwen2.5-32b-zero3.yaml",
)


def _positive(kind: type):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def main(argv: list[str] | None = None) -> int:
    """``tokenskip plan-memory``: a bad argument, config or model name is a one-line error (exit 2)."""
    from tokenskip.config import ConfigError

    ap = argparse.ArgumentParser(prog="tokenskip plan-memory", description="Per-GPU memory estimate for LoRA SFT.")
    ap.add_argument("--config", "-c", action="append", help="train YAML(s); default: the shipped GPU configs")
    ap.add_argument("--model", help="model name / hub id / local dir (instead of --config)")
    ap.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--gpus", type=_positive(int), default=8)
    ap.add_argument("--micro-batch", type=_positive(int), default=1)
    ap.add_argument("--seq-len", type=_positive(int), default=2048)
    ap.add_argument("--no-grad-ckpt", action="store_true")
    ap.add_argument("--lora-r", type=_positive(int), default=8)
    ap.add_argument("--offload-optimizer", action="store_true")
    ap.add_argument("--offload-params", action="store_true")
    ap.add_argument("--gpu-gib", type=_positive(float), default=80.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for --config")
    args = ap.parse_args(argv)
    try:
        rows = _plans(args)
    except (ConfigError, UnknownModel) as e:
        print(f"tokenskip plan-memory: {e}", file=sys.stderr)
        return 2
    for name, p in rows:
        print(json.dumps({"name": name, **p}) if args.json else format_plan(name, p))
    return 0


def _plans(args: argparse.Namespace) -> list[tuple[str, dict]]:
    rows: list[tuple[str, dict]] = []
    if args.model:
        rows.append(
            (
                args.model,
                plan(
                    arch_for(args.model),
                    args.zero,
                    args.gpus,
                    args.micro_batch,
                    args.seq_len,
                    not args.no_grad_ckpt,
                    args.lora_r,
                    args.offload_optimizer,
                    args.offload_params,
                    args.gpu_gib,
                ),
            )
        )
    else:
        from tokenskip.config import TrainConfig, load_config

        paths = args.config or [
            str(Path(__file__).resolve().parents[1] / "configs" / "train" / n) for n in DEFAULT_CONFIGS
        ]
        for path in paths:
            cfg = load_config(TrainConfig, path, args.overrides)
            rows.append((f"{Path(path).name} ({cfg.model})", plan_for_config(cfg, args.gpu_gib)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
