"""Stage 5: LoRA SFT as a Ray Train job (``TorchTrainer``), plain DDP or DeepSpeed ZeRO-1/2/3.

Driver: read and check the data (before any worker starts) -> tokenise (into a Ray
Dataset that Ray Train splits across the workers) -> ``TorchTrainer`` (ScalingConfig / RunConfig /
FailureConfig / CheckpointConfig from the config) -> copy the adapter out of the final
checkpoint -> manifest last.

Worker (``train_loop_per_worker``): setup (model, LoRA, DDP or DeepSpeed engine) ->
restore the latest checkpoint if Ray hands one over -> optimizer steps over a seeded,
per-epoch order of this worker's shard -> a checkpoint every ``checkpoint_every`` steps
-> the adapter gathered (ZeRO-3) and saved by rank 0 into the final checkpoint.

The step -> rows map is a pure function of (step, seed), so a run restored from the
checkpoint of step k continues with step k+1 exactly as the uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines import faults, progress
from tokenskip import artifacts, assets, card, tracking
from tokenskip.config import ConfigError, LoraConfig, TrainConfig, to_dict
from tokenskip.training import (
    TrainDataError,
    grad_accum_steps,
    total_steps,
    validate_rows,
)

log = logging.getLogger("tokenskip.train")

STEP_LOG = "steps.jsonl"
ADAPTER_DIR = "adapter"


# =========================================================================== driver side


def resolve_dataset(path: str | os.PathLike) -> tuple[Path, Path | None, dict]:
    """(train file, validation file or None, upstream manifest) for a build_sft stage dir or a file."""
    p = Path(path)
    if p.is_dir():
        manifest = artifacts.require_complete(p)
        for suffix in (".parquet", ".jsonl"):
            if (p / f"train{suffix}").is_file():
                val = p / f"validation{suffix}"
                return p / f"train{suffix}", (val if val.is_file() else None), manifest
        raise TrainDataError(f"{p}: build_sft stage directory has no train.parquet / train.jsonl")
    if p.is_file():
        if p.suffix not in (".parquet", ".jsonl"):
            raise TrainDataError(f"{p}: training data must be .parquet or .jsonl")
        return p, None, {}
    raise TrainDataError(f"training data not found: {p}")


def load_train_rows(cfg: TrainConfig) -> tuple[list[dict], Path, dict]:
    """Read and check the training rows on the driver (clear errors before any worker starts)."""
    if not cfg.dataset:
        raise ConfigError("train.dataset is not set (a build_sft stage directory or a .parquet/.jsonl file)")
    train_file, _val, upstream = resolve_dataset(cfg.dataset)
    rows = artifacts.read_rows(train_file)
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    validate_rows(rows, str(train_file))
    return rows, train_file, upstream


def tokenize_rows(model: str, rows: list[dict], cutoff_len: int, overlong: str) -> tuple[list[dict], dict]:
    """(user, completion) rows -> the kept examples (``idx`` = row number, ``input_ids``, ``labels``
    with the prompt masked) and the counts of truncated / dropped rows."""
    import numpy as np
    from transformers import AutoTokenizer

    from tokenskip.training import tokenize_pair

    tok = AutoTokenizer.from_pretrained(assets.resolve_model(model))
    kept: list[dict] = []
    truncated = tokens = 0
    for i, r in enumerate(rows):
        ex = tokenize_pair(tok, str(r["user"]), str(r["completion"]), cutoff_len, overlong)
        if ex is None:
            continue
        truncated += bool(ex["overlong"])
        tokens += len(ex["input_ids"])
        kept.append(
            {
                "idx": i,
                "input_ids": np.asarray(ex["input_ids"], dtype=np.int64),
                "labels": np.asarray(ex["labels"], dtype=np.int64),
            }
        )
    counts = {
        "rows": len(rows),
        "kept": len(kept),
        "dropped_overlong": len(rows) - len(kept),
        "truncated": truncated if overlong == "truncate" else 0,
        "train_tokens": tokens,
    }
    return kept, counts


def tokenize_dataset(cfg: TrainConfig, rows: list[dict]):
    """Tokenised Ray Dataset (row order kept, overlong rows dropped or cut) and its counts.

    Tokenised here on the driver, which already holds and has checked every row
    (``load_train_rows``): one tokenizer load. A one-actor Ray Data pool did the same work no
    faster, and its start plus three ``ds.sum`` aggregations cost ~20 s on every run (2 CPUs).
    Ray Train still gets a Ray Dataset, split across the workers (``DataConfig``)."""
    import ray

    kept, counts = tokenize_rows(cfg.model, rows, cfg.cutoff_len, cfg.overlong)
    if not kept:
        return None, counts
    return ray.data.from_items(kept, override_num_blocks=max(1, min(8, len(kept) // 64 or 1))), counts


def check_adapter(adapter_dir: str | os.PathLike) -> dict:
    """The saved adapter is a standard, non-empty PEFT adapter (what vLLM needs)."""
    from safetensors import safe_open

    d = Path(adapter_dir)
    cfg_file, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise RuntimeError(f"{d}: not a PEFT adapter (adapter_config.json + adapter_model.safetensors expected)")
    conf = json.loads(cfg_file.read_text())
    if conf.get("modules_to_save"):
        raise RuntimeError(f"{d}: adapter has modules_to_save {conf['modules_to_save']} (vLLM cannot load it)")
    n_tensors = n_params = 0
    nonzero_b = 0.0
    with safe_open(str(weights), "pt") as fh:
        for k in fh.keys():
            t = fh.get_tensor(k)
            if t.numel() == 0:
                raise RuntimeError(f"{d}: tensor {k} is empty (a ZeRO-3 adapter saved without gathering?)")
            if "lm_head" in k or "embed" in k:
                raise RuntimeError(f"{d}: adapter touches {k} (vLLM cannot load it)")
            n_tensors += 1
            n_params += t.numel()
            if "lora_B" in k:
                nonzero_b += float(t.float().abs().sum())
    if n_tensors == 0:
        raise RuntimeError(f"{d}: adapter has no tensors")
    return {"tensors": n_tensors, "parameters": n_params, "lora_B_abs_sum": nonzero_b}


def _storage_path(cfg: TrainConfig, out: Path) -> str:
    if cfg.storage_path:
        sp = cfg.storage_path
        return sp if "://" in sp else str(Path(sp).resolve())
    return str((out / "ray_storage").resolve())


def run_train(cfg: TrainConfig, force: bool = False) -> dict:
    """Train the adapter; returns the manifest (cached unless ``force``)."""
    if not cfg.output_dir:
        raise ConfigError("train.output_dir is not set")
    out = Path(cfg.output_dir)
    finished = artifacts.skip_if_finished(out, force, cfg)
    if finished is not None:
        return finished
    rows, train_file, upstream = load_train_rows(cfg)  # fails before Ray / workers start
    workers = int(cfg.scaling.get("num_workers", 1))
    accum = grad_accum_steps(cfg.global_batch_size, cfg.micro_batch_size, workers)

    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ds, counts = tokenize_dataset(cfg, rows)  # on the Ray the caller started (ray_jobs.runner)
    if counts["kept"] == 0:
        raise TrainDataError(
            f"{train_file}: all {counts['rows']} rows dropped (longer than cutoff_len {cfg.cutoff_len})"
        )
    total_steps(counts["kept"] // workers, cfg.micro_batch_size, accum, cfg.epochs, cfg.max_steps)  # enough rows?
    out.mkdir(parents=True, exist_ok=True)
    loop_cfg = {
        "cfg": to_dict(cfg),
        "step_log": str((out / STEP_LOG).resolve()),
        "fault": faults.from_env(),  # a documented fault-injection switch, None normally
    }
    # The adapter card (γ trained with their row counts, data hash, prompt format): rank 0
    # writes it beside the adapter in the final checkpoint, and the driver beside the copy.
    adapter_card = card.card_for_training(cfg.model, rows, str(cfg.dataset), train_file, to_dict(cfg))
    loop_cfg["card"] = adapter_card.to_dict()
    exec_opts = ray.data.ExecutionOptions(preserve_order=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(**cfg.scaling),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=_storage_path(cfg, out),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),
        datasets={"train": ds},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=exec_opts),
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    adapter_out = out / ADAPTER_DIR
    with result.checkpoint.as_directory() as ckpt_dir:
        src = Path(ckpt_dir) / ADAPTER_DIR
        if not src.is_dir():
            raise RuntimeError(f"final checkpoint {result.checkpoint.path} has no {ADAPTER_DIR}/")
        tmp = out / f".{ADAPTER_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        card.write_card(tmp, adapter_card)  # also when restored from a checkpoint written without one
        shutil.rmtree(adapter_out, ignore_errors=True)
        os.replace(tmp, adapter_out)
    adapter_info = check_adapter(adapter_out)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str, bool))}
    metrics["wall_s"] = round(wall, 2)
    return artifacts.write_manifest(
        out,
        "train",
        config=cfg,
        inputs={"dataset": str(cfg.dataset), "train_file": str(train_file), "data_manifest": upstream},
        counts={**counts, "workers": workers, "grad_accum": accum},
        base_model=cfg.model,
        base_model_path=assets.resolve_model(cfg.model),
        ratios_trained=adapter_card.rows_per_ratio,
        adapter=str(adapter_out),
        adapter_card=str(card.card_path(adapter_out)),
        adapter_info=adapter_info,
        checkpoint=str(result.checkpoint.path),
        final_metrics=metrics,
    )


# =========================================================================== worker side


def _train_cfg(d: dict) -> TrainConfig:
    d = dict(d)
    d["lora"] = LoraConfig(**d["lora"])
    return TrainConfig(**d)


class _Runner:
    """One training engine (DDP or DeepSpeed) behind the same five calls."""

    def __init__(self, cfg: TrainConfig, total: int, accum: int, device, on_gpu: bool) -> None:
        import torch

        from tokenskip.training import (
            build_deepspeed_config,
            build_lora_config,
            completion_loss_module,
            lr_factor,
            resolve_precision,
        )

        self.cfg, self.accum, self.device = cfg, accum, device
        self.precision = resolve_precision(cfg.precision, on_gpu)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        self.deepspeed = cfg.strategy == "deepspeed"
        self.zero3 = self.deepspeed and cfg.zero_stage == 3
        lr_fn = lambda s: lr_factor(s, total, cfg.warmup_ratio, cfg.lr_scheduler)  # noqa: E731
        self._hf_ds = None
        if self.deepspeed:
            self.ds_config = build_deepspeed_config(
                cfg.zero_stage,
                cfg.micro_batch_size,
                accum,
                self.precision,
                cfg.offload_optimizer,
                cfg.offload_params,
                on_gpu,
                cfg.learning_rate,
                cfg.weight_decay,
                cfg.gradient_clipping,
                cfg.deepspeed,
            )
            if self.zero3:
                # Must exist (and stay referenced) before from_pretrained: weights then load
                # straight into ZeRO-3 partitions under deepspeed.zero.Init, never whole per rank.
                from transformers.integrations.deepspeed import HfDeepSpeedConfig

                self._hf_ds = HfDeepSpeedConfig(self.ds_config)
        model = self._build_model(
            build_lora_config(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
        )
        self.peft_model = model
        params = [p for p in model.parameters() if p.requires_grad]
        # returns the loss; the LM head sees only the completion's positions where the architecture allows
        model = completion_loss_module(model, None if cfg.lm_head_positions == "labelled" else False)
        self.labelled_head = model.labelled_head
        if self.deepspeed:
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                model_parameters=params,
                config=self.ds_config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn),
            )
            self.module = self.engine
        else:
            import ray.train.torch

            model.to(device)
            self.module = ray.train.torch.prepare_model(model, move_to_device=False)
            self.optimizer = torch.optim.AdamW(
                params, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
            )
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_fn)
        self.params = params
        self.grad_norm: float | None = None

    def _build_model(self, lora_config):
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        path = assets.resolve_model(self.cfg.model)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        model.config.use_cache = False
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(self.cfg.seed)  # LoRA init identical on every rank and for every strategy
        return get_peft_model(model, lora_config)

    def forward_backward(self, batch: dict, micro: int) -> float:
        import contextlib

        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.deepspeed:
            loss = self.engine(**batch)
            self.engine.backward(loss)  # scaled by 1/accum inside
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            return float(loss.detach())
        last = micro == self.accum - 1
        ctx = self.module.no_sync() if (not last and hasattr(self.module, "no_sync")) else contextlib.nullcontext()
        with ctx:
            loss = self.module(**batch)
            (loss / self.accum).backward()
        return float(loss.detach())

    def optimizer_step(self) -> None:
        import torch

        if self.deepspeed:  # stepped in engine.step() at the boundary, which also measured the norm
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else None
            return
        # the norm before clipping (max_norm inf when clipping is off: measured, nothing clipped)
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.gradient_clipping or math.inf))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ---- checkpoints: only what training changes (LoRA + optimizer + scheduler), never the frozen base
    def save_state(self, d: Path, rank: int) -> None:
        import torch

        if self.deepspeed:
            self.engine.save_checkpoint(str(d / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        elif rank == 0:
            trainable = {n: p.detach().cpu() for n, p in self.peft_model.named_parameters() if p.requires_grad}
            torch.save(
                {
                    "model": trainable,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                d / "trainer_state.pt",
            )

    def load_state(self, d: Path) -> None:
        import torch

        if self.deepspeed:
            path, _ = self.engine.load_checkpoint(
                str(d / "deepspeed"),
                tag="state",
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load the checkpoint in {d}")
            return
        state = torch.load(d / "trainer_state.pt", map_location="cpu", weights_only=True)  # tensors and plain data only
        missing = self.peft_model.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"checkpoint has unexpected keys {missing.unexpected_keys[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_adapter(self, d: Path, rank: int) -> None:
        """Rank 0 writes the PEFT adapter; under ZeRO-3 the LoRA shards are gathered first."""
        import contextlib

        named = [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]
        ctx = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        with ctx:
            if rank == 0:
                state = {n: p.detach().cpu().clone().contiguous() for n, p in named}
                self.peft_model.save_pretrained(str(d), state_dict=state, safe_serialization=True)


def _load_shard(shard) -> list[dict]:
    rows = []
    for r in shard.iter_rows():
        rows.append(
            {
                "idx": int(r["idx"]),
                "input_ids": [int(x) for x in r["input_ids"]],
                "labels": [int(x) for x in r["labels"]],
            }
        )
    rows.sort(key=lambda r: r["idx"])
    return rows


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [float(x) for x in t.cpu()]


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from tokenskip.training import Collator, epoch_order, length_grouped_order

    cfg = _train_cfg(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.seed)

    rows = _load_shard(ray.train.get_dataset_shard("train"))
    n_local = int(_all_reduce([len(rows)], device, "sum")[0])
    n_min = -_all_reduce([-len(rows)], device, "max")[0]  # the smallest shard bounds the steps per epoch
    accum = grad_accum_steps(cfg.global_batch_size, cfg.micro_batch_size, world)
    per_epoch, total = total_steps(int(n_min), cfg.micro_batch_size, accum, cfg.epochs, cfg.max_steps)

    runner = _Runner(cfg, total, accum, device, on_gpu)
    tracker = tracking.stage_run(cfg, "train") if rank == 0 else tracking.NULL
    collate = Collator(pad_id=_pad_id(cfg))

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            runner.load_state(Path(d))
            start = int(state["step"])
        _rank0_log(rank, f"resumed from checkpoint at step {start}/{total}")
    _rank0_log(
        rank,
        f"workers={world} rows={n_local} ({len(rows)} here) accum={accum} steps/epoch={per_epoch} total={total} "
        f"strategy={cfg.strategy}{'-zero' + str(cfg.zero_stage) if cfg.strategy == 'deepspeed' else ''} "
        f"precision={runner.precision} lm_head={'labelled positions' if runner.labelled_head else 'all positions'}",
    )

    mb = cfg.micro_batch_size
    lengths = [len(r["input_ids"]) for r in rows]
    order, order_epoch = [], -1
    processed_run = 0.0
    metrics: dict[str, Any] = {}
    t_run = time.time()
    tokens_run = 0.0
    for step in range(start, total):
        epoch, pos = divmod(step, per_epoch)
        if order_epoch != epoch:  # rows of similar length share a micro-batch: little padding
            order = (
                length_grouped_order(lengths, epoch, cfg.seed, mb)
                if cfg.group_by_length
                else epoch_order(len(rows), epoch, cfg.seed)
            )
            order_epoch = epoch
        t0 = time.time()
        lr = runner.lr()  # the LR this step uses (the scheduler moves on inside the step)
        losses, tokens, processed = [], 0, 0
        for micro in range(accum):
            first = (pos * accum + micro) * mb
            batch = collate([rows[i] for i in order[first : first + mb]])
            tokens += int(batch["attention_mask"].sum())
            processed += int(batch["attention_mask"].numel())
            losses.append(runner.forward_backward(batch, micro))
        runner.optimizer_step()
        dt = time.time() - t0
        loss_sum, tok_sum, proc_sum = _all_reduce(
            [sum(losses) / len(losses), float(tokens), float(processed)], device, "sum"
        )
        tokens_run += tok_sum
        processed_run += proc_sum
        metrics = {
            "step": step + 1,
            "epoch": round((step + 1) / per_epoch, 4),
            "loss": loss_sum / world,
            "lr": lr,
            "tokens_per_s": tok_sum / max(dt, 1e-9),
            "step_time_s": dt,
            "tokens_per_s_run": tokens_run / max(time.time() - t_run, 1e-9),
            "grad_norm": runner.grad_norm,
            "processed_tokens_per_s": proc_sum / max(dt, 1e-9),  # real + padding positions
            "real_token_share_run": tokens_run / max(processed_run, 1.0),
            "lm_head_positions": "labelled" if runner.labelled_head else "all",
        }
        if rank == 0:
            _append_step(config["step_log"], {**metrics, "pid": os.getpid(), "time": time.time()})
            tracking.log_train_step(tracker, metrics)  # MLflow: loss, lr, grad norm, tokens/s
            progress.report(step + 1, total, "steps", loss=metrics["loss"], tokens_per_s=metrics["tokens_per_s_run"])
            if (step + 1) % cfg.log_every == 0:
                log.warning(
                    "step %d/%d loss %.4f lr %.3g tokens/s %.1f",
                    step + 1,
                    total,
                    metrics["loss"],
                    metrics["lr"],
                    metrics["tokens_per_s"],
                )
        faults.maybe_kill(config.get("fault"), step + 1, rank, world)
        final = step + 1 == total
        if final or (step + 1) % cfg.checkpoint_every == 0:
            _save_and_report(runner, metrics, step + 1, rank, final, config.get("card"))
    if start >= total:  # restored from the final checkpoint: nothing left but to report it again
        _save_and_report(runner, {"step": total}, total, rank, True, config.get("card"))
    tracker.end()


def _save_and_report(
    runner: _Runner, metrics: dict, step: int, rank: int, final: bool, card_data: dict | None = None
) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"tokenskip-ckpt-{step}-") as tmp:
        d = Path(tmp)
        runner.save_state(d, rank)
        if final:
            runner.save_adapter(d / ADAPTER_DIR, rank)
            if rank == 0 and card_data:
                card.write_card(d / ADAPTER_DIR, card.AdapterCard.from_dict(card_data))
        if rank == 0:
            (d / "state.json").write_text(json.dumps({"step": step, "metrics": metrics}))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if any(d.iterdir()) else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_step_{step:06d}")


def _pad_id(cfg: TrainConfig) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.resolve_model(cfg.model))
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _rank0_log(rank: int, msg: str) -> None:
    if rank == 0:
        log.warning(msg)
        print(f"[tokenskip.train] {msg}", flush=True)


def _append_step(path: str, rec: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")


__all__ = ["run_train", "train_loop_per_worker", "load_train_rows", "resolve_dataset", "check_adapter", "tokenize_rows"]
