"""The shipped Serve config through Ray's own CLIs: `serve deploy` to a running cluster
(its own `ray start --head` on 127.0.0.1), `serve run` in the foreground, and
`tokenskip serve`. Each starts and stops what it uses; the model is the tiny Llama.

    flock /tmp/tokenskip-heavy.lock .venv/bin/python -m pytest -q tests/test_serve_cli.py -m 'slow or not slow' -s
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tokenskip.testing import free_ports, lists_models, wait_http

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE = "tiny-llama"


def shipped_config(
    tmp_path: Path, tiny_llama: str, adapter: str | None, port: int, name: str = "serve_config.yaml", **extra
) -> Path:
    """serving/serve_config.yaml as shipped, with the tiny model, a free port and (optionally)
    one adapter (plus ``extra`` args); everything else (deployments, autoscaling, runtime_env)
    unchanged."""
    conf = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    conf["http_options"]["port"] = port
    args = conf["applications"][0]["args"]
    args.update(
        {
            "model": tiny_llama,
            "model_id": BASE,
            "engine_kwargs": {"max_model_len": 512},
            "default_max_tokens": 6,
            "adapters": [{"name": "a", "path": adapter}] if adapter else [],
            **extra,
        }
    )
    path = tmp_path / name
    path.write_text(yaml.safe_dump(conf))
    return path


def _exited_output(proc: subprocess.Popen):
    """The server's piped output, read only once it has exited (reading a live pipe blocks)."""
    return lambda: proc.stdout.read() if proc.poll() is not None else ""


def _check_endpoint(port: int, with_adapter: bool, key: str = "x") -> None:
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
    ids = [m.id for m in c.models.list().data]
    assert BASE in ids and ((f"{BASE}:a" in ids) == with_adapter), ids
    r = c.completions.create(model=BASE, prompt="hi")
    assert r.usage.completion_tokens == 6  # default_max_tokens from the config's args
    if with_adapter:
        r = c.chat.completions.create(
            model=f"{BASE}:a",
            messages=[{"role": "user", "content": "What is 2+3?"}],
            max_tokens=4,
            extra_body={"compression_ratio": 0.5, "return_prompt": True},
        )
        assert r.model_extra["compression_ratio"] == 0.5
        assert "<|eot_id|>0.5<|eot_id|>" in r.model_extra["tokenskip"]["prompt"]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model=f"{BASE}:missing", prompt="hi")


def _check_docs(port: int) -> None:
    """`docs: true` serves /openapi.json and /docs (tests/test_serving.py checks they're off by default)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=60) as r:
        spec = json.loads(r.read())
    assert "/v1/chat/completions" in spec["paths"] and "/openapi.json" not in spec["paths"], sorted(spec["paths"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/docs", timeout=60) as r:
        assert r.status == 200 and b"swagger" in r.read().lower()


KEY_ENV = "TOKENSKIP_TEST_API_KEYS"
SECRET = "sk-tokenskip-test-4f1c9e27"


@pytest.fixture
def ray_head_with_keys(monkeypatch, request):
    """The `ray start --head` cluster with API keys in its processes' environment (the env
    route, as a Kubernetes Secret would set it)."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.delenv("TOKENSKIP_TEST_MISSING_KEYS", raising=False)
    return request.getfixturevalue("ray_head")


def _wait_app(serve: str, address: str, env: dict, want: str, timeout: float = 360) -> dict:
    deadline, status = time.time() + timeout, ""
    while time.time() < deadline:
        s = subprocess.run([serve, "status", "-a", address], env=env, capture_output=True, text=True, timeout=60)
        status = s.stdout
        apps = (yaml.safe_load(status) or {}).get("applications") or {}
        app = apps.get("tokenskip") or {}
        if app.get("status") == want:
            return app
        if want == "RUNNING":
            assert app.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), status
        time.sleep(3)
    pytest.fail(f"app not {want} in time:\n{status}")


def test_serve_deploy_to_running_cluster(ray_head_with_keys, tiny_llama, tiny_adapters, tmp_path):
    """`serve deploy serving/serve_config.yaml -a <dashboard>`: with ``api_key_env`` naming a
    variable the cluster doesn't have, the app fails to deploy with an error naming it (auth
    fails closed); with the keys in the cluster's environment the config deploys as written,
    `serve status` reports it RUNNING, `serve config` never shows the key, requests need it,
    the OpenAI API answers, `docs: true` serves /docs, `serve shutdown` removes it."""
    address, env = ray_head_with_keys
    port = free_ports(1)[0]
    serve = str(BIN / "serve")
    missing = shipped_config(
        tmp_path, tiny_llama, None, port, "missing.yaml", api_key_env="TOKENSKIP_TEST_MISSING_KEYS"
    )
    r = subprocess.run(
        [serve, "deploy", str(missing), "-a", address], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    app = _wait_app(serve, address, env, "DEPLOY_FAILED", timeout=180)
    assert "TOKENSKIP_TEST_MISSING_KEYS is not set" in app.get("message", ""), app
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)

    cfg = shipped_config(tmp_path, tiny_llama, tiny_adapters[0], port, api_key_env=KEY_ENV, docs=True)
    r = subprocess.run([serve, "deploy", str(cfg), "-a", address], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    app = _wait_app(serve, address, env, "RUNNING")
    deployments = app["deployments"]
    assert set(deployments) == {"OpenAIIngress", "TokenSkipModel"}, app
    shown = subprocess.run([serve, "config", "-a", address], env=env, capture_output=True, text=True, timeout=60)
    assert KEY_ENV in shown.stdout and SECRET not in shown.stdout + shown.stderr, shown.stdout
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers=headers), timeout=30
            )
        assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"
    _check_endpoint(port, with_adapter=True, key=SECRET)
    _check_docs(port)
    r = subprocess.run([serve, "shutdown", "-a", address, "-y"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)


def _stop(proc: subprocess.Popen, sig: int) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_serve_run_foreground(tiny_llama, tmp_path):
    """`serve run serving/serve_config.yaml`: starts its own local Ray, serves, Ctrl-C stops it."""
    port = free_ports(1)[0]
    cfg = shipped_config(tmp_path, tiny_llama, None, port)
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", str(cfg)],
        cwd=ROOT,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 300, lists_models, _exited_output(proc), interval=2)
        _check_endpoint(port, with_adapter=False)
    finally:
        _stop(proc, signal.SIGINT)


@pytest.mark.slow
def test_tokenskip_serve_cli(tiny_llama, tmp_path):
    """`tokenskip serve --config <Serve config>` starts its own local Ray + Serve and stops on SIGTERM."""
    port = free_ports(1)[0]
    cfg = shipped_config(tmp_path, tiny_llama, None, port)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray_jobs.cli",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(port),
            "--num-cpus",
            "4",
            "default_max_tokens=6",
        ],
        cwd=ROOT,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 300, lists_models, _exited_output(proc), interval=2)
        _check_endpoint(port, with_adapter=False)
    finally:
        assert _stop(proc, signal.SIGTERM) == 0
