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

from typing import Any, Sequence

from tokenskip.config import check_ratio
from tokenskip.pruning.pruner import ChunkWords, merge_words, prune_chunks
from tokenskip.pruning.scorers import Scorer, ScoredText

SCORERS = ("llmlingua2", "self_info")

__all__ = ["SCORERS", "load_scorer", "prune_texts", "prune_scored", "check_ratios", "TokenCounter", "prune_rows"]


def load_scorer(kind: str, model: str | None = None, device: str = "auto", batch_size: int | None = None,
                reference_quirks: bool = True, **kwargs: Any) -> Scorer:
    """Build a scorer: ``kind`` llmlingua2 (token classifier) or self_info (causal LM)."""
    if kind == "llmlingua2":
        from tokenskip.pruning.llmlingua2 import DEFAULT_CHECKPOINT, LLMLingua2Scorer

        return LLMLingua2Scorer(model or DEFAULT_CHECKPOINT, device=device, batch_size=batch_size or 16,
                                reference_quirks=reference_quirks, **kwargs)
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
    if not ratios:
        raise ValueError("ratios must not be empty")
    return [check_ratio(r, f"ratios[{i}]") for i, r in enumerate(ratios)]


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


def prune_scored(scored: ScoredText, scorer: Scorer, ratios: Sequence[float], force_tokens: Sequence[str] = (),
                 force_reserve_digit: bool = False, drop_consecutive: bool = False) -> dict[float, str]:
    """Pruned text of one scored CoT at every ratio (no model call)."""
    cws = []
    for c in scored.chunks:
        w = merge_words(c.tokens, c.probs, scorer.family, force_tokens, scored.token_map, force_reserve_digit,
                        offsets=c.offsets, text=scored.text, use_spans=scorer.use_spans)
        cws.append(ChunkWords.from_words(w, text=c.text, force_tokens=force_tokens))
    res = prune_chunks(cws, ratios, drop_consecutive, detok=scorer.detok, text=scored.text, token_map=scored.token_map)
    if not scored.text.strip():
        res = {r: (res[r] if r >= 1.0 else "") for r in ratios}
    return res


def prune_texts(texts: Sequence[str], ratios: Sequence[float], scorer: Scorer, force_tokens: Sequence[str] = (),
                force_reserve_digit: bool = False, drop_consecutive: bool = False) -> list[dict[float, str]]:
    """Score all texts once (batched) and return ``{ratio: pruned}`` per text."""
    ratios = check_ratios(ratios)
    texts = _check_texts(texts)
    force_tokens = list(force_tokens or ())
    scored = scorer.score(texts, force_tokens)
    return [prune_scored(s, scorer, ratios, force_tokens, force_reserve_digit, drop_consecutive) for s in scored]


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


def prune_rows(ids: Sequence[Any], texts: Sequence[str], ratios: Sequence[float], scorer: Scorer,
               counter: TokenCounter, force_tokens: Sequence[str] = (), force_reserve_digit: bool = False,
               drop_consecutive: bool = False) -> list[dict]:
    """Output rows of the prune stage: one per (id, ratio) with target-model token counts."""
    ratios = check_ratios(ratios)
    pruned = prune_texts(texts, ratios, scorer, force_tokens, force_reserve_digit, drop_consecutive)
    flat = [p[r] for p in pruned for r in ratios]
    cot_n = counter(texts)
    pr_n = counter(flat)
    rows = []
    k = 0
    for i, (id_, p) in enumerate(zip(ids, pruned)):
        for r in ratios:
            n = pr_n[k]
            k += 1
            rows.append({"id": id_, "ratio": float(r), "pruned": p[r], "cot_tokens": int(cot_n[i]), "pruned_tokens": int(n),
                         "actual_ratio": float(n / cot_n[i]) if cot_n[i] else 1.0})
    return rows
