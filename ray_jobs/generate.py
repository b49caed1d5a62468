"""ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m ray_jobs.generate --config configs/data/gsm8k-smollm2-gold.yaml

Generate CoTs with the target model (Ray Data + vLLM), grade them, and write the
generate stage directory (data.parquet, rejects.jsonl, manifest.json). Takes a
``kind: generate`` YAML or a ``kind: pipeline`` YAML (its ``generate`` section, its
``run_dir`` and its ``ray`` settings). Resumable: committed parts survive a crash and a
re-run generates only the missing questions; a finished stage is skipped unless --force.

Locally: ``tokenskip generate -c configs/data/gsm8k-smollm2-gold.yaml generate.data.limit=32``.
"""

from __future__ import annotations

import json
import sys

from ray_jobs._args import load_stage, parser, setup_logging


def load(path: str, overrides: list[str]):
    """(GenerateConfig, ray.init kwargs) from a generate or pipeline YAML."""
    return load_stage(path, overrides, "generate")


def main(argv: list[str] | None = None) -> int:
    args = parser("tokenskip generate", __doc__.split("\n", 2)[2]).parse_args(argv)
    setup_logging()
    from tokenskip.config import ConfigError

    try:
        cfg, ray_kwargs = load(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from pipelines.common import init_ray
    from pipelines.generate import run_generate

    init_ray(ray_kwargs)
    manifest = run_generate(cfg, force=args.force)
    print(json.dumps({"output_dir": cfg.output_dir, "counts": manifest["counts"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
