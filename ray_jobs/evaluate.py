"""ray job submit --working-dir . -- python -m ray_jobs.evaluate --config configs/eval/qwen2.5-7b-gsm8k-math500.yaml

Evaluation: accuracy, mean CoT tokens, latency (batch size 1), batched throughput and
actual ratio per γ, with the original / prompting / truncation baselines, as
results.json + table.md + PNG plots + samples/ in the config's output_dir.

Locally: ``tokenskip eval -c configs/eval/smollm2-gsm8k.yaml --limit 20`` (same run).
Overrides are ``key=value``, e.g. ``adapter=runs/x/train/adapter ratios=[1.0,0.5]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ray_jobs import runner


def main(argv: list[str] | None = None) -> int:
    def add_args(p) -> None:
        p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions of each dataset")

    def build(args) -> dict:
        overrides = list(args.overrides) + ([f"limit={args.limit}"] if args.limit is not None else [])
        cfg, ray_kwargs = runner.load_stage(args.config, overrides, "evaluate")

        def done(results: dict, timings: dict, console) -> None:
            out = Path(results["evaluate"]["config"]["output_dir"])
            if (out / "table.md").is_file():
                console.result((out / "table.md").read_text())
            console.result(f"evaluation written to {out}")

        return {"steps": [("evaluate", cfg)], "ray": ray_kwargs, "done": done}

    return runner.main("tokenskip eval", argv, build, doc=__doc__, add_args=add_args)


if __name__ == "__main__":
    sys.exit(main())
