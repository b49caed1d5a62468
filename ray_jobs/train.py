"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m ray_jobs.train --config configs/train/smollm2-cpu.yaml

LoRA SFT of the TokenSkip adapter as a Ray Train job (TorchTrainer; plain DDP or
DeepSpeed ZeRO-2/3, optional CPU offload), writing the train stage directory: adapter/
(a standard PEFT adapter that vLLM loads), steps.jsonl (rank-0 per-step log) and
manifest.json. Takes a ``kind: train`` YAML or a ``kind: pipeline`` YAML (its ``train``
section). Resumes from the latest checkpoint after a worker failure (FailureConfig) or
a restart with the same storage_path + run_name; a finished stage is skipped unless --force.

Locally: ``tokenskip train -c configs/train/smollm2-cpu.yaml dataset=runs/x/build_sft max_steps=4``.
"""

from __future__ import annotations

import json
import sys

from ray_jobs._args import load_stage, parser, setup_logging


def load(path: str, overrides: list[str]):
    """TrainConfig (with ``ray`` filled from a pipeline YAML's ``ray`` section)."""
    return load_stage(path, overrides, "train")[0]


def main(argv: list[str] | None = None) -> int:
    args = parser("tokenskip train", __doc__.split("\n", 2)[2]).parse_args(argv)
    setup_logging()
    from tokenskip.config import ConfigError
    from tokenskip.training import TrainDataError

    try:
        cfg = load(args.config, args.overrides)
        from pipelines.train import run_train

        manifest = run_train(cfg, force=args.force)
    except (ConfigError, TrainDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output_dir": cfg.output_dir, "adapter": manifest.get("adapter"), "counts": manifest["counts"],
                      "final_metrics": manifest.get("final_metrics")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
