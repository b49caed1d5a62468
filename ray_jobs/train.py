"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- python -m ray_jobs.train --config configs/train/smollm2-cpu.yaml

LoRA SFT of the TokenSkip adapter as a Ray Train job (TorchTrainer; plain DDP or
DeepSpeed ZeRO-2/3, optional CPU offload), writing the train stage directory: adapter/
(a standard PEFT adapter that vLLM loads), steps.jsonl (rank-0 per-step log) and
manifest.json. Takes a ``kind: train`` YAML or a ``kind: pipeline`` YAML (its ``train``
section). Resumes from the latest checkpoint after a worker failure (FailureConfig) or
a restart with the same storage_path + run_name; a finished stage is skipped unless --force.

Locally: ``tokenskip train -c configs/train/smollm2-cpu.yaml dataset=runs/x/build_sft max_steps=4``.
"""

from __future__ import annotations

import sys

from ray_jobs import runner


def _summary(cfg, m: dict) -> dict:
    return {
        "output_dir": cfg.output_dir,
        "adapter": m.get("adapter"),
        "counts": m["counts"],
        "final_metrics": m.get("final_metrics"),
    }


def main(argv: list[str] | None = None) -> int:
    return runner.single_stage("train", "tokenskip train", __doc__, argv, _summary)


if __name__ == "__main__":
    sys.exit(main())
