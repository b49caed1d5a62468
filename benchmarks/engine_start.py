"""vLLM engine start on CPU: cold compile vs warm compile cache vs ``enforce_eager``, and what
each costs overall (start + decode) at the sizes the quickstart and the tests use.

Every configuration runs in its own subprocess (a fresh engine, as a stage or a test gets):
  compiled-cold   the default (Inductor compile), compile caches in an empty directory;
  compiled-warm   the default again, on the caches the cold run just filled;
  eager           ``enforce_eager=True`` (no torch.compile at all), empty caches;
  eager-inproc    eager, with vLLM's engine core in the calling process
                  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no EngineCore / Worker processes to spawn).
Per configuration: engine start (``vllm.LLM(...)`` returning), then three workloads on the
same engine, greedy, token-id prompts as evaluation sends them:
  quickstart      the quickstart's evaluation batch: 30 GSM8K test prompts, up to 256 tokens;
  tests           the tests' size: 3 prompts, up to 16 tokens.
  batch           a stage-sized batch: 200 prompts, up to 256 tokens (decode throughput under load).
It prints one table (seconds; decode throughput in generated tokens/s) and, per workload,
start + decode of eager / compiled-warm and eager / compiled-cold side by side.

    flock /tmp/coord/heavy.lock python -m benchmarks.engine_start --json benchmarks/results/engine_start_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {"quickstart": (30, 256), "tests": (3, 16), "batch": (200, 256)}


def child(model: str, eager: bool) -> dict:
    """One engine: start, then each workload (run inside the subprocess)."""
    from tokenskip import engine, prompt
    from tokenskip.data import load_questions

    engine.cpu_env_defaults()
    t0 = time.perf_counter()
    llm = engine.build_llm(model, {"enforce_eager": True} if eager else None)
    start = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    qs = load_questions("gsm8k", "test", limit=max(n for n, _ in WORKLOADS.values())).rows
    out = {"start_s": start, "workloads": {}}
    for name, (n, max_tokens) in WORKLOADS.items():
        ids = [{"prompt_token_ids": prompt.prompt_token_ids(tok, q["question"])} for q in qs[:n]]
        t0 = time.perf_counter()
        res = engine.generate(llm, ids, engine.sampling_params(max_tokens))
        dt = time.perf_counter() - t0
        gen = sum(r.output_tokens for r in res)
        out["workloads"][name] = {"decode_s": dt, "generated_tokens": gen, "tokens_per_s": gen / dt}
    return out


CONFIGS = {  # name: (eager, extra environment)
    "compiled-cold": (False, {}),
    "compiled-warm": (False, {}),
    # build_llm would run a small eager engine in process by itself: "eager" pins vLLM's processes
    "eager": (True, {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}),
    "eager-inproc": (True, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
}


def run_config(model: str, eager: bool, cache: Path, extra_env: dict | None = None) -> dict:
    env = {**os.environ, **(extra_env or {})}
    env["VLLM_CACHE_ROOT"] = str(cache / "vllm")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    cmd = [sys.executable, "-m", "benchmarks.engine_start", "--child", "--model", model]
    cmd += ["--eager"] if eager else []
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    res["process_wall_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                    help="which configurations to run (compiled-warm reuses compiled-cold's caches)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.model, a.eager)), flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="tokenskip-engine-start-") as tmp:
        for name in a.configs:  # both compiled runs share one cache directory, each eager run has its own
            eager, extra = CONFIGS[name]
            cache = Path(tmp) / ("compiled" if name.startswith("compiled") else name)
            results[name] = run_config(a.model, eager, cache, extra)
    print(f"vLLM-CPU engine start and decode, {a.model}, {os.cpu_count()} CPUs (seconds; tok/s = generated tokens/s)")
    head = "config | start | " + " | ".join(f"{w} decode | {w} tok/s | {w} start+decode" for w in WORKLOADS)
    print(head)
    for name, r in results.items():
        cells = [f"{r['start_s']:.1f}"]
        for w in WORKLOADS:
            x = r["workloads"][w]
            cells += [f"{x['decode_s']:.1f}", f"{x['tokens_per_s']:.1f}", f"{r['start_s'] + x['decode_s']:.1f}"]
        print(f"{name} | " + " | ".join(cells))
    ratios: dict[str, dict[str, float]] = {}
    pairs = [("eager", "compiled-warm"), ("eager", "compiled-cold"), ("eager-inproc", "eager")]
    for w in WORKLOADS:
        tot = {k: r["start_s"] + r["workloads"][w]["decode_s"] for k, r in results.items()}
        ratios[w] = {f"{x}/{y}": tot[x] / tot[y] for x, y in pairs if x in tot and y in tot}
        print(f"{w}: start+decode " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios[w].items()) + " (< 1: faster)")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "cpus": os.cpu_count(), "results": results,
                                            "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
