"""benchmarks/gamma_sweep.py end to end on the tiny fixture model (CPU, seconds)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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


def _sweep(tmp_path, model: str, *args: str) -> dict:
    """Run the sweep on the 3-question SFT set (CPU, batch 4, no probe unless ``args`` asks) and
    return its JSON."""
    out = tmp_path / "sweep.json"
    base = ["--sft", _sft(tmp_path / "train.parquet"), "--model", model, "--device", "cpu", "--batch", "4"]
    probe = [] if "--probe-n" in args else ["--probe-n", "0"]
    assert gamma_sweep.main([*base, *probe, *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_sweep_trains_each_variant_and_reports_every_gamma(tiny_llama, tmp_path):
    res = _sweep(tmp_path, tiny_llama, "--variants", "base", "x3", "--eval-n", "2", "--max-new-tokens", "4",
                 "--probe-n", "1")
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


def test_against_targets_sets_each_output_beside_its_own_gammas_target():
    rows = [
        {"id": q, "gold": "7", "question": q, "ratio": g, "completion": prompt.build_target(c, "7")}
        for q in ("Q1", "Q2")
        for g, c in ((1.0, "a b c d"), (0.5, "a b"))
    ]
    questions = [{"id": q, "question": q, "gold": "7"} for q in ("Q1", "Q2")]
    # Q1 at 0.5 reproduces its 0.5 target; Q2 at 0.5 writes its γ = 1 target instead
    per = {
        1.0: [{"cot": 4, "cot_text": "a b c d"}, {"cot": 4, "cot_text": "a b c d"}],
        0.5: [{"cot": 2, "cot_text": "a b"}, {"cot": 4, "cot_text": "a b c d"}],
    }
    res = gamma_sweep.against_targets(per, questions, rows, _WordTok())
    assert res["1.0"]["exact_share"] == 1.0
    assert res["0.5"]["exact_share"] == 0.5
    assert [c["target_cot"] for c in res["0.5"]["per_question"]] == [2, 2]
    assert [c["cot"] for c in res["0.5"]["per_question"]] == [2, 4]
    assert res["0.5"]["median_cot"] == 3 and res["0.5"]["median_target_cot"] == 2
    # Q2's γ 0.5 output is its γ = 1 target word for word: the value ignored, not a new text
    assert [c["reproduces"] for c in res["0.5"]["per_question"]] == [[0.5], [1.0]]
    assert res["0.5"]["other_gamma_share"] == 0.5 and res["1.0"]["other_gamma_share"] == 0.0


def test_solo_trains_one_adapter_per_gamma_on_its_rows_only(tiny_llama, tmp_path, monkeypatch):
    seen = []
    real_train = gamma_sweep.train

    def spy(path, tok, rows, v, a, device):
        seen.append(sorted({r["ratio"] for r in rows}))
        return real_train(path, tok, rows, v, a, device)

    monkeypatch.setattr(gamma_sweep, "train", spy)
    res = _sweep(tmp_path, tiny_llama, "--variants", "solo", "--eval-n", "2", "--max-new-tokens", "4", "--probe-n", "1")
    assert seen == [[1.0], [0.7], [0.5]]  # three adapters, each on one γ's rows
    solo = res["variants"]["solo"]
    assert solo["config"]["per_gamma"] is True and solo["probe"] is None
    assert set(solo["train"]["per_gamma"]) == {"1.0", "0.7", "0.5"}
    assert all(t["rows"] == 3 and t["steps"] == 1 for t in solo["train"]["per_gamma"].values())
    assert solo["train"]["rows"] == 9 and solo["train"]["steps"] == 3
    assert set(solo["adherence"]) == {"1.0", "0.7", "0.5"} and solo["adherence"]["1.0"]["actual_ratio"] == 1.0


def test_contrast_term_rewards_the_own_prompt_and_leaves_the_sft_loss_alone():
    import math

    import torch

    # 2 rows under their own prompt, then the same 2 targets under the twin's; vocab 3, one target token each
    labels = torch.tensor([[-100, 1], [-100, 2], [-100, 1], [-100, 2]])
    logits = torch.zeros(4, 2, 3)
    logits[0, 0, 1] = logits[1, 0, 2] = 4.0  # own prompts put mass on the target
    total, sft, terms = gamma_sweep.sft_and_contrast_loss(logits, labels, 2, weight=0.5)
    assert terms.shape == (2,) and terms[0].item() == pytest.approx(terms[1].item())
    term = terms.mean()
    own = -math.log(math.exp(4) / (math.exp(4) + 2))
    assert sft.item() == pytest.approx(own, rel=1e-5)  # the twin half is not in the SFT loss
    delta = math.log(3) - own  # seq log p own - twin (uniform: -log 3)
    assert term.item() == pytest.approx(math.log1p(math.exp(-delta)), rel=1e-5)
    assert total.item() == pytest.approx(own + 0.5 * term.item(), rel=1e-5)
    _, _, flipped = gamma_sweep.sft_and_contrast_loss(torch.cat([logits[2:], logits[:2]]), labels, 2, 0.5)
    assert flipped.mean().item() > math.log(2) > term.item()  # the twin prompt preferred -> the term grows


def test_contrast_twins_are_another_gamma_and_reproducible():
    rows = [{"ratio": g} for g in (1.0, 0.7, 0.5) * 20]
    twins = gamma_sweep.contrast_twins(rows, seed=3)
    assert twins == gamma_sweep.contrast_twins(rows, seed=3)
    assert all(t != r["ratio"] and t in (1.0, 0.7, 0.5) for r, t in zip(rows, twins))
    assert {t for r, t in zip(rows, twins) if r["ratio"] == 0.7} == {1.0, 0.5}
    with pytest.raises(ValueError, match="two or more"):
        gamma_sweep.contrast_twins([{"ratio": 0.5}], seed=0)


def test_contrast_variant_trains_with_the_term_and_reports_it(tiny_llama, tmp_path):
    ctr = _sweep(tmp_path, tiny_llama, "--variants", "ctr", "--eval-n", "2", "--max-new-tokens", "4")["variants"]["ctr"]
    assert ctr["config"]["contrast"] == 1.0
    assert ctr["train"]["rows"] == 9 and ctr["train"]["steps"] == 3
    tr = ctr["train"]
    assert tr["contrast_first"] > 0 and tr["contrast_last"] > 0
    # 9 rows: the 0.7 and 0.5 rows whose twin is the other marked γ (the value alone), the rest with 1.0 on one side
    twins = gamma_sweep.contrast_twins(gamma_sweep.load_rows(str(tmp_path / "train.parquet")), 42)
    assert 0 < sum(t < 1.0 for t in twins[1::3] + twins[2::3]) < 6  # both kinds occur with seed 42
    assert tr["contrast_value_first"] > 0 and tr["contrast_marker_first"] > 0
    assert set(ctr["adherence"]) == {"1.0", "0.7", "0.5"}


def test_full_variant_trains_every_weight_without_lora(tiny_llama, tmp_path):
    import argparse

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = gamma_sweep.load_rows(_sft(tmp_path / "train.parquet"))
    a = argparse.Namespace(seed=42, batch=4, cutoff=128)
    v = {**gamma_sweep.QUICKSTART, **gamma_sweep.VARIANTS["trunc_full_ep3"]}
    model, stats = gamma_sweep.train(tiny_llama, tok, gamma_sweep.truncated_rows(tok, rows), v, a, "cpu")
    before = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).state_dict()
    after = model.state_dict()
    assert set(after) == set(before)  # a plain model: no LoRA modules left, none merged in
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # every tensor moved, embeddings and norms included
    assert stats["steps"] == 9  # 9 truncated rows, batch 4, 3 epochs


def test_eval_on_train_asks_the_sft_sets_own_questions(tiny_llama, tmp_path, monkeypatch):
    asked = []
    real_outputs = gamma_sweep.outputs

    def spy(model, tok, questions, ratios, marker, a, device):
        asked.append([q["question"] for q in questions])
        return real_outputs(model, tok, questions, ratios, marker, a, device)

    monkeypatch.setattr(gamma_sweep, "outputs", spy)
    res = _sweep(tmp_path, tiny_llama, "--variants", "base", "--eval-on", "train",
                 "--eval-n", "2", "--max-new-tokens", "4")
    # the first two distinct questions of the SFT set, once each (every γ is asked of the same two)
    assert asked == [[f"Ann has {i} apples and gets 2. How many?" for i in (0, 1)]]
    assert res["eval_on"] == "train" and res["eval_n"] == 2
    # each output set beside the target it was trained on, per γ
    vs = res["variants"]["base"]["against_targets"]
    assert sorted(vs) == ["0.5", "0.7", "1.0"] and all(m["questions"] == 2 for m in vs.values())


def test_fork_positions_are_where_a_questions_targets_part_ways():
    exs = [{"labels": [-100, 5, 6, 7]}, {"labels": [-100, -100, 5, 6, 9]}, {"labels": [-100, 5, 8]}]
    # row 0 parts from row 2 at its 2nd target token (label index 2) and from row 1 at its 3rd (index 3)
    assert gamma_sweep.fork_positions(exs, ["q", "q", "q"]) == [[2, 3], [3, 4], [2]]
    assert gamma_sweep.fork_positions(exs, ["a", "b", "c"]) == [[], [], []]  # no other γ of the question
    # a target that is a prefix of the other's has no fork of its own; the longer one forks where it goes on
    assert gamma_sweep.fork_positions([{"labels": [1, 2]}, {"labels": [1, 2, 3]}], ["q", "q"]) == [[], [2]]
    # identical targets at two γ: nothing the value decides
    assert gamma_sweep.fork_positions([{"labels": [1, 2]}, {"labels": [1, 2]}], ["q", "q"]) == [[], []]


def test_weighted_loss_is_the_sft_loss_at_unit_weight_and_scales_only_the_forks(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [3, 4, 9, 10, 0, 0]])
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8], [-100, -100, 9, 10, -100, -100]])
    att = ((labels != -100) | (torch.arange(6) < 2)).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits
        ref = model(input_ids=ids, attention_mask=att, labels=labels).loss
    nll, mask = gamma_sweep.token_nll(logits, labels)
    plain = gamma_sweep.weighted_loss(nll, mask, torch.ones(2, 6))
    w = torch.ones(2, 6)
    w[0, 3] = 20.0
    heavy = gamma_sweep.weighted_loss(nll, mask, w)
    assert torch.allclose(plain, ref, atol=1e-5)
    one = float(torch.nn.functional.cross_entropy(logits[0, 2], labels[0, 3]))  # the token at label index 3
    assert gamma_sweep.masked_mean(nll, mask, w != 1) == pytest.approx(one, rel=1e-4)
    assert gamma_sweep.masked_mean(nll, mask, torch.zeros(2, 6, dtype=torch.bool)) is None
    n = int((labels[:, 1:] != -100).sum())
    assert float(heavy - plain) == pytest.approx(19 * one / n, rel=1e-4)


def test_fork_weight_variant_trains_and_reports_the_nll_at_the_forks(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(gamma_sweep.VARIANTS, "fork_t", {"targets": "truncated", "fork_weight": 20.0})
    # the same, weighting only the forks between the 0.7 and 0.5 targets
    value_only = {"targets": "truncated", "fork_weight": 20.0, "fork_on": "value_fork"}
    monkeypatch.setitem(gamma_sweep.VARIANTS, "vfork_t", value_only)
    res = _sweep(tmp_path, tiny_llama, "--variants", "fork_t", "vfork_t", "--eval-n", "2", "--max-new-tokens", "4")
    res = res["variants"]
    tr, vtr = res["fork_t"]["train"], res["vfork_t"]["train"]
    # 3 questions x 3 γ, each row parting from its question's 2 others: at least one fork per row
    assert tr["rows"] == 9 and tr["fork_tokens"] >= 9
    # value forks: only between the 0.7 and 0.5 rows of a question (the γ = 1 rows have none)
    assert 0 < tr["value_fork_tokens"] <= 6 and tr["value_fork_tokens"] < tr["fork_tokens"]
    assert tr["fork_nll_first"] > 0 and tr["fork_nll_last"] > 0
    assert tr["value_fork_nll_first"] > 0 and tr["value_fork_nll_last"] > 0
    # same rows, seed and first batch; the weights differ, so the steps after the first do
    assert vtr["fork_tokens"] == tr["fork_tokens"] and vtr["loss_first"] != tr["loss_first"]


def test_fork_weight_ramped_in_leaves_the_steps_before_it_unweighted(tiny_llama, tmp_path, monkeypatch):
    # 9 rows, batch 4: 3 steps per epoch, 4 epochs = 12 steps; the weight applies from step 6 on
    plain = {"targets": "truncated", "fork_weight": 1.0, "fork_on": "value_fork", "epochs": 4.0}
    monkeypatch.setitem(gamma_sweep.VARIANTS, "plain_t", plain)
    monkeypatch.setitem(gamma_sweep.VARIANTS, "ramp_t", {**plain, "fork_weight": 20.0, "fork_from": 0.5})
    res = _sweep(tmp_path, tiny_llama, "--variants", "plain_t", "ramp_t", "--eval-n", "1", "--max-new-tokens", "2")
    res = res["variants"]
    p, r = res["plain_t"]["train"], res["ramp_t"]["train"]
    assert p["steps"] == r["steps"] == 12
    # steps 0-4 are the same training (same seed, rows, order, weight 1): the same SFT loss to the digit
    assert r["loss_first"] == p["loss_first"]
    # from step 6 the value forks weigh 20x, so the later steps train differently
    assert r["loss_last"] != p["loss_last"]
    assert r["value_fork_nll_before_weight"] > 0 and "value_fork_nll_before_weight" not in p
