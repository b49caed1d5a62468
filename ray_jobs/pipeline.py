"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- python -m ray_jobs.pipeline --config configs/quickstart.yaml

The whole TokenSkip experiment from one YAML: generate -> select CoTs -> prune ->
build SFT -> train -> evaluate. Every stage writes its manifest last and is skipped on a
re-run when that manifest exists, so a re-run picks up where the last one stopped
(``--force`` redoes all, ``--force-stage NAME`` redoes one stage and everything after it).
Artifacts live under ``run_dir``, each stage's engine and Ray logs in ``run_dir/logs/``;
the run ends with the evaluation table, plots, the adapter path and the command that serves it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipelines.stages import STAGES, plan, stage_config
from ray_jobs import runner
from tokenskip import tracking

ORDER = tuple(STAGES)


def run_pipeline(pipe, force: bool = False, force_stage: str | None = None, console=None) -> dict:
    """Run the pipeline's stages (Ray started once); writes and returns ``run_dir/summary.json``'s content."""
    from ray_jobs.console import Console
    from tokenskip.artifacts import atomic_write_json

    own = console is None
    console = console or Console()
    try:
        steps = [(name, stage_config(pipe, name)) for name in plan(pipe.stages)]
        Path(pipe.run_dir).mkdir(parents=True, exist_ok=True)
        mlflow_runs = tracking.PipelineTracking(pipe)  # one MLflow run, a child run per stage
        steps = mlflow_runs.start(steps)
        results, timings = runner.run_stages(
            steps, console, ray_kwargs=pipe.ray, force=force, force_stage=force_stage, in_pipeline=True
        )
    finally:
        if own:
            console.close()
    summary = summarize(pipe, results, timings)
    atomic_write_json(Path(pipe.run_dir) / "summary.json", summary)
    mlflow_runs.finish(steps, results, timings)
    return summary


def summarize(pipe, results: dict, timings: dict) -> dict:
    run_dir = Path(pipe.run_dir)
    summary: dict = {
        "name": pipe.name,
        "run_dir": str(run_dir),
        "stage_seconds": timings,
        "counts": {k: v.get("counts", {}) for k, v in results.items()},
        "logs": str(run_dir / "logs"),
    }
    if "train" in pipe.stages:
        adapter = Path(stage_config(pipe, "train").output_dir) / "adapter"
        summary["adapter"] = str(adapter)
        ev_results = Path(stage_config(pipe, "evaluate").output_dir) / "results.json"
        adapters = f"[{{name: {pipe.name}, path: {adapter}, eval_results: {ev_results}}}]"
        summary["serve_command"] = (
            f"tokenskip serve --config serving/serve_config.yaml model={pipe.model} "
            f"model_id={pipe.model} 'adapters={adapters}'"
        )
        summary["serve_model"] = f"{pipe.model}:{pipe.name}"
    if "evaluate" in pipe.stages:
        ev = Path(stage_config(pipe, "evaluate").output_dir)
        summary["evaluation"] = {
            "table": str(ev / "table.md"),
            "results": str(ev / "results.json"),
            "plots": sorted(str(p) for p in ev.glob("*.png")),
        }
    return summary


def print_summary(summary: dict, write=print) -> None:
    write("\n" + "=" * 72)
    write(f"tokenskip run '{summary['name']}' finished - artifacts in {summary['run_dir']}")
    write("stage times (s): " + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items()))
    ev = summary.get("evaluation")
    if ev and Path(ev["table"]).is_file():
        write("\n" + Path(ev["table"]).read_text())
        write("plots: " + ", ".join(ev["plots"]))
    if "adapter" in summary:
        write(f"\nadapter: {summary['adapter']}")
        write(f"serve it: {summary['serve_command']}")
    write("=" * 72)


def main(argv: list[str] | None = None) -> int:
    def add_args(p) -> None:
        p.add_argument("--force-stage", choices=ORDER, help="redo this stage and every later one")

    def build(args) -> dict:
        pipe = runner.load_pipeline(args.config, args.overrides)
        Path(pipe.run_dir).mkdir(parents=True, exist_ok=True)
        mlflow_runs = tracking.PipelineTracking(pipe)  # one MLflow run, a child run per stage
        steps = mlflow_runs.start([(name, stage_config(pipe, name)) for name in plan(pipe.stages)])

        def done(results: dict, timings: dict, console) -> None:
            from tokenskip.artifacts import atomic_write_json

            summary = summarize(pipe, results, timings)
            atomic_write_json(Path(pipe.run_dir) / "summary.json", summary)
            mlflow_runs.finish(steps, results, timings)
            print_summary(summary, console.result)
            console.result(json.dumps({"summary": str(Path(pipe.run_dir) / "summary.json")}))

        return {
            "steps": steps,
            "ray": pipe.ray,
            "force_stage": args.force_stage,
            "in_pipeline": True,
            "done": done,
        }

    return runner.main("tokenskip pipeline", argv, build, doc=runner.doc_body(__doc__), add_args=add_args)


if __name__ == "__main__":
    sys.exit(main())
