"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed).

* ``accuracy_vs_tokens``: accuracy against mean CoT tokens, one point per γ and per
  baseline (each γ point labelled with its latency at batch size 1 when measured), one
  panel per dataset.
* ``ratio_adherence``: requested γ against the measured actual ratio (TokenSkip, truncation
  and budget forcing), with the y = x line a perfectly controllable model would sit on.

Both take the ``results`` dict that ``pipelines/evaluate.py`` writes to results.json.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tokenskip.evaluation import FLAG_MEANINGS  # noqa: E402

_STYLE = {
    "original": ("black", "*"),
    "tokenskip": ("tab:blue", "o"),
    "prompt": ("tab:green", "s"),
    "truncation": ("tab:red", "v"),
    "budget_forcing": ("tab:purple", "^"),
}
_PER_GAMMA = ("tokenskip", "truncation", "budget_forcing")  # one line per method, a point per γ
# evaluation.attach_actual_ratios' flags, as the adherence plot writes them beside a point (key under the plot)
_FLAG_CODES = {"runaways": "R", "noisy": "N"}
_FLAG_KEY = "⚠ " + "   ".join(f"{_FLAG_CODES[flag]}: {meaning}" for flag, meaning in FLAG_MEANINGS.items())


def _panels(n: int):
    fig, axes = plt.subplots(1, n, figsize=(6.0 * n, 4.6), squeeze=False)
    return fig, list(axes[0])


def _title(results: dict) -> str:
    name = os.path.basename(str(results["model"]).rstrip("/")) or str(results["model"])
    adapter = results.get("adapter")
    return name + (f" + {os.path.basename(str(adapter).rstrip('/'))}" if adapter else "")


def _acc(r: dict) -> float | None:
    return None if r.get("accuracy") is None else 100.0 * r["accuracy"]


def _cot(r: dict) -> float | None:
    return r.get("mean_cot_tokens", r.get("mean_tokens"))


def accuracy_vs_tokens(results: dict, path: str | os.PathLike) -> str:
    datasets = results["datasets"]
    fig, axes = _panels(len(datasets))
    for ax, (name, ds) in zip(axes, datasets.items()):
        rows = [r for r in ds["conditions"] if _cot(r) is not None and _acc(r) is not None]
        for method in _PER_GAMMA:
            series = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["ratio"])
            if not series:
                continue
            color, marker = _STYLE[method]
            label = series[0]["label"]
            ax.plot(
                [_cot(r) for r in series],
                [_acc(r) for r in series],
                marker=marker,
                color=color,
                label=label,
                linestyle="-" if method == "tokenskip" else "--",
            )
            for r in series:
                ax.annotate(
                    f"γ={r['ratio']:g}" + (f", {r['latency_s']:.2f} s" if r.get("latency_s") is not None else ""),
                    (_cot(r), _acc(r)),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=color,
                )
        for r in rows:
            if r["method"] in ("original", "prompt"):
                color, marker = _STYLE[r["method"]]
                ax.scatter(
                    [_cot(r)],
                    [_acc(r)],
                    color=color,
                    marker=marker,
                    s=80 if marker == "*" else 40,
                    label=r["label"],
                    zorder=3,
                )
                if r["method"] == "prompt":
                    ax.annotate(
                        r.get("prompt_name") or r["label"],
                        (_cot(r), _acc(r)),
                        textcoords="offset points",
                        xytext=(4, -10),
                        fontsize=7,
                        color=color,
                    )
        ax.set_xlabel("mean CoT tokens (before the answer sentence)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{name} (n = {ds['n']})")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        seen: dict[str, Any] = {}
        for h, lab in zip(handles, labels):
            if lab.startswith("Prompt"):
                lab = "Prompt baselines"
            seen.setdefault(lab, h)
        ax.legend(seen.values(), seen.keys(), fontsize=8)
    fig.suptitle(f"Accuracy vs tokens: {_title(results)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def ratio_adherence(results: dict, path: str | os.PathLike) -> str:
    datasets = results["datasets"]
    fig, axes = _panels(len(datasets))
    for ax, (name, ds) in zip(axes, datasets.items()):
        ax.plot([0, 1.05], [0, 1.05], color="grey", linestyle=":", label="actual = requested")
        for slot, method in enumerate(_PER_GAMMA):
            series = sorted(
                (r for r in ds["conditions"] if r["method"] == method and r.get("actual_ratio") is not None),
                key=lambda r: r["ratio"],
            )
            if not series:
                continue
            color, marker = _STYLE[method]
            ax.plot(
                [r["ratio"] for r in series],
                [r["actual_ratio"] for r in series],
                marker=marker,
                color=color,
                label=series[0]["label"],
            )
            ci = [(r["ratio"], r["actual_ratio"], r.get("actual_ratio_ci")) for r in series if r.get("actual_ratio_ci")]
            if ci:  # 95 % bootstrap intervals over questions
                lo = [c[1] - c[2][0] for c in ci]
                hi = [c[2][1] - c[1] for c in ci]
                ax.errorbar(
                    [c[0] for c in ci],
                    [c[1] for c in ci],
                    yerr=[lo, hi],
                    fmt="none",
                    ecolor=color,
                    alpha=0.6,
                    capsize=3,
                )
            for r in series:
                if r.get("flags"):
                    ax.annotate(  # short codes (key under the plot): neighbouring γ stay readable
                        "⚠" + "".join(_FLAG_CODES.get(f, f) for f in r["flags"]),
                        (r["ratio"], r["actual_ratio"]),
                        textcoords="offset points",
                        xytext=(4, -10 - 8 * slot),  # a line per method: series meeting at a point stay apart
                        fontsize=7,
                        color=color,
                    )
        ax.set_xlabel("requested ratio γ")
        ax.set_ylabel("actual ratio (mean CoT tokens / mean CoT tokens at γ = 1)")
        ax.set_title(f"{name} (n = {ds['n']})")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Ratio adherence: {_title(results)}", fontsize=10)
    fig.text(0.5, 0.005, _FLAG_KEY, ha="center", va="bottom", fontsize=6, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
