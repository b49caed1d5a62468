"""ray job submit --working-dir . -- python -m ray_jobs.evaluate --config configs/eval/qwen2.5-7b-gsm8k-math500.yaml

Evaluation: accuracy, mean CoT tokens, latency (batch size 1), batched throughput and
actual ratio per γ, with the original / prompting / truncation baselines, as
results.json + table.md + PNG plots + samples/ in the config's output_dir.

Locally: ``tokenskip eval -c configs/eval/smollm2-gsm8k.yaml --limit 20`` (same run).
Overrides are ``key=value``, e.g. ``adapter=runs/x/train/adapter ratios=[1.0,0.5]``.
"""

from __future__ import annotations

import sys

from ray_jobs._args import parser, setup_logging


def main(argv: list[str] | None = None) -> int:
    p = parser("tokenskip eval", __doc__)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions of each dataset")
    args = p.parse_args(argv)
    setup_logging()
    from pipelines.evaluate import EvalInputError, run_evaluate
    from tokenskip.artifacts import StageError
    from tokenskip.config import ConfigError, EvalConfig, load_config

    overrides = list(args.overrides)
    if args.limit is not None:
        overrides.append(f"limit={args.limit}")
    try:
        cfg = load_config(EvalConfig, args.config, overrides)
        manifest = run_evaluate(cfg, force=args.force)
    except (ConfigError, EvalInputError, StageError) as e:
        print(f"tokenskip eval: {e}", file=sys.stderr)
        return 2
    from pathlib import Path

    table = Path(manifest["config"]["output_dir"]) / "table.md"
    if table.is_file():
        print(table.read_text())
    print(f"evaluation written to {manifest['config']['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
