import pytest

from tokenskip import artifacts as A


def test_partwriter_resume_and_finalize(tmp_path):
    w = A.PartWriter(tmp_path / "stage")
    w.write([{"id": "a", "x": 1}, {"id": "b", "x": 2}])
    w.reject([{"id": "c", "reason": "too long"}])
    # a crash leaves a temporary behind: it never counts
    (w.parts / ".part-x.parquet.tmp-1234").write_bytes(b"garbage")
    w2 = A.PartWriter(tmp_path / "stage")
    assert w2.done_ids() == {"a", "b", "c"}
    w2.write([{"id": "b", "x": 2}, {"id": "d", "x": 4}])  # a duplicate slips in
    rows, rejects = w2.finalize()
    assert [r["id"] for r in rows] == ["a", "b", "d"]
    assert rejects == [{"id": "c", "reason": "too long"}]
    assert not A.is_complete(w2.dir)
    with pytest.raises(A.StageError, match="not finished"):
        A.read_rows(w2.dir)
    A.write_manifest(w2.dir, "test", counts={"rows": 3})
    assert A.is_complete(w2.dir) and len(A.read_rows(w2.dir)) == 3
    m = A.read_manifest(w2.dir)
    assert m["counts"] == {"rows": 3} and "ray" in m["versions"]


def test_write_rows_formats(tmp_path):
    rows = [{"id": "1", "t": "héllo"}]
    assert A.read_rows(A.write_rows(tmp_path / "a.jsonl", rows)) == rows
    assert A.read_rows(A.write_rows(tmp_path / "a.parquet", rows)) == rows
    assert not list(tmp_path.glob(".*tmp*"))


def _finish(stage, name="test"):
    A.write_manifest(stage, name, counts={"rows": 0})


def test_fingerprint_refuses_a_changed_config(tmp_path):
    from tokenskip.config import GenerateConfig

    stage = tmp_path / "gen"
    cfg = GenerateConfig(model="m", output_dir=str(stage))
    assert A.skip_if_finished(stage, config=cfg) is None  # fresh: fingerprint recorded
    assert (stage / A.FINGERPRINT).is_file()
    _finish(stage, "generate")
    # operational keys may change (e.g. a bigger cluster); the finished manifest comes back
    same = GenerateConfig(model="m", output_dir=str(stage), concurrency=4, batch_size=64)
    assert A.skip_if_finished(stage, config=same)["counts"] == {"rows": 0}
    # an output-deciding key may not: the error names the key, old and new values
    other = GenerateConfig(model="m", output_dir=str(stage), max_new_tokens=7)
    with pytest.raises(A.StageError, match=r"finished with a different config \(max_new_tokens: \S+ -> 7\).*--force"):
        A.skip_if_finished(stage, config=other)
    assert A.is_complete(stage)  # refused, nothing lost
    # nested dataclass fields are compared by dotted key
    other.max_new_tokens = cfg.max_new_tokens
    other.data.name = "math"
    with pytest.raises(A.StageError, match=r"data\.name: \"gsm8k\" -> \"math\""):
        A.skip_if_finished(stage, config=other)
    # --force redoes the stage with the new config
    assert A.skip_if_finished(stage, force=True, config=other) is None and not A.is_complete(stage)
    assert A.skip_if_finished(stage, config=other) is None


def test_settings_that_change_speed_not_output_are_not_fingerprinted():
    """A finished prune or train stage is reused when only its actor threads or the LM-head
    path change; a setting that changes the output still counts."""
    from tokenskip.config import PruneConfig, TrainConfig

    fp = A.config_fingerprint
    assert fp(PruneConfig(num_cpus=2)) == fp(PruneConfig(num_cpus=1))
    assert fp(TrainConfig(lm_head_positions="all")) == fp(TrainConfig(lm_head_positions="labelled"))
    assert fp(TrainConfig(learning_rate=1e-3)) != fp(TrainConfig(learning_rate=1e-4))


def test_fingerprint_unfinished_stage_resumes_only_with_a_new_limit(tmp_path):
    stage = tmp_path / "s"
    assert A.skip_if_finished(stage, config={"model": "m", "data": {"limit": 4}}) is None
    A.PartWriter(stage).write([{"id": "a"}])
    assert A.skip_if_finished(stage, config={"model": "m", "data": {"limit": 8}}) is None  # resume, bigger limit
    assert A.PartWriter(stage).done_ids() == {"a"}
    with pytest.raises(A.StageError, match=r"started \(unfinished\) with a different config \(model: \"m\" -> \"n\"\)"):
        A.skip_if_finished(stage, config={"model": "n", "data": {"limit": 8}})
    _finish(stage)
    with pytest.raises(A.StageError, match="data.limit: 8 -> 16"):  # finished: a new limit is a new result
        A.skip_if_finished(stage, config={"model": "m", "data": {"limit": 16}})


def test_stage_finished_before_fingerprints_is_still_skipped(tmp_path):
    stage = tmp_path / "old"
    _finish(stage)
    assert A.skip_if_finished(stage, config={"model": "anything"})["stage"] == "test"
    assert not (stage / A.FINGERPRINT).exists()


def test_fingerprint_of_a_stage_that_wrote_nothing_is_replaced(tmp_path):
    stage = tmp_path / "s"
    A.skip_if_finished(stage, config={"input": "wrong/path"})  # then failed on its input
    A.PartWriter(stage)  # empty parts/ and rejects/ dirs are not work
    assert A.skip_if_finished(stage, config={"input": "right/path"}) is None
    A.PartWriter(stage).write([{"id": "a"}])
    with pytest.raises(A.ConfigChanged, match="input"):
        A.skip_if_finished(stage, config={"input": "wrong/path"})


# ------------------------------------------------------------- no stage deletes what it doesn't own (#15.7)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != A.LOCK)


def test_force_refuses_a_directory_the_stage_does_not_own(tmp_path):
    from tokenskip.config import EvalConfig, GenerateConfig

    run = tmp_path / "runs" / "quickstart"
    (run / "train" / "adapter").mkdir(parents=True)
    (run / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "summary.json").write_text("{}")
    _finish(run / "prune", "prune")
    before = _tree(tmp_path)
    # a run directory given as a stage's output_dir: no manifest/fingerprint of this stage
    with pytest.raises(A.StageError, match="refusing to delete"):
        A.skip_if_finished(run, force=True, config=GenerateConfig(model="m", output_dir=str(run)))
    # another stage's finished directory
    with pytest.raises(A.StageError, match="refusing to delete"):
        A.skip_if_finished(run / "prune", force=True, config=GenerateConfig(model="m", output_dir=str(run / "prune")))
    # an ancestor of the stage's input (the adapter being evaluated), even if it looked owned
    _finish(run / "train", "evaluate")
    with pytest.raises(A.StageError, match="contains this stage's input"):
        A.reset_stage(
            run / "train", config=EvalConfig(adapter=str(run / "train" / "adapter"), output_dir=str(run / "train"))
        )
    assert _tree(tmp_path) == sorted(before + ["runs/quickstart/train/manifest.json"])


def test_force_refuses_the_working_directory(tmp_path, monkeypatch):
    from tokenskip.config import GenerateConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "precious.txt").write_text("keep me")
    A.write_manifest(tmp_path, "generate")  # even one that looks like this stage's
    for d in (".", str(tmp_path.parent)):
        with pytest.raises(A.StageError, match="working directory"):
            A.reset_stage(d, config=GenerateConfig(output_dir=d))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_force_wipes_an_owned_or_empty_directory(tmp_path):
    from tokenskip.config import GenerateConfig

    stage = tmp_path / "gen"
    cfg = GenerateConfig(model="m", output_dir=str(stage))
    A.skip_if_finished(stage, config=cfg)
    A.PartWriter(stage).write([{"id": "a"}])
    assert A.skip_if_finished(stage, force=True, config=cfg) is None
    assert _tree(stage) == [A.FINGERPRINT]  # parts gone, the new fingerprint recorded
    (tmp_path / "empty").mkdir()
    A.reset_stage(tmp_path / "empty", config=cfg)
    # a directory with foreign files is not resumed into either (no fingerprint, files present)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(A.StageError, match="not a generate directory"):
        A.skip_if_finished(tmp_path / "other", config=GenerateConfig(output_dir=str(tmp_path / "other")))


# --------------------------------------------------------------------------- durable, single-writer (#15.9)


def test_data_files_and_directories_are_fsynced(tmp_path, monkeypatch):
    import os

    paths: dict[int, str] = {}
    synced: list[str] = []
    real_open, real_fsync = os.open, os.fsync

    def track_open(path, *a, **k):
        fd = real_open(path, *a, **k)
        paths[fd] = str(path)
        return fd

    def track_fsync(fd):
        synced.append(paths.get(fd, f"fd{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", track_open)
    monkeypatch.setattr(os, "fsync", track_fsync)
    w = A.PartWriter(tmp_path / "s")
    part = w.write([{"id": "a"}])
    rej = w.reject([{"id": "b", "reason": "x"}])
    for f in (part, rej):
        assert any(f".{f.name}.tmp-" in s for s in synced), (f, synced)  # the data, before the rename
        assert str(f.parent) in synced  # the directory entry, after it


def test_corrupt_part_is_quarantined_and_recomputed(tmp_path, caplog):
    w = A.PartWriter(tmp_path / "s")
    good = w.write([{"id": "a"}])
    bad = w.write([{"id": "b"}, {"id": "c"}])
    bad.write_bytes(bad.read_bytes()[:20])  # truncated (a crash before the data reached the disk)
    rej = w.reject([{"id": "d", "reason": "too long"}])
    rej.write_text('{"id": "d", "reas')
    with caplog.at_level("WARNING", logger="tokenskip"):
        w2 = A.PartWriter(tmp_path / "s")
    assert w2.done_ids() == {"a"}  # b, c, d will be recomputed
    assert {p.name for p in w2.quarantined} == {f"parts-{bad.name}", f"rejects-{rej.name}"}
    assert str(bad) in caplog.text and "recomputed" in caplog.text
    assert good.is_file() and not bad.exists() and (tmp_path / "s" / "quarantine" / f"parts-{bad.name}").is_file()
    assert [r["id"] for r in w2.finalize()[0]] == ["a"]


def test_second_writer_is_refused(tmp_path):
    import subprocess
    import sys

    from tokenskip.config import GenerateConfig

    stage = tmp_path / "gen"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from tokenskip import artifacts as A; A.acquire_lock(sys.argv[1]); "
                "print('held', flush=True); sys.stdin.readline()"
            ),
            str(stage),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(A.StageLocked, match=rf"another run is writing.*pid {holder.pid}"):
            A.skip_if_finished(stage, config=GenerateConfig(output_dir=str(stage)))
    finally:
        holder.communicate("\n", timeout=30)
    assert A.skip_if_finished(stage, config=GenerateConfig(output_dir=str(stage))) is None  # free again
    A.release_lock(stage)


def _try_lock_elsewhere(stage) -> str:
    import subprocess
    import sys

    code = (
        "import sys; from tokenskip import artifacts as A\ntry:\n A.acquire_lock(sys.argv[1]); print('free')\n"
        "except A.StageLocked:\n print('locked')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(stage)], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_lock_is_reentrant_and_released_by_the_manifest(tmp_path):
    stage = tmp_path / "s"
    with A.stage_lock(stage):
        assert A.skip_if_finished(stage, config={"model": "m"}) is None  # same process: fine
        assert _try_lock_elsewhere(stage) == "locked"
        A.write_manifest(stage, "test")
        assert _try_lock_elsewhere(stage) == "free"  # finished: released
    assert A.skip_if_finished(stage, config={"model": "m"})["stage"] == "test"
    assert _try_lock_elsewhere(stage) == "free"  # skipping a finished stage does not keep it


def test_uri_stage_dir_is_refused(tmp_path):
    with pytest.raises(A.StageError, match="object storage"):
        A.skip_if_finished("s3://bucket/run/generate", config={"model": "m"})


# --------------------------------------------------------------------------- rejects: input vs failure (#15.8)


def test_failure_rejects_are_retried_input_rejects_are_final(tmp_path):
    w = A.PartWriter(tmp_path / "s")
    w.write([{"id": "a"}])
    w.reject(
        [
            {"id": "b", "reason": "prompt too long", "reason_kind": "input"},
            {"id": "c", "reason": "generation error: EngineDeadError", "reason_kind": "failure"},
            {"id": "d", "reason": "generation error: RuntimeError: boom"},  # written before kinds: a failure
            {"id": "e", "reason": "duplicate id", "reason_kind": "load"},
        ]
    )
    assert w.done_ids() == {"a", "b"}
    assert w.drop_failures() == 2
    assert sorted(r["id"] for r in w.read_rejects()) == ["b", "e"]


def test_reject_share_limit():
    A.check_reject_share(5, 10, 0.5, "gen")
    with pytest.raises(A.StageError, match=r"gen: 6 of 10 rows rejected \(60% > max_reject_share 0.5\).*boom: 6"):
        A.check_reject_share(6, 10, 0.5, "gen", {"boom": 6})
    A.check_reject_share(10, 10, 1.0, "gen")


# --------------------------------------------------------------------------- fingerprints: engine + upstream (#15.10)


def test_fingerprint_includes_output_deciding_engine_settings(tmp_path):
    from tokenskip.config import GenerateConfig

    stage = tmp_path / "gen"
    cfg = GenerateConfig(model="m", output_dir=str(stage), engine_kwargs={"max_model_len": 2048, "dtype": "bfloat16"})
    A.skip_if_finished(stage, config=cfg)
    _finish(stage, "generate")
    # operational engine settings may change
    A.skip_if_finished(
        stage,
        config=GenerateConfig(
            model="m",
            output_dir=str(stage),
            engine_kwargs={"max_model_len": 2048, "dtype": "bfloat16", "gpu_memory_utilization": 0.5},
        ),
    )
    for kw, key in (
        ({"max_model_len": 4096, "dtype": "bfloat16"}, "_engine.max_model_len"),
        ({"max_model_len": 2048, "dtype": "float32"}, "_engine.dtype"),
        ({"max_model_len": 2048, "dtype": "bfloat16", "quantization": "fp8"}, "_engine.quantization"),
    ):
        with pytest.raises(A.ConfigChanged, match=key):
            A.skip_if_finished(stage, config=GenerateConfig(model="m", output_dir=str(stage), engine_kwargs=kw))


def test_fingerprint_includes_the_upstream_stage_identity(tmp_path):
    from tokenskip.config import PruneConfig

    cots = tmp_path / "cots"
    A.write_rows(cots / "data.parquet", [{"id": "a", "cot": "x"}])
    A.write_manifest(cots, "cots", counts={"kept": 1})
    cfg = PruneConfig(input=str(cots), output_dir=str(tmp_path / "prune"))
    A.skip_if_finished(cfg.output_dir, config=cfg)
    _finish(cfg.output_dir, "prune")
    assert A.skip_if_finished(cfg.output_dir, config=cfg)["stage"] == "prune"
    A.write_manifest(cots, "cots", counts={"kept": 1})  # the upstream stage was redone
    with pytest.raises(A.ConfigChanged, match=r"_upstream\.input: \"manifest:\w+\" -> \"manifest:\w+\""):
        A.skip_if_finished(cfg.output_dir, config=cfg)


def test_a_moved_or_respelled_run_directory_is_still_reused(tmp_path, monkeypatch):
    """A run directory copied elsewhere, or named relative once and absolute once (a local run, then
    the same run through `ray job submit`, which needs an absolute run_dir), keeps its finished stages:
    an input is the same when its identity is, or (an input neither run had, like a gold-CoT run's
    generate directory) when it is the same sibling of the stage. A changed input is still refused."""
    import json
    import shutil

    from tokenskip.config import CotsConfig, EvalConfig, PruneConfig

    monkeypatch.chdir(tmp_path)
    a = tmp_path / "runs" / "a"
    A.write_rows(a / "cots" / "data.parquet", [{"id": "x", "cot": "y"}])
    A.write_manifest(a / "cots", "cots", counts={"kept": 1})

    def prune(run, spell=str):
        return PruneConfig(input=spell(run / "cots"), output_dir=str(run / "prune"))

    def cots(run, gen="generate"):
        return CotsConfig(generations=f"{run}/{gen}", output_dir=f"{run}/cots", cot_source="gold")

    rel = lambda p: str(p.relative_to(tmp_path))  # noqa: E731
    A.skip_if_finished(a / "prune", config=prune(a, rel))  # a relative run_dir, as `make quickstart`
    A.write_manifest(a / "prune", "prune", config=PruneConfig(output_dir=rel(a / "prune")), data=f"{rel(a)}/prune/d")
    (a / "cots" / A.FINGERPRINT).write_text(json.dumps(A.config_fingerprint(cots(rel(a)))))
    # the same run named by its absolute path
    assert A.skip_if_finished(a / "prune", config=prune(a))["stage"] == "prune"
    assert A.skip_if_finished(a / "cots", config=cots(a))["stage"] == "cots"
    # the run copied to another directory: every finished stage is reused, the new paths recorded
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert A.skip_if_finished(b / "prune", config=prune(b))["stage"] == "prune"
    assert json.loads((b / "prune" / A.FINGERPRINT).read_text())["input"] == str(b / "cots")
    # the reused manifest names its files where they are now (the file keeps the old, its identity)
    assert A.skip_if_finished(b / "prune", config=prune(b))["data"] == f"{b / 'prune'}/d"
    assert json.loads((b / "prune" / A.MANIFEST).read_text())["data"] == "runs/a/prune/d"
    assert A.skip_if_finished(b / "cots", config=cots(b))["stage"] == "cots"
    # ... but not another input: another sibling name, or the upstream stage redone
    with pytest.raises(A.ConfigChanged, match=r"\(generations: "):
        A.skip_if_finished(b / "cots", config=cots(b, "gen2"))
    A.write_manifest(b / "cots", "cots", counts={"kept": 2})
    with pytest.raises(A.ConfigChanged, match=r"_upstream\.input"):
        A.skip_if_finished(b / "prune", config=prune(b))
    # names that are not paths here (hub ids) match only themselves
    ev = tmp_path / "runs" / "a" / "evaluate"
    A.skip_if_finished(ev, config=EvalConfig(adapter="org/adapter-a", output_dir=str(ev)))
    _finish(ev, "evaluate")
    with pytest.raises(A.ConfigChanged, match=r"adapter: \"org/adapter-a\" -> \"org/adapter-b\""):
        A.skip_if_finished(ev, config=EvalConfig(adapter="org/adapter-b", output_dir=str(ev)))


def test_fingerprint_from_before_derived_keys_is_not_a_change(tmp_path):
    import json

    from tokenskip.config import GenerateConfig

    stage = tmp_path / "gen"
    cfg = GenerateConfig(model="m", output_dir=str(stage), engine_kwargs={"dtype": "float32"})
    legacy = {k: v for k, v in A.config_fingerprint(cfg).items() if not k.startswith("_")}
    stage.mkdir()
    (stage / A.FINGERPRINT).write_text(json.dumps(legacy))
    _finish(stage, "generate")
    assert A.skip_if_finished(stage, config=cfg)["stage"] == "generate"


def test_fingerprint_from_before_a_new_field_at_its_default_is_not_a_change(tmp_path):
    """An evaluate directory finished before e.g. ``hard_budgets`` existed is still skipped when
    the field is at its default (the old behaviour); set to anything else, it is a change."""
    import json

    from tokenskip.config import EvalConfig

    stage = tmp_path / "eval"
    cfg = EvalConfig(output_dir=str(stage), limit=3)
    old = {k: v for k, v in A.config_fingerprint(cfg).items() if not k.startswith(("hard_budgets", "force_answer"))}
    assert len(old) < len(A.config_fingerprint(cfg))
    stage.mkdir()
    (stage / A.FINGERPRINT).write_text(json.dumps(old))
    _finish(stage, "evaluate")
    assert A.skip_if_finished(stage, config=cfg)["stage"] == "evaluate"
    assert json.loads((stage / A.FINGERPRINT).read_text()) == A.config_fingerprint(cfg)  # recorded once
    (stage / A.FINGERPRINT).write_text(json.dumps(old))
    with pytest.raises(A.ConfigChanged, match=r"hard_budgets: null -> \[64\]"):
        A.skip_if_finished(stage, config=EvalConfig(output_dir=str(stage), limit=3, hard_budgets=[64]))
    # a key another version dropped or renamed is still a change
    (stage / A.FINGERPRINT).write_text(json.dumps({**A.config_fingerprint(cfg), "gone": 1}))
    with pytest.raises(A.ConfigChanged, match="gone: 1 -> null"):
        A.skip_if_finished(stage, config=cfg)
