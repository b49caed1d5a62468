"""Typed configs: defaults (dataclasses) -> YAML -> CLI overrides (``key.sub=value``).

Every stage has one dataclass. An experiment YAML (``kind: pipeline``) holds one section
per stage; a stage YAML (``kind: prune`` ...) holds just that stage's fields. Unknown keys
are errors that name the dotted key and the file; values are validated in
``__post_init__``. Ray-native settings (engine kwargs, scaling config, resources) are
plain nested dicts passed through untouched.

>>> cfg = load_config(PruneConfig, data={"ratios": [0.9, 0.5]}, overrides=["batch_size=4"])
>>> cfg.ratios, cfg.batch_size
([0.9, 0.5], 4)
>>> load_config(PruneConfig, data={"ratio": [0.5]})
Traceback (most recent call last):
...
tokenskip.config.ConfigError: <dict>: unknown key 'ratio' (valid: ...)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokenskip import gamma


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names which."""


# --------------------------------------------------------------------------- helpers


def _ratios(values: Any, where: str, unique: bool = False) -> list[float]:
    """A config's γ list through :func:`tokenskip.gamma.check_list`, as a ConfigError."""
    try:
        return gamma.check_list(values, where, unique=unique)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _positive(obj: Any, *names: str, allow_none: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None and allow_none:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be positive, got {v!r}")


def _nonneg(obj: Any, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be >= 0, got {v!r}")


def _share(obj: Any, name: str) -> None:
    v = getattr(obj, name)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= 1.0):
        raise ConfigError(f"{type(obj).__name__}.{name} must be in [0, 1], got {v!r}")


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_local_dir(value: Any, where: str) -> None:
    """``run_dir`` / ``output_dir`` must be a local (or mounted shared) path for now, and not blank
    (a blank one would be the working directory, or with ``run_dir`` the filesystem root)."""
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{where}: must not be empty (give a directory)")
    if isinstance(value, str) and _URI.match(value):
        raise ConfigError(
            f"{where}: {value!r} is a URI; object storage is not supported for stage outputs yet: "
            "give a local or mounted shared-filesystem path (e.g. /mnt/shared/...)"
        )


def _check_finite(value: Any, where: str, origin: str) -> None:
    """NaN / inf are refused in every config value, nested dicts and lists included."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{origin}: {where or 'value'} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}" if where else str(k), origin)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{where}[{i}]", origin)


_TRACKING_HELP = (
    "MLflow run tracking: {} (a local store under <run_dir>/mlruns) | {uri: http://host:5000, "
    "experiment: name} | none (see tokenskip.tracking)"
)


def _tracking(value: Any, where: str) -> Any:
    from tokenskip.tracking import check

    try:
        return check(value, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _choice(obj: Any, name: str, choices: tuple) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise ConfigError(f"{type(obj).__name__}.{name} must be one of {list(choices)}, got {v!r}")


# --------------------------------------------------------------------------- sections


@dataclass
class DataSourceConfig:
    """Where questions come from."""

    name: str = field(
        default="gsm8k",
        metadata={"help": "embedded gsm8k|math|math500, a .jsonl/.json/.parquet path, or a HF dataset id"},
    )
    split: str = field(default="train", metadata={"help": "split name (train/test)"})
    subset: str | None = field(default=None, metadata={"help": "HF dataset config name (e.g. 'main' for openai/gsm8k)"})
    kind: str | None = field(
        default=None, metadata={"help": "grading flavour gsm8k|math; inferred from name when unset"}
    )
    limit: int | None = field(default=None, metadata={"help": "keep the first N rows"})
    offset: int = field(default=0, metadata={"help": "skip the first N rows"})
    fields: dict = field(
        default_factory=dict,
        metadata={"help": "column renames for custom files: {question: ..., gold: ..., solution: ..., id: ...}"},
    )

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("data.name must not be empty")
        _positive(self, "limit", allow_none=True)
        _nonneg(self, "offset")
        if self.kind is not None:
            _choice(self, "kind", ("gsm8k", "math"))
        bad = set(self.fields) - {"question", "gold", "solution", "id"}
        if bad:
            raise ConfigError(f"data.fields: unknown key(s) {sorted(bad)} (valid: question, gold, solution, id)")


@dataclass
class GenerateConfig:
    """Stage 1: generate CoTs with the target model on vLLM."""

    model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "embedded model name, HF hub id or local path"}
    )
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    output_dir: str | None = field(
        default=None, metadata={"help": "stage output directory (pipeline sets it from run_dir)"}
    )
    max_new_tokens: int | None = field(default=None, metadata={"help": "None: 512 for gsm8k, 1024 for math"})
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = field(default=16, metadata={"help": "rows per Ray Data batch sent to one engine"})
    max_concurrent_batches: int = field(
        default=16,
        metadata={
            "help": "ray_data_llm: batches in flight per engine; keep batch_size x this above the engine's "
            "max_num_seqs so rows queue in the engine while a batch waits for its slowest row"
        },
    )
    max_pending_requests: int | None = field(
        default=None,
        metadata={
            "help": "ray_data_llm: requests one engine may hold (running + queued); None: Ray's 1.1 x max_num_seqs"
        },
    )
    shard_rows: int = field(default=64, metadata={"help": "rows per committed output part (the resume granularity)"})
    concurrency: int = field(default=1, metadata={"help": "number of vLLM engine replicas"})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per replica (tensor_parallel_size x pipeline size)"})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per replica"})
    engine_kwargs: dict = field(
        default_factory=dict, metadata={"help": "passed to vllm.LLM / vLLMEngineProcessorConfig as-is"}
    )
    backend: str = field(default="auto", metadata={"help": "auto | ray_data_llm | vllm_udf"})
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "reject prompts longer than this (None: model limit - max_new_tokens)"}
    )
    placement_group_config: dict | None = field(
        default=None, metadata={"help": "ray_data_llm backend: vLLMEngineProcessorConfig.placement_group_config as-is"}
    )
    max_reject_share: float = field(
        default=0.5, metadata={"help": "fail the stage (no manifest) when more than this share of rows is rejected"}
    )

    def __post_init__(self) -> None:
        _share(self, "max_reject_share")
        _positive(self, "batch_size", "shard_rows", "concurrency", "max_concurrent_batches")
        _positive(self, "max_new_tokens", "max_prompt_tokens", "max_pending_requests", allow_none=True)
        _nonneg(self, "temperature", "num_gpus", "num_cpus")
        _choice(self, "backend", ("auto", "ray_data_llm", "vllm_udf"))


@dataclass
class PruneConfig:
    """Stage 3: prune each CoT by token importance at every ratio from one scoring pass."""

    input: str | None = field(
        default=None, metadata={"help": "JSONL/Parquet file or stage directory with id + text column"}
    )
    output_dir: str | None = None
    text_field: str = field(default="cot", metadata={"help": "column holding the CoT to prune"})
    id_field: str = field(default="id", metadata={"help": "column holding the row id"})
    scorer: str = field(default="self_info", metadata={"help": "llmlingua2 | self_info"})
    scorer_model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "token-classifier (llmlingua2) or causal LM (self_info)"}
    )
    target_tokenizer: str = field(
        default="smollm2-135m-instruct", metadata={"help": "tokenizer whose tokens measure ratios"}
    )
    ratios: list[float] = field(default_factory=lambda: list(gamma.PRUNE_RATIOS))
    force_tokens: list[str] = field(default_factory=list)
    force_reserve_digit: bool = False
    drop_consecutive: bool = False
    cut: str = field(
        default="auto",
        metadata={
            "help": "percentile (LLMLingua-2's, cl100k-weighted, llmlingua parity) | budget "
            "(keep the top words until γ × the CoT's target-model tokens) | auto "
            "(budget for self_info, percentile for llmlingua2)"
        },
    )
    protect: str = field(
        default="auto",
        metadata={
            "help": "none | numbers (budget cut: numbers, then equation operators, "
            "outrank every other word) | auto (numbers with the budget cut)"
        },
    )
    reference_quirks: bool = field(
        default=True, metadata={"help": "reproduce llmlingua 0.2.2 output byte for byte (see tokenskip.pruning)"}
    )
    model_batch_size: int = field(default=16, metadata={"help": "chunks per forward pass (length-sorted)"})
    batch_size: int = field(default=64, metadata={"help": "rows per Ray Data batch"})
    concurrency: int = field(default=1, metadata={"help": "actors in the pool"})
    num_cpus: float = field(
        default=1.0,
        metadata={
            "help": "CPUs per actor; Ray gives the actor that many threads (OMP_NUM_THREADS), so a CPU scorer "
            "alone on a node runs fastest with its cores here"
        },
    )
    num_gpus: float = 0.0
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    format: str = field(default="parquet", metadata={"help": "output data file: parquet | jsonl"})
    limit: int | None = field(default=None, metadata={"help": "prune only the first N input rows (smoke runs)"})
    ray: dict = field(
        default_factory=dict, metadata={"help": "ray.init kwargs for local runs (ignored when RAY_ADDRESS is set)"}
    )
    max_reject_share: float = field(
        default=0.5, metadata={"help": "fail the stage (no manifest) when more than this share of rows is rejected"}
    )

    def __post_init__(self) -> None:
        _share(self, "max_reject_share")
        _choice(self, "scorer", ("llmlingua2", "self_info"))
        _choice(self, "cut", ("auto", "percentile", "budget"))
        _choice(self, "protect", ("auto", "none", "numbers"))
        _choice(self, "format", ("parquet", "jsonl"))
        _choice(self, "device", ("auto", "cpu", "cuda"))
        _positive(self, "model_batch_size", "batch_size", "concurrency")
        _positive(self, "limit", allow_none=True)
        _nonneg(self, "num_cpus", "num_gpus")
        self.ratios = _ratios(self.ratios, "prune.ratios", unique=True)
        if len(self.force_tokens) > 100:
            raise ConfigError(f"prune.force_tokens: at most 100 (llmlingua's limit), got {len(self.force_tokens)}")
        if not self.text_field or not self.id_field:
            raise ConfigError("prune.text_field and prune.id_field must not be empty")
        if self.resolved_cut() == "budget" and self.scorer == "llmlingua2" and self.reference_quirks:
            raise ConfigError(
                "prune.cut: budget needs character offsets; with scorer llmlingua2 set reference_quirks: false"
            )

    def resolved_cut(self) -> str:
        """The cut actually used (``auto`` resolved by scorer)."""
        if self.cut != "auto":
            return self.cut
        return "budget" if self.scorer == "self_info" else "percentile"

    def resolved_protect(self) -> str:
        if self.protect != "auto":
            return self.protect
        return "numbers" if self.resolved_cut() == "budget" else "none"


@dataclass
class CotsConfig:
    """Stage 2: select the CoTs to prune: correct generations within ``max_cot_tokens``, or the
    dataset's own (gold) solutions."""

    generations: str | None = field(
        default=None,
        metadata={"help": "generate stage directory, read with cot_source: generated (pipeline: <run_dir>/generate)"},
    )
    data: DataSourceConfig = field(
        default_factory=DataSourceConfig,
        metadata={"help": "questions, read with cot_source: gold (pipeline default: the generate section's data)"},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "stage output directory (pipeline sets it to <run_dir>/cots)"}
    )
    cot_source: str = field(
        default="generated",
        metadata={"help": "generated (the model's correct CoTs) | gold (the dataset's worked solutions)"},
    )
    max_cot_tokens: int = field(default=500, metadata={"help": "drop CoTs longer than this (target-model tokens)"})
    target_tokenizer: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "tokenizer counting gold CoTs' tokens (pipeline: its model unless set)"},
    )

    def __post_init__(self) -> None:
        _choice(self, "cot_source", ("generated", "gold"))
        _positive(self, "max_cot_tokens")


@dataclass
class BuildSFTConfig:
    """Stage 4: join the selected CoTs with their pruned versions, draw γ, write the SFT set."""

    cots_dir: str | None = field(
        default=None, metadata={"help": "cots stage directory (pipeline sets it to <run_dir>/cots)"}
    )
    pruned: str | None = field(
        default=None, metadata={"help": "prune stage directory (pipeline sets it to <run_dir>/prune)"}
    )
    output_dir: str | None = None
    ratios: list[float] = field(default_factory=lambda: list(gamma.DEFAULT_RATIOS))
    ratio_sampling: str = field(default="random", metadata={"help": "random (one γ per question) | all"})
    seed: int = 42
    val_fraction: float = 0.05
    format: str = field(default="parquet", metadata={"help": "parquet | jsonl"})

    def __post_init__(self) -> None:
        _choice(self, "ratio_sampling", ("random", "all"))
        _choice(self, "format", ("parquet", "jsonl"))
        if not (0.0 <= self.val_fraction < 1.0):
            raise ConfigError(f"build_sft.val_fraction must be in [0, 1), got {self.val_fraction}")
        self.ratios = _ratios(self.ratios, "build_sft.ratios")


@dataclass
class LoraConfig:
    """LoRA on all linear projections (never lm_head / embeddings, never modules_to_save: vLLM loads it)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(
        default="all-linear", metadata={"help": "'all-linear' or a list of module names"}
    )

    def __post_init__(self) -> None:
        _positive(self, "r", "alpha")
        if not (0.0 <= self.dropout < 1.0):
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ConfigError("lora.target_modules must not be empty")
        else:
            if not self.target_modules:
                raise ConfigError("lora.target_modules must not be empty")
            bad = [m for m in self.target_modules if m in ("lm_head", "embed_tokens", "wte", "embed_out")]
            if bad:
                raise ConfigError(
                    f"lora.target_modules must not include lm_head / embeddings (vLLM cannot load them): {bad}"
                )


@dataclass
class TrainConfig:
    """Stage 5: LoRA SFT on Ray Train (+ DeepSpeed ZeRO)."""

    model: str = "smollm2-135m-instruct"
    dataset: str | None = field(
        default=None, metadata={"help": "build_sft stage directory (train.parquet) or a .parquet/.jsonl file"}
    )
    output_dir: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    learning_rate: float = 5e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    gradient_clipping: float = 1.0
    epochs: float = 3.0
    max_steps: int | None = field(default=None, metadata={"help": "stop after N optimizer steps (overrides epochs)"})
    max_rows: int | None = field(default=None, metadata={"help": "use only the first N training rows (smoke runs)"})
    group_by_length: bool = field(
        default=True,
        metadata={"help": "micro-batches of rows of similar length (less padding); false: a plain seeded shuffle"},
    )
    micro_batch_size: int = 1
    global_batch_size: int = field(default=8, metadata={"help": "micro_batch_size x workers x accumulation steps"})
    cutoff_len: int = 2048
    overlong: str = field(
        default="truncate", metadata={"help": "truncate | drop rows longer than cutoff_len (counted in the manifest)"}
    )
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32 | fp16"})
    gradient_checkpointing: bool = False
    lm_head_positions: str = field(
        default="labelled",
        metadata={
            "help": "labelled: LM head + cross entropy on the completion's positions only (same loss; "
            "llama / mistral / qwen2 / qwen3, others fall back) | all: transformers' full-sequence logits"
        },
    )
    strategy: str = field(default="ddp", metadata={"help": "ddp | deepspeed"})
    zero_stage: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    deepspeed: dict = field(default_factory=dict, metadata={"help": "extra DeepSpeed config merged over the built one"})
    scaling: dict = field(
        default_factory=lambda: {"num_workers": 1, "use_gpu": False},
        metadata={"help": "ray.train.ScalingConfig kwargs (num_workers, use_gpu, resources_per_worker, ...)"},
    )
    storage_path: str | None = field(
        default=None,
        metadata={"help": "RunConfig storage (local dir, NFS or s3://...); None: <output_dir>/ray_storage"},
    )
    run_name: str = field(
        default="tokenskip-train",
        metadata={"help": "Ray Train run name; a restart with the same storage_path + run_name resumes"},
    )
    max_failures: int = field(default=0, metadata={"help": "FailureConfig.max_failures (-1: retry forever)"})
    checkpoint_every: int = field(default=50, metadata={"help": "optimizer steps between checkpoints (and at the end)"})
    num_to_keep: int = 2
    log_every: int = 1
    seed: int = 42
    ray: dict = field(
        default_factory=dict, metadata={"help": "ray.init kwargs for local runs (ignored when RAY_ADDRESS is set)"}
    )
    tracking: Any = field(default_factory=dict, metadata={"help": _TRACKING_HELP})

    def __post_init__(self) -> None:
        self.tracking = _tracking(self.tracking, "train.tracking")
        _positive(
            self,
            "learning_rate",
            "epochs",
            "micro_batch_size",
            "global_batch_size",
            "cutoff_len",
            "checkpoint_every",
            "num_to_keep",
            "log_every",
        )
        _positive(self, "max_steps", "max_rows", allow_none=True)
        _nonneg(self, "weight_decay", "gradient_clipping")
        _choice(self, "strategy", ("ddp", "deepspeed"))
        _choice(self, "zero_stage", (0, 1, 2, 3))
        _choice(self, "overlong", ("truncate", "drop"))
        _choice(self, "lm_head_positions", ("labelled", "all"))
        _choice(self, "precision", ("auto", "bf16", "fp32", "fp16"))
        _choice(self, "lr_scheduler", ("cosine", "linear", "constant"))
        if not (0.0 <= self.warmup_ratio < 1.0):
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ConfigError(f"train.max_failures must be an integer >= -1, got {self.max_failures!r}")
        if self.strategy == "deepspeed":
            if self.offload_params and self.zero_stage != 3:
                raise ConfigError(f"train.offload_params needs zero_stage 3 (got {self.zero_stage})")
            if self.offload_optimizer and self.zero_stage == 0:
                raise ConfigError("train.offload_optimizer needs zero_stage >= 1")
        elif self.offload_params or self.offload_optimizer:
            raise ConfigError("train.offload_params / offload_optimizer need strategy: deepspeed")
        workers = self.scaling.get("num_workers", 1)
        if not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"train.scaling.num_workers must be a positive integer, got {workers!r}")
        if self.global_batch_size % (self.micro_batch_size * workers):
            raise ConfigError(
                f"train.global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size "
                f"{self.micro_batch_size} x scaling.num_workers {workers}"
            )


@dataclass
class EvalConfig:
    """Stage 6: accuracy / tokens / latency / actual ratio per γ, with baselines."""

    model: str = "smollm2-135m-instruct"
    adapter: str | None = field(default=None, metadata={"help": "PEFT adapter directory (None: base model only)"})
    datasets: list[str] = field(default_factory=lambda: ["gsm8k"], metadata={"help": "gsm8k | math500 | a file/HF id"})
    split: str = "test"
    ratios: list[float] = field(default_factory=lambda: list(gamma.DEFAULT_RATIOS))
    limit: int | None = None
    output_dir: str | None = None
    max_new_tokens: int | None = field(default=None, metadata={"help": "None: 512 gsm8k / 1024 math"})
    budget_scales_with_ratio: bool = field(
        default=False, metadata={"help": "max tokens = max_len x γ (the paper's MATH setting)"}
    )
    baselines: list[str] = field(
        default_factory=lambda: ["original", "prompt", "truncation"],
        metadata={"help": "original | prompt | truncation | budget_forcing (cut CoT + forced answer)"},
    )
    force_answer_tokens: int = field(
        default=24, metadata={"help": "new tokens a forced answer may take (budget_forcing, hard_budgets)"}
    )
    hard_budgets: list[int] = field(
        default_factory=list,
        metadata={"help": "CoT-token budgets B: TokenSkip routed to fit B vs the base model, both capped at B"},
    )
    latency_samples: int = field(default=8, metadata={"help": "questions timed one at a time (batch size 1)"})
    engine_kwargs: dict = field(default_factory=dict)
    num_gpus: float = field(
        default=0.0, metadata={"help": "GPUs for the evaluation task (>0: runs inside a Ray task on a GPU node)"}
    )
    num_cpus: float = 1.0
    merge_adapter: str = field(
        default="auto",
        metadata={
            "help": "auto (merge the LoRA into the weights on CPU, where vLLM's LoRA path is ~20x slower) "
            "| true | false"
        },
    )
    placement: str = field(
        default="auto",
        metadata={"help": "auto (Ray task when RAY_ADDRESS is set or num_gpus > 0, else the driver) | driver | ray"},
    )
    seed: int = 0
    grader: str | None = field(
        default=None,
        metadata={
            "help": "None/ours (tokenskip.grading) | math_verify | both "
            "(correct only when both agree; results.json lists disagreements)"
        },
    )
    tracking: Any = field(default_factory=dict, metadata={"help": _TRACKING_HELP})

    def __post_init__(self) -> None:
        self.tracking = _tracking(self.tracking, "eval.tracking")
        if self.grader is not None:
            _choice(self, "grader", ("ours", "math_verify", "both"))
        self.ratios = _ratios(self.ratios, "eval.ratios", unique=True)
        _choice(self, "placement", ("auto", "driver", "ray"))
        _choice(self, "merge_adapter", ("auto", "true", "false"))
        _positive(self, "limit", "max_new_tokens", allow_none=True)
        _nonneg(self, "latency_samples", "num_gpus", "num_cpus")
        bad = set(self.baselines) - {"original", "prompt", "truncation", "budget_forcing"}
        if bad:
            raise ConfigError(
                f"eval.baselines: unknown {sorted(bad)} (valid: original, prompt, truncation, budget_forcing)"
            )
        _positive(self, "force_answer_tokens")
        if not isinstance(self.hard_budgets, (list, tuple)):
            raise ConfigError(f"eval.hard_budgets must be a list of token counts, got {self.hard_budgets!r}")
        for i, b in enumerate(self.hard_budgets):
            if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
                raise ConfigError(f"eval.hard_budgets[{i}] must be a positive whole number of tokens, got {b!r}")
            if self.max_new_tokens is not None and b > self.max_new_tokens:
                raise ConfigError(
                    f"eval.hard_budgets[{i}] = {b} exceeds eval.max_new_tokens = {self.max_new_tokens} "
                    "(a budget above the cap is never reached)"
                )
        if len(set(self.hard_budgets)) != len(self.hard_budgets):
            raise ConfigError(f"eval.hard_budgets has duplicates: {list(self.hard_budgets)}")
        self.hard_budgets = sorted(self.hard_budgets)
        if not self.datasets:
            raise ConfigError("eval.datasets must not be empty")


@dataclass
class PipelineConfig:
    """One experiment: generate -> select CoTs -> prune -> build SFT -> train -> evaluate."""

    name: str = "experiment"
    run_dir: str = field(
        default="runs/experiment", metadata={"help": "all artifacts go under here (local path or cloud URI)"}
    )
    model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "target model; stages inherit it unless they set their own"}
    )
    stages: list[str] = field(default_factory=lambda: ["generate", "prune", "build_sft", "train", "evaluate"])
    ray: dict = field(
        default_factory=dict, metadata={"help": "ray.init kwargs for local runs (ignored when RAY_ADDRESS is set)"}
    )
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    cots: CotsConfig = field(default_factory=CotsConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    build_sft: BuildSFTConfig = field(default_factory=BuildSFTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tracking: Any = field(default_factory=dict, metadata={"help": _TRACKING_HELP})

    def __post_init__(self) -> None:
        self.tracking = _tracking(self.tracking, "tracking")
        if not self.stages:  # (a blank name, run_dir or model is refused by _build, as in every section)
            raise ConfigError(f"pipeline.stages must not be empty (valid: {list(STAGES)})")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"pipeline.stages: unknown stage(s) {bad} (valid: {list(STAGES)})")
        if "build_sft" in self.stages and self.build_sft.pruned is None:  # it reads this run's prune stage
            pruned = {gamma.canonical(r) for r in self.prune.ratios} | {1.0}
            missing = [r for r in self.build_sft.ratios if gamma.canonical(r) not in pruned]
            if missing:
                raise ConfigError(
                    f"build_sft.ratios {missing} are not among prune.ratios {self.prune.ratios}, so no pruned CoT "
                    "would exist for them (γ 1.0 is the unpruned CoT): add them to prune.ratios or drop them"
                )


# The stages a pipeline's ``stages`` may name (the table, pipelines/stages.py, orders and wires
# them; ``cots`` also runs whenever prune or build_sft does).
STAGES = ("generate", "cots", "prune", "build_sft", "train", "evaluate")
KINDS: dict[str, type] = {
    "pipeline": PipelineConfig,
    "generate": GenerateConfig,
    "cots": CotsConfig,
    "prune": PruneConfig,
    "build_sft": BuildSFTConfig,
    "train": TrainConfig,
    "evaluate": EvalConfig,
}

# Keys that left a section for another one: an old YAML that still has them gets an error
# saying where they went (config class -> {old key: new dotted key}).
MOVED_KEYS: dict[type, dict[str, str]] = {
    BuildSFTConfig: {
        k: f"cots.{k}" for k in ("generations", "data", "cot_source", "max_cot_tokens", "target_tokenizer")
    },
}

# --------------------------------------------------------------------------- loading


def _origin_name(source: str | os.PathLike | None) -> str:
    return str(source) if source is not None else "<dict>"


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str, origin: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {where} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, where, origin)
    base = typing.get_origin(tp)
    try:
        if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise TypeError from None
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{origin}: {where} must be a finite number, got {value!r}")
            return float(value)
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if tp is bool and not isinstance(value, bool):
            raise TypeError
        if tp in (int, str) and not isinstance(value, tp):
            if tp is str and isinstance(value, (int, float)):
                return str(value)
            raise TypeError
        if base is list:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            (item_tp,) = typing.get_args(tp) or (Any,)
            return [_coerce(v, item_tp, f"{where}[{i}]", origin) for i, v in enumerate(value)]
        if tp is dict or base is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except TypeError:
        raise ConfigError(
            f"{origin}: {where} has the wrong type: expected {getattr(tp, '__name__', tp)}, got {value!r}"
        ) from None
    return value


def _build(cls: type, data: dict, prefix: str, origin: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else key
            moved = MOVED_KEYS.get(cls, {}).get(key)
            if moved:
                section = moved.split(".")[0]
                was = dotted if prefix else f"{next(k for k, v in KINDS.items() if v is cls)}.{key}"
                raise ConfigError(
                    f"{origin}: {was} moved to {moved} (the {section} stage's section of a pipeline YAML; "
                    f"in a stage YAML: kind: {section})"
                )
            raise ConfigError(f"{origin}: unknown key '{dotted}' (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            _check_finite(data[f.name], dotted, origin)
            if f.name in ("run_dir", "output_dir"):
                check_local_dir(data[f.name], f"{origin}: {dotted}")
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], dotted, origin)
            if hints[f.name] is str and not str(kwargs[f.name] or "").strip():  # a model, a dataset name, …
                raise ConfigError(f"{origin}: {dotted} must not be empty")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{origin}: {e}") from None
    except TypeError as e:  # a value of the wrong shape reached a check: name the key that causes it
        bad = []
        for name, value in kwargs.items():
            try:
                cls(**{name: value})
            except TypeError:
                bad.append(f"{prefix}.{name}" if prefix else name)
            except Exception:
                pass
        keys = ", ".join(f"{k} = {data[k.rsplit('.', 1)[-1]]!r}" for k in bad) or (prefix or cls.__name__)
        raise ConfigError(f"{origin}: {keys}: value of the wrong type ({e})") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` (value read as YAML).

    >>> parse_override("train.lora.r=16")
    (['train', 'lora', 'r'], 16)
    >>> parse_override("prune.ratios=[0.5, 0.7]")
    (['prune', 'ratios'], [0.5, 0.7])
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if data is None or data == {}:  # an empty file would silently run every default (a whole dataset)
        raise ConfigError(f"{p}: empty config (no keys); name at least its kind and model, e.g. `kind: pipeline`")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(
    cls: type,
    path: str | os.PathLike | None = None,
    overrides: typing.Iterable[str] = (),
    data: dict | None = None,
    *,
    origin: str | None = None,
) -> Any:
    """Build ``cls`` from defaults, then the YAML at ``path`` (or ``data``), then overrides.
    Errors name ``origin`` (default: the path, or ``<dict>``).

    A ``kind:`` key in the file must match ``cls``; a pipeline YAML passed to a stage
    loader yields that stage's section with the pipeline's model filled in.
    """
    origin = origin or _origin_name(path)
    raw = read_yaml(path) if path is not None else dict(data or {})
    kind = raw.pop("kind", None)
    want = next((k for k, v in KINDS.items() if v is cls), None)
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"{origin}: unknown kind {kind!r} (valid: {', '.join(KINDS)})")
    if kind == "pipeline" and want not in (None, "pipeline"):
        pipe = load_config(
            PipelineConfig,
            data=dict(raw, kind="pipeline"),
            overrides=[o if o.startswith(want + ".") else f"{want}.{o}" for o in overrides],
            origin=origin,
        )
        return stage_config(pipe, want)
    if kind is not None and want is not None and kind != want:
        raise ConfigError(f"{origin}: kind {kind!r} cannot be loaded as {want!r}")
    raw = apply_overrides(raw, overrides)
    return _build(cls, raw, "", origin)


def load_any(path: str | os.PathLike, overrides: typing.Iterable[str] = ()) -> Any:
    """Load a YAML whose ``kind:`` names its config class."""
    raw = read_yaml(path)
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{path}: missing or unknown 'kind' {kind!r} (valid: {', '.join(KINDS)})")
    return load_config(KINDS[kind], path, overrides)


def stage_config(pipe: PipelineConfig, stage: str) -> Any:
    """The section of a pipeline config for one stage: the pipeline's model filled in and
    ``output_dir`` under ``run_dir``. The directories a stage reads from other stages (its
    inputs) are wired by the stage table, ``pipelines.stages.stage_config``."""
    run = pipe.run_dir.rstrip("/")
    cfg = dataclasses.replace(getattr(pipe, stage))
    defaults = KINDS[stage]()
    if hasattr(cfg, "model") and cfg.model == defaults.model:
        cfg.model = pipe.model
    if hasattr(cfg, "target_tokenizer") and cfg.target_tokenizer == defaults.target_tokenizer:
        cfg.target_tokenizer = pipe.model
    if getattr(cfg, "output_dir", None) is None:
        cfg.output_dir = f"{run}/{stage}"
    if stage == "cots":  # gold CoTs: by default the questions the generate stage reads
        cfg.data = cfg.data if cfg.data != DataSourceConfig() else pipe.generate.data
    return cfg


def to_dict(cfg: Any) -> dict:
    """Resolved config as plain data (for manifests)."""
    return dataclasses.asdict(cfg)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for the configuration reference."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = _unwrap_optional(typing.get_type_hints(cls)[f.name])
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
