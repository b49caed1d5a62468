"""benchmarks/gamma_sweep.py end to end on the tiny fixture model (CPU, seconds)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import gamma_sweep
from tokenskip import prompt


def _sft(path, n_questions: int = 3) -> str:
    rows = []
    for i in range(n_questions):
        for g, cot in (
            (1.0, f"She has {i} + 2 = {i + 2} apples."),
            (0.7, f"{i} + 2 = {i + 2} apples"),
            (0.5, f"{i}+2={i + 2}"),
        ):
            rows.append(
                {
                    "question": f"Ann has {i} apples and gets 2. How many?",
                    "ratio": str(g),
                    "completion": prompt.build_target(cot, str(i + 2)),
                }
            )
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_sweep_trains_each_variant_and_reports_every_gamma(tiny_llama, tmp_path):
    out = tmp_path / "sweep.json"
    rc = gamma_sweep.main(
        [
            "--sft",
            _sft(tmp_path / "train.parquet"),
            "--model",
            tiny_llama,
            "--device",
            "cpu",
            "--variants",
            "base",
            "x3",
            "--eval-n",
            "2",
            "--max-new-tokens",
            "4",
            "--probe-n",
            "1",
            "--batch",
            "4",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["ratios"] == [1.0, 0.7, 0.5] and res["eval_n"] == 2
    assert set(res["variants"]) == {"base", "x3"}
    x3 = res["variants"]["x3"]
    assert x3["config"]["marker"] == "x3" and x3["config"]["epochs"] == 1.0
    assert x3["train"]["rows"] == 9 and x3["train"]["steps"] == 3  # ceil(9 / 4) steps for one epoch
    assert 0 < x3["train"]["real_share"] <= 1
    for v in res["variants"].values():
        assert set(v["adherence"]) == {"1.0", "0.7", "0.5"}
        assert v["adherence"]["1.0"]["actual_ratio"] == 1.0
        assert set(v["probe"]) == {"1.0", "0.7", "0.5"}
        assert all(p["discrimination"] in (0.0, 1.0) for p in v["probe"].values())  # one probe question
        for m in v["adherence"].values():
            assert 0 <= m["runaway_share"] <= 1 and m["cot_mean"] >= 0


def test_marker_forms_differ_only_in_the_marker():
    base = prompt.user_content("Q", 0.7)
    for name, template in gamma_sweep.MARKERS.items():
        text = prompt.user_content("Q", 0.7, marker=template)
        assert text.startswith(prompt.user_content("Q")), name
        assert ("0.7" in text) or ("70%" in text), name
    assert prompt.user_content("Q", 0.7, marker=gamma_sweep.MARKERS["eot"]) == base
    assert prompt.user_content("Q", 1.0, marker=gamma_sweep.MARKERS["x3"]) == prompt.user_content("Q")


class _WordTok:
    """One token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}

    def decode(self, ids):
        return " ".join(ids)


def test_truncated_targets_cut_the_full_cot_at_gamma():
    full = prompt.build_target("a b c d e f g h i j", "7")
    rows = [
        {"id": "q", "gold": "7", "question": "Q", "ratio": g, "completion": c}
        for g, c in ((1.0, full), (0.7, prompt.build_target("a c e", "7")), (0.5, prompt.build_target("x", "7")))
    ]
    rows.append({"id": "lone", "gold": "1", "question": "L", "ratio": 0.5, "completion": prompt.build_target("y", "1")})
    out = gamma_sweep.truncated_rows(_WordTok(), rows)
    assert [r["id"] for r in out] == ["q", "q", "q"]  # no γ = 1 row for "lone": nothing to cut
    cots = [prompt.split_answer(r["completion"])[0].strip() for r in out]
    assert cots == ["a b c d e f g h i j", "a b c d e f g", "a b c d e"]
    assert all(r["completion"].endswith(prompt.answer_sentence("7")) for r in out)
    assert [r["ratio"] for r in out] == [1.0, 0.7, 0.5]


def test_solo_trains_one_adapter_per_gamma_on_its_rows_only(tiny_llama, tmp_path, monkeypatch):
    seen = []
    real_train = gamma_sweep.train

    def spy(path, tok, rows, v, a, device):
        seen.append(sorted({r["ratio"] for r in rows}))
        return real_train(path, tok, rows, v, a, device)

    monkeypatch.setattr(gamma_sweep, "train", spy)
    out = tmp_path / "solo.json"
    args = ["--sft", _sft(tmp_path / "train.parquet"), "--model", tiny_llama, "--device", "cpu"]
    args += ["--variants", "solo", "--eval-n", "2", "--max-new-tokens", "4", "--probe-n", "1", "--batch", "4"]
    assert gamma_sweep.main([*args, "--json", str(out)]) == 0
    assert seen == [[1.0], [0.7], [0.5]]  # three adapters, each on one γ's rows
    solo = json.loads(out.read_text())["variants"]["solo"]
    assert solo["config"]["per_gamma"] is True and solo["probe"] is None
    assert set(solo["train"]["per_gamma"]) == {"1.0", "0.7", "0.5"}
    assert all(t["rows"] == 3 and t["steps"] == 1 for t in solo["train"]["per_gamma"].values())
    assert solo["train"]["rows"] == 9 and solo["train"]["steps"] == 3
    assert set(solo["adherence"]) == {"1.0", "0.7", "0.5"} and solo["adherence"]["1.0"]["actual_ratio"] == 1.0
