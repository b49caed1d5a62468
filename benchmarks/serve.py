"""Serving benchmark: γ = 1.0 vs 0.5 through the endpoint, and the endpoint vs vLLM directly.

    flock /tmp/tokenskip-heavy.lock .venv/bin/python benchmarks/serve.py --n 16 --max-tokens 128 --out benchmarks/results/serve.json

1. Endpoint (Ray Serve app, OpenAI SDK, one request at a time — the paper's batch-1 latency):
   the same GSM8K test questions at γ = 1.0 and γ = 0.5 on an adapter; mean completion
   tokens and latency per request, and their ratios (γ=0.5 / γ=1.0).
2. Router overhead: the same requests (prompt token ids + LoRA, identical outputs) sent
   straight to a vLLM ``AsyncLLM`` in this process, after the Serve app is shut down.
   overhead = mean endpoint latency / mean direct latency − 1 (goal ≤ 5 %).

The adapter: ``--adapter`` or the newest ``runs/**/train/adapter``; if none exists, an
identity LoRA (PEFT's B = 0 init) is built — then the γ ratio only measures the marker's
effect on an untrained model and says nothing about TokenSkip.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def find_adapter(model_dir: str, explicit: str | None) -> tuple[str, str]:
    if explicit:
        return explicit, "given"
    found = sorted(glob.glob(str(ROOT / "runs" / "**" / "train" / "adapter" / "adapter_config.json"), recursive=True),
                   key=os.path.getmtime)
    if found:
        return str(Path(found[-1]).parent), "trained"
    out = Path(os.environ.get("TOKENSKIP_HOME", ROOT / ".cache" / "tokenskip")) / "bench" / "identity-lora"
    if not (out / "adapter_config.json").is_file():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).save_pretrained(str(out))
    return str(out), "identity (untrained)"


def summarize(rows: list[dict]) -> dict:
    lat = sorted(r["latency_s"] for r in rows)
    return {"n": len(rows), "mean_tokens": statistics.mean(r["tokens"] for r in rows),
            "mean_latency_s": statistics.mean(lat), "p50_latency_s": statistics.median(lat),
            "ms_per_token": 1000 * sum(lat) / max(1, sum(r["tokens"] for r in rows))}


def run_endpoint(args, model_dir: str, adapter: str, questions: list[str]) -> tuple[dict, list[dict]]:
    import socket

    import openai
    from ray import serve

    from pipelines.common import init_ray
    from serving.app import build_app

    init_ray({"num_cpus": 4})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {"model": model_dir, "model_id": "base", "adapters": [{"name": "bench", "path": adapter}],
                "engine_kwargs": {"max_model_len": 2048},
                "ingress_deployment": {"ray_actor_options": {"num_cpus": 0.1}},
                "model_deployment": {"ray_actor_options": {"num_cpus": 1}}}
    t0 = time.time()
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    ready = time.time() - t0
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    results: dict[str, list[dict]] = {}
    prepared: list[dict] = []
    for gamma in args.ratios:
        rows = []
        for i, q in enumerate([questions[0]] + questions):  # first = warm-up, dropped
            t = time.perf_counter()
            r = client.chat.completions.create(model="base:bench", messages=[{"role": "user", "content": q}],
                                               max_tokens=args.max_tokens, temperature=0.0,
                                               extra_body={"compression_ratio": gamma, "return_prompt": True})
            dt = time.perf_counter() - t
            if i == 0:
                continue
            rows.append({"latency_s": dt, "tokens": r.usage.completion_tokens, "gamma": (r.model_extra or {})["compression_ratio"]})
            prepared.append({"prompt": r.model_extra["tokenskip"]["prompt"], "tokens": r.usage.completion_tokens,
                             "gamma": gamma, "endpoint_latency_s": dt, "text": r.choices[0].message.content})
        results[str(gamma)] = rows
    serve.shutdown()
    return {"ready_s": ready, "per_gamma": results}, prepared


async def run_direct(args, model_dir: str, adapter: str, prepared: list[dict]) -> list[dict]:
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from tokenskip import engine as tsengine

    tsengine.cpu_env_defaults()
    kw = tsengine.engine_kwargs_for(model_dir, {"max_loras": 4, "max_model_len": 2048, "disable_log_stats": True},
                                    enable_lora=True, max_lora_rank=16)
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
    tok = AutoTokenizer.from_pretrained(kw["model"])
    lora = LoRARequest("bench", 1, adapter)
    await llm.add_lora(lora)
    rows = []
    try:
        for i, p in enumerate([prepared[0]] + prepared):
            ids = tok(p["prompt"], add_special_tokens=False)["input_ids"]
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
            t = time.perf_counter()
            final = None
            async for out in llm.generate(TokensPrompt(prompt_token_ids=ids), params, f"direct-{i}", lora_request=lora):
                final = out
            dt = time.perf_counter() - t
            if i:
                c = final.outputs[0]
                rows.append({"latency_s": dt, "tokens": len(c.token_ids), "gamma": p["gamma"],
                             "same_text": c.text == p["text"], "endpoint_latency_s": p["endpoint_latency_s"]})
    finally:
        llm.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default=None)
    p.add_argument("--n", type=int, default=16, help="GSM8K test questions")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = p.parse_args(argv)

    from tokenskip import assets
    from tokenskip.data import load_questions

    model_dir = assets.resolve_model(args.model)
    adapter, adapter_kind = find_adapter(model_dir, args.adapter)
    questions = [r["question"] for r in load_questions("gsm8k", "test", limit=args.n).rows]

    endpoint, prepared = run_endpoint(args, model_dir, adapter, questions)
    direct = asyncio.run(run_direct(args, model_dir, adapter, prepared))

    per = {g: summarize(rows) for g, rows in endpoint["per_gamma"].items()}
    g_hi, g_lo = str(args.ratios[0]), str(args.ratios[-1])
    ep_mean = statistics.mean(r["endpoint_latency_s"] for r in direct)
    dir_mean = statistics.mean(r["latency_s"] for r in direct)
    report = {
        "model": args.model, "adapter": adapter, "adapter_kind": adapter_kind, "n": len(questions),
        "max_tokens": args.max_tokens, "serve_ready_s": round(endpoint["ready_s"], 1),
        "endpoint_per_gamma": per,
        "ratio_tokens": per[g_lo]["mean_tokens"] / per[g_hi]["mean_tokens"],
        "ratio_latency": per[g_lo]["mean_latency_s"] / per[g_hi]["mean_latency_s"],
        "direct": summarize(direct),
        "endpoint_vs_direct": {"endpoint_mean_s": ep_mean, "direct_mean_s": dir_mean,
                               "overhead_pct": 100 * (ep_mean / dir_mean - 1),
                               "overhead_ms_per_request": 1000 * (ep_mean - dir_mean),
                               "identical_outputs": sum(r["same_text"] for r in direct), "of": len(direct)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
