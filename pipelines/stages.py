"""The stage table: every stage of the experiment declared once.

A :class:`Stage` names its config class and the pipeline section it reads, the upstream
stages whose directories it reads (``inputs``: config field -> upstream stage directory,
relative to ``run_dir``), the files it writes (``outputs``), its run function, whether it
needs Ray, and the input errors it reports as a one-line message. The order of
:data:`STAGES` is the pipeline order. ``ray_jobs.runner`` runs any part of this table (the
whole pipeline, the data half, one stage) the same way.

Adding a stage: a row here and the module with its ``run_<name>(cfg, force=...)``.

>>> [s.name for s in STAGES.values()]
['generate', 'cots', 'prune', 'build_sft', 'train', 'evaluate']
>>> plan(["generate", "prune", "build_sft"])
['generate', 'cots', 'prune', 'build_sft']
>>> plan(["build_sft", "train"])
['cots', 'build_sft', 'train']
>>> {s.name: s.inputs for s in STAGES.values() if s.name in ("cots", "prune", "build_sft")}
{'cots': {'generations': 'generate'}, 'prune': {'input': 'cots'}, 'build_sft': {'cots_dir': 'cots', 'pruned': 'prune'}}
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


def _counts(m: dict, *keys: str) -> str:
    c = m.get("counts") or {}
    return ", ".join(f"{k} {c[k]}" for k in keys if k in c)


def _evaluate_summary(m: dict) -> str:
    out = Path((m.get("config") or {}).get("output_dir") or ".")
    parts = []
    try:
        import json

        res = json.loads((out / "results.json").read_text())
        for name, ds in res.get("datasets", {}).items():
            for c in ds.get("conditions", []):
                acc = c.get("accuracy")
                if acc is not None:
                    parts.append(f"{c.get('id')} {100 * acc:.1f}%")
            parts = [f"{name}: " + ", ".join(parts)] if parts else []
    except (OSError, ValueError):
        pass
    return "; ".join(parts) or f"{len(m.get('counts') or {})} conditions"


def _train_summary(m: dict) -> str:
    fm = m.get("final_metrics") or {}
    bits = [_counts(m, "kept", "workers")]
    if isinstance(fm.get("step"), (int, float)):
        bits.append(f"steps {fm['step']}")
    if isinstance(fm.get("loss"), (int, float)):
        bits.append(f"final loss {fm['loss']:.4f}")
    if m.get("adapter"):
        bits.append(f"adapter {m['adapter']}")
    return ", ".join(b for b in bits if b)


@dataclass(frozen=True)
class Stage:
    name: str
    what: str  # what the console says it is doing
    section: str  # the pipeline config section (and stage ``kind:``) it is configured by
    run: str  # "module:function" taking (config, force=...) and returning the manifest
    inputs: dict[str, str] = field(default_factory=dict)  # config field -> upstream dir under run_dir
    outputs: tuple[str, ...] = ()
    uses_ray: bool | str = False  # or "module:function" deciding from the config
    errors: tuple[str, ...] = ()  # "module:Class" input errors reported as one line (exit 2)
    summary: Callable[[dict], str] = lambda m: ", ".join(
        f"{k} {v}" for k, v in (m.get("counts") or {}).items() if isinstance(v, (int, float))
    )
    prepare: str | None = None  # "module:function" run in the driver before Ray starts
    wanted_by: tuple[str, ...] = ()  # also planned whenever one of these stages is

    def function(self) -> Callable[..., dict]:
        return _resolve(self.run)

    def error_types(self) -> tuple[type[BaseException], ...]:
        return tuple(_resolve(e) for e in self.errors)


def _resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


_INPUT_ERRORS = ("builtins:FileNotFoundError", "builtins:ValueError", "builtins:KeyError", "tokenskip.data:DataError")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "generate",
            "generating CoTs with the target model (Ray Data + vLLM)",
            "generate",
            "pipelines.generate:run_generate",
            outputs=("data.parquet", "rejects.jsonl"),
            uses_ray=True,
            errors=_INPUT_ERRORS,
            summary=lambda m: _counts(m, "generated", "correct", "accuracy", "rejected"),
        ),
        Stage(
            "cots",
            "selecting CoTs (graded, length-filtered, or gold)",
            "cots",
            "pipelines.build_sft:select_cots",
            inputs={"generations": "generate"},
            outputs=("data.parquet", "rejects.jsonl"),
            errors=_INPUT_ERRORS,
            summary=lambda m: _counts(m, "total", "kept", "rejected", "mean_cot_tokens"),
            wanted_by=("prune", "build_sft"),
        ),
        Stage(
            "prune",
            "pruning CoTs at every γ (Ray Data actor pool)",
            "prune",
            "pipelines.prune:run_prune",
            inputs={"input": "cots"},
            outputs=("data.parquet", "rejects.jsonl"),
            uses_ray=True,
            errors=_INPUT_ERRORS,
            summary=lambda m: _counts(m, "input", "rows", "rejected"),
            prepare="tokenskip.assets:ensure_tiktoken",
        ),
        Stage(
            "build_sft",
            "building the SFT set (γ per question, train/validation)",
            "build_sft",
            "pipelines.build_sft:run_build_sft",
            inputs={"cots_dir": "cots", "pruned": "prune"},
            outputs=("train.parquet", "validation.parquet"),
            errors=_INPUT_ERRORS,
            summary=lambda m: _counts(m, "cots", "train", "validation", "rejected"),
        ),
        Stage(
            "train",
            "LoRA SFT on Ray Train",
            "train",
            "pipelines.train:run_train",
            inputs={"dataset": "build_sft"},
            outputs=("adapter/", "steps.jsonl"),
            uses_ray=True,
            errors=("tokenskip.training:TrainDataError",),
            summary=_train_summary,
        ),
        Stage(
            "evaluate",
            "evaluating every γ and baseline (vLLM)",
            "evaluate",
            "pipelines.evaluate:run_evaluate",
            inputs={"adapter": "train/adapter"},
            outputs=("results.json", "table.md", "*.png", "samples/"),
            uses_ray="pipelines.evaluate:_use_ray",
            errors=("pipelines.evaluate:EvalInputError", "tokenskip.data:DataError"),
            summary=_evaluate_summary,
        ),
    )
}


def plan(wanted: Iterable[str]) -> list[str]:
    """The stages to run for the user-facing ``stages`` list, in table order (stages that
    others read, like ``cots``, join whenever one of their readers is planned)."""
    wanted = set(wanted)
    wanted |= {s.name for s in STAGES.values() if wanted & set(s.wanted_by)}
    return [name for name in STAGES if name in wanted]


def stage_config(pipe: Any, name: str) -> Any:
    """One stage's config from a pipeline config: its section (model and output_dir filled in
    by :func:`tokenskip.config.stage_config`), its ``inputs`` wired to the upstream stage
    directories under ``run_dir`` (unless set in the YAML), and the pipeline's ``ray``."""
    from tokenskip.config import stage_config as section_config

    st = STAGES[name]
    cfg = section_config(pipe, st.section)
    run = pipe.run_dir.rstrip("/")
    changes = {}
    for fld, upstream in st.inputs.items():
        if upstream.split("/")[0] == "train" and "train" not in pipe.stages:
            continue  # evaluate without a trained adapter: the base model (or its own adapter)
        if getattr(cfg, fld, None) is None:
            changes[fld] = f"{run}/{upstream}"
    if hasattr(cfg, "ray") and not cfg.ray:
        changes["ray"] = dict(pipe.ray)
    return dataclasses.replace(cfg, **changes) if changes else cfg
