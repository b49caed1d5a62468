"""Engine defaults (tokenskip/engine.py): small models run eager on CPU (no torch.compile) and
their sync engines in process, a user's engine kwargs win, and an unknown or large model keeps
vLLM's default."""

from __future__ import annotations

import pytest

from tokenskip import engine


@pytest.fixture
def cpu(monkeypatch):
    monkeypatch.setattr(engine, "on_gpu", lambda: False)


def _model_dir(tmp_path, name, size):
    d = tmp_path / name
    d.mkdir()
    with open(d / "model.safetensors", "wb") as f:
        f.truncate(size)  # sparse: the size is what counts
    return str(d)


def test_small_local_model_runs_eager_on_cpu(cpu, tmp_path):
    kw = engine.engine_kwargs_for(_model_dir(tmp_path, "small", 10_000_000))
    assert kw["enforce_eager"] is True and kw["dtype"] == "float32"


def test_large_or_remote_model_keeps_the_compiled_default(cpu, tmp_path):
    assert "enforce_eager" not in engine.engine_kwargs_for(_model_dir(tmp_path, "big", engine.SMALL_MODEL_BYTES + 1))
    assert "enforce_eager" not in engine.engine_kwargs_for("Qwen/Qwen2.5-7B-Instruct")
    assert not engine.is_small_model(str(tmp_path))  # a directory without weights is not known to be small


def test_users_engine_kwargs_win(cpu, tmp_path):
    kw = engine.engine_kwargs_for(_model_dir(tmp_path, "small", 1000), {"enforce_eager": False})
    assert kw["enforce_eager"] is False


def test_gpu_keeps_vllm_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(engine, "on_gpu", lambda: True)
    kw = engine.engine_kwargs_for(_model_dir(tmp_path, "small", 1000))
    assert "enforce_eager" not in kw and "dtype" not in kw


def test_small_model_engine_runs_in_process_unless_told_otherwise(cpu, monkeypatch, tmp_path):
    monkeypatch.delenv(engine.MP_ENV, raising=False)
    kw = engine.engine_kwargs_for(_model_dir(tmp_path, "small", 1000))
    assert engine.runs_in_process(kw)
    assert not engine.runs_in_process({**kw, "distributed_executor_backend": "mp"})  # the user's executor wins
    assert not engine.runs_in_process({**kw, "tensor_parallel_size": 2})
    big = _model_dir(tmp_path, "big", engine.SMALL_MODEL_BYTES + 1)
    assert not engine.runs_in_process(engine.engine_kwargs_for(big))  # compiled, vLLM's default processes
    monkeypatch.setenv(engine.MP_ENV, "1")  # so does the user's vLLM setting, either way
    assert not engine.runs_in_process(kw)
    monkeypatch.setattr(engine, "on_gpu", lambda: True)
    monkeypatch.delenv(engine.MP_ENV)
    assert not engine.runs_in_process(engine.engine_kwargs_for(_model_dir(tmp_path, "small2", 1000)))
