"""Pure parts of LoRA SFT: checking and tokenising (prompt, completion) pairs, the
per-batch padding collator, the LoRA config, the DeepSpeed config and the LR schedule.

No Ray here; ``pipelines/train.py`` wires these into a Ray Train job.

Loss is taken on the completion only: prompt positions carry the label ``-100``.

>>> ex = build_example([1, 2, 3], [4, 5], cutoff_len=8)
>>> ex["input_ids"], ex["labels"]
([1, 2, 3, 4, 5], [-100, -100, -100, 4, 5])
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Sequence

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("user", "completion", "ratio")


class TrainDataError(ValueError):
    """The training data is unusable; the message names the file, row and field."""


# --------------------------------------------------------------------------- data checks


def validate_rows(rows: Sequence[dict], source: str = "<rows>") -> None:
    """Fail fast (before any worker starts) on an empty set, a missing column or a bad value.

    >>> validate_rows([{"user": "u", "completion": "c", "ratio": 0.5}], "t.parquet")
    >>> validate_rows([], "t.parquet")
    Traceback (most recent call last):
    ...
    tokenskip.training.TrainDataError: t.parquet: the training set is empty (0 rows)
    >>> validate_rows([{"user": "u", "ratio": 1.0}], "t.parquet")
    Traceback (most recent call last):
    ...
    tokenskip.training.TrainDataError: t.parquet: missing column(s) ['completion'] (row 0 has ['ratio', 'user'];
    required: user, completion, ratio)
    >>> validate_rows([{"user": "u", "completion": "c", "ratio": 1.0}, None], "t.jsonl")
    Traceback (most recent call last):
    ...
    tokenskip.training.TrainDataError: t.jsonl: row 1: not a JSON object (got NoneType)
    >>> validate_rows([{"user": "u", "completion": None, "ratio": 1.0}], "t.parquet")
    Traceback (most recent call last):
    ...
    tokenskip.training.TrainDataError: t.parquet: row 0 (id None): field 'completion' must be a non-empty string,
    got None
    """
    if not rows:
        raise TrainDataError(f"{source}: the training set is empty (0 rows)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TrainDataError(f"{source}: row {i}: not a JSON object (got {type(row).__name__})")
    missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
    if missing:
        raise TrainDataError(
            f"{source}: missing column(s) {missing} (row 0 has {sorted(rows[0])}; "
            f"required: {', '.join(REQUIRED_COLUMNS)})"
        )
    from tokenskip import gamma

    for i, row in enumerate(rows):
        for col in ("user", "completion"):
            v = row.get(col)
            if not isinstance(v, str) or not v:
                raise TrainDataError(
                    f"{source}: row {i} (id {row.get('id')}): field '{col}' must be a non-empty string, got {v!r}"
                )
        try:
            gamma.check(row.get("ratio"), "ratio")
        except ValueError as e:
            raise TrainDataError(f"{source}: row {i} (id {row.get('id')}): field {e}") from None


# --------------------------------------------------------------------------- tokenisation


def build_example(
    prompt_ids: Sequence[int], completion_ids: Sequence[int], cutoff_len: int, overlong: str = "truncate"
) -> dict | None:
    """input_ids / labels for one pair; ``None`` when the row must be dropped.

    Longer than ``cutoff_len``: ``truncate`` keeps the prompt and cuts the completion's
    tail; ``drop`` drops the row. A row whose prompt alone fills the cutoff has no target
    left and is always dropped.

    >>> build_example([1, 2], [3, 4, 5], cutoff_len=4)
    {'input_ids': [1, 2, 3, 4], 'labels': [-100, -100, 3, 4], 'overlong': True}
    >>> build_example([1, 2], [3, 4, 5], cutoff_len=4, overlong="drop") is None
    True
    >>> build_example([1, 2, 3, 4], [5], cutoff_len=4) is None
    True
    """
    if not completion_ids:
        return None
    n = len(prompt_ids) + len(completion_ids)
    is_long = n > cutoff_len
    if is_long and (overlong == "drop" or len(prompt_ids) >= cutoff_len):
        return None
    ids = (list(prompt_ids) + list(completion_ids))[:cutoff_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + list(completion_ids))[:cutoff_len]
    return {"input_ids": ids, "labels": labels, "overlong": is_long}


def tokenize_pair(
    tokenizer: Any, user: str, completion: str, cutoff_len: int, overlong: str = "truncate"
) -> dict | None:
    """Render with the chat template, tokenise prompt and completion separately (so the
    boundary is exact), and mask the prompt. ``None`` = dropped (see :func:`build_example`)."""
    from tokenskip.prompt import encode_prompt, render_user_completion

    prompt_text, completion_text = render_user_completion(tokenizer, user, completion)
    p = encode_prompt(tokenizer, prompt_text)  # the same ids evaluation, generation and serving give the engine
    c = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return build_example(p, c, cutoff_len, overlong)


# --------------------------------------------------------------------------- collator


def pad_batch(
    examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, list[list[int]]]:
    """Right-pad a batch to its own longest row (never to the cutoff).

    >>> b = pad_batch([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    >>> b["input_ids"], b["attention_mask"], b["labels"]
    ([[1, 2, 3], [4, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[-100, 2, 3], [4, -100, -100]])
    >>> len(pad_batch([{"input_ids": [1], "labels": [1]}], 0, pad_to_multiple_of=8)["input_ids"][0])
    8
    """
    if not examples:
        raise ValueError("pad_batch: empty batch")
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = int(math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        ids, labels = list(e["input_ids"]), list(e["labels"])
        pad = width - len(ids)
        out["input_ids"].append(ids + [pad_id] * pad)
        out["attention_mask"].append([1] * len(ids) + [0] * pad)
        out["labels"].append(labels + [IGNORE_INDEX] * pad)
    return out


class Collator:
    """``Collator(pad_id)(examples)`` -> dict of LongTensors, padded per batch."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict:
        import torch

        return {
            k: torch.tensor(v, dtype=torch.long)
            for k, v in pad_batch(examples, self.pad_id, self.pad_to_multiple_of).items()
        }


# --------------------------------------------------------------------------- schedule


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that micro x world x accum = global.

    >>> grad_accum_steps(8, 1, 2)
    4
    >>> grad_accum_steps(8, 3, 2)
    Traceback (most recent call last):
    ...
    ValueError: global_batch_size 8 is not a multiple of micro_batch_size 3 x workers 2
    """
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(
            f"global_batch_size {global_batch} is not a multiple of micro_batch_size {micro_batch} "
            f"x workers {world_size}"
        )
    return global_batch // per_step


def total_steps(
    rows_per_rank: int, micro_batch: int, accum: int, epochs: float, max_steps: int | None = None
) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps); a trailing partial step is dropped.

    >>> total_steps(16, 1, 4, 3.0)
    (4, 12)
    >>> total_steps(16, 1, 4, 3.0, max_steps=5)
    (4, 5)
    >>> total_steps(2, 1, 4, 1.0)
    Traceback (most recent call last):
    ...
    ValueError: too few rows per worker (2) for one optimizer step (micro_batch 1 x accumulation 4)
    """
    per_epoch = rows_per_rank // (micro_batch * accum)
    if per_epoch < 1:
        raise ValueError(
            f"too few rows per worker ({rows_per_rank}) for one optimizer step "
            f"(micro_batch {micro_batch} x accumulation {accum})"
        )
    total = max(1, int(math.floor(per_epoch * epochs)))
    if max_steps is not None:
        total = max_steps
    return per_epoch, total


def lr_factor(step: int, total: int, warmup_ratio: float = 0.1, kind: str = "cosine") -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warmup,
    then cosine / linear decay to 0, or constant.

    >>> [round(lr_factor(s, 10, 0.2), 3) for s in (0, 1, 2, 6, 9)]
    [0.5, 1.0, 1.0, 0.5, 0.038]
    >>> lr_factor(5, 10, 0.0, "constant")
    1.0
    """
    warmup = int(math.ceil(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """Seeded permutation of ``range(n)`` for one epoch (same on every run and rank count).

    >>> epoch_order(5, 0, 1) == epoch_order(5, 0, 1), sorted(epoch_order(5, 1, 1))
    (True, [0, 1, 2, 3, 4])
    """
    import random

    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def length_grouped_order(lengths: Sequence[int], epoch: int, seed: int, micro_batch: int, mega: int = 32) -> list[int]:
    """An epoch order whose consecutive micro-batches hold rows of similar length, so padding
    to the longest row of a batch wastes little (HF's ``group_by_length``): a seeded shuffle,
    cut into mega-batches of ``mega × micro_batch`` rows, each sorted by length (longest
    first), then the micro-batches shuffled among themselves so lengths don't trend over the epoch.

    >>> o = length_grouped_order([5, 50, 6, 52, 7, 49, 51, 4], 0, 1, micro_batch=2, mega=4)
    >>> lengths = [5, 50, 6, 52, 7, 49, 51, 4]
    >>> sorted(o) == list(range(8)), sorted(sorted(lengths[i] for i in o[k:k + 2]) for k in range(0, 8, 2))
    (True, [[4, 5], [6, 7], [49, 50], [51, 52]])
    """
    import random

    order = epoch_order(len(lengths), epoch, seed)
    size = max(1, mega * micro_batch)
    grouped: list[list[int]] = []
    for start in range(0, len(order), size):
        chunk = sorted(order[start : start + size], key=lambda i: -lengths[i])
        grouped += [chunk[k : k + micro_batch] for k in range(0, len(chunk), micro_batch)]
    random.Random(seed * 7_919 + epoch).shuffle(grouped)
    return [i for batch in grouped for i in batch]


def padding_share(lengths: Sequence[int], order: Sequence[int], micro_batch: int) -> float:
    """Share of processed token positions that are padding when ``order`` is cut into micro-batches.

    >>> padding_share([2, 4, 4, 4], [0, 1, 2, 3], 2)
    0.125
    """
    real = padded = 0
    for k in range(0, len(order), micro_batch):
        batch = [lengths[i] for i in order[k : k + micro_batch]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1.0 - real / padded if padded else 0.0


# --------------------------------------------------------------------------- LoRA


def build_lora_config(
    r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: str | Iterable[str] = "all-linear"
):
    """A PEFT LoraConfig that vLLM can load: linear projections only, never the LM head,
    no ``modules_to_save``.

    >>> c = build_lora_config(8, 16, 0.0)
    >>> c.r, c.lora_alpha, c.target_modules, c.modules_to_save
    (8, 16, 'all-linear', None)
    >>> build_lora_config(target_modules=["q_proj", "lm_head"])
    Traceback (most recent call last):
    ...
    ValueError: lora.target_modules must not include lm_head / embeddings (vLLM cannot load them): ['lm_head']
    """
    from peft import LoraConfig as PeftLoraConfig

    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        bad = [m for m in target_modules if m in ("lm_head", "embed_tokens", "wte", "embed_out")]
        if bad:
            raise ValueError(
                f"lora.target_modules must not include lm_head / embeddings (vLLM cannot load them): {bad}"
            )
    return PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        modules_to_save=None,
    )


# --------------------------------------------------------------------------- loss

# Causal LMs whose forward is exactly ``lm_head(decoder(...).last_hidden_state)`` followed by
# transformers' mean next-token cross entropy: no logit scaling, soft-capping or auxiliary loss
# (checked against transformers' own loss in tests/test_training.py). Others keep that loss.
LABELLED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a PEFT wrapper (LoRA layers are injected in place), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def labelled_head_supported(model: Any) -> bool:
    """Whether :func:`completion_loss_module` may project only the labelled positions.

    ``model`` is a (PEFT-wrapped) transformers causal LM.
    """
    base = _causal_lm(model)
    cfg = getattr(base, "config", None)
    return (
        getattr(cfg, "model_type", None) in LABELLED_HEAD_MODEL_TYPES
        and hasattr(base, "model")
        and hasattr(base, "lm_head")
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logits_scaling", 1.0) in (None, 1.0)
    )


def completion_loss_module(model: Any, labelled_head: bool | None = None):
    """``model`` wrapped so that calling it with ``input_ids, attention_mask, labels`` returns
    the SFT loss tensor (what DDP / DeepSpeed wrap and call).

    With ``labelled_head`` (default: :func:`labelled_head_supported`) the LM head and the cross
    entropy run only on the positions whose next token is labelled, i.e. the completion: the
    prompt (half of a GSM8K row's tokens) never gets its ``[tokens, vocab]`` logits. The loss is
    transformers' (mean over labelled tokens) to float rounding; the gradient reaches the same
    LoRA weights. Otherwise the model's own ``.loss`` is returned.
    """
    import torch
    import torch.nn.functional as F

    use_head = labelled_head_supported(model) if labelled_head is None else labelled_head

    class CompletionLoss(torch.nn.Module):
        labelled_head = use_head

        def __init__(self, inner) -> None:
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask, labels):
            if not self.labelled_head:
                return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            base = _causal_lm(self.model)
            hidden = base.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            target = labels[:, 1:]
            keep = target != IGNORE_INDEX
            logits = base.lm_head(hidden[:, :-1][keep]).float()
            return F.cross_entropy(logits, target[keep])  # mean over the labelled tokens, as transformers

    return CompletionLoss(model)


# --------------------------------------------------------------------------- DeepSpeed


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` merged over ``base`` (nested dicts merged, everything else replaced).

    >>> deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4})
    {'a': {'b': 1, 'c': 3}, 'd': 4}
    """
    out = copy.deepcopy(base)
    for k, v in (extra or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """``auto`` -> bf16 on GPUs, fp32 on CPU.

    >>> resolve_precision("auto", False), resolve_precision("auto", True), resolve_precision("fp16", True)
    ('fp32', 'bf16', 'fp16')
    """
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision


def build_deepspeed_config(
    zero_stage: int = 3,
    micro_batch: int = 1,
    grad_accum: int = 1,
    precision: str = "fp32",
    offload_optimizer: bool = False,
    offload_params: bool = False,
    on_gpu: bool = False,
    learning_rate: float = 5e-5,
    weight_decay: float = 0.0,
    gradient_clipping: float = 1.0,
    extra: dict | None = None,
) -> dict:
    """The DeepSpeed config for LoRA SFT (ZeRO-0..3, optional CPU offload).

    The optimizer is torch's AdamW (``torch_adam``) except with optimizer offload on GPUs
    (DeepSpeedCPUAdam). On CPU: fp32, no pinned memory. ``extra`` is merged over the result.

    >>> c = build_deepspeed_config(3, 1, 4, "fp32")
    >>> c["zero_optimization"]["stage"], c["gradient_accumulation_steps"], "bf16" in c
    (3, 4, False)
    >>> c["optimizer"]["params"]["torch_adam"]
    True
    >>> g = build_deepspeed_config(3, 2, 1, "bf16", offload_optimizer=True, offload_params=True, on_gpu=True)
    >>> g["bf16"], g["zero_optimization"]["offload_param"]["device"], "torch_adam" in g["optimizer"]["params"]
    ({'enabled': True}, 'cpu', False)
    >>> build_deepspeed_config(2, offload_params=True)
    Traceback (most recent call last):
    ...
    ValueError: offload_params needs ZeRO stage 3 (got stage 2)
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise ValueError(f"offload_params needs ZeRO stage 3 (got stage {zero_stage})")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage >= 1")
    zero: dict[str, Any] = {"stage": zero_stage, "contiguous_gradients": True, "overlap_comm": bool(on_gpu)}
    if zero_stage == 3:
        # Adapter weights are gathered explicitly when saved; never write a 16-bit full model.
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": False,
                "stage3_param_persistence_threshold": 1e4,
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_max_live_parameters": 1e9,
            }
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(on_gpu)}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(on_gpu)}
    adam: dict[str, Any] = {"lr": learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay}
    if not (on_gpu and offload_optimizer):
        # torch's AdamW: LoRA has few parameters, so DeepSpeed's fused Adam (a JIT CUDA build on
        # every worker) buys nothing; CPU offload keeps DeepSpeedCPUAdam.
        adam["torch_adam"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return deep_merge(cfg, extra or {})
