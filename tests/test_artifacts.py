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
