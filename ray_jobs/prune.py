"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml \
    -- python -m ray_jobs.prune --config configs/prune/gsm8k-llmlingua2.yaml

Prune CoTs at every ratio γ from one scoring pass (Ray Data actor pool): LLMLingua-2
token classifier or causal-LM self-information. Input: a cots/generate stage directory
or a JSONL/Parquet file with an id and a text column; output: the prune stage directory
(data.parquet, rejects.jsonl, manifest.json). Takes a ``kind: prune`` YAML or a
``kind: pipeline`` YAML (its ``prune`` section). A finished stage is skipped unless --force.

Locally: ``tokenskip prune -c configs/prune/local-selfinfo.yaml input=cots.jsonl output_dir=runs/prune``.
"""

from __future__ import annotations

import sys

from ray_jobs import runner


def main(argv: list[str] | None = None) -> int:
    return runner.single_stage(
        "prune",
        "tokenskip prune",
        __doc__,
        argv,
        lambda cfg, m: {"output_dir": cfg.output_dir, "counts": m["counts"], "per_ratio": m.get("per_ratio")},
    )


if __name__ == "__main__":
    sys.exit(main())
