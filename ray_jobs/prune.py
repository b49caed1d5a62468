"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m ray_jobs.prune --config configs/prune/gsm8k-llmlingua2.yaml

Prune CoTs at every ratio γ from one scoring pass (Ray Data actor pool): LLMLingua-2
token classifier or causal-LM self-information. Input: a cots/generate stage directory
or a JSONL/Parquet file with an id and a text column; output: the prune stage directory
(data.parquet, rejects.jsonl, manifest.json). Takes a ``kind: prune`` YAML or a
``kind: pipeline`` YAML (its ``prune`` section). A finished stage is skipped unless --force.

Locally: ``tokenskip prune -c configs/prune/local-selfinfo.yaml input=cots.jsonl output_dir=runs/prune``.
"""

from __future__ import annotations

import json
import sys

from ray_jobs._args import load_stage, parser, setup_logging


def load(path: str, overrides: list[str]):
    """(PruneConfig, ray.init kwargs) from a prune or pipeline YAML."""
    return load_stage(path, overrides, "prune")


def main(argv: list[str] | None = None) -> int:
    args = parser("tokenskip prune", __doc__.split("\n", 2)[2]).parse_args(argv)
    setup_logging()
    from tokenskip.config import ConfigError

    try:
        cfg, ray_kwargs = load(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from pipelines.common import init_ray
    from pipelines.prune import run_prune
    from tokenskip import assets

    assets.ensure_tiktoken()  # sets TIKTOKEN_CACHE_DIR before Ray workers inherit the env
    init_ray(ray_kwargs)
    try:
        manifest = run_prune(cfg, force=args.force)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"prune failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"output_dir": cfg.output_dir, "counts": manifest["counts"], "per_ratio": manifest.get("per_ratio")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
