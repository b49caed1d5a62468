"""Pure evaluation arithmetic and rendering (no model)."""

from __future__ import annotations

import math

import pytest

from tokenskip import evaluation as ev
from tokenskip.prompt import BASELINE_PROMPTS


def test_plan_conditions_full_grid():
    conds = ev.plan_conditions([1.0, 0.9, 0.5], ["original", "prompt", "truncation"], BASELINE_PROMPTS)
    ids = [c.id for c in conds]
    assert ids[0] == "original"
    assert ids[1:4] == ["tokenskip-1.0", "tokenskip-0.9", "tokenskip-0.5"]
    assert [i for i in ids if i.startswith("prompt-")] == [f"prompt-{n}" for n in BASELINE_PROMPTS]
    assert ids[-2:] == ["truncation-0.9", "truncation-0.5"]  # no truncation at γ = 1
    assert len(ids) == len(set(ids))


def test_truncation_needs_original_even_if_not_requested():
    assert [c.id for c in ev.plan_conditions([0.5], ["truncation"], [])] == [
        "original",
        "tokenskip-0.5",
        "truncation-0.5",
    ]
    assert [c.id for c in ev.plan_conditions([0.5], [], [])] == ["tokenskip-0.5"]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 99, 100, 213, 512])
@pytest.mark.parametrize("ratio", [0.1, 0.29, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
def test_truncation_length_is_floor(n, ratio):
    k = ev.truncation_length(n, ratio)
    assert 0 <= k <= n
    # exact floor of the decimal product (float error must not lose a token)
    assert k == (n * round(ratio * 100)) // 100
    assert ev.truncate_ids(list(range(n)), ratio) == list(range(k))


def test_truncation_rejects_negative():
    with pytest.raises(ValueError):
        ev.truncation_length(-1, 0.5)


def test_summarize_and_actual_ratio():
    samples = [
        {"correct": True, "output_tokens": 100, "finish_reason": "stop"},
        {"correct": False, "output_tokens": 300, "finish_reason": "length"},
        {"correct": True, "output_tokens": 200, "finish_reason": "stop"},
    ]
    s = ev.summarize(samples)
    assert s["n"] == 3 and s["correct"] == 2
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert s["mean_tokens"] == 200.0 and s["median_tokens"] == 200.0
    assert s["hit_limit"] == pytest.approx(1 / 3)
    assert ev.actual_ratio(100.0, 200.0) == 0.5
    assert ev.actual_ratio(None, 200.0) is None


def test_attach_actual_ratios_falls_back_to_original():
    rows = [
        {"id": "original", "method": "original", "mean_tokens": 200.0},
        {"id": "tokenskip-0.5", "method": "tokenskip", "mean_tokens": 90.0},
        {"id": "prompt-concise", "method": "prompt", "mean_tokens": 150.0},
    ]
    ev.attach_actual_ratios(rows)
    assert [r["actual_ratio"] for r in rows] == [1.0, 0.45, 0.75]
    assert {r["ratio_reference"] for r in rows} == {"original"}


def test_table_shape_and_values():
    rows = [
        {
            "label": "Original",
            "method": "original",
            "ratio": None,
            "accuracy": 0.862,
            "mean_tokens": 213.17,
            "mean_cot_tokens": 200.0,
            "median_cot_tokens": 190.0,
            "latency_s": 5.96,
            "actual_ratio": 1.0,
            "runaway_share": 0.0,
        },
        {
            "label": "TokenSkip",
            "method": "tokenskip",
            "ratio": 0.5,
            "accuracy": 0.782,
            "mean_tokens": 113.05,
            "mean_cot_tokens": 100.0,
            "median_cot_tokens": 98.0,
            "latency_s": 3.4,
            "actual_ratio": 0.53,
            "actual_ratio_ci": [0.5, 0.56],
            "median_item_ratio": 0.52,
            "adherence_error": 0.03,
            "runaway_share": 0.02,
            "flags": [],
        },
        {
            "label": "Truncation",
            "method": "truncation",
            "ratio": 0.5,
            "accuracy": 0.07,
            "mean_tokens": 103.69,
            "mean_cot_tokens": 103.69,
            "latency_s": None,
            "actual_ratio": 0.486,
            "runaway_share": 0.0,
            "flags": ["runaways"],
        },
    ]
    lines = ev.format_table(rows).splitlines()
    assert lines[0].startswith(
        "| Method | γ | Acc (%) | CoT tokens mean | CoT tokens median | Output tokens mean | Actual ratio"
    )
    assert "Runaways (%)" in lines[0]
    assert (
        lines[3] == "| TokenSkip | 0.5 | 78.2 | 100.0 | 98.0 | 113.0 | 0.53 [0.50, 0.56] | 0.52 | 0.03 | 2.0 | 3.40 |"
    )
    assert "0.49 ⚠ runaways" in lines[4]


def test_cot_tokens_exclude_the_answer_sentence_and_ratios_use_them():
    from tokenskip.prompt import split_answer

    cot, ans = split_answer("He has 2*3 = 6 apples.\n\nThe final answer is: $\\boxed{6}$")
    assert cot == "He has 2*3 = 6 apples." and ans.startswith("The final answer is")
    # A model repeating the sentence (a runaway) is cut at the first one.
    assert split_answer("a\nThe final answer is: 1 The final answer is: 1")[0] == "a"
    samples = {
        "tokenskip-1.0": [
            {"id": "a", "correct": True, "output_tokens": 110, "cot_tokens": 100, "finish_reason": "stop"},
            {"id": "b", "correct": True, "output_tokens": 60, "cot_tokens": 50, "finish_reason": "stop"},
        ],
        "tokenskip-0.5": [
            {"id": "a", "correct": True, "output_tokens": 60, "cot_tokens": 50, "finish_reason": "stop"},
            {"id": "b", "correct": False, "output_tokens": 35, "cot_tokens": 25, "finish_reason": "stop"},
        ],
    }
    rows = [
        {"id": k, "method": "tokenskip", "ratio": float(k.split("-")[1]), **ev.summarize(v)} for k, v in samples.items()
    ]
    ev.attach_actual_ratios(rows, samples)
    half = rows[1]
    # CoT ratio is exactly 0.5; the total-output ratio (95/170) would be pulled toward 1 by the answer sentence.
    assert half["actual_ratio"] == 0.5 and half["median_item_ratio"] == 0.5 and half["adherence_error"] == 0.0
    assert half["actual_ratio_ci"] == [0.5, 0.5] and half["flags"] == []
    assert half["mean_tokens"] == 47.5 and half["median_cot_tokens"] == 37.5


def test_runaways_and_noise_are_flagged():
    ref = [
        {"id": str(i), "correct": False, "output_tokens": 100, "cot_tokens": 100, "finish_reason": "stop"}
        for i in range(20)
    ]
    run = [
        {
            "id": str(i),
            "correct": False,
            "output_tokens": 512 if i < 4 else 50,
            "cot_tokens": 512 if i < 4 else 50,
            "finish_reason": "length" if i < 4 else "stop",
        }
        for i in range(20)
    ]
    noisy = [
        {
            "id": str(i),
            "correct": False,
            "output_tokens": 5 if i % 2 else 200,
            "cot_tokens": 5 if i % 2 else 200,
            "finish_reason": "stop",
        }
        for i in range(20)
    ]
    samples = {"tokenskip-1.0": ref, "tokenskip-0.5": run, "tokenskip-0.7": noisy}
    rows = [
        {"id": k, "method": "tokenskip", "ratio": float(k.split("-")[1]), **ev.summarize(v)} for k, v in samples.items()
    ]
    ev.attach_actual_ratios(rows, samples)
    by = {r["id"]: r for r in rows}
    assert by["tokenskip-0.5"]["runaway_share"] == 0.2 and "runaways" in by["tokenskip-0.5"]["flags"]
    assert "noisy" in by["tokenskip-0.7"]["flags"] and "runaways" not in by["tokenskip-0.7"]["flags"]
    assert by["tokenskip-1.0"]["flags"] == []
    table = ev.format_table([dict(r, label="TokenSkip") for r in rows])
    assert "⚠ runaways" in table and "⚠ noisy" in table


def test_caption_mentions_near_zero_only_when_near_zero():
    kw = dict(model="m", adapter="a", dataset="gsm8k", split="test", n=10, max_new_tokens=64, latency_samples=2)
    assert "near zero (at most 8.0% in any row)" in ev.build_caption(rows=[{"accuracy": 0.0}, {"accuracy": 0.08}], **kw)
    cap = ev.build_caption(rows=[{"accuracy": 0.0}, {"accuracy": 0.12}], **kw)
    assert "near zero" not in cap and "no adapter" not in cap


def test_render_markdown_has_every_condition():
    rows = [
        {
            "id": "original",
            "label": "Original",
            "method": "original",
            "ratio": None,
            "accuracy": 0.0,
            "mean_tokens": 10.0,
            "latency_s": 0.1,
            "actual_ratio": 1.0,
            "throughput": {"wall_s": 1.0, "tokens_per_s": 10.0, "samples_per_s": 1.0},
        },
        {
            "id": "truncation-0.5",
            "label": "Truncation",
            "method": "truncation",
            "ratio": 0.5,
            "accuracy": 0.0,
            "mean_tokens": 5.0,
            "latency_s": None,
            "actual_ratio": 0.5,
            "throughput": None,
        },
    ]
    md = ev.render_markdown(
        {
            "model": "m",
            "adapter": None,
            "wall_s": 3.0,
            "engine_start_s": 1.0,
            "datasets": {
                "gsm8k": {"split": "test", "n": 1, "max_new_tokens": 8, "latency_samples": 1, "conditions": rows}
            },
        }
    )
    assert "## gsm8k" in md and "| Truncation | 0.5 |" in md and "near zero" in md and "Run wall time: 3.0 s" in md
    assert md.count("| Original | - |") == 2  # Table 1 + throughput table; truncation has no throughput row


def test_scaled_budget():
    assert ev.scaled_budget(1024, 0.7) == 716 == math.floor(1024 * 0.7)


def _fake_results(accs=(0.0, 0.1, 0.05)):
    rows = [
        {
            "id": "original",
            "label": "Original",
            "method": "original",
            "ratio": None,
            "accuracy": accs[0],
            "mean_tokens": 200.0,
            "actual_ratio": 1.0,
        },
        {
            "id": "tokenskip-1.0",
            "label": "TokenSkip",
            "method": "tokenskip",
            "ratio": 1.0,
            "accuracy": accs[1],
            "mean_tokens": 190.0,
        },
        {
            "id": "tokenskip-0.5",
            "label": "TokenSkip",
            "method": "tokenskip",
            "ratio": 0.5,
            "accuracy": accs[2],
            "mean_tokens": 100.0,
        },
        {
            "id": "prompt-concise",
            "label": "Prompt: concise",
            "prompt_name": "concise",
            "method": "prompt",
            "ratio": None,
            "accuracy": 0.0,
            "mean_tokens": 150.0,
        },
        {
            "id": "truncation-0.5",
            "label": "Truncation",
            "method": "truncation",
            "ratio": 0.5,
            "accuracy": 0.0,
            "mean_tokens": 100.0,
        },
    ]
    ev.attach_actual_ratios(rows)
    return {"model": "m", "datasets": {"gsm8k": {"n": 3, "conditions": rows}, "math500": {"n": 3, "conditions": rows}}}


def test_plots_write_valid_pngs(tmp_path):
    from PIL import Image

    from tokenskip import plots

    res = _fake_results()
    for fn, name in ((plots.accuracy_vs_tokens, "a.png"), (plots.ratio_adherence, "r.png")):
        path = tmp_path / name
        fn(res, path)
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 2 * im.size[1]  # one panel per dataset, side by side
