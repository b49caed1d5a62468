"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- python -m ray_jobs.cots --config configs/data/gsm8k-smollm2-gold.yaml

Select the CoTs to prune: the generate stage's correct CoTs within ``max_cot_tokens``
(``cot_source: generated``), or the dataset's own worked solutions counted in target-model
tokens (``cot_source: gold``); writes the cots stage directory (data.parquet,
rejects.jsonl, manifest.json). Light: runs in the driver, without Ray. Takes a ``kind: cots``
YAML or a ``kind: pipeline`` YAML (its ``cots`` section, inputs under its ``run_dir``). A
finished stage is skipped unless --force.

Locally: ``tokenskip cots -c configs/data/gsm8k-smollm2-gold.yaml max_cot_tokens=300``.
"""

from __future__ import annotations

import sys

from ray_jobs import runner


def main(argv: list[str] | None = None) -> int:
    return runner.single_stage(
        "cots",
        "tokenskip cots",
        __doc__,
        argv,
        lambda cfg, m: {"output_dir": cfg.output_dir, "counts": m["counts"]},
    )


if __name__ == "__main__":
    sys.exit(main())
