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


def test_adherence_plot_marks_flagged_points_with_codes_and_a_key(tmp_path, monkeypatch):
    from tokenskip import plots

    figs = []
    monkeypatch.setattr(plots.plt, "close", figs.append)  # keep the figure to read its texts
    res = _fake_results()
    rows = res["datasets"]["gsm8k"]["conditions"]  # both panels share these rows
    half = next(r for r in rows if r["id"] == "tokenskip-0.5")
    half.update(runaway_share=0.3, actual_ratio_ci=[0.3, 0.9])  # a runaway-dominated, noisy ratio
    ev.attach_actual_ratios(rows)
    flagged = [r for r in rows if r.get("flags")]
    assert [r["id"] for r in flagged] == ["tokenskip-0.5"] and half["flags"] == ["runaways", "noisy"]
    plots.ratio_adherence(res, tmp_path / "r.png")
    (fig,) = figs
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert notes == ["⚠RN", "⚠RN"]  # one note per flagged point, in each of the two panels
    key = " ".join(t.get_text() for t in fig.texts)
    assert "R:" in key and "runaways" in key and "N:" in key and f"{ev.NOISY_CI_WIDTH}" in key


# --------------------------------------------------------------------------- budget forcing and hard budgets (#16)


def test_plan_conditions_with_budget_forcing():
    ids = [c.id for c in ev.plan_conditions([1.0, 0.7, 0.5], ["budget_forcing"], [])]
    # the original is the source of the cut CoTs; no budget forcing at γ = 1
    assert ids == [
        "original",
        "tokenskip-1.0",
        "tokenskip-0.7",
        "tokenskip-0.5",
        "budget_forcing-0.7",
        "budget_forcing-0.5",
    ]
    both = [c.id for c in ev.plan_conditions([0.5], ["truncation", "budget_forcing"], [])]
    assert both == ["original", "tokenskip-0.5", "truncation-0.5", "budget_forcing-0.5"]
    assert [c.id for c in ev.plan_conditions([0.5], [], [], need_original=True)] == ["original", "tokenskip-0.5"]
    cond = ev.plan_conditions([0.5], ["budget_forcing"], [])[-1]
    assert cond.label() == "Budget forcing" and not cond.uses_adapter and cond.ratio == 0.5
    with pytest.raises(ValueError, match="unknown method"):
        ev.condition_id("forcing", 0.5)


@pytest.mark.parametrize(
    "cot_tokens,ratio,expected", [(10, 0.5, 5), (10, 0.7, 7), (7, 0.5, 3), (0, 0.5, 0), (40, 0.5, 6)]
)
def test_budget_cut_keeps_gamma_times_the_cot(cot_tokens, ratio, expected):
    ids = list(range(100, 112))  # 12 output tokens: the CoT and then the answer sentence
    kept = ev.budget_cut_ids(ids, cot_tokens, ratio)
    # ⌊γ × CoT tokens⌋ (the truncation rule, applied to the CoT, never past the output)
    assert kept == ids[:expected]
    assert len(kept) == ev.truncation_length(min(cot_tokens, len(ids)), ratio)


def test_forced_prompt_layout_matches_the_training_target():
    from tokenskip.prompt import ANSWER_OPENING, ANSWER_PREFIX, build_target, split_answer

    assert ANSWER_OPENING == ANSWER_PREFIX + "$\\boxed{"
    p = ev.forced_prompt("<prompt>", "Janet has 16 eggs. She eats 3, so 16 - 3 = ")
    assert p == "<prompt>Janet has 16 eggs. She eats 3, so 16 - 3 =\n\nThe final answer is: $\\boxed{"
    # a finished forced output is laid out like a training target, and its CoT is the kept text
    out = p[len("<prompt>") :] + "13}$"
    assert out == build_target("Janet has 16 eggs. She eats 3, so 16 - 3 =", "13")
    assert split_answer(out) == ("Janet has 16 eggs. She eats 3, so 16 - 3 =", "The final answer is: $\\boxed{13}$")
    assert ev.forced_prompt("P", "   ") == "P" + ANSWER_OPENING  # nothing kept: no blank line


def test_forced_answer_is_cut_where_the_box_closes():
    from tokenskip.grading import grade

    vocab = {
        1: "1",
        2: "3",
        3: "}",
        4: "$",
        5: ".\n\nThe final answer is: $\\boxed{",
        6: "7}$",
        7: "\\frac{1",
        8: "}{2}}$",
    }

    def dec(ids):
        return "".join(vocab[i] for i in ids)

    ids, text, closed = ev.trim_answer_ids([1, 2, 3, 4, 5, 6], dec)
    assert (ids, text, closed) == ([1, 2, 3, 4], "13}$", True)  # the '$' after the brace is kept
    # what followed (a second, different box) would have changed the graded answer
    assert grade("x\n\nThe final answer is: $\\boxed{" + dec([1, 2, 3, 4, 5, 6]), "13").correct is False
    assert grade("x\n\nThe final answer is: $\\boxed{" + text, "13").correct is True
    assert ev.trim_answer_ids([7, 8, 5], dec) == ([7, 8], "\\frac{1}{2}}$", True)  # nested braces
    assert ev.trim_answer_ids([1, 2], dec) == ([1, 2], "13", False)  # the cap came first
    assert ev.answer_close("}") == 1 and ev.answer_close("{}") is None


def test_capped_ids_is_a_hard_cap():
    assert ev.capped_ids([1, 2, 3, 4, 5], "stop", 3) == ([1, 2, 3], True)
    assert ev.capped_ids([1, 2], "stop", 3) == ([1, 2], False)
    assert ev.capped_ids([1, 2, 3], "stop", 3) == ([1, 2, 3], False)  # finished on the last allowed token
    assert ev.capped_ids([1, 2, 3], "length", 3) == ([1, 2, 3], True)
    assert ev.latency_share(3.0, 10, 30) == pytest.approx(1.0)


def _ts_rows(table):
    return [{"id": f"tokenskip-{g}", "method": "tokenskip", "ratio": g, "mean_cot_tokens": t} for g, t in table]


def test_route_budget_picks_the_largest_gamma_that_fits():
    rows = _ts_rows([(1.0, 200.0), (0.7, 150.0), (0.5, 90.0)]) + [
        {"id": "original", "method": "original", "ratio": None, "mean_cot_tokens": 10.0},
        {"id": "budget_forcing-0.5", "method": "budget_forcing", "ratio": 0.5, "mean_cot_tokens": 5.0},
    ]
    assert ev.route_budget(rows, 1000) == {"ratio": 1.0, "expected_cot_tokens": 200.0, "fits": True}
    assert ev.route_budget(rows, 150) == {"ratio": 0.7, "expected_cot_tokens": 150.0, "fits": True}  # ≤ fits
    assert ev.route_budget(rows, 149.9)["ratio"] == 0.5
    # nothing fits: the smallest γ, flagged (other methods' rows never route)
    assert ev.route_budget(rows, 20) == {"ratio": 0.5, "expected_cot_tokens": 90.0, "fits": False}
    # a non-monotone model: the largest γ that fits, not the first
    assert ev.route_budget(_ts_rows([(1.0, 100.0), (0.7, 120.0), (0.5, 80.0)]), 110)["ratio"] == 1.0
    with pytest.raises(ValueError, match="TokenSkip rows"):
        ev.route_budget([{"method": "original", "ratio": None, "mean_cot_tokens": 3.0}], 10)


def test_summarize_hard_budget():
    rows = [
        {"correct": True, "cot_tokens": 30, "output_tokens": 41, "forced": False, "uncapped_cot_tokens": 30},
        {"correct": True, "cot_tokens": 64, "output_tokens": 75, "forced": True, "uncapped_cot_tokens": 200},
        {"correct": False, "cot_tokens": 60, "output_tokens": 64, "forced": True, "uncapped_cot_tokens": 60},
        {"correct": False, "cot_tokens": 10, "output_tokens": 20, "forced": False, "uncapped_cot_tokens": 10},
    ]
    s = ev.summarize_hard_budget(rows, 64)
    assert s["n"] == 4 and s["correct"] == 2 and s["accuracy"] == 0.5
    assert s["within_budget_share"] == 1.0 and s["forced_share"] == 0.5 and s["uncapped_within_share"] == 0.75
    assert s["mean_cot_tokens"] == 41.0 and s["max_cot_tokens"] == 64 and s["mean_tokens"] == 50.0
    # a CoT over the budget is counted (the cap did not hold)
    assert ev.summarize_hard_budget(rows, 60)["within_budget_share"] == 0.75
    assert ev.summarize_hard_budget([], 64)["accuracy"] is None


def _bf_rows():
    def row(i, m, g, acc, cot, lat, lab):
        return {"id": i, "method": m, "ratio": g, "label": lab, "accuracy": acc, "mean_cot_tokens": cot,
                "mean_tokens": cot + 10, "latency_s": lat, "runaway_share": 0.0}  # fmt: skip

    return [
        row("original", "original", None, 0.5, 200.0, 4.0, "Original"),
        row("tokenskip-1.0", "tokenskip", 1.0, 0.5, 180.0, 3.8, "TokenSkip"),
        row("tokenskip-0.5", "tokenskip", 0.5, 0.4, 80.0, 1.9, "TokenSkip"),
        row("truncation-0.5", "truncation", 0.5, 0.05, 95.0, None, "Truncation"),
        row("budget_forcing-0.5", "budget_forcing", 0.5, 0.3, 100.0, 2.3, "Budget forcing"),
    ]


def test_budget_forcing_rows_in_table_ratios_and_side_by_side():
    rows = _bf_rows()
    ev.attach_actual_ratios(rows)
    bf = rows[-1]
    assert bf["ratio_reference"] == "original" and bf["actual_ratio"] == 0.5 and bf["adherence_error"] == 0.0
    table = ev.format_table(rows)
    assert "| Budget forcing | 0.5 | 30.0 | 100.0 |" in table and table.count("\n") == len(rows) + 1
    sbs = ev.side_by_side(rows)
    assert [e["ratio"] for e in sbs] == [0.5]  # γ = 1 has no hard-cap baseline row
    e = sbs[0]
    assert (e["tokenskip"]["accuracy"], e["truncation"]["accuracy"], e["budget_forcing"]["accuracy"]) == (
        0.4,
        0.05,
        0.3,
    )
    assert e["budget_forcing"]["latency_s"] == 2.3 and e["truncation"]["latency_s"] is None
    lines = ev.format_side_by_side(rows).splitlines()
    assert lines[0].count("|") == 11 and "Budget forcing Acc (%)" in lines[0]
    assert lines[2] == "| 0.5 | 40.0 | 80.0 | 1.90 | 5.0 | 95.0 | n/a | 30.0 | 100.0 | 2.30 |"
    assert ev.format_side_by_side(rows[:3]) == ""  # neither baseline ran: no table


def test_render_markdown_with_budget_forcing_and_hard_budgets():
    rows = _bf_rows()
    ev.attach_actual_ratios(rows)
    hard = [
        {"budget": 64, "model": "tokenskip", "ratio": 0.5, "fits": False, "expected_cot_tokens": 80.0,
         "within_budget_share": 1.0, "accuracy": 0.25, "forced_share": 0.4, "mean_cot_tokens": 50.0,
         "uncapped_within_share": 0.6},
        {"budget": 64, "model": "base", "ratio": None, "fits": None, "expected_cot_tokens": None,
         "within_budget_share": 1.0, "accuracy": 0.1, "forced_share": 0.9, "mean_cot_tokens": 63.0,
         "uncapped_within_share": 0.1},
    ]  # fmt: skip
    ds = {"split": "test", "n": 10, "max_new_tokens": 256, "latency_samples": 2, "conditions": rows}
    md = ev.render_markdown(
        {"model": "m", "adapter": "a", "force_answer_tokens": 16, "datasets": {"gsm8k": {**ds, "hard_budget": hard}}}
    )
    assert "| Budget forcing | 0.5 |" in md and "TokenSkip against the hard-cap baselines" in md
    assert "Budget forcing rows cut Original's CoT" in md and "at most 16 new tokens" in md
    assert "| 64 | TokenSkip (routed) | 0.5 (none fits) | 80.0 | 100.0 | 25.0 | 40.0 | 50.0 | 60.0 |" in md
    assert "| 64 | Base model | - | - | 100.0 | 10.0 | 90.0 | 63.0 | 10.0 |" in md
    assert "### gsm8k: hard budget" in md and "no trained γ's mean CoT fits B" in md
    # the throughput table has the generated conditions only
    thr = md.split("Batched throughput:")[1].split("###")[0]
    assert "Budget forcing" not in thr and "Truncation" not in thr
    plain = ev.render_markdown({"model": "m", "datasets": {"gsm8k": ds}})
    assert "hard budget" not in plain and "at most 24 new tokens" in plain


def test_plots_show_budget_forcing(tmp_path):
    from PIL import Image

    from tokenskip import plots

    rows = _bf_rows()
    ev.attach_actual_ratios(rows)
    res = {"model": "m", "datasets": {"gsm8k": {"n": 3, "conditions": rows}}}
    for fn in (plots.accuracy_vs_tokens, plots.ratio_adherence):
        path = tmp_path / f"{fn.__name__}.png"
        fn(res, path)
        with Image.open(path) as im:
            assert im.format == "PNG"


def test_eval_config_budget_fields():
    from tokenskip.config import ConfigError, EvalConfig

    cfg = EvalConfig(baselines=["budget_forcing"], hard_budgets=[128, 32], max_new_tokens=256)
    assert cfg.hard_budgets == [32, 128] and cfg.force_answer_tokens == 24
    for kw, match in (
        ({"hard_budgets": [0]}, r"hard_budgets\[0\] must be a positive"),
        ({"hard_budgets": [8, 2.5]}, r"hard_budgets\[1\]"),
        ({"hard_budgets": [300], "max_new_tokens": 256}, "exceeds eval.max_new_tokens"),
        ({"hard_budgets": [8, 8]}, "duplicates"),
        ({"force_answer_tokens": 0}, "force_answer_tokens must be positive"),
        ({"baselines": ["forcing"]}, "budget_forcing"),
    ):
        with pytest.raises(ConfigError, match=match):
            EvalConfig(**kw)
