"""A thin layer over vLLM shared by generation, evaluation and benchmarks.

It only resolves model names, fills CPU-friendly defaults and normalises outputs;
vLLM does the work. Scripts that build an engine need an ``if __name__ == "__main__"``
guard (vLLM starts worker processes).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from tokenskip import assets


def on_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


CPU_ENV_KEYS = (
    "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_USE_AOT_COMPILE",
    "VLLM_CACHE_ROOT",
    "TORCHINDUCTOR_CACHE_DIR",
)
# GiB of KV cache a vLLM-CPU engine preallocates. One value for the quickstart, the tests and
# serving (the Makefile, the tests' conftest and the Serve config used to say 2, 1 and 1):
# 2 GiB (the value the quickstart was measured with) holds ~60 SmolLM2-135M sequences of
# 700 tokens in fp32; the tests' tiny models need less, and 1 GiB more per engine is no
# burden for a test machine.
CPU_KVCACHE_GIB = 2


def cpu_env_defaults() -> None:
    """Environment for vLLM engines started from this process, and for local Ray workers
    (the code starting Ray forwards :data:`CPU_ENV_KEYS`); users' values win. The one place
    these defaults are written: the Makefile, the tests and the Serve config set none.

    * ``VLLM_CACHE_ROOT`` / ``TORCHINDUCTOR_CACHE_DIR``: vLLM's and Inductor's compile caches
      under ``$TOKENSKIP_HOME`` (``vllm/``, ``inductor/``), so a second engine start reuses them.
    * On CPU only: ``VLLM_CPU_OMP_THREADS_BIND`` binds OpenMP threads to all cores (faster
      than vLLM's default, see benchmarks/RESULTS.md); ``VLLM_CPU_KVCACHE_SPACE`` is
      :data:`CPU_KVCACHE_GIB`; ``VLLM_USE_AOT_COMPILE=0`` because vllm-cpu 0.32's AOT-compiled
      artifact never loads back ("'function' object has no attribute 'finalize_loading'"), so
      every engine start recompiled the model; the Inductor cache path is reused instead.
    """
    home = assets.tokenskip_home()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(home / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(home / "inductor"))
    if not on_gpu():
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(1, os.cpu_count() or 1) - 1}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB))
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")


def cpu_env_vars() -> dict[str, str]:
    """The vLLM-CPU variables of this process (after :func:`cpu_env_defaults`), for a runtime_env."""
    return {k: os.environ[k] for k in CPU_ENV_KEYS if k in os.environ}


SMALL_MODEL_BYTES = 1 << 30  # weights under 1 GiB on disk (SmolLM2-135M in fp32: 0.5 GiB)


def is_small_model(path: str) -> bool:
    """Whether a local model directory holds under :data:`SMALL_MODEL_BYTES` of weights (a hub id
    that is not a local directory is not known to be small).

    >>> is_small_model("Qwen/Qwen2.5-7B-Instruct")
    False
    """
    from pathlib import Path

    p = Path(path)
    if not p.is_dir():
        return False
    weights = [f for pat in ("*.safetensors", "*.bin", "*.pt") for f in p.glob(pat)]
    return bool(weights) and sum(f.stat().st_size for f in weights) < SMALL_MODEL_BYTES


def engine_kwargs_for(
    model: str, engine_kwargs: dict | None = None, *, enable_lora: bool = False, max_lora_rank: int = 16, seed: int = 0
) -> dict:
    """Keyword arguments for ``vllm.LLM`` / ``AsyncEngineArgs``: user's engine kwargs win."""
    kw: dict[str, Any] = {"model": assets.resolve_model(model), "seed": seed}
    if not on_gpu():
        # AVX2-only CPUs run bf16 slowly; fp32 measured faster for the 135M model.
        kw.update({"dtype": "float32", "max_model_len": 4096})
        # vLLM's CPU scheduler defaults differ by entry point: vllm.LLM 256 sequences / 4096 batched
        # tokens, its async engine (ray.data.llm, serving) 128 / 2048. One setting for every engine, so
        # the generate stage and a bare vllm.LLM resolve the same; 128 / 2048 also made bare vllm.LLM
        # 10% faster on 200 x 256 tokens (fewer KV-cache preemptions; benchmarks/RESULTS.md "Generation").
        kw.update({"max_num_seqs": 128, "max_num_batched_tokens": 2048})
        if is_small_model(kw["model"]):
            # No torch.compile for small models on CPU: the compile costs more than it saves at the
            # sizes the quickstart and the tests run (benchmarks/engine_start.py: start + decode
            # 0.96x of a warm-cache compiled engine, 0.50x of a cold one, for 30 x 256 tokens).
            kw["enforce_eager"] = True
    if enable_lora:
        kw.update({"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 2})
    kw.update(engine_kwargs or {})
    return kw


MP_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def runs_in_process(kw: dict) -> bool:
    """Whether :func:`build_llm` runs the engine core in the calling process: on CPU, for the small
    models that also run eager (``kw`` from :func:`engine_kwargs_for`), unless the user chose an
    executor or set ``VLLM_ENABLE_V1_MULTIPROCESSING``.

    vLLM's default spawns an EngineCore process and a Worker process, each importing torch and vLLM
    again: half of a small model's engine start on 2 CPUs (benchmarks/engine_start.py: start 32 s
    in process vs 65 s, decode throughput the same). GPUs and larger models keep vLLM's default.
    Once an engine core has run in a process, vLLM caches its environment there, so a later sync
    engine in that same process runs its core in process too (its model still in a Worker
    process unless it is small).

    >>> runs_in_process({"enforce_eager": True}) == (not on_gpu() and MP_ENV not in os.environ)
    True
    >>> runs_in_process({"enforce_eager": True, "distributed_executor_backend": "mp"})
    False
    """
    return (
        not on_gpu()
        and bool(kw.get("enforce_eager"))
        and "distributed_executor_backend" not in kw
        and int(kw.get("tensor_parallel_size", 1)) == 1
        and MP_ENV not in os.environ
    )


def bound_cpus(bind: str | None = None) -> int | None:
    """How many CPUs vLLM's multiprocess executor gives its CPU worker's OpenMP threads: the CPUs
    named by ``VLLM_CPU_OMP_THREADS_BIND`` (``bind``; :func:`cpu_env_defaults` sets all cores),
    the CPUs this process may run on for ``auto``, None for ``nobind`` (vLLM leaves them alone).

    >>> bound_cpus("0-3"), bound_cpus("0,2,5-6"), bound_cpus("nobind"), bound_cpus("all")
    (4, 4, None, None)
    """
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") if bind is None else bind
    if bind == "nobind":
        return None
    if bind == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus: set[int] = set()
    try:
        for part in bind.split("|")[0].split(","):  # rank 0's list; "5,2-4"
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:  # not a CPU list: vLLM's own parser reports it; threads are left alone here
        return None
    return len(cpus) or None


def in_process_threads_env(kw: dict) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for a Ray task or actor that runs a small CPU model's engine in its own
    process (:func:`runs_in_process` on ``kw``): the CPUs of ``VLLM_CPU_OMP_THREADS_BIND``, the threads
    vLLM's multiprocess executor gives its Worker whatever its parent has. Ray otherwise sets a task's
    ``OMP_NUM_THREADS`` to its ``num_cpus`` (1 by default), and the engine decoded on one thread
    (benchmarks/engine_threads.py; benchmarks/RESULTS.md, "threads inside Ray"). It must be in the
    process's environment when it starts: vLLM-CPU's attention checks that the thread that plans a
    batch and the one that runs it see the same OpenMP thread count, and a ``torch.set_num_threads``
    made later in one thread does not reach a Ray actor's other threads. Empty otherwise, and for
    ``nobind`` (vLLM leaves its Worker's threads alone too).
    """
    threads = bound_cpus()
    if not threads or not runs_in_process(kw):
        return {}
    return {"OMP_NUM_THREADS": str(threads)}


def in_process_env(kw: dict) -> dict[str, str]:
    """Environment for a Ray actor whose async engine (``ray.data.llm``) should run the model the way
    :func:`build_llm` runs a small CPU model (:func:`runs_in_process` on ``kw``): in vLLM's EngineCore
    process itself (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the ``uni`` executor, no Worker process to
    spawn), on the CPUs of ``VLLM_CPU_OMP_THREADS_BIND`` (``OMP_NUM_THREADS``; Ray would give a 1-CPU
    actor 1). Empty otherwise, and for ``nobind``: vLLM's default processes.

    An async engine always has its EngineCore process; this saves starting the Worker's (a shorter
    engine start at the same decode speed: benchmarks/RESULTS.md, "Generation").
    """
    threads = in_process_threads_env(kw)
    return {MP_ENV: "0", **threads} if threads else {}


def _warn_if_few_threads() -> None:
    """A log line when this process decodes on fewer threads than vLLM's Worker would (a Ray task
    started without :func:`in_process_threads_env`, a ``ray job submit`` driver): it cannot be raised here."""
    import torch

    want = bound_cpus()
    if want and torch.get_num_threads() < want:
        import logging

        logging.getLogger(__name__).warning(
            "the in-process vLLM engine decodes on %d of the %d CPUs of VLLM_CPU_OMP_THREADS_BIND (OMP_NUM_THREADS=%s "
            "in this process; Ray sets it to a task's num_cpus): start the process with OMP_NUM_THREADS=%d "
            "(tokenskip.engine.in_process_threads_env), or run the evaluation as a Ray task (evaluate.placement: ray)",
            torch.get_num_threads(),
            want,
            os.environ.get("OMP_NUM_THREADS"),
            want,
        )


@contextlib.contextmanager
def spawn_env(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set while an engine starts its processes (they inherit it),
    restored afterwards.

    >>> with spawn_env({"TSK_DOCTEST": "1"}):
    ...     os.environ["TSK_DOCTEST"]
    '1'
    >>> "TSK_DOCTEST" in os.environ
    False
    """
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_llm(model: str, engine_kwargs: dict | None = None, **kwargs: Any):
    """A ``vllm.LLM`` for ``model`` (embedded name, hub id or path); in this process for small
    models on CPU (:func:`runs_in_process`; in a Ray task or actor, start it with
    :func:`in_process_threads_env` in its env so it gets the CPUs vLLM's Worker would). Release
    it with :func:`close_llm`."""
    cpu_env_defaults()
    from vllm import LLM

    kw = engine_kwargs_for(model, engine_kwargs, **kwargs)
    if not runs_in_process(kw):
        return LLM(**kw)
    _warn_if_few_threads()
    # Only while the engine is built: processes started later (Ray workers, servers) keep vLLM's
    # default, and async engines always run their core in a process of their own.
    with spawn_env({MP_ENV: "0"}):
        return LLM(**kw, distributed_executor_backend="uni")


def close_llm(llm: Any) -> None:
    """Shut a :func:`build_llm` engine down. An engine core that ran in this process froze the heap
    it found (``gc.freeze``, to shorten GC pauses), the model's weights among it: this unfreezes it,
    so that once the caller drops its last reference ``gc.collect()`` frees the engine."""
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # older/newer vLLM: dropping the object shuts it down
        pass
    gc.unfreeze()


def sampling_params(max_new_tokens: int, temperature: float = 0.0, seed: int = 0, **extra: Any):
    from vllm import SamplingParams

    return SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed, **extra)


def lora_request(adapter_path: str | None, name: str | None = None, lora_id: int = 1):
    if not adapter_path:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(name or os.path.basename(adapter_path.rstrip("/")) or "adapter", lora_id, adapter_path)


@dataclass
class Completion:
    text: str
    output_tokens: int
    prompt_tokens: int
    finish_reason: str | None


def generate(
    llm: Any, prompts: Sequence[Any], params: Any, lora: Any = None, use_tqdm: bool = False
) -> list[Completion]:
    """Generate for a list of prompts (strings or ``{"prompt_token_ids": [...]}``); one
    :class:`Completion` per prompt, in order."""
    outs = llm.generate(list(prompts), params, lora_request=lora, use_tqdm=use_tqdm)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append(Completion(c.text, len(c.token_ids), len(o.prompt_token_ids or []), c.finish_reason))
    return result


def merged_model_dir(model: str, adapter_dir: str, cache_root: str | os.PathLike | None = None) -> str:
    """The base model with a LoRA adapter merged in, saved once as a plain checkpoint.

    vLLM-CPU's LoRA kernels are an order of magnitude slower than its plain path, so a
    single-adapter evaluation on CPU runs the merged weights instead (same function,
    up to float rounding). Cached by the adapter's content hash; atomic and locked.
    """
    import hashlib
    from pathlib import Path

    adapter = Path(adapter_dir)
    h = hashlib.sha256(model.encode())
    for f in sorted(adapter.glob("adapter_*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    root = Path(cache_root) if cache_root else assets.tokenskip_home() / "merged"
    target = root / h.hexdigest()[:16]

    def build(out: Path) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base_dir = assets.resolve_model(model)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(out), safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(str(out))

    return str(assets.build_once(target, build))
