"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m ray_jobs.build_dataset --config configs/data/gsm8k-smollm2-gold.yaml

The data half of TokenSkip from one ``kind: pipeline`` YAML: generate (Ray Data + vLLM)
-> select CoTs (grade + length filter, or gold solutions) -> prune (every γ from one
scoring pass) -> build the SFT set (γ per question, train/validation split). Only the
stages named in ``stages`` among generate / prune / build_sft run; the CoT selection runs
whenever prune or build_sft does. Every stage is skipped when its manifest exists, so a
re-run after a crash resumes; ``--force`` redoes every stage.

Outputs: ``<run_dir>/generate``, ``<run_dir>/cots``, ``<run_dir>/prune``, ``<run_dir>/build_sft``.
Locally: ``tokenskip build-sft -c configs/data/gsm8k-smollm2-gold.yaml generate.data.limit=64``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from ray_jobs._args import parser, setup_logging

log = logging.getLogger("tokenskip.build_dataset")
DATA_STAGES = ("generate", "cots", "prune", "build_sft")


def plan(pipe) -> list[str]:
    wanted = set(pipe.stages) & {"generate", "prune", "build_sft"}
    if wanted & {"prune", "build_sft"}:
        wanted.add("cots")
    return [s for s in DATA_STAGES if s in wanted]


def run(pipe, force: bool = False) -> dict:
    """Run the data stages of ``pipe``; returns {stage: manifest}."""
    from tokenskip.config import stage_config

    run_dir = Path(pipe.run_dir)
    build_cfg = dataclasses.replace(stage_config(pipe, "build_sft"), cots_dir=str(run_dir / "cots"))
    results: dict[str, dict] = {}
    for stage in plan(pipe):
        t0 = time.time()
        log.info("stage %s", stage)
        if stage == "generate":
            from pipelines.generate import run_generate

            results[stage] = run_generate(stage_config(pipe, "generate"), force=force)
        elif stage == "cots":
            from pipelines.build_sft import select_cots

            results[stage] = select_cots(build_cfg, force=force)
        elif stage == "prune":
            from pipelines.prune import run_prune

            prune_cfg = stage_config(pipe, "prune")
            prune_cfg.input = prune_cfg.input or str(run_dir / "cots")
            results[stage] = run_prune(prune_cfg, force=force)
        elif stage == "build_sft":
            from pipelines.build_sft import run_build_sft

            results[stage] = run_build_sft(build_cfg, force=force)
        log.info("stage %s done in %.1f s: %s", stage, time.time() - t0, results[stage].get("counts"))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parser("tokenskip build-sft", __doc__.split("\n", 2)[2]).parse_args(argv)
    setup_logging()
    from tokenskip.config import ConfigError, PipelineConfig, load_config

    try:
        pipe = load_config(PipelineConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from pipelines.common import init_ray

    if {"generate", "prune"} & set(pipe.stages):
        init_ray(pipe.ray)
    from tokenskip.artifacts import StageError

    try:
        results = run(pipe, force=args.force)
    except StageError as e:
        print(f"tokenskip build-sft: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"run_dir": pipe.run_dir, "counts": {k: v.get("counts") for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
