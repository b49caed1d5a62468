"""Decode speed of an in-process vLLM engine inside a Ray task: the threads it inherits from Ray
vs the threads vLLM's own worker process would get.

On CPU, :func:`tokenskip.engine.build_llm` runs a small model's engine in the calling process
(no EngineCore / Worker processes to spawn). Ray sets a task's or actor's ``OMP_NUM_THREADS`` to
its ``num_cpus`` (1 by default, and a ``ray job submit`` driver gets 1 too), so that engine used
to decode on one thread wherever the evaluate stage ran as a Ray task (``placement: ray``, or
``auto`` under ``ray job submit``) or the generate stage's ``vllm_udf`` backend ran, while vLLM's
multiprocess executor gives its Worker the CPUs of ``VLLM_CPU_OMP_THREADS_BIND`` (all cores here).

Both configurations run the same way, alternating, each in a fresh ``num_cpus=1`` Ray task:
  inherited   the task as Ray starts it (the behaviour before: Ray's ``OMP_NUM_THREADS`` = 1);
  bound       the task started with ``engine.in_process_threads_env`` (what the evaluate task and the
              ``vllm_udf`` actors now get): the CPUs of ``VLLM_CPU_OMP_THREADS_BIND``, as vLLM's Worker.
Per run: the evaluate stage's batch (GSM8K test prompts as token ids, greedy, the quickstart's
30 × 256 tokens by default) after a short warm-up; it prints generated tokens/s per run, bound /
inherited side by side, and whether both produced the same tokens.

    python -m benchmarks.engine_threads --json benchmarks/results/engine_threads_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def decode(model: str, n: int, max_tokens: int, bind: str | None) -> dict:
    """One engine in this (Ray worker) process: warm-up, then the timed batch."""
    if bind is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    import torch

    from tokenskip import engine, prompt
    from tokenskip.data import load_questions

    ray_threads = torch.get_num_threads()
    llm = engine.build_llm(model)
    tok = llm.get_tokenizer()
    qs = load_questions("gsm8k", "test", limit=n).rows
    ids = [{"prompt_token_ids": prompt.prompt_token_ids(tok, q["question"])} for q in qs]
    engine.generate(llm, ids[:2], engine.sampling_params(8))
    t0 = time.perf_counter()
    res = engine.generate(llm, ids, engine.sampling_params(max_tokens))
    dt = time.perf_counter() - t0
    gen = sum(r.output_tokens for r in res)
    digest = hashlib.sha256("\x00".join(r.text for r in res).encode()).hexdigest()[:16]
    out = {"omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "threads_before": ray_threads,
           "threads_decoding": torch.get_num_threads(), "decode_s": round(dt, 2), "generated_tokens": gen,
           "tokens_per_s": round(gen / dt, 1), "outputs_sha256": digest}
    engine.close_llm(llm)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--n", type=int, default=30, help="prompts (GSM8K test)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2, help="runs of each configuration, alternating")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import ray

    from pipelines.common import init_ray

    init_ray({"num_cpus": os.cpu_count()})
    from tokenskip import engine

    task = ray.remote(num_cpus=1, max_calls=1)(decode)  # a fresh worker process per run
    env = engine.in_process_threads_env(engine.engine_kwargs_for(a.model))  # what the stages give theirs
    bound_env = {"env_vars": env} if env else None
    runs: dict[str, list[dict]] = {"inherited": [], "bound": []}
    for _ in range(a.repeat):
        for name, bind in (("inherited", "nobind"), ("bound", None)):
            t = task.options(runtime_env=bound_env) if name == "bound" and bound_env else task
            r = ray.get(t.remote(a.model, a.n, a.max_tokens, bind))
            runs[name].append(r)
            print(f"{name:9s} threads {r['threads_before']} -> {r['threads_decoding']}: "
                  f"{r['generated_tokens']} tokens in {r['decode_s']} s = {r['tokens_per_s']} tok/s", flush=True)
    ratios = [b["tokens_per_s"] / i["tokens_per_s"] for i, b in zip(runs["inherited"], runs["bound"])]
    same = len({r["outputs_sha256"] for rs in runs.values() for r in rs}) == 1
    print(f"bound / inherited, run by run: {', '.join(f'{x:.2f}x' for x in ratios)}; identical outputs: {same}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "cpus": os.cpu_count(), "n": a.n,
                                            "max_tokens": a.max_tokens, "runs": runs,
                                            "bound_over_inherited": [round(x, 3) for x in ratios],
                                            "identical_outputs": same}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
