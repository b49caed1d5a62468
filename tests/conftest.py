"""Shared fixtures. Expensive things (converted SmolLM2, DeepSpeed op build, tiny models)
are cached under $TOKENSKIP_HOME, which the Makefile points into the repo's .cache/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENSKIP_HOME", str(ROOT / ".cache" / "tokenskip"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["TOKENSKIP_HOME"]) / "torch_extensions"))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false",
               "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    d = Path(os.environ["TOKENSKIP_HOME"]) / "test-fixtures"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_llama(fixtures_dir) -> str:
    """Path of a tiny random Llama (SmolLM2 tokenizer, head dim 64)."""
    from tokenskip.testing import build_tiny_llama

    return str(build_tiny_llama(fixtures_dir / "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(fixtures_dir) -> str:
    """Path of a tiny random BERT token classifier (MiniLM tokenizer)."""
    from tokenskip.testing import build_tiny_bert_classifier

    return str(build_tiny_bert_classifier(fixtures_dir / "tiny-bert"))


@pytest.fixture(scope="session")
def smollm2() -> str:
    from tokenskip import assets

    return str(assets.ensure_smollm2())


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray instance for the whole session (ray.init costs 6-10 s here)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    from pipelines.common import init_ray

    init_ray({"num_cpus": 4, "_temp_dir": str(tmp_path_factory.mktemp("ray"))}, force_local=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama, fixtures_dir) -> tuple[str, str]:
    """Two different random LoRA adapters for the tiny Llama."""
    from tokenskip.testing import build_tiny_adapter

    return (str(build_tiny_adapter(tiny_llama, fixtures_dir / "tiny-adapter-a", seed=1)),
            str(build_tiny_adapter(tiny_llama, fixtures_dir / "tiny-adapter-b", seed=2)))
