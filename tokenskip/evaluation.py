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

>>> [c.id for c in plan_conditions([1.0, 0.5], ["original", "truncation"], [])]
['original', 'tokenskip-1.0', 'tokenskip-0.5', 'truncation-0.5']
>>> truncation_length(213, 0.5), truncation_length(10, 0.7), truncation_length(0, 0.9)
(106, 7, 0)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from tokenskip import gamma

METHODS = ("original", "tokenskip", "prompt", "truncation")
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
    if method in ("tokenskip", "truncation"):
        return f"{method}-{gamma.key(ratio)}"
    return method


def plan_conditions(ratios: Sequence[float], baselines: Iterable[str], prompt_names: Iterable[str]) -> list[Condition]:
    """Conditions in table order. ``original`` always runs when truncation is asked for
    (truncation cuts its outputs); truncation only exists for γ < 1.

    >>> [c.id for c in plan_conditions([0.9], ["prompt"], ["concise"])]
    ['tokenskip-0.9', 'prompt-concise']
    """
    baselines = set(baselines)
    out: list[Condition] = []
    if "original" in baselines or "truncation" in baselines:
        out.append(Condition("original", "original"))
    for r in ratios:
        out.append(Condition(condition_id("tokenskip", r), "tokenskip", float(r)))
    if "prompt" in baselines:
        out.extend(Condition(condition_id("prompt", name=n), "prompt", None, n) for n in prompt_names)
    if "truncation" in baselines:
        out.extend(Condition(condition_id("truncation", r), "truncation", float(r)) for r in ratios if float(r) < 1.0)
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


def scaled_budget(max_len: int, ratio: float) -> int:
    """The paper's MATH budget, ``max_len × γ`` (at least 1 token).

    >>> scaled_budget(1024, 0.5), scaled_budget(512, 1.0), scaled_budget(1, 0.1)
    (512, 512, 1)
    """
    return max(1, truncation_length(int(max_len), ratio))


RUNAWAY_FLAG = 0.10  # a ratio whose row (or reference row) has this share of runaways or more is flagged
NOISY_CI_WIDTH = 0.20  # a ratio whose 95 % bootstrap interval is wider than this is flagged


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
        if r["actual_ratio"] is not None and r.get("ratio") is not None and r["method"] in ("tokenskip", "truncation"):
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
            f"⚠ marks a ratio not to be read as a plain number: `runaways` = its row or its reference has "
            f"≥ {100 * RUNAWAY_FLAG:.0f} % runaways (a few capped outputs dominate a mean), `noisy` = its 95 % "
            f"interval is wider than {NOISY_CI_WIDTH:.1f}."
        )
    parts.append(
        f"Latency = mean wall time per sample at batch size 1 over the first {latency_samples} questions "
        "(the same engine; vLLM). Truncation rows cut Original's saved greedy outputs at ⌊γ × its length⌋ "
        "tokens, which equals greedy decoding with that budget; their latency is not measured (n/a)."
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
            ),
            "",
            "Batched throughput:",
            "",
            format_throughput_table([r for r in rows if r["method"] != "truncation"]),
            "",
        ]
    if results.get("wall_s") is not None:
        out.append(f"Run wall time: {results['wall_s']:.1f} s (engine start {results.get('engine_start_s', 0):.1f} s).")
    return "\n".join(out) + "\n"
