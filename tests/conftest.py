"""Shared fixtures. Expensive things (converted SmolLM2, DeepSpeed op build, tiny models)
are cached under $TOKENSKIP_HOME, which the Makefile points into the repo's .cache/."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


_BIN = Path(sys.executable).parent


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                "PATH": f"{_BIN}:{env.get('PATH', '')}"})
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def ray_head():
    """A real `ray start --head --block` on 127.0.0.1 with its own temp dir and ports (yields the
    dashboard address and the env to reach it); stopped through its own process, never `ray stop`."""
    tmp = Path(f"/tmp/tsk-ray-{os.getpid()}")  # short: Ray's socket paths have a length limit
    from tokenskip.testing import free_ports

    gcs, dash, client, mgr, node_mgr, dash_agent, metrics = free_ports(7)
    env = _env(tmp)
    cmd = [str(_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
           f"--object-manager-port={mgr}", f"--node-manager-port={node_mgr}", f"--dashboard-agent-listen-port={dash_agent}",
           f"--metrics-export-port={metrics}", f"--temp-dir={tmp}", "--num-cpus=4", "--include-dashboard=true",
           "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            r = subprocess.run([str(_BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if r.returncode == 0:
                break
            if head.poll() is not None:
                pytest.fail(f"ray start exited: {head.stdout.read()[-3000:]}")
            time.sleep(2)
        else:
            pytest.fail("Ray head did not come up in 120 s")
        yield address, env
    finally:
        # Stop exactly this cluster: SIGTERM its `ray start --block` process (it tears down the
        # processes it started), then make sure nothing of its session is left.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        import psutil

        left = [p for p in psutil.process_iter(["pid", "cmdline"]) if str(tmp) in " ".join(p.info["cmdline"] or [])]
        for p in left:
            p.kill()
        assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "cluster processes survived"
