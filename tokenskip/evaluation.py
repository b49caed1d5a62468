"""Pure evaluation arithmetic: the conditions of a run, per-condition figures, the actual
ratio, the truncation baseline and the Markdown table (the shape of the paper's Table 1).

No model, no Ray: rows in, numbers and text out. ``pipelines/evaluate.py`` generates
and grades; everything it reports is computed here from the saved samples, so
re-computing from ``samples/*.jsonl`` gives the same figures.

Conditions (docs/method.md §4):

* ``original`` - the base model, no adapter, the plain prompt.
* ``tokenskip-<γ>`` - the adapter (or, with no adapter, the base model) prompted with the
  γ marker (none at γ = 1.0).
* ``prompt-<name>`` - the base model with a prompting baseline appended to the instruction.
* ``truncation-<γ>`` - the original's greedy outputs cut at ⌊γ × own length⌋ tokens.
* ``budget_forcing-<γ>`` - the original's CoT cut at ⌊γ × its CoT tokens⌋, then the answer
  sentence's opening appended and the base model left to write only the answer (a hard cap
  with a forced answer: what a user without TokenSkip would try first).

A run may also evaluate hard budgets (``hard_budgets``): for each budget B, TokenSkip routed to
the largest γ whose measured mean CoT tokens fit B and the base model, both capped at B tokens
and forced to answer when the cap fires (:func:`route_budget`, :func:`summarize_hard_budget`).

>>> [c.id for c in plan_conditions([1.0, 0.5], ["original", "truncation", "budget_forcing"], [])]
['original', 'tokenskip-1.0', 'tokenskip-0.5', 'truncation-0.5', 'budget_forcing-0.5']
>>> truncation_length(213, 0.5), truncation_length(10, 0.7), truncation_length(0, 0.9)
(106, 7, 0)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from tokenskip import gamma
from tokenskip import prompt as tsprompt

METHODS = ("original", "tokenskip", "prompt", "truncation", "budget_forcing")
DERIVED = ("truncation", "budget_forcing")  # built from the original's saved outputs (no full generation)
FORCE_ANSWER_TOKENS = 24  # new tokens a forced answer may take (the answer and the closing of the box)
ANSWER_STOP = ("}$",)  # a forced answer stops where the answer sentence ends (then cut at the box's close)
NEAR_ZERO_ACCURACY = 0.10  # every row below this: say so in the caption (paper-scale models score 50-90%)


@dataclass(frozen=True)
class Condition:
    """One row of the table: how prompts are built and which model answers."""

    id: str
    method: str
    ratio: float | None = None
    prompt_name: str | None = None

    @property
    def uses_adapter(self) -> bool:
        return self.method == "tokenskip"

    def label(self, adapter: bool = True) -> str:
        """Method column text.

        >>> Condition("tokenskip-0.5", "tokenskip", 0.5).label(adapter=False)
        'TokenSkip (no adapter)'
        >>> Condition("prompt-concise", "prompt", None, "concise").label()
        'Prompt: concise'
        """
        if self.method == "original":
            return "Original"
        if self.method == "tokenskip":
            return "TokenSkip" if adapter else "TokenSkip (no adapter)"
        if self.method == "prompt":
            return f"Prompt: {self.prompt_name}"
        if self.method == "budget_forcing":
            return "Budget forcing"
        return "Truncation"


def condition_id(method: str, ratio: float | None = None, name: str | None = None) -> str:
    """File-safe id of a condition.

    >>> condition_id("tokenskip", 0.9), condition_id("prompt", name="concise"), condition_id("original")
    ('tokenskip-0.9', 'prompt-concise', 'original')
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (valid: {', '.join(METHODS)})")
    if method == "prompt":
        return f"prompt-{name}"
    if method in ("tokenskip", *DERIVED):
        return f"{method}-{gamma.key(ratio)}"
    return method


def plan_conditions(
    ratios: Sequence[float], baselines: Iterable[str], prompt_names: Iterable[str], need_original: bool = False
) -> list[Condition]:
    """Conditions in table order. ``original`` always runs when truncation or budget forcing
    is asked for (both cut its outputs) or ``need_original`` (hard budgets compare against
    it); truncation and budget forcing only exist for γ < 1.

    >>> [c.id for c in plan_conditions([0.9], ["prompt"], ["concise"])]
    ['tokenskip-0.9', 'prompt-concise']
    >>> [c.id for c in plan_conditions([0.9], [], [], need_original=True)]
    ['original', 'tokenskip-0.9']
    """
    baselines = set(baselines)
    out: list[Condition] = []
    if need_original or baselines & {"original", *DERIVED}:
        out.append(Condition("original", "original"))
    for r in ratios:
        out.append(Condition(condition_id("tokenskip", r), "tokenskip", float(r)))
    if "prompt" in baselines:
        out.extend(Condition(condition_id("prompt", name=n), "prompt", None, n) for n in prompt_names)
    if "truncation" in baselines:
        out.extend(Condition(condition_id("truncation", r), "truncation", float(r)) for r in ratios if float(r) < 1.0)
    if "budget_forcing" in baselines:
        out.extend(
            Condition(condition_id("budget_forcing", r), "budget_forcing", float(r)) for r in ratios if float(r) < 1.0
        )
    return out


def truncation_length(n_tokens: int, ratio: float) -> int:
    """⌊γ × n⌋ with a tolerance for float error (0.7 × 10 must give 7, not 6).

    >>> truncation_length(100, 0.29), truncation_length(3, 0.5)
    (29, 1)
    """
    if n_tokens < 0:
        raise ValueError(f"token count must be >= 0, got {n_tokens}")
    return min(n_tokens, int(math.floor(float(ratio) * n_tokens + 1e-9)))


def truncate_ids(token_ids: Sequence[int], ratio: float) -> list[int]:
    """The first ⌊γ × len⌋ generated token ids. For greedy decoding this is exactly what
    generating with ``max_tokens`` = that budget returns (a shorter greedy run is a prefix).

    >>> truncate_ids([5, 6, 7, 8, 9], 0.6)
    [5, 6, 7]
    """
    return list(token_ids[: truncation_length(len(token_ids), ratio)])


# --------------------------------------------------------------------------- forced answers


def budget_cut_ids(token_ids: Sequence[int], cot_tokens: int, ratio: float) -> list[int]:
    """Budget forcing's cut: the first ⌊γ × CoT tokens⌋ generated ids (:func:`truncation_length`
    of the CoT, the tokens before the answer sentence, rather than of the whole output).

    >>> budget_cut_ids(list(range(12)), 10, 0.5)
    [0, 1, 2, 3, 4]
    >>> budget_cut_ids([1, 2, 3], 10, 1.0)  # a CoT count above the output's (re-tokenized text) is capped
    [1, 2, 3]
    """
    k = truncation_length(min(int(cot_tokens), len(token_ids)) if cot_tokens is not None else len(token_ids), ratio)
    return list(token_ids[:k])


def forced_prompt(prompt: str, cot: str) -> str:
    """What the model continues for a forced answer: its prompt, the (cut) CoT and the answer
    sentence's opening (:func:`tokenskip.prompt.forced_answer_text`).

    >>> forced_prompt("<user>Q</user>", "2+3=5 and")
    '<user>Q</user>2+3=5 and\\n\\nThe final answer is: $\\\\boxed{'
    """
    return prompt + tsprompt.forced_answer_text(cot)


def answer_close(text: str) -> int | None:
    """Length of the forced answer up to the brace that closes the opened ``\\boxed{`` (and a
    ``$`` right after it), or None while it is still open. Nested braces count.

    >>> t = "\\\\frac{3}{4}}$ and more"
    >>> t[: answer_close(t)]
    '\\\\frac{3}{4}}$'
    >>> answer_close("18}"), answer_close("18") is None
    (3, True)
    """
    depth = 1
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                end = i + 1
                return end + 1 if text[end : end + 1] == "$" else end
    return None


def trim_answer_ids(ids: Sequence[int], decode: Any) -> tuple[list[int], str, bool]:
    """(ids, text, closed) of a forced answer cut after the token that closes the box, so that
    what the model writes after its answer (another sentence, another box) is not graded.
    ``decode``: token ids -> text (the tokenizer's).

    >>> dec = lambda ids: "".join({1: "1", 2: "8", 3: "}$", 4: " The"}[i] for i in ids)
    >>> trim_answer_ids([1, 2, 3, 4], dec)
    ([1, 2, 3], '18}$', True)
    >>> trim_answer_ids([1, 2], dec)
    ([1, 2], '18', False)
    """
    ids = list(ids)
    full = decode(ids)
    if answer_close(full) is None:
        return ids, full, False
    for k in range(1, len(ids) + 1):
        text = decode(ids[:k])
        end = answer_close(text)
        if end is not None:
            if end < len(full) and full[end : end + 1] == "$" and not text.endswith("$"):
                continue  # the '$' after the brace comes with the next token
            return ids[:k], text, True
    return ids, full, True


def capped_ids(token_ids: Sequence[int], finish_reason: str | None, budget: int) -> tuple[list[int], bool]:
    """(ids, cap fired) of a greedy output generated with ``max_tokens`` = budget, from the same
    greedy output generated with a larger cap (a shorter greedy run is a prefix of a longer
    one). The cap fires when the output did not finish within the budget.

    >>> capped_ids([1, 2, 3, 4], "stop", 3), capped_ids([1, 2, 3], "stop", 3), capped_ids([1, 2, 3], "length", 3)
    (([1, 2, 3], True), ([1, 2, 3], False), ([1, 2, 3], True))
    """
    ids = list(token_ids)
    fired = len(ids) > budget or (len(ids) == budget and finish_reason == "length")
    return ids[:budget], fired


def latency_share(latency_s: float, kept_tokens: int, output_tokens: int) -> float:
    """The part of a measured generation's latency spent on its first ``kept_tokens`` tokens
    (proportional to tokens: decoding dominates).

    >>> latency_share(2.0, 25, 100), latency_share(2.0, 0, 0)
    (0.5, 0.0)
    """
    return float(latency_s) * kept_tokens / output_tokens if output_tokens else 0.0


def route_budget(rows: Sequence[dict], budget: float) -> dict:
    """The γ a budget of ``budget`` CoT tokens routes to: the largest TokenSkip γ whose
    measured mean CoT tokens fit (this run's ``tokenskip`` rows), else the smallest γ
    (``fits`` False). Same rule as the server's ``max_cot_tokens`` routing.

    >>> grid = ((1.0, 200), (0.7, 150), (0.5, 90))
    >>> rows = [{"method": "tokenskip", "ratio": r, "mean_cot_tokens": t} for r, t in grid]
    >>> route_budget(rows, 160), route_budget(rows, 50)["ratio"], route_budget(rows, 50)["fits"]
    ({'ratio': 0.7, 'expected_cot_tokens': 150, 'fits': True}, 0.5, False)
    """
    known = [
        (float(r["ratio"]), r["mean_cot_tokens"])
        for r in rows
        if r.get("method") == "tokenskip" and r.get("ratio") is not None and r.get("mean_cot_tokens") is not None
    ]
    if not known:
        raise ValueError("hard budgets need TokenSkip rows with measured CoT tokens (none in this run)")
    fitting = [(g, t) for g, t in known if t <= budget]
    g, t = max(fitting) if fitting else min(known)
    return {"ratio": g, "expected_cot_tokens": t, "fits": bool(fitting)}


def summarize_hard_budget(samples: Sequence[dict], budget: int) -> dict:
    """Figures of one (budget, model) cell from its samples (``correct``, ``cot_tokens``,
    ``output_tokens``, ``forced``; ``uncapped_cot_tokens`` = the same question's CoT tokens
    without the cap): the share of CoTs within the budget, the accuracy, how often the hard
    cap fired, and the share that would have fit without the cap.

    >>> s = summarize_hard_budget([
    ...     {"correct": True, "cot_tokens": 40, "output_tokens": 50, "forced": False, "uncapped_cot_tokens": 40},
    ...     {"correct": False, "cot_tokens": 64, "output_tokens": 70, "forced": True, "uncapped_cot_tokens": 90}], 64)
    >>> [s[k] for k in ("n", "accuracy", "within_budget_share", "forced_share", "uncapped_within_share")]
    [2, 0.5, 1.0, 0.5, 0.5]
    """
    n = len(samples)
    if n == 0:
        return {"n": 0, "correct": 0, "accuracy": None, "within_budget_share": None, "forced_share": None,
                "uncapped_within_share": None, "mean_cot_tokens": None, "median_cot_tokens": None,
                "max_cot_tokens": None, "mean_tokens": None}  # fmt: skip
    cot = [int(s["cot_tokens"]) for s in samples]
    unc = [int(s["uncapped_cot_tokens"]) for s in samples if s.get("uncapped_cot_tokens") is not None]
    correct = sum(bool(s["correct"]) for s in samples)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "within_budget_share": sum(c <= budget for c in cot) / n,
        "forced_share": sum(bool(s.get("forced")) for s in samples) / n,
        "uncapped_within_share": (sum(c <= budget for c in unc) / len(unc)) if unc else None,
        "mean_cot_tokens": sum(cot) / n,
        "median_cot_tokens": _median(cot),
        "max_cot_tokens": max(cot),
        "mean_tokens": sum(int(s["output_tokens"]) for s in samples) / n,
    }


def scaled_budget(max_len: int, ratio: float) -> int:
    """The paper's MATH budget, ``max_len × γ`` (at least 1 token).

    >>> scaled_budget(1024, 0.5), scaled_budget(512, 1.0), scaled_budget(1, 0.1)
    (512, 512, 1)
    """
    return max(1, truncation_length(int(max_len), ratio))


RUNAWAY_FLAG = 0.10  # a ratio whose row (or reference row) has this share of runaways or more is flagged
NOISY_CI_WIDTH = 0.20  # a ratio whose 95 % bootstrap interval is wider than this is flagged
# what each flag of attach_actual_ratios means, for the table's legend and the adherence plot's key
FLAG_MEANINGS = {
    "runaways": f"its row or its reference has ≥ {100 * RUNAWAY_FLAG:.0f} % runaways "
    "(a few capped outputs dominate a mean)",
    "noisy": f"its 95 % interval is wider than {NOISY_CI_WIDTH:.1f}",
}


def _median(vals: Sequence[float]) -> float | None:
    return float(statistics.median(vals)) if vals else None


def summarize(samples: Sequence[dict]) -> dict:
    """Accuracy and token figures of one condition from its saved samples (each with
    ``correct`` and ``output_tokens``; ``cot_tokens`` and ``finish_reason`` optional).

    CoT tokens are the tokens before the final-answer sentence (:func:`tokenskip.prompt.split_answer`);
    a runaway is an output that hit ``max_new_tokens`` (``finish_reason == "length"``).

    >>> s = summarize([{"correct": True, "output_tokens": 10, "cot_tokens": 6, "finish_reason": "stop"},
    ...                {"correct": False, "output_tokens": 30, "cot_tokens": 30, "finish_reason": "length"}])
    >>> keys = ("n", "correct", "accuracy", "mean_tokens", "mean_cot_tokens", "median_cot_tokens", "runaway_share")
    >>> [s[k] for k in keys]
    [2, 1, 0.5, 20.0, 18.0, 18.0, 0.5]
    >>> summarize([])["accuracy"] is None
    True
    """
    n = len(samples)
    if n == 0:
        return {
            "n": 0,
            "correct": 0,
            "accuracy": None,
            "mean_tokens": None,
            "median_tokens": None,
            "mean_cot_tokens": None,
            "median_cot_tokens": None,
            "runaway_share": None,
            "hit_limit": None,
        }
    tokens = [int(s["output_tokens"]) for s in samples]
    cot = [int(s["cot_tokens"] if s.get("cot_tokens") is not None else s["output_tokens"]) for s in samples]
    correct = sum(bool(s["correct"]) for s in samples)
    hit = sum(s.get("finish_reason") == "length" for s in samples) / n
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "mean_tokens": sum(tokens) / n,
        "median_tokens": _median(tokens),
        "mean_cot_tokens": sum(cot) / n,
        "median_cot_tokens": _median(cot),
        "runaway_share": hit,
        "hit_limit": hit,  # the same figure under its earlier name
    }


def actual_ratio(mean_tokens: float | None, reference_mean: float | None) -> float | None:
    """mean CoT tokens at γ / mean CoT tokens at γ = 1.0 (None when undefined).

    >>> actual_ratio(113.05, 213.6)
    0.5292602996254682
    >>> actual_ratio(10.0, 0.0) is None
    True
    """
    if mean_tokens is None or not reference_mean:
        return None
    return mean_tokens / reference_mean


def paired_ratio_stats(cot: dict[str, int], ref: dict[str, int], resamples: int = 1000, seed: int = 0) -> dict:
    """Per-question view of a ratio: the median of cot[q] / ref[q] over questions in both, and a
    95 % bootstrap interval (questions resampled, seeded) of the ratio of means.

    >>> st = paired_ratio_stats({"a": 5, "b": 10, "c": 20}, {"a": 10, "b": 20, "c": 40})
    >>> st["median_item_ratio"], st["actual_ratio_ci"]
    (0.5, [0.5, 0.5])
    >>> paired_ratio_stats({}, {})["median_item_ratio"] is None
    True
    """
    import random

    keys = [k for k in cot if k in ref]
    items = [cot[k] / ref[k] for k in keys if ref[k]]
    out: dict[str, Any] = {"median_item_ratio": _median(items), "actual_ratio_ci": None}
    if len(keys) < 2:
        return out
    rng = random.Random(seed)
    a = [cot[k] for k in keys]
    b = [ref[k] for k in keys]
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(len(keys)) for _ in keys]
        den = sum(b[i] for i in idx)
        if den:
            stats.append(sum(a[i] for i in idx) / den)
    stats.sort()
    if stats:
        out["actual_ratio_ci"] = [
            round(stats[int(0.025 * (len(stats) - 1))], 4),
            round(stats[int(0.975 * (len(stats) - 1))], 4),
        ]
    return out


def attach_actual_ratios(rows: list[dict], samples: dict[str, Sequence[dict]] | None = None) -> None:
    """Fill ``actual_ratio``, ``ratio_reference``, ``adherence_error`` and ``flags`` in place
    (and, given the samples per condition id, ``median_item_ratio`` and ``actual_ratio_ci``).

    Ratios are of mean CoT tokens (the paper's definition): TokenSkip rows divide by the
    TokenSkip γ = 1.0 row, or by the original when 1.0 is not in the grid; every other row
    divides by the original. A ratio is flagged ``runaways`` when its row or its reference
    has ≥ 10 % runaways, and ``noisy`` when its 95 % interval is wider than 0.2.

    >>> row = lambda i, m, g, cot, run: {"id": i, "method": m, "ratio": g, "mean_cot_tokens": cot, "runaway_share": run}
    >>> rows = [row("original", "original", None, 200.0, 0.0), row("tokenskip-1.0", "tokenskip", 1.0, 100.0, 0.0),
    ...         row("tokenskip-0.5", "tokenskip", 0.5, 60.0, 0.3), row("truncation-0.5", "truncation", 0.5, 100.0, 0.0)]
    >>> attach_actual_ratios(rows)
    >>> [(r["actual_ratio"], r["ratio_reference"], r["adherence_error"], r["flags"]) for r in rows]
    [(1.0, 'original', None, []), (1.0, 'tokenskip-1.0', 0.0, []),
     (0.6, 'tokenskip-1.0', 0.1, ['runaways']), (0.5, 'original', 0.0, [])]
    """
    by_id = {r["id"]: r for r in rows}
    base_ts = by_id.get("tokenskip-1.0")
    original = by_id.get("original")
    for r in rows:
        ref = base_ts if (r["method"] == "tokenskip" and base_ts is not None) else original
        r["flags"] = []
        r["adherence_error"] = None
        if ref is None:
            r["actual_ratio"], r["ratio_reference"] = None, None
            continue
        mean = r.get("mean_cot_tokens", r.get("mean_tokens"))
        r["actual_ratio"] = actual_ratio(mean, ref.get("mean_cot_tokens", ref.get("mean_tokens")))
        r["ratio_reference"] = ref["id"]
        if r["actual_ratio"] is not None and r.get("ratio") is not None and r["method"] in ("tokenskip", *DERIVED):
            r["adherence_error"] = round(abs(r["actual_ratio"] - float(r["ratio"])), 6)
        if samples is not None and r["id"] in samples and ref["id"] in samples:
            cot = {str(s["id"]): int(s.get("cot_tokens", s["output_tokens"])) for s in samples[r["id"]]}
            rc = {str(s["id"]): int(s.get("cot_tokens", s["output_tokens"])) for s in samples[ref["id"]]}
            r.update(paired_ratio_stats(cot, rc))
        if r is not ref and max(r.get("runaway_share") or 0.0, ref.get("runaway_share") or 0.0) >= RUNAWAY_FLAG:
            r["flags"].append("runaways")
        ci = r.get("actual_ratio_ci")
        if r is not ref and ci and ci[1] - ci[0] > NOISY_CI_WIDTH:
            r["flags"].append("noisy")


def mean_or_none(values: Iterable[float]) -> float | None:
    """>>> mean_or_none([1.0, 2.0]), mean_or_none([])
    (1.5, None)
    """
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------- rendering


def _fmt(value: Any, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _ratio_cell(r: dict) -> str:
    v = r.get("actual_ratio")
    if v is None:
        return "n/a"
    text = f"{v:.2f}"
    if r.get("actual_ratio_ci"):
        lo, hi = r["actual_ratio_ci"]
        text += f" [{lo:.2f}, {hi:.2f}]"
    if r.get("flags"):
        text += " ⚠ " + ", ".join(r["flags"])
    return text


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table, one row per condition: accuracy, CoT tokens (mean and median), total output
    tokens, the actual ratio with its interval and flags, the median per-question ratio, the
    adherence error |actual − γ|, the runaway share and the latency.

    >>> t = format_table([{"label": "Original", "ratio": None, "accuracy": 0.862, "mean_tokens": 213.17,
    ...                    "mean_cot_tokens": 200.0, "median_cot_tokens": 190.0, "latency_s": 5.96, "actual_ratio": 1.0,
    ...                    "method": "original", "runaway_share": 0.0}]).splitlines()
    >>> t[0].split(" | ")[:4], t[0].split(" | ")[-2:]
    (['| Method', 'γ', 'Acc (%)', 'CoT tokens mean'], ['Runaways (%)', 'Latency (s) |'])
    >>> t[2]
    '| Original | - | 86.2 | 200.0 | 190.0 | 213.2 | 1.00 | n/a | n/a | 0.0 | 5.96 |'
    """
    lines = [
        "| Method | γ | Acc (%) | CoT tokens mean | CoT tokens median | Output tokens mean | Actual ratio [95% CI] | "
        "Median per-question ratio | abs(actual - γ) | Runaways (%) | Latency (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r.get("ratio") is None else gamma.key(r["ratio"])
        acc = None if r.get("accuracy") is None else 100.0 * r["accuracy"]
        run = r.get("runaway_share", r.get("hit_limit"))
        lines.append(
            f"| {r['label']} | {ratio} | {_fmt(acc, '.1f')} | {_fmt(r.get('mean_cot_tokens'), '.1f')} | "
            f"{_fmt(r.get('median_cot_tokens'), '.1f')} | {_fmt(r.get('mean_tokens'), '.1f')} | {_ratio_cell(r)} | "
            f"{_fmt(r.get('median_item_ratio'), '.2f')} | {_fmt(r.get('adherence_error'), '.2f')} | "
            f"{_fmt(None if run is None else 100.0 * run, '.1f')} | {_fmt(r.get('latency_s'), '.2f')} |"
        )
    return "\n".join(lines)


SIDE_BY_SIDE = ("tokenskip", "truncation", "budget_forcing")


def side_by_side(rows: Sequence[dict]) -> list[dict]:
    """Per γ (largest first, γ < 1 where a hard-cap baseline ran): TokenSkip, truncation and
    budget forcing, each ``{"accuracy", "mean_cot_tokens", "latency_s", "actual_ratio"}`` or None
    when that row is absent.

    >>> rows = [{"method": "tokenskip", "ratio": 0.5, "accuracy": 0.4, "mean_cot_tokens": 50.0, "latency_s": 1.0},
    ...         {"method": "budget_forcing", "ratio": 0.5, "accuracy": 0.3, "mean_cot_tokens": 60.0, "latency_s": 1.5}]
    >>> sbs = side_by_side(rows)
    >>> [(r["ratio"], r["tokenskip"]["accuracy"], r["truncation"], r["budget_forcing"]["mean_cot_tokens"]) for r in sbs]
    [(0.5, 0.4, None, 60.0)]
    """
    keys = ("accuracy", "mean_cot_tokens", "latency_s", "actual_ratio")
    ratios = sorted(
        {float(r["ratio"]) for r in rows if r.get("method") in DERIVED and r.get("ratio") is not None}, reverse=True
    )
    out = []
    for g in ratios:
        entry: dict[str, Any] = {"ratio": g}
        gk = gamma.key(g)
        for method in SIDE_BY_SIDE:
            row = next(
                (
                    r
                    for r in rows
                    if r.get("method") == method and r.get("ratio") is not None and gamma.key(r["ratio"]) == gk
                ),
                None,
            )
            entry[method] = None if row is None else {k: row.get(k) for k in keys}
        out.append(entry)
    return out


def format_side_by_side(rows: Sequence[dict]) -> str:
    """TokenSkip against the two hard-cap baselines, one line per γ (empty when neither ran).

    >>> t = format_side_by_side([{"method": "truncation", "ratio": 0.5, "accuracy": 0.0, "mean_cot_tokens": 9.0}])
    >>> t.splitlines()[0].split(" | ")[:3]
    ['| γ', 'TokenSkip Acc (%)', 'TokenSkip CoT tokens']
    >>> t.splitlines()[2]
    '| 0.5 | - | - | - | 0.0 | 9.0 | n/a | - | - | - |'
    """
    sbs = side_by_side(rows)
    if not sbs:
        return ""
    names = {"tokenskip": "TokenSkip", "truncation": "Truncation", "budget_forcing": "Budget forcing"}
    head = ["γ"] + [f"{names[m]} {c}" for m in SIDE_BY_SIDE for c in ("Acc (%)", "CoT tokens", "latency (s)")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in sbs:
        cells = [gamma.key(e["ratio"])]
        for m in SIDE_BY_SIDE:
            f = e[m]
            if f is None:
                cells += ["-", "-", "-"]
                continue
            acc = None if f.get("accuracy") is None else 100.0 * f["accuracy"]
            cells += [_fmt(acc, ".1f"), _fmt(f.get("mean_cot_tokens"), ".1f"), _fmt(f.get("latency_s"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_hard_budget_table(entries: Sequence[dict]) -> str:
    """One line per (budget, model) of a hard-budget evaluation.

    >>> print(format_hard_budget_table([{"budget": 64, "model": "tokenskip", "ratio": 0.5, "fits": True,
    ...     "expected_cot_tokens": 40.0, "within_budget_share": 1.0, "accuracy": 0.25, "forced_share": 0.1,
    ...     "mean_cot_tokens": 38.5, "uncapped_within_share": 0.9}]).splitlines()[2])
    | 64 | TokenSkip (routed) | 0.5 | 40.0 | 100.0 | 25.0 | 10.0 | 38.5 | 90.0 |
    """
    lines = [
        "| Budget B (CoT tokens) | Model | γ | Expected CoT tokens at γ | CoT within B (%) | Acc (%) | "
        "Hard cap fired (%) | CoT tokens mean | Within B without the cap (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v: Any) -> str:
        return _fmt(None if v is None else 100.0 * v, ".1f")

    for e in entries:
        model = "TokenSkip (routed)" if e["model"] == "tokenskip" else "Base model"
        ratio = (
            "-" if e.get("ratio") is None else gamma.key(e["ratio"]) + ("" if e.get("fits", True) else " (none fits)")
        )
        lines.append(
            f"| {e['budget']} | {model} | {ratio} | {_fmt(e.get('expected_cot_tokens'), '.1f', '-')} | "
            f"{pct(e.get('within_budget_share'))} | {pct(e.get('accuracy'))} | {pct(e.get('forced_share'))} | "
            f"{_fmt(e.get('mean_cot_tokens'), '.1f')} | {pct(e.get('uncapped_within_share'))} |"
        )
    return "\n".join(lines)


def hard_budget_caption(entries: Sequence[dict], force_answer_tokens: int | None) -> str:
    """What the hard-budget table measures."""
    cap = force_answer_tokens or FORCE_ANSWER_TOKENS
    text = (
        "Hard budget B: each question answered with at most B generated tokens; when an output does not finish "
        "within B (the hard cap fires), its CoT (the text before any answer sentence) is kept and "
        f'"{tsprompt.ANSWER_OPENING}" is appended, and the same model writes only the answer (at most {cap} new '
        'tokens, stopped at "}$" and cut where the box closes). TokenSkip is routed to the largest γ whose mean '
        "CoT tokens in this "
        "run's TokenSkip rows fit B (the smallest γ when none does, marked); the base model gets the plain "
        "prompt. Capped outputs are the greedy outputs above cut at B tokens (a greedy run with a smaller cap "
        "is a prefix of a longer one; generated with max_tokens = B where a row's own cap was below B); the "
        "forced answers are generated. CoT within B should be 100 %: the "
        "cap guarantees it. 'Without the cap' = the share of the same rows' uncapped CoTs that fit B."
    )
    if any(e.get("fits") is False for e in entries if e.get("model") == "tokenskip"):
        text += " '(none fits)': no trained γ's mean CoT fits B; the smallest γ was used."
    return text


def format_throughput_table(rows: Sequence[dict]) -> str:
    """Batched generation (all questions of a condition in one engine call).

    >>> print(format_throughput_table([{"label": "Original", "ratio": None, "throughput": None}]))
    | Method | Ratio | Batch wall (s) | Output tok/s | Samples/s |
    |---|---|---|---|---|
    | Original | - | n/a | n/a | n/a |
    """
    lines = ["| Method | Ratio | Batch wall (s) | Output tok/s | Samples/s |", "|---|---|---|---|---|"]
    for r in rows:
        t = r.get("throughput") or {}
        ratio = "-" if r.get("ratio") is None else gamma.key(r["ratio"])
        lines.append(
            f"| {r['label']} | {ratio} | {_fmt(t.get('wall_s'), '.2f')} | {_fmt(t.get('tokens_per_s'), '.1f')} | "
            f"{_fmt(t.get('samples_per_s'), '.2f')} |"
        )
    return "\n".join(lines)


def build_caption(
    *,
    model: str,
    adapter: str | None,
    dataset: str,
    split: str,
    n: int,
    max_new_tokens: int,
    rows: Sequence[dict],
    latency_samples: int,
    budget_scales_with_ratio: bool = False,
    near_zero: float = NEAR_ZERO_ACCURACY,
    force_answer_tokens: int | None = None,
) -> str:
    """The table caption: what was run, and the caveats a reader needs.

    >>> cap = build_caption(model="m", adapter=None, dataset="gsm8k", split="test", n=4, max_new_tokens=64,
    ...                     rows=[{"accuracy": 0.0}], latency_samples=2)
    >>> "near zero" in cap and "no adapter" in cap
    True
    """
    parts = [
        f"**{model}**"
        + (f" + adapter `{adapter}`" if adapter else "")
        + f" on {dataset} ({split}, n = {n}), greedy decoding, max {max_new_tokens} new tokens"
        + (" × γ for TokenSkip rows" if budget_scales_with_ratio else "")
        + "."
    ]
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    if accs and max(accs) < near_zero:
        parts.append(
            f"Accuracy is near zero (at most {100 * max(accs):.1f}% in any row): this model solves almost "
            "none of these problems, so the Acc column and its differences between rows say little; token "
            "counts, actual ratios and latencies are still meaningful."
        )
    if not adapter:
        parts.append(
            "TokenSkip rows use no adapter: the base model prompted with the γ marker (untrained), "
            "so they show how the prompt alone changes length."
        )
    parts.append(
        f"Tokens are {model}'s own tokens. CoT tokens = the output's tokens before its final-answer sentence "
        '("The final answer is: ..."); output tokens count the whole output. Actual ratio = mean CoT tokens / mean '
        "CoT tokens of TokenSkip γ = 1.0 (TokenSkip rows) or of Original (other rows), with a 95 % bootstrap "
        "interval over questions; the median per-question ratio is the median of the same ratio taken question "
        "by question. Runaways = outputs that hit the token cap."
    )
    flagged = [r for r in rows if r.get("flags")]
    if flagged:
        parts.append(
            "⚠ marks a ratio not to be read as a plain number: "
            + ", ".join(f"`{flag}` = {meaning}" for flag, meaning in FLAG_MEANINGS.items())
            + "."
        )
    parts.append(
        f"Latency = mean wall time per sample at batch size 1 over the first {latency_samples} questions "
        "(the same engine; vLLM). Truncation rows cut Original's saved greedy outputs at ⌊γ × its length⌋ "
        "tokens, which equals greedy decoding with that budget; their latency is not measured (n/a)."
    )
    if any(r.get("method") == "budget_forcing" for r in rows):
        parts.append(
            "Budget forcing rows cut Original's CoT (its tokens before the answer sentence) at ⌊γ × its CoT tokens⌋, "
            f'append "{tsprompt.ANSWER_OPENING}" and let the same base model write only the answer (at most '
            f'{force_answer_tokens or FORCE_ANSWER_TOKENS} new tokens, stopped at "}}$" and cut where the box '
            "closes; the forced answers are generated in one batched call per γ); their CoT tokens are the kept "
            "tokens, and their latency is Original's latency scaled to the kept tokens plus the forcing call, at "
            "batch size 1."
        )
    return " ".join(parts)


def render_markdown(results: dict) -> str:
    """The whole ``table.md``: one Table-1 block (+ throughput) per dataset."""
    out = [
        f"# TokenSkip evaluation: {results['model']}" + (f" + {results['adapter']}" if results.get("adapter") else ""),
        "",
    ]
    for name, ds in results["datasets"].items():
        rows = ds["conditions"]
        out += [
            f"## {name}",
            "",
            format_table(rows),
            "",
            "Table: "
            + build_caption(
                model=results["model"],
                adapter=results.get("adapter"),
                dataset=name,
                split=ds["split"],
                n=ds["n"],
                max_new_tokens=ds["max_new_tokens"],
                rows=rows,
                latency_samples=ds["latency_samples"],
                budget_scales_with_ratio=results.get("budget_scales_with_ratio", False),
                force_answer_tokens=results.get("force_answer_tokens"),
            ),
            "",
        ]
        sbs = format_side_by_side(rows)
        if sbs:
            out += [
                "TokenSkip against the hard-cap baselines, per γ (the same rows as above):",
                "",
                sbs,
                "",
            ]
        out += [
            "Batched throughput:",
            "",
            format_throughput_table([r for r in rows if r["method"] not in DERIVED]),
            "",
        ]
        hard = ds.get("hard_budget") or []
        if hard:
            out += [
                f"### {name}: hard budget",
                "",
                format_hard_budget_table(hard),
                "",
                "Table: " + hard_budget_caption(hard, results.get("force_answer_tokens")),
                "",
            ]
    if results.get("wall_s") is not None:
        out.append(f"Run wall time: {results['wall_s']:.1f} s (engine start {results.get('engine_start_s', 0):.1f} s).")
    return "\n".join(out) + "\n"
