"""Pruning engine: parity with llmlingua 0.2.2, the score-once pruner, bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tokenskip.pruning import TokenCounter, check_ratios, load_scorer, prune_rows, prune_texts
from tokenskip.pruning.pruner import ChunkWords, join_offsets, keep_masks, merge_words, offset_pieces

RATIOS = [0.9, 0.8, 0.7, 0.6, 0.5]
FORCE = dict(force_tokens=["Step", ":"], force_reserve_digit=True, drop_consecutive=True)


@pytest.fixture(scope="module")
def gsm8k_cots() -> list[str]:
    from tokenskip.data import load_questions

    return [r["solution"] for r in load_questions("gsm8k", "train").rows[:200]]


@pytest.fixture(scope="module")
def tiny_mbc(fixtures_dir) -> str:
    """Tiny random BERT classifier in a directory llmlingua accepts (name contains
    bert-base-multilingual-cased)."""
    from tokenskip.testing import build_tiny_bert_classifier

    return str(build_tiny_bert_classifier(fixtures_dir / "tiny-bert-base-multilingual-cased"))


@pytest.fixture(scope="module")
def tiny_scorer(tiny_mbc):
    return load_scorer("llmlingua2", tiny_mbc, device="cpu")


def _reference(model_dir: str):
    from tokenskip import assets

    assets.ensure_tiktoken()
    from llmlingua import PromptCompressor

    return PromptCompressor(model_dir, device_map="cpu", use_llmlingua2=True)


def _parity(model_dir: str, cots: list[str], scorer) -> dict:
    """Mismatch counts of ours vs llmlingua over (CoT, ratio) pairs, both modes.

    The reference is called with all CoTs as a context list (``use_context_level_filter
    =False``): llmlingua then compresses each context on its own, exactly as one call per
    CoT would (checked on a sample below), in a fraction of the time.
    """
    pc = _reference(model_dir)
    out = {}
    for mode, kw in (("plain", {}), ("force", FORCE)):
        mine = prune_texts(cots, RATIOS, scorer, **kw)
        bad = []
        for r in RATIOS:
            ref = pc.compress_prompt(cots, rate=r, use_context_level_filter=False, **kw)["compressed_prompt_list"]
            bad += [(i, r, a, m[r]) for i, (a, m) in enumerate(zip(ref, mine)) if a != m[r]]
        for i in range(0, len(cots), max(1, len(cots) // 4)):  # the per-CoT reference call pattern
            single = pc.compress_prompt(cots[i], rate=0.7, **kw)["compressed_prompt"]
            assert single == mine[i][0.7], (mode, i, single, mine[i][0.7])
        out[mode] = bad
    return out


# 60 CoTs x 5 ratios x 2 modes in the default run; all 200 (~3x the time) with -m slow.
@pytest.mark.parametrize("n", [60, pytest.param(200, marks=pytest.mark.slow)])
def test_parity_tiny_classifier(n, tiny_mbc, tiny_scorer, gsm8k_cots):
    assert len(gsm8k_cots) >= n
    cots = gsm8k_cots[:n]
    res = _parity(tiny_mbc, cots, tiny_scorer)
    total = len(cots) * len(RATIOS)
    for mode, bad in res.items():
        assert len(bad) <= 0.01 * total, f"{mode}: {len(bad)}/{total} differ, e.g. {bad[:2]}"


@pytest.mark.slow
def test_parity_minilm_classifier_200_cots(fixtures_dir, gsm8k_cots):
    from tokenskip.testing import build_tiny_bert_classifier

    d = str(build_tiny_bert_classifier(fixtures_dir / "minilm-as-bert-base-multilingual-cased", from_minilm=True))
    res = _parity(d, gsm8k_cots, load_scorer("llmlingua2", d, device="cpu"))
    total = len(gsm8k_cots) * len(RATIOS)
    for mode, bad in res.items():
        print(f"minilm parity {mode}: {total - len(bad)}/{total} identical")
        assert len(bad) <= 0.01 * total, f"{mode}: {len(bad)}/{total} differ, e.g. {bad[:2]}"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "x"])
def test_bad_ratio_is_value_error_naming_it(bad, tiny_scorer):
    with pytest.raises(ValueError, match=re.escape(repr(bad)) if not isinstance(bad, float) or bad == bad else "nan"):
        prune_texts(["a b c."], [0.9, bad], tiny_scorer)
    with pytest.raises(ValueError):
        check_ratios([])


def test_empty_and_whitespace_stay_empty(tiny_scorer):
    out = prune_texts(["", "   \n ", "Natalia sold 48 clips."], RATIOS + [1.0], tiny_scorer, **FORCE)
    assert all(out[0][r] == "" for r in RATIOS + [1.0])
    assert all(out[1][r] == "" for r in RATIOS)
    assert out[2][0.5] and len(out[2][0.5]) <= len(out[2][0.9])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        prune_texts(["a", 3], [0.5], tiny_scorer)


def test_long_nonascii_latex(tiny_scorer, gsm8k_cots):
    long = "\n".join(gsm8k_cots[:40])  # ~3,000 tokens: several 512-token chunks
    odd = "Café costs €5 — naïve 日本語 $\\frac{1}{2}x^2 + \\sqrt{3}$ = 7. Then \\boxed{42}."
    scored = tiny_scorer.score([long, odd])
    assert len(scored[0].chunks) >= 4
    assert all(len(c.tokens) <= 512 for c in scored[0].chunks)
    out = prune_texts([long, odd], RATIOS, tiny_scorer, force_reserve_digit=True)
    n = [len(out[0][r].split()) for r in RATIOS]
    assert n == sorted(n, reverse=True) and n[-1] < 0.7 * len(long.split())
    assert "42" in out[1][0.5] and "7" in out[1][0.5]


# --------------------------------------------------------------------------- pruner pieces


def test_merge_words_text_family_and_offsets_join():
    text = "Natalia sold 48/2 = 24 clips.\n\nStep 2: done"
    pieces, offs, pos = [], [], 0
    for p in [
        "N",
        "atal",
        "ia",
        " sold",
        " ",
        "4",
        "8",
        "/",
        "2",
        " =",
        " ",
        "2",
        "4",
        " clips",
        ".",
        "\n\n",
        "Step",
        " ",
        "2",
        ":",
        " done",
    ]:
        pieces.append(p)
        offs.append((pos, pos + len(p)))
        pos += len(p)
    assert "".join(pieces) == text
    probs = np.linspace(0.1, 0.9, len(pieces)).astype(np.float32)
    w = merge_words(pieces, probs, "text", ["Step", ":"], None, True, offsets=np.array(offs), text=text, use_spans=True)
    assert w.words == ["Natalia", "sold", "48", "/", "2", "=", "24", "clips", ".", "Step", "2", ":", "done"]
    assert float(w.probs[w.words.index("Step")]) == 1.0 and float(w.probs[w.words.index("48")]) == 1.0
    keep = np.ones(len(w.words), bool)
    assert join_offsets(text, w.spans, keep) == text
    keep[[1, 3]] = False
    assert join_offsets(text, w.spans, keep) == "Natalia 48 2 = 24 clips.\n\nStep 2: done"
    keep[[4, 6]] = False
    assert join_offsets(text, w.spans, keep) == "Natalia 48 = clips.\n\nStep 2: done"


def _join_offsets_reference(text, spans, keep):
    """The join as first written (a scan back over whitespace per kept word), kept here as the reference."""
    parts, prev = [], -2
    for k in np.flatnonzero(keep):
        s, e = spans[k]
        if parts:
            j = s
            while j > 0 and text[j - 1].isspace():
                j -= 1
            sep = " " if j == s and k != prev + 1 and text[s : s + 1].isalnum() else ""
            parts.append(sep + text[j:e])
        else:
            parts.append(text[s:e])
        prev = k
    return "".join(parts)


def test_join_with_precomputed_pieces_matches_the_reference_join(gsm8k_cots):
    """The budget cut joins one text many times from ``offset_pieces``; every join must be the
    one the per-word scan gives, on real CoTs (numbers glued to operators, line breaks) and random masks."""
    rng = np.random.default_rng(0)
    texts = [c for c in gsm8k_cots[:40]] + ["3*2=6\n\n  x=$4.50  (ok)\tend", "", "  lead and trail  "]
    checked = 0
    for text in texts:
        spans = np.array([m.span() for m in re.finditer(r"\w+|[^\w\s]", text)], np.int64).reshape(-1, 2)
        pieces = offset_pieces(text, spans)
        for p in (0.0, 0.3, 0.7, 1.0):
            keep = rng.random(len(spans)) < p
            want = _join_offsets_reference(text, spans, keep)
            assert join_offsets(text, spans, keep, pieces) == want == join_offsets(text, spans, keep)
            checked += bool(want)
    assert checked > 100


def test_all_ratios_from_one_threshold_pass_match_separate_calls():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    cw = ChunkWords(
        words,
        rng.random(300).astype(np.float32),
        np.zeros(300, bool),
        rng.integers(1, 4, 300),
        is_force=np.zeros(300, bool),
    )
    together = keep_masks(cw, RATIOS)
    for r in RATIOS:
        assert (together[r] == keep_masks(cw, [r])[r]).all()
    kept = [together[r].sum() for r in RATIOS]
    assert kept == sorted(kept, reverse=True)


# --------------------------------------------------------------------------- other scorers / modes


def test_self_info_scorer_tiny_llama(tiny_llama, gsm8k_cots):
    sc = load_scorer("self_info", tiny_llama, device="cpu")
    cots = gsm8k_cots[:6] + [""]
    out = prune_texts(cots, RATIOS, sc, force_reserve_digit=True)
    for cot, o in zip(cots[:6], out):
        for r in RATIOS:
            # kept words are cut from the original (punctuation may glue to a kept neighbour)
            assert all(w in cot for w in re.findall(r"\w+", o[r])), (r, o[r])
            assert all(w.strip(".,:;") in cot for w in o[r].split()), (r, o[r])
        # every number survives with force_reserve_digit
        for num in re.findall(r"\d+", cot):
            assert num in o[0.5]
        assert len(o[0.5]) < len(o[0.9]) <= len(cot)
    assert out[-1] == {r: "" for r in RATIOS}
    counter = TokenCounter(tiny_llama)
    rows = prune_rows(["a", "b"], cots[:2], [0.9, 0.5], sc, counter)
    assert [r["ratio"] for r in rows] == [0.9, 0.5, 0.9, 0.5]
    for r in rows:
        assert isinstance(r["cot_tokens"], int) and isinstance(r["actual_ratio"], float)
        assert r["pruned_tokens"] == counter([r["pruned"]])[0]
        assert r["actual_ratio"] == pytest.approx(r["pruned_tokens"] / r["cot_tokens"])
    assert rows[1]["actual_ratio"] < rows[0]["actual_ratio"] <= 1.0


def test_no_quirks_mode_keeps_original_text(tiny_mbc, gsm8k_cots):
    sc = load_scorer("llmlingua2", tiny_mbc, device="cpu", reference_quirks=False)
    cots = gsm8k_cots[:20]
    out = prune_texts(cots, RATIOS, sc, **FORCE)
    for cot, o in zip(cots, out):
        for r in RATIOS:
            assert all(w in cot for w in re.findall(r"\w+", o[r]))  # case preserved, cut from the original
        assert len(o[0.5]) < len(o[0.9])
    assert sum(c.isupper() for o in out for c in o[0.9]) > 20  # an uncased model, yet the case survives


def test_budget_cut_hits_gamma_in_target_tokens_and_keeps_numbers(tiny_llama, gsm8k_cots):
    """The default self-information path (cut: budget, protect: numbers): each pruned CoT is
    γ long in the target model's tokens, and every number and equation survives at γ ≥ 0.7
    (the old percentile cut over cl100k words dropped results of arithmetic: '48+ 72')."""
    from tokenskip.pruning import kept_share

    sc = load_scorer("self_info", tiny_llama, device="cpu")
    counter = TokenCounter(tiny_llama)
    cots = gsm8k_cots[:40]
    rows = prune_rows([str(i) for i in range(len(cots))], cots, RATIOS, sc, counter, cut="budget", protect="numbers")
    for r in RATIOS:
        sel = [x for x in rows if x["ratio"] == r]
        mean = sum(x["actual_ratio"] for x in sel) / len(sel)
        assert abs(mean - r) <= 0.015, (r, mean)  # the goal is ±0.03
        if r >= 0.7:
            assert all(x["numbers_kept"] in (None, 1.0) for x in sel), (
                r,
                [x["pruned"] for x in sel if x["numbers_kept"] != 1.0],
            )
            assert sum(x["equations_kept"] or 0 for x in sel) / len(sel) > 0.6
    plain = prune_rows([str(i) for i in range(len(cots))], cots, [0.5], sc, counter, cut="budget", protect="none")
    protected = [x for x in rows if x["ratio"] == 0.5]
    assert sum(x["numbers_kept"] or 0 for x in protected) > sum(x["numbers_kept"] or 0 for x in plain)
    # kept words are still cut from the original text, in order
    for cot, x in zip(cots, [x for x in rows if x["ratio"] == 0.7]):
        assert all(w in cot for w in re.findall(r"\w+", x["pruned"]))
    assert kept_share("48/2 = 24", "48/2 = 24") == 1.0


def test_budget_cut_hits_gamma_on_texts_longer_than_a_window(tiny_llama, gsm8k_cots):
    """CoTs over 512 tokens (several scoring windows): the word-sum estimate of the cut can be
    dozens of words off there, and the cut must still land on γ × the measured tokens (it used to be
    held within 24 words of the estimate and missed by up to ~25 tokens)."""
    sc = load_scorer("self_info", tiny_llama, device="cpu")
    counter = TokenCounter(tiny_llama)
    texts, cur = [], ""
    for c in gsm8k_cots:
        cur = f"{cur}\n\n{c}" if cur else c
        if counter([cur])[0] > 1100:
            texts.append(cur)
            cur = ""
        if len(texts) == 3:
            break
    rows = prune_rows([str(i) for i in range(len(texts))], texts, RATIOS, sc, counter, cut="budget", protect="numbers")
    assert len(rows) == len(texts) * len(RATIOS)
    errs = [abs(x["pruned_tokens"] - x["ratio"] * x["cot_tokens"]) for x in rows if x["ratio"] < 1.0]
    assert max(errs) <= 3 and sum(errs) / len(errs) <= 1, errs  # held near the estimate: 10.5 and a mean of 1.3


def test_refine_reaches_a_cut_far_from_the_estimate_in_few_measurements():
    from tokenskip.pruning.pruner import _refine

    calls = []

    def measure(keep):  # the joined text runs 30 % longer than the word-sum estimate
        calls.append(int(keep.sum()))
        return int(1.3 * keep.sum())

    assert _refine(np.arange(1000), 500, 1.3 * 600, measure, 24, 1.0) == 600
    assert len(calls) <= 6, calls


def test_prune_rows_counts_each_text_once(tiny_llama, gsm8k_cots):
    """The budget cut measures the originals and its candidate cuts; the rows' token counts reuse
    those measurements instead of tokenizing the originals and the chosen cuts again."""
    from collections import Counter

    sc = load_scorer("self_info", tiny_llama, device="cpu")
    counter = TokenCounter(tiny_llama)
    seen: Counter = Counter()

    class Counting:  # the target's counter (same tokenizer as the scorer), recording what it counts
        tokenizer = counter.tokenizer

        def __call__(self, texts):
            texts = list(texts)
            seen.update(texts)
            return counter(texts)

    counting = Counting()
    cots = gsm8k_cots[:8]
    rows = prune_rows([str(i) for i in range(len(cots))], cots, RATIOS, sc, counting, cut="budget", protect="numbers")
    assert seen and max(seen.values()) == 1, seen.most_common(3)
    for r in rows:
        assert r["pruned_tokens"] == counter([r["pruned"]])[0]
    assert [r["cot_tokens"] for r in rows[:: len(RATIOS)]] == counter(cots)


def test_budget_cut_counts_another_tokenizer_when_asked(tiny_llama):
    """With a target tokenizer unlike the scorer's, the budget is placed in the target's unit."""
    from tokenskip.pruning import prune_texts

    sc = load_scorer("self_info", tiny_llama, device="cpu")
    text = "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May."
    chars = lambda words: [len(w) for w in words]  # noqa: E731 - a "tokenizer" whose tokens are characters
    out = prune_texts([text], [0.5], sc, cut="budget", protect="none", count_words=chars)[0][0.5]
    assert abs(len(out) / len(text) - 0.5) < 0.08, out


def test_budget_cut_needs_offsets_and_valid_options(tiny_scorer):
    with pytest.raises(ValueError, match="character offsets"):
        prune_texts(["a b c"], [0.5], tiny_scorer, cut="budget")
    with pytest.raises(ValueError, match="unknown cut"):
        prune_texts(["a b c"], [0.5], tiny_scorer, cut="middle")


def test_same_tokenizer_cache_is_not_fooled_by_a_reused_id():
    """The cache is keyed by ids; an entry left by freed tokenizers whose ids were reused must not answer."""
    import types

    from tokenskip import pruning

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    a, b = Tok({"x": 0}), Tok({"y": 0})
    scorer, counter = types.SimpleNamespace(tokenizer=a), types.SimpleNamespace(tokenizer=b)
    pruning._SAME[(id(a), id(b))] = (object(), object(), True)  # as if two freed tokenizers had these ids
    try:
        assert pruning.same_tokenizer(scorer, counter) is False
        b.vocab = {"x": 0}
        assert pruning.same_tokenizer(scorer, counter) is False  # cached for these very objects now
        assert pruning.same_tokenizer(scorer, types.SimpleNamespace(tokenizer=a)) is True
    finally:
        pruning._SAME.pop((id(a), id(b)), None)
        pruning._SAME.pop((id(a), id(a)), None)
