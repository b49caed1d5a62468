"""Generation throughput: the reference's pattern vs this project's Ray Data + vLLM stage.

Same prompts (rendered by tokenskip.prompt), same model, greedy, same max new tokens:

(a) a plain transformers ``generate`` loop at batch size 1 (what the TokenSkip reference
    does); on CPU this is slow, so it runs on the first ``--ref-n`` prompts only;
(b) ``pipelines.generate.run_generate`` (Ray Data + vLLM, the stage itself, writing its
    stage directory), reported end to end (engine start included) and without its own
    engine start: the stage records when its first request reached its engine
    (``last_run.engine_start_s`` in its manifest, from vLLM's per-request arrival times), and
    (b) without engine start is everything from then until ``run_generate`` returns;
(c) bare ``vllm.LLM`` on the same prompt token ids with the same engine kwargs
    (``tokenskip.engine.engine_kwargs_for``, as the stage) — the ceiling for (b), timed from
    the ``generate`` call; ``--skip-bare`` to omit.

(c) runs first, then (b), in one process, so the two are measured side by side.

Prints output tokens/s for each and the ratios (b)/(c) and (b)/(a). Run on its own (it starts vLLM
and Ray):

    flock /tmp/tokenskip-heavy.lock python -m benchmarks.generate --n 64 --ref-n 4

The yield report (correct answers, rows the ``cots`` stage keeps with ``cot_source: generated``)
comes from (b)'s own output, e.g. the embedded model on 200 GSM8K train questions:

    python -m benchmarks.generate --split train --n 200 --ref-n 4 --json benchmarks/results/generate_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def prompts_for(model: str, n: int, split: str, dataset: str) -> tuple[list[dict], list[str], list[list[int]]]:
    """Rows, rendered prompts and their token ids, exactly as the stage's PromptUDF makes them."""
    from transformers import AutoTokenizer

    from tokenskip import assets, data, prompt

    rows = data.load_questions(dataset, split, limit=n).rows
    tok = AutoTokenizer.from_pretrained(assets.resolve_model(model))
    texts = [prompt.render_prompt(tok, r["question"]) for r in rows]
    return rows, texts, [prompt.encode_prompt(tok, t) for t in texts]


def bench_transformers(model: str, prompts: list[str], max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenskip import assets

    path = assets.resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    tokens, t0 = 0, time.perf_counter()
    for p in prompts:
        enc = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = lm.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id
            )
        tokens += int(out.shape[1] - enc["input_ids"].shape[1])
    dt = time.perf_counter() - t0
    return {
        "prompts": len(prompts),
        "output_tokens": tokens,
        "seconds": round(dt, 2),
        "tokens_per_s": round(tokens / dt, 2),
    }


def bench_bare_vllm(model: str, prompt_ids: list[list[int]], max_new_tokens: int, seed: int = 0) -> dict:
    """``vllm.LLM`` built by ``tokenskip.engine.build_llm`` from the engine kwargs the stage uses
    (``engine_kwargs_for(model, {}, seed)``: on CPU fp32, and eager for small local models),
    given the same prompt token ids the stage gives its engine. Its engine core runs in a
    process of its own, as the stage's async engine does (``build_llm`` would otherwise run a
    small model's in this process: a different start, not what is compared here), with vLLM's
    default Worker process; the stage's small CPU model runs in its EngineCore instead
    (``engine.in_process_env``; in this process, bare decodes 2-4 % faster than with the Worker:
    benchmarks/RESULTS.md, "Engine start")."""
    from tokenskip import engine

    mp = {"distributed_executor_backend": "mp"}
    kw = engine.engine_kwargs_for(model, mp, seed=seed)
    t0 = time.perf_counter()
    llm = engine.build_llm(model, mp, seed=seed)
    start = time.perf_counter() - t0
    t1 = time.perf_counter()
    outs = engine.generate(
        llm, [{"prompt_token_ids": ids} for ids in prompt_ids], engine.sampling_params(max_new_tokens, 0.0, seed)
    )
    dt = time.perf_counter() - t1
    tokens = sum(o.output_tokens for o in outs)
    engine.close_llm(llm)  # its engine-core process would otherwise linger while (b) runs
    del llm
    import gc

    gc.collect()
    return {
        "prompts": len(prompt_ids),
        "output_tokens": tokens,
        "engine_kwargs": kw,
        "engine_start_s": round(start, 2),
        "seconds": round(dt, 2),
        "tokens_per_s": round(tokens / dt, 2),
    }


def bench_ray_stage(
    model: str,
    n: int,
    split: str,
    dataset: str,
    max_new_tokens: int,
    backend: str,
    batch_size: int,
    out_dir: str,
    max_pending_requests: int | None = None,
) -> dict:
    from pipelines.common import init_ray
    from pipelines.generate import run_generate
    from tokenskip.config import DataSourceConfig, GenerateConfig

    init_ray({"num_cpus": 4})
    cfg = GenerateConfig(
        model=model,
        data=DataSourceConfig(name=dataset, split=split, limit=n),
        output_dir=out_dir,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        shard_rows=batch_size,
        backend=backend,
        max_pending_requests=max_pending_requests,
    )
    t0 = time.perf_counter()
    m = run_generate(cfg, force=True)
    wall = time.perf_counter() - t0
    last = m["last_run"]
    tokens = last["output_tokens"]
    res = {
        "prompts": n,
        "output_tokens": tokens,
        "seconds": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "backend": m["backend"],
        "engine_kwargs": m.get("engine_kwargs"),
        "accuracy": m["counts"]["accuracy"],
        "correct": m["counts"]["correct"],
        "batch_size": cfg.batch_size,
        "max_concurrent_batches": cfg.max_concurrent_batches,
        "max_pending_requests": cfg.max_pending_requests,
    }
    # The stage's own engine start: from run_generate's call (loading the questions included) to
    # its first request reaching the engine; everything after it, writing the output and the
    # manifest included, counts as generation time.
    if last.get("engine_start_s") is not None:
        start = last["engine_start_s"]
        res["engine_start_s"] = round(start, 2)
        res["seconds_excl_engine_start"] = round(wall - start, 2)
        res["tokens_per_s_excl_engine_start"] = round(tokens / max(1e-6, wall - start), 2)
    return res


def yield_report(gen_dir: str, max_cot_tokens: int) -> dict:
    """What the ``cots`` stage (cot_source: generated) keeps from the stage's output."""
    from pipelines.build_sft import select_cots
    from tokenskip.config import CotsConfig

    cfg = CotsConfig(
        cot_source="generated",
        generations=gen_dir,
        max_cot_tokens=max_cot_tokens,
        output_dir=str(Path(gen_dir).parent / "cots"),
    )
    counts = select_cots(cfg, force=True)["counts"]
    return {
        "questions": counts["total"],
        "correct": counts["correct"],
        "kept": counts["kept"],
        "accuracy": round(counts["correct"] / max(1, counts["total"]), 4),
        "max_cot_tokens": max_cot_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=64, help="prompts for (b) and (c)")
    p.add_argument("--ref-n", type=int, default=8, help="prompts for the transformers batch-1 loop (a); 0 skips (a)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--backend", default="auto", choices=["auto", "ray_data_llm", "vllm_udf"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-pending-requests", type=int, help="generate.max_pending_requests for (b)")
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument("--out-dir", help="keep the stage's output here (default: a temporary directory)")
    p.add_argument("--max-cot-tokens", type=int, default=500, help="the cots stage's length limit for the yield report")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    from tokenskip import engine

    engine.cpu_env_defaults()
    _, prompts, prompt_ids = prompts_for(args.model, args.n, args.split, args.dataset)
    res: dict = {"model": args.model, "dataset": f"{args.dataset}:{args.split}", "max_new_tokens": args.max_new_tokens}
    if args.ref_n > 0:
        print(f"(a) transformers batch 1 on {args.ref_n} prompts ...", flush=True)
        res["a_transformers_bs1"] = bench_transformers(args.model, prompts[: args.ref_n], args.max_new_tokens)
        print(json.dumps(res["a_transformers_bs1"]), flush=True)
    if not args.skip_bare:
        print(f"(c) bare vllm.LLM on {args.n} prompts ...", flush=True)
        res["c_bare_vllm"] = bench_bare_vllm(args.model, prompt_ids, args.max_new_tokens)
        print(json.dumps(res["c_bare_vllm"]), flush=True)
    print(f"(b) Ray Data + vLLM stage on {args.n} prompts ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        gen_dir = str(Path(args.out_dir or tmp) / "generate")
        res["b_ray_data_stage"] = bench_ray_stage(
            args.model,
            args.n,
            args.split,
            args.dataset,
            args.max_new_tokens,
            args.backend,
            args.batch_size,
            gen_dir,
            args.max_pending_requests,
        )
        res["yield"] = yield_report(gen_dir, args.max_cot_tokens)
    b, a, c = res["b_ray_data_stage"], res.get("a_transformers_bs1"), res.get("c_bare_vllm")
    print(json.dumps(b))
    print("\noutput tokens/s")
    if a:
        print(f"  (a) transformers generate, batch 1 : {a['tokens_per_s']:8.1f}  ({a['prompts']} prompts)")
    if c:
        print(
            f"  (c) bare vllm.LLM                  : {c['tokens_per_s']:8.1f}  "
            f"(engine start {c['engine_start_s']} s excluded)"
        )
    print(
        f"  (b) Ray Data + vLLM stage          : {b['tokens_per_s']:8.1f}  "
        f"end to end, engine start included ({b['backend']})"
    )
    if "tokens_per_s_excl_engine_start" in b:
        print(
            f"      ... without its engine start   : {b['tokens_per_s_excl_engine_start']:8.1f}  "
            f"(its engine start {b['engine_start_s']} s, measured in the stage)"
        )
    if c and "tokens_per_s_excl_engine_start" in b:
        res["ratio_b_over_c_excl_engine_start"] = round(b["tokens_per_s_excl_engine_start"] / c["tokens_per_s"], 3)
        print(f"  ratio (b)/(c) without engine start: {res['ratio_b_over_c_excl_engine_start']}x")
    if c:
        res["ratio_b_over_c_end_to_end"] = round(
            b["tokens_per_s"] / (c["output_tokens"] / (c["seconds"] + c["engine_start_s"])), 3
        )
        print(f"  ratio (b)/(c) end to end, engine starts included: {res['ratio_b_over_c_end_to_end']}x")
    if a:
        res["ratio_b_over_a"] = round(b["tokens_per_s"] / a["tokens_per_s"], 2)
        print(
            f"  ratio (b)/(a): {res['ratio_b_over_a']}x end to end"
            + (
                f", {round(b['tokens_per_s_excl_engine_start'] / a['tokens_per_s'], 2)}x without engine start"
                if "tokens_per_s_excl_engine_start" in b
                else ""
            )
        )
    y = res["yield"]
    print(
        f"  yield on {args.dataset}:{args.split} ({y['questions']} questions): {y['correct']} correct "
        f"(accuracy {y['accuracy']}), {y['kept']} kept by the cots stage (correct, <= {y['max_cot_tokens']} CoT tokens)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
