"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- python -m ray_jobs.generate --config configs/data/gsm8k-smollm2-gold.yaml

Generate CoTs with the target model (Ray Data + vLLM), grade them, and write the
generate stage directory (data.parquet, rejects.jsonl, manifest.json). Takes a
``kind: generate`` YAML or a ``kind: pipeline`` YAML (its ``generate`` section, its
``run_dir`` and its ``ray`` settings). Resumable: committed parts survive a crash and a
re-run generates only the missing questions; a finished stage is skipped unless --force.

Locally: ``tokenskip generate -c configs/data/gsm8k-smollm2-gold.yaml generate.data.limit=32``.
"""

from __future__ import annotations

import sys

from ray_jobs import runner


def main(argv: list[str] | None = None) -> int:
    return runner.single_stage(
        "generate",
        "tokenskip generate",
        __doc__,
        argv,
        lambda cfg, m: {"output_dir": cfg.output_dir, "counts": m["counts"]},
    )


if __name__ == "__main__":
    sys.exit(main())
