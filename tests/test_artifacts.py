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


def _finish(stage):
    A.write_manifest(stage, "test", counts={"rows": 0})


def test_fingerprint_refuses_a_changed_config(tmp_path):
    from tokenskip.config import GenerateConfig

    stage = tmp_path / "gen"
    cfg = GenerateConfig(model="m", output_dir=str(stage))
    assert A.skip_if_finished(stage, config=cfg) is None  # fresh: fingerprint recorded
    assert (stage / A.FINGERPRINT).is_file()
    _finish(stage)
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
