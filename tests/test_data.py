import json

import pytest

from tokenskip import data as D


@pytest.mark.parametrize(
    "name,split,n,kind",
    [
        ("gsm8k", "train", 7473, "gsm8k"),
        ("gsm8k", "test", 1319, "gsm8k"),
        ("math", "test", 5000, "math"),
        ("math500", "test", 500, "math"),
    ],
)
def test_embedded_datasets(name, split, n, kind):
    res = D.load_questions(name, split)
    assert len(res.rows) == n and not res.rejects
    r = res.rows[0]
    assert set(D.SCHEMA) <= set(r) and r["kind"] == kind and r["question"] and r["gold"]
    assert len({x["id"] for x in res.rows}) == n


def test_gsm8k_gold_and_solution():
    r = D.load_questions("gsm8k", "test", limit=1).rows[0]
    assert r["gold"] == "18" and "<<" not in r["solution"] and "####" not in r["solution"]


def test_limit_offset():
    a = D.load_questions("gsm8k", "test", limit=5, offset=3).rows
    b = D.load_questions("gsm8k", "test", limit=8).rows
    assert [x["id"] for x in a] == [x["id"] for x in b[3:8]]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_row_names_file_and_line(tmp_path):
    f = _write(
        tmp_path / "q.jsonl",
        [json.dumps({"question": "1+1?", "answer": "#### 2"}), "{not json", json.dumps({"question": "", "gold": "3"})],
    )
    with pytest.raises(D.DataError, match=r"q.jsonl:2: invalid JSON"):
        D.load_questions(str(f))


def test_lenient_loading_collects_rejects(tmp_path):
    f = _write(
        tmp_path / "q.jsonl",
        [
            json.dumps({"question": "1+1?", "answer": "#### 2"}),
            "{not json",
            json.dumps({"question": "", "gold": "3"}),
            json.dumps({"question": "x?"}),
            json.dumps({"problem": "2x=4, x?", "solution": "So $x=\\boxed{2}$."}),
        ],
    )
    res = D.load_questions(str(f), lenient=True)
    assert [r["gold"] for r in res.rows] == ["2", "2"]
    assert [r["line"] for r in res.rejects] == [2, 3, 4]
    assert "empty" in res.rejects[1]["reason"] and "gold" in res.rejects[2]["reason"]


def test_parquet_and_custom_fields(tmp_path):
    from tokenskip.artifacts import write_rows

    p = write_rows(tmp_path / "c.parquet", [{"q": "What?", "a": "7", "key": "k1"}])
    rows = D.load_questions(str(p), fields={"question": "q", "gold": "a", "id": "key"}).rows
    assert rows == [{"id": "k1", "question": "What?", "gold": "7", "solution": None, "source": str(p), "kind": "gsm8k"}]


def test_missing_file_and_unknown_dataset(tmp_path):
    with pytest.raises(D.DataError, match="not found"):
        D.load_questions(str(tmp_path / "nope.jsonl"))
    with pytest.raises(D.DataError, match="could not load dataset"):
        D.load_questions("no-such-org/no-such-dataset-xyz")


def test_duplicate_ids_rejected(tmp_path):
    f = _write(tmp_path / "d.jsonl", [json.dumps({"id": "a", "question": "q", "gold": "1"})] * 2)
    with pytest.raises(D.DataError, match="duplicate id"):
        D.load_questions(str(f))


def test_math_train_has_one_real_bad_row():
    """MATH train lines 5342 and 5344 have an empty \\boxed{}: strict loading names it, lenient rejects it."""
    with pytest.raises(D.DataError, match=r"math/train.jsonl:5342: no gold answer"):
        D.load_questions("math", "train")
    res = D.load_questions("math", "train", lenient=True)
    assert len(res.rows) == 7498 and [r["line"] for r in res.rejects] == [5342, 5344]


def test_non_utf8_byte_is_a_reject_or_an_error_naming_file_and_line(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_bytes(
        b'{"question": "1+1?", "answer": "#### 2"}\n{"question": "caf\xe9?", "answer": "#### 3"}\n'
        b'{"question": "2+2?", "answer": "#### 4"}\n'
    )
    with pytest.raises(D.DataError, match=r"q.jsonl:2: not valid UTF-8"):
        D.load_questions(str(f))
    res = D.load_questions(str(f), lenient=True)
    assert [r["gold"] for r in res.rows] == ["2", "4"]
    assert [(r["line"], r["reason"].split(" (")[0]) for r in res.rejects] == [(2, "not valid UTF-8")]
    j = tmp_path / "q.json"
    j.write_bytes(b'[\n{"question": "1+1?", "answer": "2"},\n{"question": "\xff", "answer": "3"}\n]\n')
    with pytest.raises(D.DataError, match=r"q.json:3: not valid UTF-8"):
        D.load_questions(str(j), lenient=True)  # a whole-file format: no row to reject, the file fails
