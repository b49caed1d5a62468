"""Shared fixtures. Expensive things (converted SmolLM2, DeepSpeed op build, tiny models)
are cached under $TOKENSKIP_HOME, which the Makefile points into the repo's .cache/."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENSKIP_HOME", str(ROOT / ".cache" / "tokenskip"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(os.environ["TOKENSKIP_HOME"]) / "torch_extensions"))
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_k, _v)
# vLLM-CPU settings: the same single source as every run (engines started here, and their
# subprocesses and `ray job submit` runtime envs built from this environment, inherit them).
from tokenskip.engine import cpu_env_defaults  # noqa: E402

cpu_env_defaults()


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
    """One local Ray instance for the whole session (starting one takes seconds: benchmarks/RESULTS.md)."""
    import ray

    if ray.is_initialized():
        route_worker_output_to_fds()
        yield ray
        return
    from pipelines.common import init_ray

    init_ray({"num_cpus": 4, "_temp_dir": str(tmp_path_factory.mktemp("ray"))}, force_local=True)
    route_worker_output_to_fds()
    yield ray
    ray.shutdown()


class _FdWriter:
    """A text sink bound to a file descriptor, not to whatever ``sys.stdout`` is at the moment."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, s: str) -> int:
        os.write(self.fd, s.encode("utf-8", "replace"))
        return len(s)

    def flush(self) -> None:
        pass


def route_worker_output_to_fds() -> None:
    """Issue 20: with ``log_to_driver`` Ray's ``ray_print_logs`` thread prints worker output
    with ``print(file=sys.stdout)``, looked up when each line arrives. The session's Ray
    outlives every test, so lines that arrive late (a Serve replica's vLLM shutting down after
    tests/test_serving.py) were printed into whatever ``sys.stdout`` was at that moment: during
    ``doctest.testmod`` that is doctest's own buffer, and the doctest in the next file failed
    with worker lines in its "Got:". Keep the stream (stage consoles watch it) but write it to
    fd 1 / fd 2: pytest's fd capture still files it under the running test, ``-s`` shows it,
    and doctest never sees it."""
    from ray._private import worker as rw
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    if not any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        return  # log_to_driver=False: nothing is streamed
    out, err = _FdWriter(1), _FdWriter(2)
    ignore_prefix = rw._should_ignore_worker_log_prefix(rw.global_worker)

    def to_fds(data: dict) -> None:
        rw.print_worker_logs(data, err if data["is_err"] else out, ignore_prefix)

    to_fds.tokenskip_fd_sink = True
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", to_fds)


# --------------------------------------------------------------------------- leak check (issue 20)
# After every test: state that one test can leave behind and that changes what later tests
# (doctests above all) see. A leak is reported as an error at the teardown of the test that
# caused it, not as a flaky failure somewhere later.

_PROJECT_PACKAGES = ("tokenskip", "serving", "pipelines", "ray_jobs")
# Variables the project and its tests read (libraries may set others of their own on import).
_WATCHED_ENV = ("TOKENSKIP_", "RAY_ADDRESS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME")
_ROOT_PREFIX, _VENV_PREFIX = str(ROOT) + os.sep, str(ROOT / ".venv") + os.sep
_project_names: list = [0, []]


def _project_attrs() -> list[tuple[dict, str, object, str]]:
    """(module dict, name, value, module name) of the functions, classes and submodules of the
    project's imported modules."""
    if len(sys.modules) != _project_names[0]:  # rescan only when modules were added or removed
        _project_names[:] = [
            len(sys.modules),
            [
                n
                for n in list(sys.modules)
                if n.startswith(_PROJECT_PACKAGES) and n.partition(".")[0] in _PROJECT_PACKAGES
            ],
        ]
    out = []
    for name in _project_names[1]:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        d = vars(mod)
        out += [
            (d, k, v, name)
            for k, v in list(d.items())
            if not k.startswith("__") and (callable(v) or isinstance(v, types.ModuleType))
        ]
    return out


def _own_file(mod) -> str | None:
    f = getattr(mod, "__file__", None)
    return f if isinstance(f, str) and f.startswith(_ROOT_PREFIX) and not f.startswith(_VENV_PREFIX) else None


def _new_duplicate_modules(before: set[str]) -> list[str]:
    """Project files imported during the test under a second module name (two copies of every
    class: isinstance and `except` stop matching, doctests print another qualified name)."""
    new = [n for n in sys.modules.keys() - before if _own_file(sys.modules[n])]
    if not new:
        return []
    names: dict[str, list[str]] = {}
    for name, mod in list(sys.modules.items()):
        f = _own_file(mod)
        if f and not name.startswith(("conftest", "test_")):
            names.setdefault(os.path.realpath(f), []).append(name)
    return sorted(f"{f} as {sorted(ns)}" for f, ns in names.items() if len(ns) > 1 and set(ns) & set(new))


def _root_logging() -> tuple:
    root = logging.getLogger()
    own = [h for h in root.handlers if not type(h).__module__.startswith("_pytest")]
    return root.level, own


def ray_streams_into_sys_stdout() -> bool:
    """True if this process runs Ray with Ray's own worker-output printer (issue 20)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - Ray internals moved
        return False
    return any(
        name == "ray_print_logs" and not getattr(h, "tokenskip_fd_sink", False) for name, h in dispatcher.handlers
    )


def state_snapshot() -> dict:
    return {
        "attrs": _project_attrs(),
        "modules": set(sys.modules),
        "logging": _root_logging(),
        "stdout": (sys.stdout, sys.stderr),
        "cwd": os.getcwd(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(_WATCHED_ENV)},
    }


def state_leaks(before: dict, after: dict) -> list[str]:
    """What changed between two snapshots that the next test would inherit."""
    leaks = []
    changed = sorted(f"{m}.{k}" for d, k, v, m in before["attrs"] if d.get(k, v) is not v)
    if changed:
        leaks.append(f"module attributes replaced and not restored (use monkeypatch): {', '.join(changed)}")
    dups = _new_duplicate_modules(before["modules"])
    if dups:
        leaks.append(f"project modules imported a second time under another name: {dups}")
    if after["logging"][0] != before["logging"][0] or after["logging"][1] != before["logging"][1]:
        leaks.append(
            f"root logger changed: level {before['logging'][0]} -> {after['logging'][0]}, "
            f"handlers {before['logging'][1]} -> {after['logging'][1]}"
        )
    if after["stdout"][0] is not before["stdout"][0] or after["stdout"][1] is not before["stdout"][1]:
        leaks.append(f"sys.stdout/sys.stderr replaced: {after['stdout']}")
    if after["cwd"] != before["cwd"]:
        leaks.append(f"working directory changed: {before['cwd']} -> {after['cwd']}")
    if after["env"] != before["env"]:
        old, new = before["env"], after["env"]
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        leaks.append(f"environment variables changed (use monkeypatch.setenv): {keys}")
    return leaks


@pytest.fixture(autouse=True)
def _no_leaked_state():
    before = state_snapshot()
    yield
    leaks = state_leaks(before, state_snapshot())
    if ray_streams_into_sys_stdout():
        leaks.append(
            "Ray runs in this process and prints worker output into whatever sys.stdout is when a line "
            "arrives (a later doctest's output); start it through the ray_local fixture"
        )
    if leaks:
        pytest.fail("this test leaves state behind for later tests:\n- " + "\n- ".join(leaks), pytrace=False)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama, fixtures_dir) -> tuple[str, str]:
    """Two different random LoRA adapters for the tiny Llama."""
    from tokenskip.testing import build_tiny_adapter

    return (
        str(build_tiny_adapter(tiny_llama, fixtures_dir / "tiny-adapter-a", seed=1)),
        str(build_tiny_adapter(tiny_llama, fixtures_dir / "tiny-adapter-b", seed=2)),
    )


_BIN = Path(sys.executable).parent


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{_BIN}:{env.get('PATH', '')}",
        }
    )
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def _ray_head(tag: str = ""):
    """A real `ray start --head --block` on 127.0.0.1 with its own temp dir and ports (yields the
    dashboard address and the env to reach it); stopped through its own process, never `ray stop`."""
    tmp = Path(f"/tmp/tsk-ray-{os.getpid()}{tag}")  # short: Ray's socket paths have a length limit
    from tokenskip.testing import free_ports

    gcs, dash, client, mgr, node_mgr, dash_agent, metrics = free_ports(7)
    env = _env(tmp)
    cmd = [
        str(_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client}",
        f"--object-manager-port={mgr}",
        f"--node-manager-port={node_mgr}",
        f"--dashboard-agent-listen-port={dash_agent}",
        f"--metrics-export-port={metrics}",
        f"--temp-dir={tmp}",
        "--num-cpus=4",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]
    head = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            r = subprocess.run(
                [str(_BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True
            )
            if r.returncode == 0:
                break
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited: {head.stdout.read()[-3000:]}")
            time.sleep(2)
        else:
            raise RuntimeError("Ray head did not come up in 120 s")
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
        assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], (
            "cluster processes survived"
        )


@pytest.fixture
def ray_head():
    with _ray_head() as head:
        yield head


def tiny_pipeline_config(run_dir: Path, model: str) -> dict:
    """The quickstart's shape at toy size, every stage (generate included), three γ evaluated."""
    return {
        "kind": "pipeline",
        "name": "tiny",
        "run_dir": str(run_dir),
        "model": model,
        "stages": ["generate", "prune", "build_sft", "train", "evaluate"],
        "ray": {"num_cpus": 4},
        "generate": {"data": {"name": "gsm8k", "split": "train", "limit": 4}, "max_new_tokens": 16, "shard_rows": 2},
        "prune": {"scorer": "self_info", "scorer_model": model, "target_tokenizer": model},
        "cots": {
            "data": {"name": "gsm8k", "split": "train", "limit": 24},
            "cot_source": "gold",
            "target_tokenizer": model,
        },
        "build_sft": {"val_fraction": 0.1},
        "train": {
            "max_steps": 3,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "cutoff_len": 384,
            "learning_rate": 1e-3,
            "checkpoint_every": 2,
            "scaling": {"num_workers": 1, "use_gpu": False},
        },
        "evaluate": {
            "datasets": ["gsm8k"],
            "limit": 3,
            "max_new_tokens": 16,
            "ratios": [1.0, 0.7, 0.5],
            "baselines": ["original", "truncation"],
            "latency_samples": 1,
        },
    }


@dataclass
class TinyPipelineRun:
    """One run of the tiny pipeline through `ray job submit` on a real Ray head, shared by the
    tests that check its console, its MLflow runs and the serving of its adapter (issue 20:
    one pipeline run instead of three)."""

    run_dir: Path
    config: Path
    output: str  # what `ray job submit` printed (stdout + stderr)
    returncode: int
    seconds: float
    env: dict  # the environment the job was submitted with (no RAY_ADDRESS)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_llama) -> TinyPipelineRun:
    import yaml

    from tokenskip.engine import CPU_ENV_KEYS

    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("tiny-pipeline")
    run_dir = tmp / "run"
    cfg_path = tmp / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_pipeline_config(run_dir, tiny_llama)))
    with _ray_head("-job") as (address, env):
        runtime_env = {
            "excludes": [".venv/", ".cache/", "runs/", ".git/", "*.egg-info/"],
            "env_vars": {
                k: env[k]
                for k in ("TOKENSKIP_HOME", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                          *CPU_ENV_KEYS)
                if k in env
            },
        }
        cmd = [str(_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(root),
               "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", "ray_jobs.pipeline", "--config", str(cfg_path)]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
        took = time.time() - t0
    return TinyPipelineRun(run_dir, cfg_path, r.stdout + r.stderr, r.returncode, took, env)
