"""LoRA SFT throughput on CPU: 1 vs 2 Ray Train workers, and DDP vs ZeRO-2 vs ZeRO-3.

Every run is ``pipelines.train.run_train`` itself (Ray Train TorchTrainer, gloo) on the
embedded SmolLM2-135M-Instruct with LoRA r 8 on all linear layers, fp32, the same rows
(GSM8K gold solutions rendered with tokenskip.prompt) and the same micro-batch per worker,
no accumulation. Training tokens/s (non-pad tokens, all workers) are taken from rank 0's
per-step log, skipping the first ``--warmup`` steps; worker start-up is reported apart.
Then the per-GPU memory plan of the 7B/14B/32B GPU configs (``tokenskip plan-memory``).

    flock /tmp/tokenskip-heavy.lock python -m benchmarks.train --steps 8

``--grouping DIR``: on a real SFT set (a build_sft stage directory, rows at every γ, so of
very different lengths), DDP x 2 with a plain shuffle vs length-grouped micro-batches
(``train.group_by_length``), side by side: processed tokens/s (real + padding), real
tokens/s and the share of processed tokens that are real, plus that share computed over a
whole epoch's order for both.

    python -m benchmarks.train --grouping runs/smollm2-gsm8k-adherence/build_sft --steps 12 --micro-batch 4

``--lm-head DIR`` (or ``gold``): the LM head and cross entropy on every position (transformers'
loss) vs on the labelled (completion) positions only (``train.lm_head_positions``), DDP x 2,
alternating ``--repeat`` times: real tokens/s of each and the largest per-step loss difference.

    python -m benchmarks.train --lm-head runs/quickstart/build_sft --steps 12 --micro-batch 4 --cutoff 384
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RUNS = [("ddp", 0, 1), ("ddp", 0, 2), ("deepspeed", 2, 2), ("deepspeed", 3, 2)]


def make_data(path: Path, n: int) -> Path:
    from tokenskip import artifacts, prompt
    from tokenskip.data import load_questions

    rows = [
        {
            "id": q["id"],
            "ratio": 1.0,
            "user": prompt.user_content(q["question"], 1.0),
            "completion": prompt.build_target(q["solution"], q["gold"]),
        }
        for q in load_questions("gsm8k", "train", limit=n).rows
    ]
    artifacts.write_rows(path / "train.parquet", rows)
    artifacts.write_manifest(path, "build_sft", counts={"train": n})
    return path


def run_one(
    model: str,
    data: Path,
    out: Path,
    strategy: str,
    stage: int,
    workers: int,
    steps: int,
    micro: int,
    cutoff: int,
    warmup: int,
    group_by_length: bool = True,
    lm_head_positions: str = "labelled",
) -> dict:
    from pipelines.train import run_train
    from tokenskip.config import TrainConfig, load_config

    cfg = load_config(
        TrainConfig,
        data=dict(
            model=model,
            dataset=str(data),
            output_dir=str(out),
            strategy=strategy,
            zero_stage=stage or 3,
            max_steps=steps,
            micro_batch_size=micro,
            global_batch_size=micro * workers,
            cutoff_len=cutoff,
            learning_rate=1e-4,
            checkpoint_every=10_000,
            group_by_length=group_by_length,
            lm_head_positions=lm_head_positions,
            scaling={"num_workers": workers, "use_gpu": False, "resources_per_worker": {"CPU": 1}},
        ),
    )
    t0 = time.time()
    manifest = run_train(cfg, force=True)
    wall = time.time() - t0
    log = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    timed = [r for r in log if r["step"] > warmup]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    processed = sum(r.get("processed_tokens_per_s", r["tokens_per_s"]) * r["step_time_s"] for r in timed)
    secs = sum(r["step_time_s"] for r in timed)
    train_s = sum(r["step_time_s"] for r in log)
    name = "ddp" if strategy == "ddp" else f"zero{stage}"
    return {
        "run": f"{name} x{workers}",
        "strategy": name,
        "workers": workers,
        "steps": len(log),
        "tokens_per_s": round(tokens / secs, 1),
        "processed_tokens_per_s": round(processed / secs, 1),
        "real_token_share": round(tokens / processed, 4) if processed else None,
        "group_by_length": group_by_length,
        "lm_head_positions": log[-1].get("lm_head_positions", lm_head_positions),
        "s_per_step": round(secs / len(timed), 3),
        "loss_first": round(log[0]["loss"], 4),
        "loss_last": round(log[-1]["loss"], 4),
        "losses": [r["loss"] for r in log],
        "wall_s": round(wall, 1),
        "startup_and_save_s": round(wall - train_s, 1),
        "adapter_params": manifest["adapter_info"]["parameters"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--cutoff", type=int, default=256)
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--grouping", default=None, help="a build_sft stage directory: compare shuffle vs length-grouped batches"
    )
    ap.add_argument(
        "--lm-head",
        default=None,
        help="a build_sft stage directory (or 'gold': GSM8K gold rows at γ 1.0): the LM head on every position "
        "vs on the labelled ones only (train.lm_head_positions), DDP x 2, alternating --repeat times",
    )
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    if args.grouping:
        return grouping(args)
    if args.lm_head:
        return lm_head(args)
    args.out = args.out or "benchmarks/results/train_cpu.json"

    from pipelines.common import init_ray

    init_ray({"num_cpus": 4})
    results = []
    with tempfile.TemporaryDirectory(prefix="tokenskip-bench-train-") as tmp:
        data = make_data(Path(tmp) / "sft", args.rows)
        for strategy, stage, workers in RUNS:
            r = run_one(
                args.model,
                data,
                Path(tmp) / f"{strategy}{stage}x{workers}",
                strategy,
                stage,
                workers,
                args.steps,
                args.micro_batch,
                args.cutoff,
                args.warmup,
            )
            print(json.dumps(r), flush=True)
            results.append(r)
    by = {r["run"]: r for r in results}
    ratios = {
        "ddp x2 / ddp x1": by["ddp x2"]["tokens_per_s"] / by["ddp x1"]["tokens_per_s"],
        "zero2 x2 / ddp x2": by["zero2 x2"]["tokens_per_s"] / by["ddp x2"]["tokens_per_s"],
        "zero3 x2 / ddp x2": by["zero3 x2"]["tokens_per_s"] / by["ddp x2"]["tokens_per_s"],
        "zero3 x2 / zero2 x2": by["zero3 x2"]["tokens_per_s"] / by["zero2 x2"]["tokens_per_s"],
    }
    print(f"\n{'run':<10} {'tokens/s':>9} {'s/step':>7} {'loss first->last':>18} {'start+save s':>13}")
    for r in results:
        print(
            f"{r['run']:<10} {r['tokens_per_s']:>9} {r['s_per_step']:>7} {r['loss_first']:>8} -> {r['loss_last']:<7} "
            f"{r['startup_and_save_s']:>13}"
        )
    print("\nratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))

    from tokenskip import memory

    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    from tokenskip.config import TrainConfig, load_config

    plans = {}
    print("\nper-GPU memory plan (tokenskip plan-memory):")
    for name in memory.DEFAULT_CONFIGS:
        cfg = load_config(TrainConfig, root / name)
        plans[name] = memory.plan_for_config(cfg)
        print(memory.format_plan(name, plans[name]))
    for gpus in (8, 4, 2):
        p = memory.plan(memory.arch_for("Qwen/Qwen2.5-32B-Instruct"), 3, gpus, 1, 2048, True)
        plans[f"qwen2.5-32b zero3 x{gpus}"] = p
        print(
            f"Qwen2.5-32B ZeRO-3 x {gpus} GPUs, micro 1: {p['total_gib']} GiB/GPU -> "
            f"{'fits' if p['fits'] else 'does not fit'} on 80 GiB"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args), "runs": results, "ratios": ratios, "memory_plans": plans}, indent=1) + "\n"
    )
    return 0


def epoch_padding(lengths: list[int], micro: int, workers: int, seed: int = 42) -> dict:
    """Real-token share over one whole epoch's micro-batches, shuffle vs length-grouped (no training)."""
    from tokenskip.training import epoch_order, length_grouped_order, padding_share

    shards = [lengths[w::workers] for w in range(workers)]  # Ray Data splits rows across workers
    out = {}
    for name, fn in (
        ("shuffle", lambda ls: epoch_order(len(ls), 0, seed)),
        ("grouped", lambda ls: length_grouped_order(ls, 0, seed, micro)),
    ):
        shares = [1.0 - padding_share(ls, fn(ls), micro) for ls in shards]
        out[name] = round(sum(shares) / len(shares), 4)
    return out


def grouping(args) -> int:
    from transformers import AutoTokenizer

    from pipelines.common import init_ray
    from tokenskip import assets
    from tokenskip.training import tokenize_pair

    data = Path(args.grouping)
    rows = _sft_rows(data)
    tok = AutoTokenizer.from_pretrained(assets.resolve_model(args.model))
    lengths = [
        len(ex["input_ids"]) for ex in (tokenize_pair(tok, r["user"], r["completion"], args.cutoff) for r in rows) if ex
    ]
    static = epoch_padding(lengths, args.micro_batch, 2)
    print(f"{len(lengths)} rows, {sum(lengths)} tokens; real-token share over an epoch: {static}", flush=True)
    init_ray({"num_cpus": 4})
    results = []
    with tempfile.TemporaryDirectory(prefix="tokenskip-bench-group-") as tmp:
        for grouped in (False, True):
            r = _ddp_x2(args, data, Path(tmp) / f"g{int(grouped)}", group_by_length=grouped)
            print(json.dumps(r), flush=True)
            results.append(r)
    a, b = results
    ratio = b["tokens_per_s"] / a["tokens_per_s"]
    print(f"\n{'batches':<10} {'real tok/s':>10} {'processed tok/s':>16} {'real share':>11}")
    for r in results:
        print(
            f"{'grouped' if r['group_by_length'] else 'shuffle':<10} {r['tokens_per_s']:>10} "
            f"{r['processed_tokens_per_s']:>16} {r['real_token_share']:>11}"
        )
    print(f"\nreal tokens/s grouped / shuffle = {ratio:.2f}")
    _save(
        args.out or "benchmarks/results/train_grouping_cpu.json",
        {"args": vars(args), "epoch_real_share": static, "runs": results, "real_tokens_per_s_ratio": ratio},
    )
    return 0


def lm_head(args) -> int:
    """Side by side in one run: ``lm_head_positions`` all vs labelled, same rows, seed and steps."""
    from pipelines.common import init_ray

    init_ray({"num_cpus": 4})
    results = []
    with tempfile.TemporaryDirectory(prefix="tokenskip-bench-head-") as tmp:
        data = make_data(Path(tmp) / "sft", args.rows) if args.lm_head == "gold" else Path(args.lm_head)
        rows = _sft_rows(data)
        print(f"{len(rows)} rows from {args.lm_head}", flush=True)
        for rep in range(args.repeat):
            for positions in ("all", "labelled"):
                r = _ddp_x2(args, data, Path(tmp) / f"{positions}{rep}", lm_head_positions=positions)
                r["repeat"] = rep
                print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
                results.append(r)
    by = {p: [r for r in results if r["lm_head_positions"] == p] for p in ("all", "labelled")}
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(by["all"], by["labelled"])]
    loss_diff = max(abs(x - y) for a, b in zip(by["all"], by["labelled"]) for x, y in zip(a["losses"], b["losses"]))
    print(f"\n{'lm head on':<10} {'repeat':>6} {'real tok/s':>10} {'s/step':>7} {'loss first -> last':>20}")
    for r in results:
        print(
            f"{r['lm_head_positions']:<10} {r['repeat']:>6} {r['tokens_per_s']:>10} {r['s_per_step']:>7} "
            f"{r['loss_first']:>9} -> {r['loss_last']:<8}"
        )
    print(
        "\nreal tokens/s labelled / all, per repeat: "
        + ", ".join(f"{x:.2f}" for x in ratios)
        + f"; largest per-step loss difference {loss_diff:.2e}"
    )
    _save(
        args.out or "benchmarks/results/train_lm_head_cpu.json",
        {"args": vars(args), "runs": results, "tokens_per_s_ratio": ratios, "max_step_loss_diff": loss_diff},
    )
    return 0


def _ddp_x2(args, data: Path, out: Path, **kw) -> dict:
    """One measured run: DDP on 2 workers, the command line's steps, micro-batch and cutoff."""
    return run_one(args.model, data, out, "ddp", 0, 2, args.steps, args.micro_batch, args.cutoff, args.warmup, **kw)


def _save(path: str, payload: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")


def _sft_rows(data: Path) -> list[dict]:
    """The train rows of a build_sft stage directory (or of a rows file)."""
    from tokenskip import artifacts

    path = data / "train.parquet"
    return artifacts.read_rows(path if path.exists() else artifacts.data_file(data))


if __name__ == "__main__":
    raise SystemExit(main())
