"""Prune stage on a local Ray cluster: lazy stage, run_prune + manifest, CLI, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenskip import artifacts
from tokenskip.config import PruneConfig, load_any

ROOT = Path(__file__).resolve().parents[1]
RATIOS = [0.9, 0.7, 0.5]


def test_shipped_prune_configs_load():
    files = sorted((ROOT / "configs" / "prune").glob("*.yaml"))
    assert {f.name for f in files} >= {"gsm8k-llmlingua2.yaml", "local-selfinfo.yaml"}
    for f in files:
        cfg = load_any(f)
        assert isinstance(cfg, PruneConfig)
        assert "ray job submit" in f.read_text().split("kind:")[0]
    with pytest.raises(ValueError, match="1.5"):
        PruneConfig(ratios=[0.5, 1.5])


@pytest.fixture(scope="module")
def cots_file(tmp_path_factory) -> Path:
    from tokenskip.data import load_questions

    rows = [{"id": r["id"], "cot": r["solution"]} for r in load_questions("gsm8k", "train").rows[:10]]
    rows += [{"id": "empty", "cot": ""}, {"id": "bad", "cot": None}, {"id": None, "cot": "x"}]
    path = tmp_path_factory.mktemp("prune-in") / "cots.jsonl"
    artifacts.write_rows(path, rows, "jsonl")
    return path


@pytest.mark.integration
def test_run_prune_self_info(ray_local, tiny_llama, cots_file, tmp_path):
    cfg = PruneConfig(
        input=str(cots_file),
        output_dir=str(tmp_path / "prune"),
        scorer="self_info",
        scorer_model=tiny_llama,
        target_tokenizer=tiny_llama,
        ratios=RATIOS,
        force_reserve_digit=True,
        batch_size=4,
        device="cpu",
    )
    from pipelines.prune import run_prune

    m = run_prune(cfg)
    assert m["counts"] == {"total": 13, "pruned": 11, "rows": 33, "rejected": 2}
    rows = artifacts.read_rows(tmp_path / "prune")
    assert set(rows[0]) >= {"id", "ratio", "pruned", "cot_tokens", "pruned_tokens", "actual_ratio"}
    by = {(r["id"], r["ratio"]): r for r in rows}
    assert all(by[("empty", r)]["pruned"] == "" and by[("empty", r)]["cot_tokens"] == 0 for r in RATIOS)
    real = [r for r in rows if r["id"] != "empty"]
    assert all(0 < r["actual_ratio"] <= 1 and isinstance(r["ratio"], float) for r in real)
    assert m["per_ratio"]["0.5"]["token_ratio"] < m["per_ratio"]["0.9"]["token_ratio"] < 1
    rejects = artifacts.read_rows(tmp_path / "prune" / "rejects.jsonl")
    assert any("'cot' must be a string" in r["reason"] for r in rejects)
    # finished: a re-run returns the manifest without recomputing
    again = run_prune(cfg)
    assert again["finished_at"] == m["finished_at"]


@pytest.mark.integration
def test_prune_stage_is_lazy_and_cli_runs(ray_local, fixtures_dir, cots_file, tmp_path):
    import ray

    from pipelines.prune import prune_stage
    from tokenskip.testing import build_tiny_bert_classifier

    clf = str(build_tiny_bert_classifier(fixtures_dir / "tiny-bert-base-multilingual-cased"))
    cfg = PruneConfig(
        scorer="llmlingua2",
        scorer_model=clf,
        text_field="text",
        ratios=RATIOS,
        batch_size=8,
        device="cpu",
        force_tokens=["Step", ":"],
        force_reserve_digit=True,
        drop_consecutive=True,
    )
    ds = ray.data.from_items(
        [{"id": f"q{i}", "text": f"Step {i}: she has {i} apples. So the answer is {i}."} for i in range(6)]
    )
    staged = prune_stage(ds, cfg)  # lazy: nothing ran yet
    rows = staged.take_all()
    assert len(rows) == 18 and {r["ratio"] for r in rows} == set(RATIOS)
    # the same output as the library called directly
    from tokenskip.pruning import load_scorer, prune_texts

    direct = prune_texts(
        ["Step 0: she has 0 apples. So the answer is 0."],
        RATIOS,
        load_scorer("llmlingua2", clf, device="cpu"),
        ["Step", ":"],
        True,
        True,
    )[0]
    assert {r["ratio"]: r["pruned"] for r in rows if r["id"] == "q0"} == direct

    from ray_jobs.cli import main

    cfg_path = tmp_path / "prune.yaml"
    cfg_path.write_text(
        f"kind: prune\ninput: {cots_file}\noutput_dir: {tmp_path / 'out'}\nscorer: llmlingua2\n"
        f"scorer_model: {clf}\ntarget_tokenizer: minilm-l6\nratios: [0.8, 0.6]\ndevice: cpu\nformat: jsonl\n"
    )
    assert main(["prune", "--config", str(cfg_path)]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == 22 and (tmp_path / "out" / "data.jsonl").is_file()
    assert main(["prune", "--config", str(cfg_path), "ratios=[1.5]"]) == 2


# --------------------------------------------------------------------------- per-row isolation (#15.8), no Ray


def _udf(fake_prune, ratios=(0.9, 0.5)):
    from pipelines.prune import PruneUDF

    udf = object.__new__(PruneUDF)
    udf.cfg = PruneConfig(ratios=list(ratios))
    udf._prune = fake_prune
    return udf


def _fake_rows(ids, texts, ratios=(0.9, 0.5)):
    from pipelines.prune import OUTPUT_COLUMNS

    out = []
    for i, t in zip(ids, texts):
        if "POISON" in t:
            raise IndexError(f"scorer: index out of range in row {i}")
        for r in ratios:
            row = {k: None for k in OUTPUT_COLUMNS}
            row.update(
                id=i, ratio=r, pruned=t[: max(1, int(len(t) * r))], cot_tokens=len(t), pruned_tokens=1, actual_ratio=r
            )
            out.append(row)
    return out


def test_one_row_that_breaks_the_scorer_becomes_a_reject():
    import numpy as np

    out = _udf(_fake_rows)({"id": np.array(["a", "b", "c"]), "cot": np.array(["fine", "POISON here", "also fine"])})
    rows = [dict(zip(out, vals)) for vals in zip(*out.values())]
    ok = [r for r in rows if not r["error"]]
    assert sorted({r["id"] for r in ok}) == ["a", "c"] and len(ok) == 4
    (bad,) = [r for r in rows if r["error"]]
    assert bad["id"] == "b" and bad["error"].startswith("scorer error: IndexError") and bad["error_kind"] == "input"


def test_a_scorer_failing_every_row_fails_the_batch():
    import numpy as np

    def broken(ids, texts):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="every one of 2 rows failed"):
        _udf(broken)({"id": np.array(["a", "b"]), "cot": np.array(["x", "y"])})


class _FakeDS:
    def __init__(self, rows, udf):
        self.rows, self.udf = rows, udf

    def iter_batches(self, batch_size, batch_format):
        import numpy as np
        import pyarrow as pa

        for i in range(0, len(self.rows), 2):
            chunk = self.rows[i : i + 2]
            out = self.udf({"id": np.array([r["id"] for r in chunk]), "cot": np.array([r["cot"] for r in chunk])})
            yield pa.table(out)


def test_run_prune_keeps_going_past_a_bad_row_and_retries_failures(tmp_path, monkeypatch):
    import ray.data

    import pipelines.prune as P

    calls, state = [], {"flaky": True}

    def flaky(ids, texts):
        calls.extend(ids)
        if state["flaky"] and any("FLAKY" in t for t in texts):
            raise OSError("scorer: transient I/O error")
        return _fake_rows(ids, texts)

    monkeypatch.setattr(ray.data, "from_items", lambda rows: rows)
    monkeypatch.setattr(P, "prune_stage", lambda rows, cfg: _FakeDS(rows, _udf(flaky)))
    src = tmp_path / "cots.jsonl"
    rows = [
        {"id": "a", "cot": "one"},
        {"id": "b", "cot": "POISON"},
        {"id": "c", "cot": "FLAKY"},
        {"id": "d", "cot": "four"},
        {"id": "e", "cot": None},
        {"id": "f", "cot": "six"},
        {"id": "g", "cot": "seven"},
        {"id": "h", "cot": "eight"},
    ]
    artifacts.write_rows(src, rows, "jsonl")
    cfg = PruneConfig(input=str(src), output_dir=str(tmp_path / "prune"), ratios=[0.9, 0.5])
    m = P.run_prune(cfg)
    rejects = {r["id"]: r for r in artifacts.read_rows(tmp_path / "prune" / "rejects.jsonl")}
    assert m["counts"]["pruned"] == 5 and m["counts"]["rejected"] == 3  # b (input), c (failure), e (load)
    assert rejects["b"]["reason_kind"] == "input" and "IndexError" in rejects["b"]["reason"]
    assert rejects["c"]["reason_kind"] == "failure" and rejects["e"]["reason_kind"] == "load"
    # an unfinished stage (e.g. it crashed before its manifest) resumes: only the failure is retried
    (tmp_path / "prune" / "manifest.json").unlink()
    calls.clear()
    state["flaky"] = False
    m = P.run_prune(cfg)
    assert calls == ["c"] and m["counts"]["pruned"] == 6 and m["counts"]["rejected"] == 2
    # one reject share too many fails the stage instead of finishing it
    cfg2 = PruneConfig(input=str(src), output_dir=str(tmp_path / "prune2"), ratios=[0.9, 0.5], max_reject_share=0.2)
    state["flaky"] = True
    with pytest.raises(artifacts.StageError, match=r"3 of 8 rows rejected .* max_reject_share 0.2"):
        P.run_prune(cfg2)
    assert not artifacts.is_complete(cfg2.output_dir)


def test_prune_input_with_no_rows_fails_here(tmp_path):
    from pipelines.prune import run_prune

    src = tmp_path / "cots.jsonl"
    artifacts.write_rows(src, [{"id": "a", "cot": None}], "jsonl")
    with pytest.raises(artifacts.StageError, match=r"cots.jsonl: 0 rows \(1 unusable rows\)"):
        run_prune(PruneConfig(input=str(src), output_dir=str(tmp_path / "prune")))


def test_bad_input_lines_become_rejects_naming_file_and_line_with_the_row_kept(tmp_path):
    """A line that is not JSON, or not a JSON object, is a reject like any other bad row (it used to
    stop the stage, or crash it with AttributeError); every reject names the file's own line number
    (blank lines counted) and keeps the row as read."""
    from pipelines.prune import read_input

    src = tmp_path / "cots.jsonl"
    src.write_bytes(
        b'{"id": "a", "cot": "one"}\n'
        b"[1, 2]\n"
        b"\n"
        b"not json {\n"
        b'{"id": "b", "cot": "two"}\n'
        b'{"id": "a", "cot": "again"}\n'
        b'{"cot": "no id"}\n'
        b'{"id": "c", "cot": 3}\n'
        b'{"id": "d", "cot": "caf\xe9"}\n'
    )
    good, bad, where = read_input(PruneConfig(input=str(src), output_dir=str(tmp_path / "out")))
    assert where == str(src) and [r["id"] for r in good] == ["a", "b"]
    got = [(r["line"], r["id"], r["reason"].removeprefix(f"{src}:"), r["row"]) for r in bad]
    assert got == [
        (2, None, "2: not a JSON object (got list)", "[1, 2]"),
        (4, None, "4: invalid JSON: Expecting value", "not json {"),
        (6, "a", "6: duplicate id 'a'", '{"id": "a", "cot": "again"}'),
        (7, None, "7: missing 'id'", '{"cot": "no id"}'),
        (8, "c", "8: field 'cot' must be a string, got int", '{"id": "c", "cot": 3}'),
        (9, None, "9: not valid UTF-8 (byte b'\\xe9' at column 24)", '{"id": "d", "cot": "caf\ufffd"}'),
    ]
    # a Parquet input names its rows from 1
    pq = tmp_path / "cots.parquet"
    artifacts.write_rows(pq, [{"id": "a", "cot": "one"}, {"id": "", "cot": "two"}], "parquet")
    good, bad, _ = read_input(PruneConfig(input=str(pq), output_dir=str(tmp_path / "out2")))
    assert [r["id"] for r in good] == ["a"] and bad[0]["reason"] == f"{pq}: row 2: missing 'id'"
