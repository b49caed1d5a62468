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



@pytest.mark.parametrize("bind, want", [("0-1", 2), ("nobind", 1)])
def test_in_process_engine_in_a_ray_task_gets_the_bound_cpus_not_rays_one_thread(
    ray_local, tiny_llama, monkeypatch, bind, want
):
    """A num_cpus=1 Ray task has OMP_NUM_THREADS=1 (Ray sets it), as the evaluate stage's task and the
    vllm_udf backend's actors do. vLLM's Worker process would get the CPUs of VLLM_CPU_OMP_THREADS_BIND;
    an engine run in the task's own process gets them from engine.in_process_threads_env (it decoded on one
    thread: benchmarks/engine_threads.py), and decodes with them. ``nobind`` leaves Ray's setting, as
    vLLM leaves its Worker's."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    env = engine.in_process_threads_env(engine.engine_kwargs_for(tiny_llama))

    @ray_local.remote(num_cpus=1, max_calls=1)  # defined here: pickled by value (tests/ is not importable there)
    def threads_in_task(model: str) -> tuple[int, str]:
        import torch

        from tokenskip import engine

        llm = engine.build_llm(model)
        text = engine.generate(llm, [{"prompt_token_ids": [1, 2, 3]}], engine.sampling_params(4))[0].text
        engine.close_llm(llm)
        return torch.get_num_threads(), text

    task = threads_in_task.options(runtime_env={"env_vars": env}) if env else threads_in_task
    threads, text = ray_local.get(task.remote(tiny_llama))
    assert threads == want
    assert isinstance(text, str)


def test_evaluate_task_and_vllm_udf_actors_get_the_bound_cpus(cpu, monkeypatch, tiny_llama, ray_local):
    from pipelines.evaluate import _task_options
    from pipelines.generate import build_dataset
    from tokenskip.config import EvalConfig, GenerateConfig

    monkeypatch.delenv(engine.MP_ENV, raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    opts = _task_options(EvalConfig(model=tiny_llama, output_dir="unused"))
    assert opts["num_cpus"] == 1 and opts["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    cfg = GenerateConfig(model=tiny_llama, max_new_tokens=8, max_prompt_tokens=64, backend="vllm_udf")
    op = build_dataset([{"id": "a", "question": "1+1?", "gold": "2", "kind": "gsm8k"}], cfg)._logical_plan.dag
    while "VLLMGenerateUDF" not in op.name:
        op = op.input_dependencies[0]
    assert op.ray_remote_args["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"


def test_bound_cpus_reads_vllms_bind_syntax():
    assert engine.bound_cpus("0-1") == 2 and engine.bound_cpus("3") == 1
    assert engine.bound_cpus("0-1,4-5|6-9") == 4  # rank 0's list
    assert engine.bound_cpus("nobind") is None
    assert engine.bound_cpus("auto") >= 1


def test_async_engine_env_runs_a_small_cpu_model_in_its_engine_core(cpu, monkeypatch, tmp_path):
    monkeypatch.delenv(engine.MP_ENV, raising=False)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    kw = engine.engine_kwargs_for(_model_dir(tmp_path, "small", 1000))
    assert engine.in_process_env(kw) == {engine.MP_ENV: "0", "OMP_NUM_THREADS": "2"}
    assert engine.in_process_env({**kw, "distributed_executor_backend": "mp"}) == {}  # the user's executor wins
    big = engine.engine_kwargs_for(_model_dir(tmp_path, "big", engine.SMALL_MODEL_BYTES + 1))
    assert engine.in_process_env(big) == {}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # vLLM's default processes, Ray's threads
    assert engine.in_process_env(kw) == {}
