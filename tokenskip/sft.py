"""Building TokenSkip training samples (docs/method.md §3): pure functions, no Ray, no models.

* :func:`draw_ratio` - one γ per question, seeded and independent of row order.
* :func:`select_cot` - keep a CoT or say why not (incorrect, too long, empty).
* :func:`sft_row` - the training row for (question, γ, CoT) through :mod:`tokenskip.prompt`.
* :func:`assign_splits` - a seeded train/validation split by question (every ratio of a
  question lands in the same split, so validation never sees a training question).
* :func:`ratio_stats` - count and mean actual ratio per γ (keyed by :func:`tokenskip.gamma.key`), for the manifest.

>>> row = sft_row({"id": "q1", "question": "2+3?", "gold": "5"}, 0.5, "2+3=5", cot_tokens=6, pruned_tokens=3)
>>> row["user"].endswith("<|eot_id|>0.5<|eot_id|>"), row["completion"]
(True, '2+3=5\\n\\nThe final answer is: $\\\\boxed{5}$')
>>> row["actual_ratio"]
0.5
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

from tokenskip import gamma, prompt


def draw_ratio(qid: str, ratios: Sequence[float], seed: int) -> float:
    """One γ for a question, uniform over ``ratios``; depends only on (seed, id).

    Row order, sharding and re-runs never change the draw.

    >>> g = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    >>> draw_ratio("gsm8k-train-0", g, 42) == draw_ratio("gsm8k-train-0", g, 42)
    True
    >>> draw_ratio("q", [0.5], 0)
    0.5
    >>> from collections import Counter
    >>> c = Counter(draw_ratio(f"q{i}", [1.0, 0.5], 1) for i in range(2000))
    >>> 900 < c[0.5] < 1100
    True
    """
    if not ratios:
        raise ValueError("ratios must not be empty")
    return random.Random(f"{seed}:{qid}").choice(list(ratios))


def ratios_for(qid: str, ratios: Sequence[float], sampling: str, seed: int) -> list[float]:
    """The ratios a question contributes: one drawn (``random``) or every one (``all``).

    >>> ratios_for("q", [1.0, 0.5], "all", 0)
    [1.0, 0.5]
    >>> len(ratios_for("q", [1.0, 0.5], "random", 0))
    1
    """
    if sampling == "all":
        return list(ratios)
    if sampling == "random":
        return [draw_ratio(qid, ratios, seed)]
    raise ValueError(f"ratio_sampling must be 'random' or 'all', got {sampling!r}")


def select_cot(cot: str | None, cot_tokens: int | None, max_cot_tokens: int, correct: bool = True) -> str | None:
    """Why a CoT is not kept, or ``None`` when it is (docs/method.md §1: correct and ≤ 500 tokens).

    >>> select_cot("x = 5", 3, 500) is None
    True
    >>> select_cot("x = 4", 3, 500, correct=False)
    'incorrect answer'
    >>> select_cot("long", 600, 500)
    'cot too long: 600 > 500 tokens'
    >>> select_cot("  ", 0, 500)
    'empty cot'
    """
    if not correct:
        return "incorrect answer"
    if cot is None or not str(cot).strip():
        return "empty cot"
    if cot_tokens is None:
        return "cot_tokens missing"
    if cot_tokens > max_cot_tokens:
        return f"cot too long: {cot_tokens} > {max_cot_tokens} tokens"
    return None


def sft_row(cot_row: dict, ratio: float, text: str, cot_tokens: int, pruned_tokens: int | None = None) -> dict:
    """One training row: γ-marked user turn and the (pruned) CoT + answer sentence.

    ``cot_row`` needs ``id``, ``question``, ``gold``. For γ = 1 the original CoT is used
    and ``pruned_tokens`` defaults to ``cot_tokens``.

    >>> r = sft_row({"id": "a", "question": "Q", "gold": "1"}, 1.0, "c", cot_tokens=4)
    >>> r["user"].endswith("\\nQ"), r["pruned_tokens"], r["actual_ratio"]
    (True, 4, 1.0)
    """
    for key in ("id", "question", "gold"):
        if cot_row.get(key) is None:
            raise ValueError(f"row {cot_row.get('id')!r}: field {key!r} is missing")
    pruned_tokens = cot_tokens if pruned_tokens is None else int(pruned_tokens)
    return {
        "id": str(cot_row["id"]),
        "question": cot_row["question"],
        "gold": str(cot_row["gold"]),
        "kind": cot_row.get("kind"),
        "ratio": float(ratio),
        "user": prompt.user_content(cot_row["question"], ratio),
        "completion": prompt.build_target(text, str(cot_row["gold"])),
        "cot_tokens": int(cot_tokens),
        "pruned_tokens": pruned_tokens,
        "actual_ratio": round(pruned_tokens / cot_tokens, 6) if cot_tokens else 1.0,
    }


def validation_ids(ids: Iterable[str], val_fraction: float, seed: int) -> set[str]:
    """A seeded set of question ids for validation: round(n × fraction), at least one when
    the fraction is positive and there are two or more questions.

    >>> ids = [f"q{i}" for i in range(10)]
    >>> sorted(validation_ids(ids, 0.2, 0)) == sorted(validation_ids(ids[::-1], 0.2, 0))
    True
    >>> len(validation_ids(ids, 0.2, 0)), len(validation_ids(["a", "b"], 0.01, 0)), validation_ids(["a"], 0.5, 0)
    (2, 1, set())
    """
    unique = sorted(set(str(i) for i in ids))
    if val_fraction <= 0 or len(unique) < 2:
        return set()
    k = min(len(unique) - 1, max(1, round(len(unique) * val_fraction)))
    rng = random.Random(seed)
    rng.shuffle(unique)
    return set(unique[:k])


def assign_splits(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation), split by question id; each row gets a ``split`` field.

    >>> rows = [{"id": f"q{i // 2}", "ratio": r} for i, r in enumerate([1.0, 0.5] * 10)]
    >>> train, val = assign_splits(rows, 0.2, 0)
    >>> len(train) + len(val) == len(rows), {r["id"] for r in train} & {r["id"] for r in val}
    (True, set())
    """
    val_ids = validation_ids((r["id"] for r in rows), val_fraction, seed)
    train, val = [], []
    for r in rows:
        r = dict(r, split="validation" if r["id"] in val_ids else "train")
        (val if r["split"] == "validation" else train).append(r)
    return train, val


def ratio_stats(rows: Iterable[dict]) -> dict[str, dict]:
    """Per γ: rows, mean CoT / pruned tokens, and the mean and spread (std, min, max) of the
    pruned/original ratio, all in the target model's tokens.

    >>> ratio_stats([{"ratio": 0.5, "cot_tokens": 10, "pruned_tokens": 6, "actual_ratio": 0.6},
    ...              {"ratio": 0.5, "cot_tokens": 20, "pruned_tokens": 10, "actual_ratio": 0.5}])
    {'0.5': {'rows': 2, 'mean_cot_tokens': 15.0, 'mean_pruned_tokens': 8.0, 'mean_actual_ratio': 0.55,
             'std_actual_ratio': 0.05, 'min_actual_ratio': 0.5, 'max_actual_ratio': 0.6}}
    """
    import statistics

    acc: dict[float, list[dict]] = {}
    for r in rows:
        acc.setdefault(gamma.canonical(r["ratio"]), []).append(r)
    out = {}
    for ratio in sorted(acc, reverse=True):
        group = acc[ratio]
        n = len(group)
        out[gamma.key(ratio)] = {
            "rows": n,
            "mean_cot_tokens": round(sum(r["cot_tokens"] for r in group) / n, 4),
            "mean_pruned_tokens": round(sum(r["pruned_tokens"] for r in group) / n, 4),
            "mean_actual_ratio": round(sum(r["actual_ratio"] for r in group) / n, 4),
            "std_actual_ratio": round(statistics.pstdev([r["actual_ratio"] for r in group]), 4),
            "min_actual_ratio": round(min(r["actual_ratio"] for r in group), 4),
            "max_actual_ratio": round(max(r["actual_ratio"] for r in group), 4),
        }
    return out
