"""Score once, cut at every ratio: LLMLingua-2's post-processing, vectorised.

The keep probabilities of a CoT do not depend on the ratio γ, so a scorer runs once
per CoT and :func:`prune_scored` cuts the same probabilities at every requested γ.
Per chunk (≤ 512 model tokens) it does what ``llmlingua==0.2.2`` does in
``PromptCompressor.__compress``:

1. merge sub-tokens into words (word probability = mean of its sub-token
   probabilities; a word whose first token is a force token gets 1.0; with
   ``force_reserve_digit`` every sub-token containing a digit counts as 1.0);
2. optional ``drop_consecutive``: a force word repeated with no kept word in between
   gets probability 0;
3. threshold = ``np.percentile`` of the word probabilities, each repeated by the
   word's number of tiktoken ``cl100k`` tokens, at ``int(100 * (1 - γ) + 1)``;
4. keep words with ``p > threshold`` (or ``p == threshold == 1.0``);
5. join the kept words back to text.

The merge is done once per chunk; steps 2–5 are a few numpy operations per ratio.
Everything here is tokenizer-agnostic given token strings, probabilities and (for the
``offsets`` join) character spans. Word-start rules by ``family``:

* ``wordpiece`` (BERT): a token not starting with ``##`` starts a word;
* ``sentencepiece`` (XLM-R): a ``▁`` token or a single punctuation character;
* ``text`` (byte-level BPE such as Llama/SmolLM2, tokens given as their text pieces):
  a piece starting with whitespace, a piece of punctuation only, or the piece after
  whitespace or punctuation. Whitespace-only pieces belong to no word.

Two ways to turn kept words back into text:

* ``detok`` (LLMLingua-2's, ``reference_quirks=True``): the tokenizer's
  ``convert_tokens_to_string`` on the kept words of a chunk, chunks joined with "".
  With an uncased BERT this lower-cases the CoT and puts spaces around punctuation
  (``48 / 2``), ``[UNK]`` words vanish, and consecutive chunks are glued together.
* ``offsets``: the kept words' original character spans, each preceded by the
  whitespace that preceded it in the original text. Case, spacing and line breaks
  survive; nothing outside the kept words is invented.

>>> toks = ["▁Natalia", "▁sold", "▁48", "/", "2", "▁clips", "."]
>>> probs = np.array([0.9, 0.2, 0.8, 0.7, 0.7, 0.6, 0.1], dtype=np.float32)
>>> words = merge_words(toks, probs, "sentencepiece")
>>> words.words
['▁Natalia', '▁sold', '▁48', '/2', '▁clips', '.']
>>> out = prune_chunks([ChunkWords.from_words(words)], [0.5], detok=lambda ws: "".join(ws).replace("▁", " ").strip())
>>> out[0.5]
'Natalia 48'
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

FAMILIES = ("wordpiece", "sentencepiece", "text")
_DIGIT = re.compile(r"\d")
_PUNCT = set(string.punctuation)


# --------------------------------------------------------------------------- tiktoken weights

_ENC = None
_COUNT_CACHE: dict[str, int] = {}


def tiktoken_len(word: str) -> int:
    """Number of cl100k (gpt-3.5-turbo) tokens of ``word``, cached; LLMLingua-2 weights
    each word by it when placing the percentile threshold."""
    n = _COUNT_CACHE.get(word)
    if n is None:
        global _ENC
        if _ENC is None:
            from tokenskip import assets

            assets.ensure_tiktoken()
            import tiktoken

            _ENC = tiktoken.get_encoding("cl100k_base")
        n = len(_ENC.encode_ordinary(word))
        if len(_COUNT_CACHE) > 500_000:
            _COUNT_CACHE.clear()
        _COUNT_CACHE[word] = n
    return n


# --------------------------------------------------------------------------- word merge


def _is_punct(s: str) -> bool:
    return bool(s) and all(c in _PUNCT for c in s)


def is_word_start(token: str, family: str, force: frozenset | set = frozenset(), prev: str | None = None) -> bool:
    """Whether ``token`` begins a new word (llmlingua's ``is_begin_of_new_word``).

    >>> is_word_start("##s", "wordpiece"), is_word_start("cat", "wordpiece")
    (False, True)
    >>> is_word_start(".", "sentencepiece"), is_word_start("ing", "sentencepiece")
    (True, False)
    >>> is_word_start(" May", "text", prev="in"), is_word_start("ia", "text", prev="atal")
    (True, False)
    """
    if family == "wordpiece":
        if token.lstrip("#") in force:
            return True
        return not token.startswith("##")
    if family == "sentencepiece":
        if token in _PUNCT or token in force:
            return True
        return token.startswith("▁")
    if family == "text":
        stripped = token.strip()
        if prev is None or not prev.strip() or token[:1].isspace() or stripped in force:
            return True
        if _is_punct(stripped) or _is_punct(prev.strip()):
            return True
        return False
    raise ValueError(f"unknown tokenizer family {family!r} (valid: {', '.join(FAMILIES)})")


def pure_token(token: str, family: str) -> str:
    """A token without its word-piece marker (llmlingua's ``get_pure_token``).

    >>> pure_token("##ing", "wordpiece"), pure_token("▁Step", "sentencepiece"), pure_token(" Step", "text")
    ('ing', 'Step', 'Step')
    """
    if family == "wordpiece":
        return token.lstrip("#")
    if family == "sentencepiece":
        return token.lstrip("▁")
    return token.strip()


@dataclass
class Words:
    """Words of one chunk: reference word strings, mean probabilities, spans."""

    words: list[str]
    probs: np.ndarray  # float32, mean of (force-adjusted) sub-token probabilities
    all_forced: np.ndarray  # bool: every sub-token forced to 1.0 (llmlingua then holds a Python float)
    spans: np.ndarray | None = None  # (n, 2) character spans in the original text
    n_tokens: np.ndarray | None = None  # scorer tokens per word
    n_sep: int = 0  # whitespace-only scorer tokens (belong to no word)


def merge_words(
    tokens: Sequence[str],
    probs: np.ndarray,
    family: str,
    force_tokens: Iterable[str] = (),
    token_map: dict[str, str] | None = None,
    force_reserve_digit: bool = False,
    offsets: np.ndarray | None = None,
    text: str | None = None,
    use_spans: bool = False,
) -> Words:
    """Merge sub-tokens into words, exactly as llmlingua 0.2.2's ``__merge_token_to_word``.

    ``tokens`` must already exclude special tokens. With ``use_spans`` (needs ``offsets``
    and ``text``) force tokens are matched against, and words are spelled as, the
    original text instead of the tokenizer's normalised tokens.

    >>> w = merge_words(["step", "1", ":", "48", "##0"], np.array([.1, .2, .3, .4, .5], np.float32),
    ...                 "wordpiece", force_tokens=[":"], force_reserve_digit=True)
    >>> w.words, [round(float(p), 2) for p in w.probs]
    (['step', '1', ':', '480'], [0.1, 1.0, 1.0, 1.0])
    """
    token_map = token_map or {}
    force = set(force_tokens)
    mapped = set(token_map.values())
    force_all = force | mapped
    n = len(tokens)
    probs = np.asarray(probs, dtype=np.float32)
    eff = probs.copy()
    forced = np.zeros(n, dtype=bool)
    starts: list[int] = []
    words: list[str] = []
    spans_on = use_spans and offsets is not None and text is not None
    prev = None
    for i, tok in enumerate(tokens):
        piece = text[offsets[i][0] : offsets[i][1]] if spans_on else tok
        if family == "text":
            if not tok.strip():  # whitespace-only piece: a separator, not a word
                prev = tok
                continue
            start = is_word_start(tok, family, force_all, prev)
        else:
            start = is_word_start(tok, family, force_all) or not words
        prev = tok
        if start:
            match = piece.strip() if spans_on else pure_token(tok, family)
            if match in force or match in mapped:
                eff[i], forced[i] = 1.0, True
            word = tok
            for ori, new in token_map.items():
                word = word.replace(new, ori)
            words.append(piece.lstrip() if spans_on else word)
            starts.append(i)
        else:
            words[-1] += piece if spans_on else pure_token(tok, family)
        if force_reserve_digit and _DIGIT.search(tok):
            eff[i], forced[i] = 1.0, True
    if family == "text" and len(starts) < n:
        keep_idx = np.array([i for i, t in enumerate(tokens) if t.strip()], dtype=np.int64)
    else:
        keep_idx = None
    n_sep = int(n - len(keep_idx)) if keep_idx is not None else 0
    if not starts:
        return Words(
            [],
            np.zeros(0, np.float32),
            np.zeros(0, bool),
            np.zeros((0, 2), np.int64) if spans_on else None,
            np.zeros(0, np.int64),
            n_sep,
        )
    # Word membership over the (non-whitespace) tokens.
    idx = keep_idx if keep_idx is not None else np.arange(n)
    st = np.asarray(starts)
    pos = np.searchsorted(idx, st)
    ends = np.append(pos[1:], len(idx))
    lens = ends - pos
    vals, frc = eff[idx], forced[idx]
    # Sequential float32 sum per word (same rounding as llmlingua's Python ``sum``).
    sums = vals[pos].copy()
    for k in range(1, int(lens.max())):
        has = lens > k
        sums[has] = sums[has] + vals[pos[has] + k]
    means = (sums / lens.astype(np.float32)).astype(np.float32)
    all_forced = np.logical_and.reduceat(frc, pos) if len(pos) else np.zeros(0, bool)
    spans = None
    if offsets is not None:
        off = np.asarray(offsets, dtype=np.int64)[idx]
        s0 = off[pos, 0].copy()
        if text is not None:  # offsets of byte-level pieces may include the leading space
            for j, s in enumerate(s0):
                e = off[ends[j] - 1, 1]
                while s < e and text[s].isspace():
                    s += 1
                s0[j] = s
        spans = np.stack([s0, off[ends - 1, 1]], axis=1)
    return Words(words, means, all_forced, spans, lens.astype(np.int64), n_sep)


# --------------------------------------------------------------------------- thresholds


@dataclass
class ChunkWords:
    """What the per-ratio cut needs for one chunk (computed once)."""

    words: list[str]
    probs: np.ndarray
    all_forced: np.ndarray
    weights: np.ndarray  # tiktoken count per word
    spans: np.ndarray | None = None
    text: str = ""  # the chunk's text at ratio 1.0 (detok join)
    is_force: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @classmethod
    def from_words(cls, w: Words, text: str = "", force_tokens: Iterable[str] = ()) -> "ChunkWords":
        force = set(force_tokens)
        weights = np.fromiter((tiktoken_len(x) for x in w.words), dtype=np.int64, count=len(w.words))
        is_force = np.fromiter((x in force for x in w.words), dtype=bool, count=len(w.words))
        return cls(w.words, w.probs, w.all_forced, weights, w.spans, text, is_force)


def percentile_q(ratio: float) -> int:
    """llmlingua's percentile for rate γ: ``int(100 * (1 - γ) + 1)`` (float rounding included).

    >>> [percentile_q(r) for r in (0.9, 0.8, 0.7, 0.6, 0.5)]
    [10, 20, 31, 41, 51]
    """
    return int(100 * max(0.0, 1 - ratio) + 1)


def keep_masks(cw: ChunkWords, ratios: Sequence[float], drop_consecutive: bool = False) -> dict[float, np.ndarray]:
    """Boolean keep mask over the chunk's words for each ratio < 1."""
    out: dict[float, np.ndarray] = {}
    if not len(cw.words):
        return {r: np.zeros(0, bool) for r in ratios}
    # llmlingua percentiles a Python list: float64 as soon as one entry is a Python float.
    base = cw.probs.astype(np.float64) if cw.all_forced.any() else cw.probs
    todo = [r for r in ratios if r < 1.0]
    if not drop_consecutive or not cw.is_force.any():
        expanded = np.repeat(base, cw.weights)
        if len(expanded) == 0:
            return {r: np.zeros(len(cw.words), bool) for r in todo}
        ths = np.percentile(expanded, [percentile_q(r) for r in todo]) if todo else []
        for r, th in zip(todo, ths):
            th = base.dtype.type(th)
            out[r] = (base > th) | ((th == 1.0) & (base == th))
        return out
    for r in todo:
        reduce_rate = max(0.0, 1 - r)
        probs = base
        th_dc = np.percentile(base, int(100 * reduce_rate))
        drop = _consecutive_force(cw, base > th_dc)
        if drop.any():
            probs = base.astype(np.float64)
            probs[drop] = 0.0
        expanded = np.repeat(probs, cw.weights)
        if len(expanded) == 0:
            out[r] = np.zeros(len(cw.words), bool)
            continue
        th = np.percentile(expanded, percentile_q(r))
        keep = (probs > th) | ((th == 1.0) & (probs == th))
        # A kept force word equal to the previous kept word is not emitted.
        kidx = np.flatnonzero(keep)
        if len(kidx) > 1:
            kw = np.array([cw.words[i] for i in kidx], dtype=object)
            dup = cw.is_force[kidx[1:]] & (kw[1:] == kw[:-1])
            keep[kidx[1:][dup]] = False
        out[r] = keep
    return out


def _consecutive_force(cw: ChunkWords, above: np.ndarray) -> np.ndarray:
    """Force words repeating the previous force word with no above-threshold non-force
    word in between (llmlingua's ``drop_consecutive`` scan)."""
    fidx = np.flatnonzero(cw.is_force)
    drop = np.zeros(len(cw.words), bool)
    if len(fidx) < 2:
        return drop
    between = np.cumsum(above & ~cw.is_force)
    for a, b in zip(fidx[:-1], fidx[1:]):
        if between[b] - between[a] == 0 and cw.words[a] == cw.words[b]:
            drop[b] = True
    return drop


# --------------------------------------------------------------------------- joining


def offset_pieces(text: str, spans: np.ndarray) -> tuple[list[str], list[str], list[bool]]:
    """Per word of ``text``: the word, the whitespace before it, and whether it needs a space
    when the word before it was dropped (it touched that word and starts alphanumeric). Computed
    once per text, so that each of the joins the budget cut measures costs one pass over the kept
    words (``join_offsets(..., pieces=...)``).

    >>> offset_pieces("3*2=6 ok", np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [6, 8]]))
    (['3', '*', '2', '=', '6', 'ok'], ['', '', '', '', '', ' '], [True, False, True, False, True, False])
    """
    words: list[str] = []
    leads: list[str] = []
    sep: list[bool] = []
    for s, e in spans.tolist():
        j = s
        while j > 0 and text[j - 1].isspace():
            j -= 1
        words.append(text[s:e])
        leads.append(text[j:s])
        sep.append(j == s and text[s : s + 1].isalnum())
    return words, leads, sep


def join_offsets(
    text: str,
    spans: np.ndarray,
    keep: np.ndarray,
    pieces: tuple[list[str], list[str], list[bool]] | None = None,
) -> str:
    """Kept words from the original text, each after the whitespace that preceded it.

    ``pieces``: ``offset_pieces(text, spans)``, when the same text is joined many times.

    >>> spans = np.array([[0, 2], [3, 7], [8, 10], [11, 16], [16, 17], [18, 22], [23, 25], [25, 26]])
    >>> join_offsets("He sold 48 clips.\\nThen 72.", spans, np.array([1, 0, 1, 1, 0, 1, 1, 1], bool))
    'He 48 clips\\nThen 72.'
    """
    idx = np.flatnonzero(keep).tolist()
    if not idx:
        return ""
    words, leads, sep = pieces if pieces is not None else offset_pieces(text, spans)
    parts = [words[idx[0]]]
    prev = idx[0]
    for k in idx[1:]:
        # words that were not adjacent must not fuse ("3*2=6" without "*" is "3 2=6")
        parts.append((" " if sep[k] and k != prev + 1 else "") + leads[k] + words[k])
        prev = k
    return "".join(parts)


def prune_chunks(
    chunks: Sequence[ChunkWords],
    ratios: Sequence[float],
    drop_consecutive: bool = False,
    detok: Callable[[list[str]], str] | None = None,
    text: str | None = None,
    token_map: dict[str, str] | None = None,
) -> dict[float, str]:
    """Pruned text of one CoT for every ratio, from its scored chunks.

    ``detok`` given: llmlingua's join (per chunk ``detok(kept_words)``, chunks joined
    with ""); else the ``offsets`` join over ``text``.
    """
    masks = [keep_masks(c, ratios, drop_consecutive) for c in chunks]
    out: dict[float, str] = {}
    if detok is None and chunks:  # the offsets join: the text's pieces once, for every ratio
        spans = np.concatenate([c.spans for c in chunks])
        pieces = offset_pieces(text or "", spans)
    for r in ratios:
        if r >= 1.0:
            if detok is not None:
                full = "".join(c.text for c in chunks)
                for ori, new in (token_map or {}).items():
                    full = full.replace(new, ori)
                out[r] = full
            else:
                out[r] = text or ""
            continue
        if detok is not None:
            out[r] = "".join(
                detok([c.words[i] for i in np.flatnonzero(m[r])]) if len(c.words) else "" for c, m in zip(chunks, masks)
            )
        else:
            if not chunks:
                out[r] = ""
                continue
            keep = np.concatenate([m[r] for m in masks])
            out[r] = join_offsets(text or "", spans, keep, pieces)
    return out


# --------------------------------------------------------------------------- budget cut

# A word made only of these is part of an equation (``48 / 2 = 24``, ``$5``, ``20%``).
_OPERATOR_WORD = re.compile(r"^[=+\-−–*×÷/^%$<>()]+$")
CUTS = ("percentile", "budget")
PROTECT = ("none", "numbers")


def word_tiers(words: Sequence[str], protect: str = "numbers", spans: np.ndarray | None = None) -> np.ndarray:
    """Protection tier per word: 2 = part of a number or of an equation, 1 = an operator, 0 = the rest.

    Under the budget cut a higher tier outranks every word of a lower tier whatever their
    scores, so numbers go last and fillers first (TokenSkip keeps equations and numbers).
    With ``spans``, a ``.`` or ``,`` glued between two digit words is part of the number
    (``0.2``, ``22,500``), and an operator (or ``x``) between two numbers is part of the equation.

    >>> word_tiers(["Natalia", "sold", "48", "/", "2", "=", "24", "clips", "."]).tolist()
    [0, 0, 2, 1, 2, 1, 2, 0, 0]
    >>> sp = np.array([[0, 2], [2, 3], [3, 4], [5, 6], [7, 9], [10, 11], [12, 13]])
    >>> word_tiers(["48", "/", "2", "=", "24", "+", "tax"], spans=sp).tolist()
    [2, 2, 2, 2, 2, 1, 0]
    >>> sp = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [5, 6], [7, 9], [9, 10]])
    >>> word_tiers(["$", "0", ".", "2", "x", "50", "."], spans=sp).tolist()
    [1, 2, 2, 2, 2, 2, 0]
    >>> word_tiers(["48"], protect="none").tolist()
    [0]
    """
    if protect not in PROTECT:
        raise ValueError(f"unknown protect {protect!r} (valid: {', '.join(PROTECT)})")
    if protect == "none":
        return np.zeros(len(words), np.int8)
    tiers = np.fromiter(
        (2 if _DIGIT.search(w) else 1 if _OPERATOR_WORD.match(w.strip()) else 0 for w in words),
        dtype=np.int8,
        count=len(words),
    )
    if spans is not None and len(words) > 2:
        digit = tiers == 2
        for i in range(1, len(words) - 1):
            if tiers[i] == 2 or not (digit[i - 1] and digit[i + 1]):
                continue
            w = words[i].strip()
            glued = spans[i - 1][1] == spans[i][0] and spans[i][1] == spans[i + 1][0]
            if (w in (".", ",") and glued) or tiers[i] == 1 or w.lower() == "x":
                tiers[i] = 2  # inside a number, or an operator between two numbers: part of the equation
    return tiers


def budget_masks(
    probs: np.ndarray,
    weights: np.ndarray,
    tiers: np.ndarray,
    ratios: Sequence[float],
    fixed_tokens: int = 0,
    measure: Callable[[np.ndarray], int] | None = None,
    measured_total: int | None = None,
    max_steps: int = 24,
) -> dict[float, np.ndarray]:
    """Keep masks that hit γ in the weights' unit: words ranked by (tier, score), earliest
    first on ties, kept while their tokens fit ``γ × (sum(weights) + fixed_tokens) − fixed_tokens``
    (``fixed_tokens``: tokens that are always kept, e.g. line breaks). The cut is placed where
    the kept total is closest to the budget, so the ratio is met to within one word.

    With ``measure`` (keep mask -> tokens of the text it gives) and ``measured_total`` (tokens
    of the whole text), the cut is then moved word by word until the *measured* length is
    closest to γ × ``measured_total``: joining kept words re-tokenizes differently than the
    sum of the words' own tokens (dropped line breaks, merged pieces).

    >>> p = np.array([.9, .1, .5, .5, .2, .8], np.float32)
    >>> w = np.array([1, 1, 2, 1, 1, 1])
    >>> m = budget_masks(p, w, np.array([0, 0, 2, 1, 0, 0]), [0.5, 0.3])
    >>> m[0.5].tolist(), m[0.3].tolist()
    ([False, False, True, True, False, False], [False, False, True, False, False, False])
    """
    n = len(probs)
    out: dict[float, np.ndarray] = {}
    if n == 0:
        return {r: np.zeros(0, bool) for r in ratios if r < 1.0}
    order = np.lexsort((np.arange(n), -np.asarray(probs, np.float64), -np.asarray(tiers, np.int64)))
    cum = np.cumsum(np.asarray(weights, np.int64)[order])
    total = int(cum[-1]) + int(fixed_tokens)
    for r in ratios:
        if r >= 1.0:
            continue
        budget = r * total - fixed_tokens
        k = int(np.searchsorted(cum, budget, side="right"))  # words whose cumulative tokens fit
        if k < n and k > 0 and abs(cum[k] - budget) < abs(cum[k - 1] - budget):
            k += 1
        elif k == 0 and n and abs(cum[0] - budget) < abs(budget):
            k = 1
        if measure is not None and measured_total:
            k = _refine(order, k, r * measured_total, measure, max_steps, measured_total / n)
        keep = np.zeros(n, bool)
        keep[order[:k]] = True
        out[r] = keep
    return out


def _refine(
    order: np.ndarray,
    k: int,
    target: float,
    measure: Callable[[np.ndarray], int],
    max_steps: int,
    tokens_per_word: float | None = None,
) -> int:
    """Move the cut (``k`` best words kept) to where the measured length is closest to ``target``.

    The word-sum estimate ``k`` is often several words short (joining drops line breaks and
    merges pieces; on texts of several scoring windows, dozens), so secant steps come first -
    by ``(target − measured) / tokens_per_word`` words, then by the slope measured between the
    last two cuts, from the closest cut so far, bisecting once cuts on both sides of the target
    are known; the word-by-word walk (at most ``max_steps``) then finishes from there. Each
    measurement re-tokenizes the pruned text, so this takes a few measurements per γ.

    >>> lengths = [0, 3, 5, 8, 11, 13, 16, 19, 21, 24]   # measured tokens with the j best words kept
    >>> calls = []
    >>> def measure(keep):
    ...     calls.append(int(keep.sum()))
    ...     return lengths[int(keep.sum())]
    >>> _refine(np.arange(9), 2, 19.4, measure, 24, 2.5), calls
    (7, [2, 8, 7])
    >>> calls.clear(); _refine(np.arange(9), 2, 19.4, measure, 24), len(calls)
    (7, 7)
    """
    n = len(order)
    seen: dict[int, int] = {}

    def m(j: int) -> int:
        if j not in seen:
            keep = np.zeros(n, bool)
            keep[order[:j]] = True
            seen[j] = measure(keep)
        return seen[j]

    cur = m(k)
    tpw = tokens_per_word
    lo = hi = None  # the nearest cuts measured below and above the target, once known

    def bracket(j: int, v: int) -> None:
        nonlocal lo, hi
        if v < target and (lo is None or j > lo):
            lo = j
        if v > target and (hi is None or j < hi):
            hi = j

    bracket(k, cur)
    for _ in range(12):  # secant steps from the closest cut so far, kept inside the bracket once there is one
        if cur == target or (lo is not None and hi is not None and hi - lo <= 1):
            break
        j = k + int(round((target - cur) / tpw)) if tpw and tpw > 0 else k
        j = min(max(j, 0), n)
        mid = (lo + hi) // 2 if lo is not None and hi is not None else None
        if mid is not None and not lo < j < hi:
            j = mid
        if j == k or j in seen:
            if mid is None or mid in seen:
                break
            j = mid
        v = m(j)
        bracket(j, v)
        if v != cur:
            tpw = max(0.25, abs(v - cur) / abs(j - k))  # the slope measured between the two cuts
        if abs(v - target) < abs(cur - target):
            k, cur = j, v
    step = 1 if cur < target else -1
    for _ in range(max_steps):
        j = k + step
        if not 0 <= j <= n:
            break
        nxt = m(j)
        if abs(nxt - target) < abs(cur - target) or (step > 0 and nxt <= target):
            k, cur = j, nxt
        else:
            break
    return k
