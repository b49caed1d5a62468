"""Ray set-up shared by the entrypoints (``ray_jobs.runner``), the Serve launcher and benchmarks."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("tokenskip")

# Passed on to local Ray workers: the offline caches and switches the driver runs with.
WORKER_ENV_KEYS = (
    "TOKENSKIP_HOME",
    "TORCH_EXTENSIONS_DIR",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TIKTOKEN_CACHE_DIR",
    "TOKENIZERS_PARALLELISM",
)


def init_ray(ray_kwargs: dict[str, Any] | None = None, force_local: bool = False) -> None:
    """Connect to the cluster the job runs in (``ray job submit`` sets RAY_ADDRESS), or
    start a local single-node instance on 127.0.0.1 with ``ray_kwargs`` from config."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    kwargs.update(ray_kwargs or {})
    if os.environ.get("RAY_ADDRESS") and not force_local:
        # Inside `ray job submit` (or pointed at a cluster): the job's runtime_env already
        # applies; adding one here would conflict with it.
        for local_only in ("num_cpus", "num_gpus", "_temp_dir", "include_dashboard", "object_store_memory"):
            kwargs.pop(local_only, None)
        ray.init(**kwargs)
    else:
        # Local workers need the same offline caches and vLLM settings as the driver.
        from tokenskip.engine import CPU_ENV_KEYS, cpu_env_defaults

        cpu_env_defaults()
        env = {k: os.environ[k] for k in (*WORKER_ENV_KEYS, *CPU_ENV_KEYS) if k in os.environ}
        if env:
            runtime_env = dict(kwargs.pop("runtime_env", None) or {})
            runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
            kwargs["runtime_env"] = runtime_env
        kwargs.setdefault("_node_ip_address", "127.0.0.1")
        ray.init(address="local", **kwargs)
    log.info("ray resources: %s", ray.cluster_resources())


def runtime_env_with(env: dict[str, str]) -> dict | None:
    """A task's or actor's runtime_env setting ``env``, less the keys the job's own runtime_env sets
    (Ray refuses to merge a conflict; the job's value wins); None when nothing is left."""
    import ray

    job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    env_vars = {k: v for k, v in env.items() if k not in job_env}
    return {"env_vars": env_vars} if env_vars else None
