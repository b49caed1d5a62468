"""Serving benchmark: γ = 1.0 vs 0.5 through the endpoint, and the endpoint vs vLLM directly.

    flock /tmp/tokenskip-heavy.lock .venv/bin/python benchmarks/serve.py --n 8 --max-tokens 128 \
        --out benchmarks/results/serve.json

1. Endpoint (Ray Serve app, OpenAI SDK, one request at a time — the paper's batch-1 latency):
   the same GSM8K test questions at γ = 1.0 and γ = 0.5 on an adapter; mean completion
   tokens and latency per request, and their ratios (γ=0.5 / γ=1.0).
2. Router overhead: the same requests (the prompt the endpoint rendered, same LoRA, greedy:
   identical outputs) sent straight to a vLLM ``AsyncLLM`` with the replica's engine
   arguments in this process, interleaved with the endpoint request by request (alternating
   which goes first), once with the adapter and once on the base model.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def find_adapter(model_dir: str, explicit: str | None) -> tuple[str, str]:
    if explicit:
        return explicit, "given"
    found = sorted(
        glob.glob(str(ROOT / "runs" / "**" / "train" / "adapter" / "adapter_config.json"), recursive=True),
        key=os.path.getmtime,
    )
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
    return {
        "n": len(rows),
        "mean_tokens": statistics.mean(r["tokens"] for r in rows),
        "mean_latency_s": statistics.mean(lat),
        "p50_latency_s": statistics.median(lat),
        "ms_per_token": 1000 * sum(lat) / max(1, sum(r["tokens"] for r in rows)),
    }


class DirectEngine:
    """A vLLM ``AsyncLLM`` in this process with the replica's engine arguments, driven from a
    private event loop one request at a time: "calling the vLLM engine directly"."""

    def __init__(self, model_dir: str, adapter: str, max_loras: int, max_lora_rank: int, engine_kwargs: dict):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        from tokenskip import engine as tsengine

        tsengine.cpu_env_defaults()
        kw = tsengine.engine_kwargs_for(
            model_dir,
            {"max_loras": max_loras, **engine_kwargs, "disable_log_stats": True},
            enable_lora=True,
            max_lora_rank=max_lora_rank,
        )
        self.loop = asyncio.new_event_loop()
        self.llm = self.loop.run_until_complete(self._make(AsyncLLM, AsyncEngineArgs(**kw)))
        self.tok = AutoTokenizer.from_pretrained(kw["model"])
        self.lora = LoRARequest("bench", 1, adapter)
        self.loop.run_until_complete(self.llm.add_lora(self.lora))
        self._ids = 0

    @staticmethod
    async def _make(cls, args):
        return cls.from_engine_args(args)

    async def _generate(self, ids: list[int], max_tokens: int, lora: bool):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
        self._ids += 1
        final = None
        async for out in self.llm.generate(
            TokensPrompt(prompt_token_ids=ids), params, f"direct-{self._ids}", lora_request=self.lora if lora else None
        ):
            final = out
        return final.outputs[0]

    def complete(self, prompt: str, max_tokens: int, lora: bool) -> tuple[float, str, int]:
        """(latency s, text, completion tokens) for an already rendered prompt."""
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        t = time.perf_counter()
        c = self.loop.run_until_complete(self._generate(ids, max_tokens, lora))
        return time.perf_counter() - t, c.text, len(c.token_ids)

    def close(self) -> None:
        import gc

        self.llm.shutdown()
        self.llm = None  # collected now, not at interpreter exit (AsyncLLM.__del__ then fails)
        gc.collect()
        self.loop.close()


def endpoint_call(client, model: str, question: str, max_tokens: int, gamma: float | None) -> tuple[float, Any]:
    extra = {"return_prompt": True}
    if gamma is not None:
        extra["compression_ratio"] = gamma
    t = time.perf_counter()
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=extra,
    )
    return time.perf_counter() - t, r


def run(args, model_dir: str, adapter: str, questions: list[str]) -> dict:
    import openai
    from ray import serve

    from pipelines.common import init_ray
    from serving.app import build_app
    from serving.routing import apply_ratio_to_messages, normalize_messages
    from tokenskip import prompt as tsprompt
    from tokenskip.testing import free_ports

    init_ray({"num_cpus": 4})
    port = free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Prefix caching off on both sides: section 1 sends the same prompts to the replica first.
    engine_kwargs = {"max_model_len": 2048, "enable_prefix_caching": False}
    app_args = {
        "model": model_dir,
        "model_id": "base",
        "adapters": [{"name": "bench", "path": adapter}],
        "engine_kwargs": engine_kwargs,
        "max_adapters_per_replica": 4,
        "max_lora_rank": 16,
        "ingress_deployment": {"ray_actor_options": {"num_cpus": 0.1}},
        "model_deployment": {"ray_actor_options": {"num_cpus": 1}},
    }
    t0 = time.time()
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    ready = time.time() - t0
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    report: dict = {"serve_ready_s": round(ready, 1)}
    try:
        # 1. γ through the endpoint, batch 1 (first request of each γ = warm-up, dropped).
        per_gamma: dict[str, list[dict]] = {}
        for gamma in args.ratios:
            rows = []
            for i, q in enumerate([questions[0]] + questions):
                dt, r = endpoint_call(client, "base:bench", q, args.max_tokens, gamma)
                if i:
                    rows.append(
                        {
                            "latency_s": dt,
                            "tokens": r.usage.completion_tokens,
                            "gamma": (r.model_extra or {})["compression_ratio"],
                        }
                    )
            per_gamma[str(gamma)] = rows
        report["per_gamma_rows"] = per_gamma

        # 2. Endpoint vs the engine called directly, interleaved request by request (the order
        #    alternates) so that drift on a shared machine hits both sides alike.
        direct = DirectEngine(model_dir, adapter, 4, 16, engine_kwargs)
        try:
            for label, model, gamma, lora in (("adapter", "base:bench", 1.0, True), ("base", "base", None, False)):
                pairs = []
                qs = questions[: args.overhead_n]
                for i, q in enumerate([qs[0]] + qs):
                    # The replica's own rendering (serving.routing + tokenskip.prompt), done here so
                    # neither engine sees the prompt before its timed request (prefix caching).
                    prompt = tsprompt.render_messages(
                        direct.tok, apply_ratio_to_messages(normalize_messages([{"role": "user", "content": q}]), gamma)
                    )
                    if i % 2 == 0:
                        ep_dt, r = endpoint_call(client, model, q, args.max_tokens, gamma)
                        d_dt, d_text, d_tokens = direct.complete(prompt, args.max_tokens, lora)
                    else:
                        d_dt, d_text, d_tokens = direct.complete(prompt, args.max_tokens, lora)
                        ep_dt, r = endpoint_call(client, model, q, args.max_tokens, gamma)
                    if i:
                        pairs.append(
                            {
                                "endpoint_s": ep_dt,
                                "direct_s": d_dt,
                                "tokens": r.usage.completion_tokens,
                                "same_prompt": r.model_extra["tokenskip"]["prompt"] == prompt,
                                "same_output": r.choices[0].message.content == d_text
                                and r.usage.completion_tokens == d_tokens,
                            }
                        )
                report[f"overhead_{label}"] = pairs
        finally:
            direct.close()
    finally:
        serve.shutdown()
    return report


def overhead_summary(pairs: list[dict]) -> dict:
    ep = statistics.mean(p["endpoint_s"] for p in pairs)
    d = statistics.mean(p["direct_s"] for p in pairs)
    diffs = sorted(1000 * (p["endpoint_s"] - p["direct_s"]) for p in pairs)
    return {
        "n": len(pairs),
        "mean_tokens": statistics.mean(p["tokens"] for p in pairs),
        "endpoint_mean_s": ep,
        "direct_mean_s": d,
        "overhead_pct": 100 * (ep / d - 1),
        "overhead_ms_mean": 1000 * (ep - d),
        "overhead_ms_median": statistics.median(diffs),
        "identical_outputs": sum(p["same_output"] for p in pairs),
        "same_prompt": sum(p["same_prompt"] for p in pairs),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default=None)
    p.add_argument("--n", type=int, default=16, help="GSM8K test questions")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--overhead-n", type=int, default=8, help="questions for the endpoint-vs-direct pairs")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    args = p.parse_args(argv)

    from tokenskip import assets
    from tokenskip.data import load_questions

    model_dir = assets.resolve_model(args.model)
    adapter, adapter_kind = find_adapter(model_dir, args.adapter)
    questions = [r["question"] for r in load_questions("gsm8k", "test", limit=args.n).rows]

    raw = run(args, model_dir, adapter, questions)
    per = {g: summarize(rows) for g, rows in raw["per_gamma_rows"].items()}
    g_hi, g_lo = str(args.ratios[0]), str(args.ratios[-1])
    report = {
        "model": args.model,
        "adapter": adapter,
        "adapter_kind": adapter_kind,
        "n": len(questions),
        "max_tokens": args.max_tokens,
        "serve_ready_s": raw["serve_ready_s"],
        "endpoint_per_gamma": per,
        "ratio_tokens": per[g_lo]["mean_tokens"] / per[g_hi]["mean_tokens"],
        "ratio_latency": per[g_lo]["mean_latency_s"] / per[g_hi]["mean_latency_s"],
        "endpoint_vs_direct": {
            "adapter": overhead_summary(raw["overhead_adapter"]),
            "base": overhead_summary(raw["overhead_base"]),
        },
        "raw": raw,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "raw"}, indent=2))
    for label, o in report["endpoint_vs_direct"].items():
        print(
            f"endpoint vs direct ({label}): {o['endpoint_mean_s']:.3f} vs {o['direct_mean_s']:.3f} s per request "
            f"({o['mean_tokens']:.0f} tokens) -> overhead {o['overhead_pct']:+.2f} % "
            f"(median {o['overhead_ms_median']:+.0f} ms); identical outputs {o['identical_outputs']}/{o['n']}"
        )
    print(f"gamma {g_lo} vs {g_hi}: tokens x{report['ratio_tokens']:.2f}, latency x{report['ratio_latency']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
