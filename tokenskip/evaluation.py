"""Pure evaluation arithmetic: the conditions of a run, per-condition figures, the actual
ratio, the truncation baseline and the Markdown table (the shape of the paper's Table 1).

No model, no Ray: rows in, numbers and text out. ``pipelines/evaluate.py`` generates
and grades; everything it reports is computed here from the saved samples, so
re-computing from ``samples/*.jsonl`` gives the same figures.

Conditions (SPEC §4):

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


def format_gamma(ratio: float) -> str:
    """γ as used in condition ids and tables.

    >>> format_gamma(0.5), format_gamma(1), format_gamma(0.7000001)
    ('0.5', '1.0', '0.7')
    """
    text = f"{round(float(ratio), 4):.4f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


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
        return f"{method}-{format_gamma(ratio)}"
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


def summarize(samples: Sequence[dict]) -> dict:
    """Accuracy and token figures of one condition from its saved samples
    (each with ``correct`` and ``output_tokens``; ``finish_reason`` optional).

    >>> s = summarize([{"correct": True, "output_tokens": 10, "finish_reason": "stop"},
    ...                {"correct": False, "output_tokens": 30, "finish_reason": "length"}])
    >>> s["n"], s["correct"], s["accuracy"], s["mean_tokens"], s["hit_limit"]
    (2, 1, 0.5, 20.0, 0.5)
    >>> summarize([])["accuracy"] is None
    True
    """
    n = len(samples)
    if n == 0:
        return {"n": 0, "correct": 0, "accuracy": None, "mean_tokens": None, "median_tokens": None, "hit_limit": None}
    tokens = [int(s["output_tokens"]) for s in samples]
    correct = sum(bool(s["correct"]) for s in samples)
    hit = sum(s.get("finish_reason") == "length" for s in samples)
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n,
        "mean_tokens": sum(tokens) / n,
        "median_tokens": float(statistics.median(tokens)),
        "hit_limit": hit / n,
    }


def actual_ratio(mean_tokens: float | None, reference_mean: float | None) -> float | None:
    """mean tokens at γ / mean tokens at γ = 1.0 (None when undefined).

    >>> actual_ratio(113.05, 213.6)
    0.5292602996254682
    >>> actual_ratio(10.0, 0.0) is None
    True
    """
    if mean_tokens is None or not reference_mean:
        return None
    return mean_tokens / reference_mean


def attach_actual_ratios(rows: list[dict]) -> None:
    """Fill ``actual_ratio`` and ``ratio_reference`` in place.

    TokenSkip rows divide by the TokenSkip γ = 1.0 row (the paper's definition), or by
    the original when 1.0 is not in the grid; every other row divides by the original.

    >>> rows = [{"id": "original", "method": "original", "mean_tokens": 200.0},
    ...         {"id": "tokenskip-1.0", "method": "tokenskip", "mean_tokens": 100.0},
    ...         {"id": "tokenskip-0.5", "method": "tokenskip", "mean_tokens": 50.0},
    ...         {"id": "truncation-0.5", "method": "truncation", "mean_tokens": 100.0}]
    >>> attach_actual_ratios(rows)
    >>> [(r["actual_ratio"], r["ratio_reference"]) for r in rows]
    [(1.0, 'original'), (1.0, 'tokenskip-1.0'), (0.5, 'tokenskip-1.0'), (0.5, 'original')]
    """
    by_id = {r["id"]: r for r in rows}
    base_ts = by_id.get("tokenskip-1.0")
    original = by_id.get("original")
    for r in rows:
        ref = base_ts if (r["method"] == "tokenskip" and base_ts is not None) else original
        if ref is None:
            r["actual_ratio"], r["ratio_reference"] = None, None
            continue
        r["actual_ratio"] = actual_ratio(r.get("mean_tokens"), ref.get("mean_tokens"))
        r["ratio_reference"] = ref["id"]


def mean_or_none(values: Iterable[float]) -> float | None:
    """>>> mean_or_none([1.0, 2.0]), mean_or_none([])
    (1.5, None)
    """
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------- rendering


def _fmt(value: Any, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table: Method | Ratio | Acc | Tokens | Latency (s) | Actual ratio.

    >>> print(format_table([{"label": "Original", "ratio": None, "accuracy": 0.862, "mean_tokens": 213.17,
    ...                      "latency_s": 5.96, "actual_ratio": 1.0, "method": "original"}]))
    | Method | Ratio | Acc (%) | Tokens | Latency (s) | Actual ratio |
    |---|---|---|---|---|---|
    | Original | - | 86.2 | 213.17 | 5.96 | 1.00 |
    """
    lines = ["| Method | Ratio | Acc (%) | Tokens | Latency (s) | Actual ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.get("ratio") is None else format_gamma(r["ratio"])
        acc = None if r.get("accuracy") is None else 100.0 * r["accuracy"]
        lines.append(f"| {r['label']} | {ratio} | {_fmt(acc, '.1f')} | {_fmt(r.get('mean_tokens'), '.2f')} | "
                     f"{_fmt(r.get('latency_s'), '.2f')} | {_fmt(r.get('actual_ratio'), '.2f')} |")
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
        ratio = "-" if r.get("ratio") is None else format_gamma(r["ratio"])
        lines.append(f"| {r['label']} | {ratio} | {_fmt(t.get('wall_s'), '.2f')} | {_fmt(t.get('tokens_per_s'), '.1f')} | "
                     f"{_fmt(t.get('samples_per_s'), '.2f')} |")
    return "\n".join(lines)


def build_caption(*, model: str, adapter: str | None, dataset: str, split: str, n: int, max_new_tokens: int,
                  rows: Sequence[dict], latency_samples: int, budget_scales_with_ratio: bool = False,
                  near_zero: float = NEAR_ZERO_ACCURACY) -> str:
    """The table caption: what was run, and the caveats a reader needs.

    >>> cap = build_caption(model="m", adapter=None, dataset="gsm8k", split="test", n=4, max_new_tokens=64,
    ...                     rows=[{"accuracy": 0.0}], latency_samples=2)
    >>> "near zero" in cap and "no adapter" in cap
    True
    """
    parts = [f"**{model}**" + (f" + adapter `{adapter}`" if adapter else "") +
             f" on {dataset} ({split}, n = {n}), greedy decoding, max {max_new_tokens} new tokens"
             + (" × γ for TokenSkip rows" if budget_scales_with_ratio else "") + "."]
    accs = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    if accs and max(accs) < near_zero:
        parts.append(f"Accuracy is near zero (at most {100 * max(accs):.1f}% in any row): this model solves almost "
                     "none of these problems, so the Acc column and its differences between rows say little; token "
                     "counts, actual ratios and latencies are still meaningful.")
    if not adapter:
        parts.append("TokenSkip rows use no adapter: the base model prompted with the γ marker (untrained), "
                     "so they show how the prompt alone changes length.")
    parts.append("Actual ratio = mean tokens / mean tokens of TokenSkip γ = 1.0 (TokenSkip rows) or of Original "
                 "(other rows).")
    parts.append(f"Latency = mean wall time per sample at batch size 1 over the first {latency_samples} questions "
                 "(the same engine; vLLM). Truncation rows cut Original's saved greedy outputs at ⌊γ × its length⌋ "
                 "tokens, which equals greedy decoding with that budget; their latency is not measured (n/a).")
    return " ".join(parts)


def render_markdown(results: dict) -> str:
    """The whole ``table.md``: one Table-1 block (+ throughput) per dataset."""
    out = [f"# TokenSkip evaluation: {results['model']}" + (f" + {results['adapter']}" if results.get("adapter") else ""), ""]
    for name, ds in results["datasets"].items():
        rows = ds["conditions"]
        out += [f"## {name}", "", format_table(rows), "",
                "Table: " + build_caption(model=results["model"], adapter=results.get("adapter"), dataset=name,
                                          split=ds["split"], n=ds["n"], max_new_tokens=ds["max_new_tokens"], rows=rows,
                                          latency_samples=ds["latency_samples"],
                                          budget_scales_with_ratio=results.get("budget_scales_with_ratio", False)),
                "", "Batched throughput:", "", format_throughput_table([r for r in rows if r["method"] != "truncation"]), ""]
    if results.get("wall_s") is not None:
        out.append(f"Run wall time: {results['wall_s']:.1f} s (engine start {results.get('engine_start_s', 0):.1f} s).")
    return "\n".join(out) + "\n"
