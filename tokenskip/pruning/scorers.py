"""The scorer interface: per-token keep probabilities for a batch of texts.

A scorer returns, per text, its chunks (≤ the model's window) with token strings,
keep probabilities (higher = keep) and, where the tokenizer gives them, character
offsets into the original text. The pruner (:mod:`tokenskip.pruning.pruner`) turns
these into pruned text at any number of ratios without calling the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np


@dataclass
class ScoredChunk:
    tokens: list[str]  # tokenizer tokens (special tokens removed) or text pieces (family "text")
    probs: np.ndarray  # float32 keep probability per token
    offsets: np.ndarray | None = None  # (n, 2) spans in the original text
    text: str = ""  # the chunk as text (the output at ratio 1.0 under the detok join)


@dataclass
class ScoredText:
    text: str
    chunks: list[ScoredChunk] = field(default_factory=list)
    token_map: dict[str, str] = field(default_factory=dict)


class Scorer(Protocol):
    """What :func:`tokenskip.pruning.prune_texts` needs from a scorer."""

    family: str  # word-start rules: wordpiece | sentencepiece | text
    use_spans: bool  # spell words / match force tokens from the original text
    detok: Callable[[list[str]], str] | None  # None: join kept words by original offsets

    def score(self, texts: Sequence[str], force_tokens: Sequence[str] = ()) -> list[ScoredText]: ...


def chunk_bounds(is_end: Sequence[bool], max_len: int) -> list[tuple[int, int]]:
    """Token windows of llmlingua's ``__chunk_context``: up to ``max_len`` tokens, each
    cut back to the last chunk-end token (the window then holds up to ``max_len + 1``).

    >>> chunk_bounds([False, True, False, False, True, False], 3)
    [(0, 2), (2, 5), (5, 6)]
    >>> chunk_bounds([False] * 5, 2)
    [(0, 3), (3, 5)]
    >>> chunk_bounds([], 4)
    []
    """
    n = len(is_end)
    out: list[tuple[int, int]] = []
    st = 0
    while st < n:
        if st + max_len > n - 1:
            out.append((st, n))
            break
        ed = st + max_len
        for j in range(0, ed - st):
            if is_end[ed - j]:
                ed = ed - j
                break
        out.append((st, ed + 1))
        st = ed + 1
    return out


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None,
                          min_fill: float = 0.67) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding to the
    longest in a batch wastes little: a batch also ends before a sequence shorter than
    ``min_fill`` × its longest (whose row would be over a third padding). Few texts of
    spread-out lengths (15 MATH solutions of 40-510 tokens) otherwise made one batch with
    3× the real tokens.

    >>> length_sorted_batches([3, 10, 4, 9], 2)
    [[1, 3], [2, 0]]
    >>> length_sorted_batches([500, 45, 480, 300, 60, 290], 16)
    [[0, 2], [3, 5], [4, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) >= batch_size or (max_tokens and (len(cur) + 1) * lengths[cur[0]] > max_tokens)
                    or lengths[i] < min_fill * lengths[cur[0]]):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int):
    """Right-padded ids and attention mask (absolute positions stay as unpadded)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[k, : len(s)] = 1
    return ids, mask


def batched_scores(seqs, batch_size: int, max_batch_tokens, pad_id: int, device, score_fn, trim: int = 0):
    """Run ``score_fn(ids, mask) -> np.ndarray [batch, len]`` over length-sorted, padded
    batches; return per-sequence score arrays in input order, each cut to its length - trim."""
    import torch

    res = [None] * len(seqs)
    with torch.inference_mode():
        for batch in length_sorted_batches([len(s) for s in seqs], batch_size, max_batch_tokens):
            ids, mask = pad_batch([seqs[k] for k in batch], pad_id)
            scores = score_fn(ids.to(device), mask.to(device))
            for row, k in enumerate(batch):
                res[k] = scores[row, : len(seqs[k]) - trim]
    return res
