"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m ray_jobs.pipeline --config configs/quickstart.yaml

The whole TokenSkip experiment from one YAML: generate -> select CoTs -> prune ->
build SFT -> train -> evaluate. Every stage writes its manifest last and is skipped on a
re-run when that manifest exists, so a re-run picks up where the last one stopped
(``--force`` redoes all, ``--force-stage NAME`` redoes one stage and everything after it).
Artifacts live under ``run_dir``; the run ends with the evaluation table, plots, the
adapter path and the command that serves it.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
from pathlib import Path

from ray_jobs._args import parser, setup_logging

log = logging.getLogger("tokenskip.pipeline")

ORDER = ("generate", "cots", "prune", "build_sft", "train", "evaluate")
# stage -> (module, function taking (stage config, force=...), config section it reads)
RUNNERS = {
    "generate": ("pipelines.generate", "run_generate", "generate"),
    "cots": ("pipelines.build_sft", "select_cots", "build_sft"),
    "prune": ("pipelines.prune", "run_prune", "prune"),
    "build_sft": ("pipelines.build_sft", "run_build_sft", "build_sft"),
    "train": ("pipelines.train", "run_train", "train"),
    "evaluate": ("pipelines.evaluate", "run_evaluate", "evaluate"),
}


def _stage_plan(pipe) -> list[str]:
    """Stages to run, in order. ``cots`` (grade + filter, or gold CoTs) runs whenever
    prune or build_sft does, since both read it."""
    wanted = set(pipe.stages)
    if wanted & {"prune", "build_sft"}:
        wanted.add("cots")
    return [s for s in ORDER if s in wanted]


def run_pipeline(pipe, force: bool = False, force_stage: str | None = None) -> dict:
    from pipelines.common import init_ray
    from tokenskip.artifacts import ConfigChanged
    from tokenskip.config import stage_config

    init_ray(pipe.ray)
    run_dir = Path(pipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = _stage_plan(pipe)
    forcing = force
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for i, stage in enumerate(plan, 1):
        if force_stage and stage == force_stage:
            forcing = True
        t0 = time.time()
        log.info("[%d/%d] stage %s%s", i, len(plan), stage, " (forced)" if forcing else "")
        module, func, section = RUNNERS[stage]
        runner = getattr(importlib.import_module(module), func)
        try:
            results[stage] = runner(stage_config(pipe, section), force=forcing)
        except ConfigChanged as e:
            raise ConfigChanged(f"stage {stage}: {e} (in a pipeline: --force-stage {stage} redoes it and every later "
                                f"stage)") from None
        timings[stage] = round(time.time() - t0, 1)
        log.info("[%d/%d] stage %s done in %.1f s", i, len(plan), stage, timings[stage])
    summary = summarize(pipe, results, timings)
    from tokenskip.artifacts import atomic_write_json

    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def summarize(pipe, results: dict, timings: dict) -> dict:
    from tokenskip.config import stage_config

    run_dir = Path(pipe.run_dir)
    summary: dict = {"name": pipe.name, "run_dir": str(run_dir), "stage_seconds": timings,
                     "counts": {k: v.get("counts", {}) for k, v in results.items()}}
    if "train" in pipe.stages:
        adapter = Path(stage_config(pipe, "train").output_dir) / "adapter"
        summary["adapter"] = str(adapter)
        ev_results = Path(stage_config(pipe, "evaluate").output_dir) / "results.json"
        adapters = f"[{{name: {pipe.name}, path: {adapter}, eval_results: {ev_results}}}]"
        summary["serve_command"] = (f"tokenskip serve --config serving/serve_config.yaml model={pipe.model} "
                                    f"model_id={pipe.model} 'adapters={adapters}'")
        summary["serve_model"] = f"{pipe.model}:{pipe.name}"
    if "evaluate" in pipe.stages:
        ev = Path(stage_config(pipe, "evaluate").output_dir)
        summary["evaluation"] = {"table": str(ev / "table.md"), "results": str(ev / "results.json"),
                                 "plots": sorted(str(p) for p in ev.glob("*.png"))}
    return summary


def print_summary(summary: dict) -> None:
    out = sys.stdout
    print("\n" + "=" * 72, file=out)
    print(f"tokenskip run '{summary['name']}' finished - artifacts in {summary['run_dir']}", file=out)
    print("stage times (s): " + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items()), file=out)
    ev = summary.get("evaluation")
    if ev and Path(ev["table"]).is_file():
        print("\n" + Path(ev["table"]).read_text(), file=out)
        print("plots: " + ", ".join(ev["plots"]), file=out)
    if "adapter" in summary:
        print(f"\nadapter: {summary['adapter']}", file=out)
        print(f"serve it: {summary['serve_command']}", file=out)
    print("=" * 72, file=out)


def main(argv: list[str] | None = None) -> int:
    from tokenskip.config import ConfigError, PipelineConfig, load_config

    p = parser("tokenskip pipeline", __doc__.split("\n", 2)[2])
    p.add_argument("--force-stage", choices=ORDER, help="redo this stage and every later one")
    args = p.parse_args(argv)
    setup_logging()
    try:
        pipe = load_config(PipelineConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from tokenskip.artifacts import ConfigChanged

    try:
        summary = run_pipeline(pipe, force=args.force, force_stage=args.force_stage)
    except ConfigChanged as e:
        print(f"tokenskip pipeline: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    print(json.dumps({"summary": str(Path(pipe.run_dir) / "summary.json")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
