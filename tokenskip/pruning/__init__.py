"""Token pruning for TokenSkip: score each CoT once, cut it at every ratio γ.

>>> from tokenskip.pruning import load_scorer, prune_texts          # doctest: +SKIP
>>> scorer = load_scorer("llmlingua2", "microsoft/llmlingua-2-xlm-roberta-large-meetingbank")  # doctest: +SKIP
>>> prune_texts(["Natalia sold 48/2 = 24 clips in May."], [0.9, 0.5], scorer)  # doctest: +SKIP
[{0.9: '...', 0.5: '...'}]

Scorers (:mod:`.scorers` interface): ``llmlingua2`` (:class:`.llmlingua2.LLMLingua2Scorer`,
any HF token classifier) and ``self_info`` (:class:`.self_info.SelfInfoScorer`, any
causal LM). The pruner (:mod:`.pruner`) is pure numpy/str.

Ratios are checked up front: a ratio outside (0, 1] is a ``ValueError`` naming the
value. An empty or whitespace-only CoT prunes to "" at every ratio below 1.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from tokenskip import gamma
from tokenskip.pruning.pruner import (
    CUTS,
    PROTECT,
    ChunkWords,
    budget_masks,
    join_offsets,
    merge_words,
    offset_pieces,
    prune_chunks,
    word_tiers,
)
from tokenskip.pruning.scorers import ScoredText, Scorer

SCORERS = ("llmlingua2", "self_info")

__all__ = ["SCORERS", "load_scorer", "prune_texts", "prune_scored", "check_ratios", "TokenCounter", "prune_rows"]


def load_scorer(
    kind: str,
    model: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    reference_quirks: bool = True,
    **kwargs: Any,
) -> Scorer:
    """Build a scorer: ``kind`` llmlingua2 (token classifier) or self_info (causal LM)."""
    if kind == "llmlingua2":
        from tokenskip.pruning.llmlingua2 import DEFAULT_CHECKPOINT, LLMLingua2Scorer

        return LLMLingua2Scorer(
            model or DEFAULT_CHECKPOINT,
            device=device,
            batch_size=batch_size or 16,
            reference_quirks=reference_quirks,
            **kwargs,
        )
    if kind == "self_info":
        from tokenskip.pruning.self_info import SelfInfoScorer

        return SelfInfoScorer(model or "smollm2-135m-instruct", device=device, batch_size=batch_size or 8, **kwargs)
    raise ValueError(f"unknown scorer {kind!r} (valid: {', '.join(SCORERS)})")


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """Validate ratios; a bad one is a ValueError naming it.

    >>> check_ratios([0.9, 0.5])
    [0.9, 0.5]
    >>> check_ratios([0.5, 1.2])
    Traceback (most recent call last):
    ...
    ValueError: ratios[1]: compression ratio must be in (0, 1], got 1.2
    """
    if isinstance(ratios, (int, float)):
        ratios = [ratios]
    return gamma.check_list(ratios, "ratios")


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single str")
    out = []
    for i, t in enumerate(texts):
        if t is None:
            t = ""
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        out.append(t)
    return out


def prune_scored(
    scored: ScoredText,
    scorer: Scorer,
    ratios: Sequence[float],
    force_tokens: Sequence[str] = (),
    force_reserve_digit: bool = False,
    drop_consecutive: bool = False,
    cut: str = "percentile",
    protect: str = "none",
    count_words: Callable[[list[str]], list[int]] | None = None,
    count_text: Callable[[str], int] | None = None,
) -> dict[float, str]:
    """Pruned text of one scored CoT at every ratio (no model call).

    ``cut="percentile"``: LLMLingua-2's per-chunk percentile over cl100k-weighted words
    (byte-for-byte llmlingua parity). ``cut="budget"``: over the whole CoT, words ranked by
    (protection tier, score) are kept while they fit γ × the CoT's tokens, counted in the
    scorer's own tokens or, with ``count_words``, in another tokenizer's (the target
    model's); ``protect="numbers"`` ranks numbers, then equation operators, above every
    other word. Needs a scorer with character offsets (``use_spans``).
    """
    if cut not in CUTS:
        raise ValueError(f"unknown cut {cut!r} (valid: {', '.join(CUTS)})")
    if protect not in PROTECT:
        raise ValueError(f"unknown protect {protect!r} (valid: {', '.join(PROTECT)})")
    if cut == "budget":
        return _prune_budget(
            scored, scorer, ratios, force_tokens, force_reserve_digit, protect, count_words, count_text
        )
    cws = [ChunkWords.from_words(w, text=c.text, force_tokens=force_tokens)
           for c, w in zip(scored.chunks, _chunk_words(scored, scorer, force_tokens, force_reserve_digit))]
    res = prune_chunks(cws, ratios, drop_consecutive, detok=scorer.detok, text=scored.text, token_map=scored.token_map)
    if not scored.text.strip():
        res = {r: (res[r] if r >= 1.0 else "") for r in ratios}
    return res


def _chunk_words(scored: ScoredText, scorer: Scorer, force_tokens: Sequence[str], force_reserve_digit: bool) -> list:
    """The words of each scored chunk (sub-tokens merged, force rules applied)."""
    return [merge_words(c.tokens, c.probs, scorer.family, force_tokens, scored.token_map, force_reserve_digit,
                        offsets=c.offsets, text=scored.text, use_spans=scorer.use_spans) for c in scored.chunks]


def _prune_budget(
    scored: ScoredText,
    scorer: Scorer,
    ratios: Sequence[float],
    force_tokens: Sequence[str],
    force_reserve_digit: bool,
    protect: str,
    count_words,
    count_text=None,
) -> dict[float, str]:
    if not getattr(scorer, "use_spans", False):
        raise ValueError(
            "cut='budget' needs a scorer with character offsets (self_info, or llmlingua2 with reference_quirks=False)"
        )
    text = scored.text
    if not text.strip():
        return {r: (text if r >= 1.0 else "") for r in ratios}
    words, probs, spans, n_tok, n_sep = [], [], [], [], 0
    for w in _chunk_words(scored, scorer, force_tokens, force_reserve_digit):
        words += w.words
        probs.append(w.probs)
        spans.append(w.spans)
        n_tok.append(w.n_tokens)
        n_sep += w.n_sep
    probs_a = np.concatenate(probs) if probs else np.zeros(0, np.float32)
    spans_a = np.concatenate(spans) if spans else np.zeros((0, 2), np.int64)
    if count_words is not None:  # another tokenizer's unit: each word with the space before it
        weights = np.asarray(
            count_words([text[max(0, s - 1) : e] if s and text[s - 1] == " " else text[s:e] for s, e in spans_a]),
            np.int64,
        )
        n_sep = 0
        fixed = (
            int(sum(count_words([t for t in _gaps(text, spans_a) if t.strip() == "" and "\n" in t])))
            if len(spans_a)
            else 0
        )
    else:
        weights = np.concatenate(n_tok) if n_tok else np.zeros(0, np.int64)
        fixed = n_sep
    measure = total = None
    pieces = offset_pieces(text, spans_a)  # one pass over the words; every join below reuses it
    if count_text is not None:  # place the cut on the measured length of the pruned text itself
        measure = lambda keep: count_text(join_offsets(text, spans_a, keep, pieces))  # noqa: E731
        total = count_text(text)
    masks = budget_masks(
        probs_a,
        weights,
        word_tiers(words, protect, spans_a),
        ratios,
        fixed_tokens=fixed,
        measure=measure,
        measured_total=total,
    )
    return {r: (text if r >= 1.0 else join_offsets(text, spans_a, masks[r], pieces)) for r in ratios}


def _gaps(text: str, spans: np.ndarray) -> list[str]:
    """The text between consecutive words (line breaks live here)."""
    return [text[spans[k - 1][1] : spans[k][0]] for k in range(1, len(spans))]


def prune_texts(
    texts: Sequence[str],
    ratios: Sequence[float],
    scorer: Scorer,
    force_tokens: Sequence[str] = (),
    force_reserve_digit: bool = False,
    drop_consecutive: bool = False,
    cut: str = "percentile",
    protect: str = "none",
    count_words: Callable[[list[str]], list[int]] | None = None,
    count_text: Callable[[str], int] | None = None,
) -> list[dict[float, str]]:
    """Score all texts once (batched) and return ``{ratio: pruned}`` per text."""
    ratios = check_ratios(ratios)
    texts = _check_texts(texts)
    force_tokens = list(force_tokens or ())
    scored = scorer.score(texts, force_tokens)
    return [
        prune_scored(
            s,
            scorer,
            ratios,
            force_tokens,
            force_reserve_digit,
            drop_consecutive,
            cut,
            protect,
            count_words,
            count_text,
        )
        for s in scored
    ]


class TokenCounter:
    """Token counts in the target model's tokenizer (the unit ratios are measured in)."""

    def __init__(self, name: str = "smollm2-135m-instruct") -> None:
        from transformers import AutoTokenizer

        from tokenskip import assets

        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(assets.resolve_model(name))

    def __call__(self, texts: Sequence[str]) -> list[int]:
        texts = list(texts)
        if not texts:
            return []
        return [len(x) for x in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_EQUATION = re.compile(r"\$?\d[\d.,]*%?(?:\s*[-+*/×÷x]\s*\$?\d[\d.,]*%?)+\s*=\s*\$?\d[\d.,]*%?")


def kept_share(original: str, pruned: str, what: str = "numbers") -> float | None:
    """Share of the numbers (or whole equations) of ``original`` still in ``pruned``,
    counted with multiplicity; None when the original has none.

    >>> kept_share("48/2 = 24 clips, 48+24 = 72 in all", "48/2 = 24 clips 48+ 72")
    0.8333333333333334
    >>> kept_share("48/2 = 24 clips, 48+24 = 72 in all", "48/2 = 24 clips 48+ 72", "equations")
    0.5
    >>> kept_share("no digits", "no") is None
    True
    """
    pattern = _NUMBER if what == "numbers" else _EQUATION
    norm = (lambda x: x) if what == "numbers" else (lambda x: re.sub(r"\s+", "", x))
    want = Counter(norm(m) for m in pattern.findall(original))
    if not want:
        return None
    have = Counter(norm(m) for m in pattern.findall(pruned))
    return sum(min(n, have[k]) for k, n in want.items()) / sum(want.values())


def same_tokenizer(scorer: Any, counter: "TokenCounter") -> bool:
    """Whether the scorer tokenizes exactly like the target-model counter (same vocabulary)."""
    a, b = getattr(scorer, "tokenizer", None), getattr(counter, "tokenizer", None)
    if a is None or b is None:
        return False
    key = (id(a), id(b))
    hit = _SAME.get(key)
    if hit is None or hit[0] is not a or hit[1] is not b:  # ids of freed tokenizers can be reused
        hit = (a, b, a is b or (type(a) is type(b) and a.get_vocab() == b.get_vocab()))
        _SAME[key] = hit
    return hit[2]


# (scorer tokenizer, counter tokenizer, same?) by their ids; the entry holds both tokenizers, so
# an id is not reused for another object while its answer is cached.
_SAME: dict[tuple[int, int], tuple[Any, Any, bool]] = {}


def prune_rows(
    ids: Sequence[Any],
    texts: Sequence[str],
    ratios: Sequence[float],
    scorer: Scorer,
    counter: TokenCounter,
    force_tokens: Sequence[str] = (),
    force_reserve_digit: bool = False,
    drop_consecutive: bool = False,
    cut: str = "percentile",
    protect: str = "none",
) -> list[dict]:
    """Output rows of the prune stage: one per (id, ratio) with target-model token counts.

    With ``cut="budget"`` the cut is placed in the counter's (target model's) tokens: the
    scorer's own tokens when it uses the same tokenizer, else the counter counts each word;
    then it is moved until the pruned text itself, counted by the counter, is closest to γ.
    """
    ratios = check_ratios(ratios)
    count_words = None
    if cut == "budget" and not same_tokenizer(scorer, counter):
        count_words = counter
    # Every text is counted once: the budget cut measures the originals and its candidate cuts,
    # and the rows' counts below come from the same memo.
    memo: dict[str, int] = {}

    def count_one(t: str) -> int:
        n = memo.get(t)
        if n is None:
            n = memo[t] = int(counter([t])[0])
        return n

    count_text = count_one if cut == "budget" else None  # the measured unit
    pruned = prune_texts(
        texts,
        ratios,
        scorer,
        force_tokens,
        force_reserve_digit,
        drop_consecutive,
        cut,
        protect,
        count_words,
        count_text,
    )
    flat = [p[r] for p in pruned for r in ratios]
    missing = [t for t in dict.fromkeys([*texts, *flat]) if t not in memo]
    if missing:
        memo.update(zip(missing, (int(n) for n in counter(missing))))
    cot_n = [memo[t] for t in texts]
    pr_n = [memo[t] for t in flat]
    rows = []
    k = 0
    for i, (id_, p) in enumerate(zip(ids, pruned)):
        for r in ratios:
            n = pr_n[k]
            k += 1
            rows.append(
                {
                    "id": id_,
                    "ratio": float(r),
                    "pruned": p[r],
                    "cot_tokens": int(cot_n[i]),
                    "pruned_tokens": int(n),
                    "actual_ratio": float(n / cot_n[i]) if cot_n[i] else 1.0,
                    "numbers_kept": kept_share(texts[i], p[r]),
                    "equations_kept": kept_share(texts[i], p[r], "equations"),
                }
            )
    return rows
