"""The adapter card: round trip, validation errors that name file and field, evaluation from
the project's own results.json files, atomic add_evaluation and evaluate's fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenskip import card, gamma, prompt
from tokenskip.card import AdapterCard, CardError, DatasetEval, RatioEval

ROOT = Path(__file__).resolve().parents[1]
# the evaluate stage's own results.json files kept as benchmarks (other eval_* files are summaries)
BENCH_RESULTS = [p for p in sorted((ROOT / "benchmarks" / "results").glob("eval_*.json"))
                 if "datasets" in json.loads(p.read_text())]
assert len(BENCH_RESULTS) >= 2, BENCH_RESULTS


def _train_file(tmp_path: Path) -> Path:
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps({"ratio": r}) + "\n" for r in (1.0, 0.9, 0.5, 0.5)))
    return f


def _card(tmp_path: Path) -> AdapterCard:
    rows = [{"ratio": 1.0}, {"ratio": 0.9}, {"ratio": 0.5}, {"ratio": 0.50000001}]
    return card.card_for_training(
        "smollm2-135m-instruct",
        rows,
        "runs/x/build_sft",
        _train_file(tmp_path),
        {
            "model": "smollm2-135m-instruct",
            "epochs": 3.0,
            "lora": {"r": 8, "alpha": 16},
            "scaling": {"num_workers": 2},
            "ray": {"num_cpus": 4},
        },
    )


def test_card_for_training(tmp_path):
    c = _card(tmp_path)
    assert c.card_version == 1 and c.base_model == "smollm2-135m-instruct"
    assert c.ratios == [1.0, 0.9, 0.5] and c.rows_per_ratio == {"1.0": 1, "0.9": 1, "0.5": 2}
    assert c.prompt["format_version"] == prompt.FORMAT_VERSION and c.prompt["separator"] == prompt.SEPARATOR
    assert c.train["rows"] == 4 and len(c.train["data_sha256"]) == 64
    assert c.train["config"] == {
        "model": "smollm2-135m-instruct",
        "epochs": 3.0,
        "lora": {"r": 8, "alpha": 16},
        "num_workers": 2,
    }  # a summary: no ray / paths
    assert c.evaluation is None and c.expected_cot_tokens() == {}


def test_round_trip_file(tmp_path):
    c = _card(tmp_path)
    (tmp_path / "adapter").mkdir()
    path = card.write_card(tmp_path / "adapter", c)
    assert path == tmp_path / "adapter" / "tokenskip.json"
    raw = json.loads(path.read_text())
    assert (
        raw["card_version"] == 1 and raw["rows_per_ratio"] == {"1.0": 1, "0.9": 1, "0.5": 2} and "evaluation" not in raw
    )
    assert card.read_card(tmp_path / "adapter") == c
    ev = {
        "gsm8k": DatasetEval(
            "/r/results.json",
            {"1.0": RatioEval(180.0, 170.0, 1.0, 0.4, 0.1), "0.5": RatioEval(95.5, None, 0.53, 0.3, 0.0)},
            512,
            100,
            "test",
            "t",
        )
    }
    card.add_evaluation(tmp_path / "adapter", ev)
    back = card.read_card(tmp_path / "adapter")
    assert back.evaluation == ev and back.expected_cot_tokens() == {1.0: 180.0, 0.5: 95.5}
    assert back.expected_cot_tokens("gsm8k") == {1.0: 180.0, 0.5: 95.5}
    with pytest.raises(CardError, match="'math500' was not evaluated"):
        back.expected_cot_tokens("math500")
    # a second dataset is added; the same dataset again replaces its entry
    card.add_evaluation(tmp_path / "adapter", {"math500": DatasetEval("/m.json", {"1.0": RatioEval(400.0)})})
    card.add_evaluation(tmp_path / "adapter", {"gsm8k": DatasetEval("/r2.json", {"1.0": RatioEval(170.0)})})
    back = card.read_card(tmp_path / "adapter")
    assert list(back.evaluation) == ["gsm8k", "math500"] and back.expected_cot_tokens() == {1.0: 170.0}
    assert not [p for p in (tmp_path / "adapter").iterdir() if p.name != "tokenskip.json"]  # no temp files left


def _write_raw(tmp_path: Path, data: dict) -> Path:
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    (d / "tokenskip.json").write_text(json.dumps(data))
    return d


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d.update(card_version=2), "card_version 2 is not supported"),
        (lambda d: d.update(card_version="1"), "card_version '1' is not supported"),
        (lambda d: d.pop("card_version"), "card_version: missing"),
        (lambda d: d.pop("base_model"), "base_model: missing"),
        (lambda d: d.update(base_model=""), "base_model: must be a non-empty string"),
        (lambda d: d.pop("ratios"), "ratios: missing"),
        (lambda d: d.update(ratios=[1.0, 1.5, 0.9]), r"ratios\[1\]: compression ratio must be in \(0, 1\], got 1.5"),
        (lambda d: d.update(ratios=[]), "ratios must not be empty"),
        (lambda d: d.pop("rows_per_ratio"), "rows_per_ratio: missing"),
        (lambda d: d["rows_per_ratio"].update({"0.9": -1}), r"rows_per_ratio\['0.9'\]: must be an integer >= 0"),
        (lambda d: d["rows_per_ratio"].pop("0.9"), "rows_per_ratio: keys .* do not match ratios"),
        (lambda d: d["rows_per_ratio"].update({"x": 1}), "rows_per_ratio key 'x'"),
        (lambda d: d.pop("prompt"), "prompt: missing"),
        (
            lambda d: d["prompt"].update(format_version=9),
            "prompt.format_version: 9 is not this tokenskip's prompt format",
        ),
        (lambda d: d["prompt"].pop("separator"), "prompt.separator: missing"),
        (lambda d: d.pop("train"), "train: missing"),
        (lambda d: d["train"].pop("data_sha256"), "train.data_sha256: missing"),
        (lambda d: d["train"].update(config=[]), "train.config: must be a mapping"),
        (lambda d: d.update(extra=1), "extra: unknown field"),
        (
            lambda d: d.update(evaluation={"datasets": {"gsm8k": {"results": "r", "ratios": {"0.5": {}}}}}),
            r"evaluation.datasets\['gsm8k'\].ratios\['0.5'\].expected_cot_tokens: missing",
        ),
        (
            lambda d: d.update(
                evaluation={
                    "datasets": {
                        "gsm8k": {"results": "r", "ratios": {"0.5": {"expected_cot_tokens": 10, "accuracy": 1.5}}}
                    }
                }
            ),
            r"\.accuracy: must be a number in \[0, 1\]",
        ),
        (
            lambda d: d.update(evaluation={"datasets": {"gsm8k": {"ratios": {}}}}),
            r"evaluation.datasets\['gsm8k'\].results: missing",
        ),
        (lambda d: d.update(evaluation={"runs": []}), "evaluation.datasets: missing"),
    ],
)
def test_invalid_cards_name_file_and_field(tmp_path, mutate, field):
    data = _card(tmp_path).to_dict()
    mutate(data)
    d = _write_raw(tmp_path, data)
    with pytest.raises(CardError, match=field) as e:
        card.read_card(d)
    assert str(e.value).startswith(str(d / "tokenskip.json") + ": ")


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(CardError, match="no adapter card"):
        card.read_card(tmp_path)
    assert card.read_card(tmp_path, missing_ok=True) is None
    (tmp_path / "tokenskip.json").write_text("{not json")
    with pytest.raises(CardError, match="not readable JSON"):
        card.read_card(tmp_path, missing_ok=True)
    # the pre-card ad-hoc shape is refused, not half-read
    (tmp_path / "tokenskip.json").write_text(json.dumps({"ratios": [1.0, 0.5], "expected_cot_tokens": {"1.0": 100}}))
    with pytest.raises(CardError, match="card_version: missing"):
        card.read_card(tmp_path)


def test_write_refuses_invalid(tmp_path):
    c = _card(tmp_path)
    c.rows_per_ratio = {"1.0": 3}
    with pytest.raises(CardError, match="do not match ratios"):
        card.write_card(tmp_path, c)
    assert not (tmp_path / "tokenskip.json").exists()


@pytest.mark.parametrize("path", BENCH_RESULTS, ids=lambda p: p.name)
def test_evaluation_from_the_projects_results_files(path):
    results = json.loads(path.read_text())
    ev = card.evaluation_from_results(results, str(path))
    assert list(ev) == list(results["datasets"]) == ["gsm8k"]
    rows = {gamma.key(r["ratio"]): r for r in results["datasets"]["gsm8k"]["conditions"] if r["method"] == "tokenskip"}
    assert set(ev["gsm8k"].ratios) == set(rows) == {gamma.key(r) for r in results["ratios"]}
    for k, r in rows.items():
        got = ev["gsm8k"].ratios[k]
        assert got.expected_cot_tokens == r.get("mean_cot_tokens", r["mean_tokens"])
        assert got.runaway_share == r.get("runaway_share", r["hit_limit"]) and got.accuracy == r["accuracy"]
        assert got.actual_ratio == r["actual_ratio"]
    assert ev["gsm8k"].max_new_tokens == results["datasets"]["gsm8k"]["max_new_tokens"]
    assert ev["gsm8k"].results == str(path)


def test_evaluation_prefers_cot_fields_when_present():
    res = {
        "datasets": {
            "gsm8k": {
                "conditions": [
                    {
                        "method": "tokenskip",
                        "ratio": 0.5,
                        "mean_tokens": 50,
                        "mean_cot_tokens": 35,
                        "median_tokens": 48,
                        "median_cot_tokens": 30,
                        "hit_limit": 0.5,
                        "runaway_share": 0.25,
                        "accuracy": 1.0,
                        "actual_ratio": 0.6,
                    },
                    {"method": "truncation", "ratio": 0.5, "mean_tokens": 10},
                ]
            }
        }
    }
    r = card.evaluation_from_results(res, "r.json")["gsm8k"].ratios["0.5"]
    assert (r.expected_cot_tokens, r.median_cot_tokens, r.runaway_share) == (35.0, 30.0, 0.25)
    for bad in ({}, {"datasets": []}, {"datasets": {"g": {"conditions": {}}}}, [{"ratio": 1.0}]):
        with pytest.raises(CardError):
            card.evaluation_from_results(bad, "r.json")


def test_record_evaluation_in_place_or_beside_results(tmp_path, caplog, monkeypatch):
    results = json.loads(BENCH_RESULTS[0].read_text())
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    out = tmp_path / "eval"
    out.mkdir()
    # an adapter without a card is left alone
    assert card.record_evaluation(adapter, results, str(out / "results.json"), out) is None
    assert not (adapter / "tokenskip.json").exists() and not (out / "tokenskip.json").exists()
    card.write_card(adapter, _card(tmp_path))
    path = card.record_evaluation(adapter, results, str(out / "results.json"), out)
    assert path == adapter / "tokenskip.json"
    c = card.read_card(adapter)
    assert c.expected_cot_tokens()[1.0] == 182.1 and c.evaluation["gsm8k"].results == str(out / "results.json")
    # a read-only adapter dir (simulated: this may run as root, which writes anywhere)
    from tokenskip import artifacts

    real = artifacts.atomic_write_json

    def refuse_adapter_dir(p, obj):
        if Path(p).parent == adapter:
            raise PermissionError(13, "Permission denied", str(p))
        real(p, obj)

    monkeypatch.setattr(artifacts, "atomic_write_json", refuse_adapter_dir)
    before = (adapter / "tokenskip.json").read_text()
    with caplog.at_level("WARNING", logger="tokenskip.card"):
        path = card.record_evaluation(adapter, results, str(out / "results.json"), out)
    assert path == out / "tokenskip.json" and card.read_card(out).evaluation["gsm8k"].ratios
    assert (adapter / "tokenskip.json").read_text() == before
    assert (
        "written to" in caplog.text
        and str(out / "tokenskip.json") in caplog.text
        and "Permission denied" in caplog.text
    )


def test_evaluate_refuses_a_broken_card_before_any_model_loads(tmp_path):
    from pipelines.evaluate import EvalInputError, check_adapter

    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (d / "adapter_model.safetensors").write_bytes(b"")
    assert check_adapter(str(d))["r"] == 8  # no card: fine (an adapter not trained by tokenskip)
    card.write_card(d, _card(tmp_path))
    assert check_adapter(str(d))["r"] == 8
    (d / "tokenskip.json").write_text(json.dumps(dict(_card(tmp_path).to_dict(), card_version=3)))
    with pytest.raises(EvalInputError, match=r"eval.adapter: .*tokenskip.json: card_version 3 is not supported"):
        check_adapter(str(d))
