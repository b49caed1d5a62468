"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- python -m ray_jobs.build_dataset --config configs/data/gsm8k-smollm2-gold.yaml

The data half of TokenSkip from one ``kind: pipeline`` YAML: generate (Ray Data + vLLM)
-> select CoTs (grade + length filter, or gold solutions) -> prune (every γ from one
scoring pass) -> build the SFT set (γ per question, train/validation split). Only the
stages named in ``stages`` among generate / cots / prune / build_sft run; the CoT selection
(``cots``) runs whenever prune or build_sft does. Every stage is skipped when its manifest
exists, so a re-run after a crash resumes; ``--force`` redoes every stage.

Outputs: ``<run_dir>/generate``, ``<run_dir>/cots``, ``<run_dir>/prune``, ``<run_dir>/build_sft``
(logs in ``<run_dir>/logs/``).
Locally: ``tokenskip build-sft -c configs/data/gsm8k-smollm2-gold.yaml generate.data.limit=64``.
"""

from __future__ import annotations

import json
import sys

from pipelines.stages import plan as stage_plan
from pipelines.stages import stage_config
from ray_jobs import runner

DATA_STAGES = ("generate", "cots", "prune", "build_sft")


def plan(pipe) -> list[str]:
    """The data stages of ``pipe`` to run, in order."""
    return [s for s in stage_plan(set(pipe.stages) & set(DATA_STAGES)) if s in DATA_STAGES]


def run(pipe, force: bool = False) -> dict:
    """Run the data stages of ``pipe`` (in this process, on its Ray); returns {stage: manifest}."""
    from ray_jobs.console import Console

    console = Console()
    try:
        steps = [(name, stage_config(pipe, name)) for name in plan(pipe)]
        try:
            return runner.run_stages(steps, console, ray_kwargs=pipe.ray, force=force)[0]
        except runner.StageFailed as e:
            raise e.__cause__ or e
    finally:
        console.close()


def main(argv: list[str] | None = None) -> int:
    def build(args) -> dict:
        pipe = runner.load_pipeline(args.config, args.overrides)

        def done(results: dict, timings: dict, console) -> None:
            console.result(
                json.dumps({"run_dir": pipe.run_dir, "counts": {k: v.get("counts") for k, v in results.items()}})
            )

        return {"steps": [(name, stage_config(pipe, name)) for name in plan(pipe)], "ray": pipe.ray, "done": done}

    return runner.main("tokenskip build-sft", argv, build, doc=runner.doc_body(__doc__))


if __name__ == "__main__":
    sys.exit(main())
