"""The adapter card: ``tokenskip.json`` beside a TokenSkip adapter's weights.

Train writes it when it saves the adapter; evaluate adds what it measured per γ; the
evaluate stage and the Serve app read adapter metadata only through :func:`read_card`.
The card travels with the adapter directory (a copy to object storage keeps it), so an
adapter is self-describing without the run directory it came from.

Version 1 (``card_version: 1``)::

    {
      "card_version": 1,
      "base_model": "smollm2-135m-instruct",
      "ratios": [1.0, 0.9, 0.5],                     # γ trained (canonical, largest first)
      "rows_per_ratio": {"1.0": 120, "0.9": 118, "0.5": 121},
      "prompt": {"format_version": 1, "separator": "<|eot_id|>", "marker": "...", ...},
      "train": {"dataset": "runs/x/build_sft", "train_file": ".../train.parquet",
                "data_sha256": "…", "rows": 359, "config": {...summary...}},
      "evaluation": {                                # optional, added by evaluate
        "datasets": {
          "gsm8k": {"results": "runs/x/evaluate/results.json", "evaluated_at": "…",
                    "split": "test", "n": 100, "max_new_tokens": 512,
                    "ratios": {"1.0": {"expected_cot_tokens": 182.1, "median_cot_tokens": 76.0,
                                       "actual_ratio": 1.0, "accuracy": 0.03, "runaway_share": 0.26}}}}}
    }

γ keys are :func:`tokenskip.gamma.key` strings. A card of another version, a missing or
invalid field is a :class:`CardError` naming the file and the field. Pure library: no Ray.

>>> train = {"dataset": "d", "data_sha256": "0" * 64, "config": {}}
>>> c = AdapterCard("m", [1.0, 0.5], {"1.0": 3, "0.5": 2}, prompt_spec(), train)
>>> AdapterCard.from_dict(c.to_dict()) == c
True
>>> AdapterCard.from_dict(dict(c.to_dict(), card_version=7), "a/tokenskip.json")
Traceback (most recent call last):
...
tokenskip.card.CardError: a/tokenskip.json: card_version 7 is not supported (this tokenskip reads version 1)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from tokenskip import gamma, prompt

log = logging.getLogger("tokenskip.card")

CARD_FILE = "tokenskip.json"
CARD_VERSION = 1
TRAIN_SUMMARY_KEYS = (
    "model",
    "strategy",
    "zero_stage",
    "epochs",
    "max_steps",
    "max_rows",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "global_batch_size",
    "micro_batch_size",
    "cutoff_len",
    "overlong",
    "precision",
    "seed",
)


class CardError(ValueError):
    """An adapter card that is missing, unreadable, of an unknown version or invalid; the
    message names the file and the field."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RatioEval:
    """What evaluate measured for the adapter at one γ on one dataset."""

    expected_cot_tokens: float  # mean CoT tokens: what budget routing (max_cot_tokens) compares
    median_cot_tokens: float | None = None
    actual_ratio: float | None = None
    accuracy: float | None = None
    runaway_share: float | None = None  # share of answers that hit max_new_tokens


@dataclass(frozen=True)
class DatasetEval:
    """One evaluated dataset: where the figures come from, and the figures per γ key."""

    results: str
    ratios: dict[str, RatioEval]
    max_new_tokens: int | None = None
    n: int | None = None
    split: str | None = None
    evaluated_at: str | None = None


@dataclass
class AdapterCard:
    """A validated card (build one with :func:`card_for_training`, read one with :func:`read_card`)."""

    base_model: str
    ratios: list[float]
    rows_per_ratio: dict[str, int]
    prompt: dict
    train: dict
    evaluation: dict[str, DatasetEval] | None = None  # dataset name -> figures
    card_version: int = CARD_VERSION

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "card_version": self.card_version,
            "base_model": self.base_model,
            "ratios": list(self.ratios),
            "rows_per_ratio": dict(self.rows_per_ratio),
            "prompt": dict(self.prompt),
            "train": dict(self.train),
        }
        if self.evaluation is not None:
            out["evaluation"] = {"datasets": {name: _dataset_dict(d) for name, d in self.evaluation.items()}}
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "<card>") -> "AdapterCard":
        """The validator: every field checked, errors name ``source`` and the field."""
        return _parse(data, source)

    def expected_cot_tokens(self, dataset: str | None = None) -> dict[float, float]:
        """γ -> expected CoT tokens from the evaluation (``{}`` when never evaluated).

        ``dataset``: which evaluated dataset; None takes the first one evaluated.
        """
        return expected_cot_tokens(self.evaluation or {}, dataset, "adapter card")

    def with_evaluation(self, datasets: Mapping[str, DatasetEval]) -> "AdapterCard":
        """A copy with ``datasets`` added to (or replacing the same names in) the evaluation."""
        merged = dict(self.evaluation or {})
        merged.update(datasets)
        return dataclasses.replace(self, evaluation=merged)


def _dataset_dict(d: DatasetEval) -> dict:
    return {
        "results": d.results,
        "evaluated_at": d.evaluated_at,
        "split": d.split,
        "n": d.n,
        "max_new_tokens": d.max_new_tokens,
        "ratios": {k: dataclasses.asdict(v) for k, v in d.ratios.items()},
    }


# --------------------------------------------------------------------------- validation

_TOP_KEYS = ("card_version", "base_model", "ratios", "rows_per_ratio", "prompt", "train", "evaluation")


def _fail(source: str, where: str, msg: str) -> CardError:
    return CardError(f"{source}: {where}: {msg}")


def _require(obj: Mapping, name: str, source: str, where: str = "") -> Any:
    if name not in obj or obj[name] is None:
        raise _fail(source, f"{where}{name}", "missing")
    return obj[name]


def _number(
    value: Any, source: str, where: str, lo: float = 0.0, hi: float | None = None, optional: bool = True
) -> float | None:
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < lo
        or (hi is not None and value > hi)
    ):
        bound = f"in [{lo:g}, {hi:g}]" if hi is not None else f">= {lo:g}"
        raise _fail(source, where, f"must be a number {bound}, got {value!r}")
    return float(value)


def _int(value: Any, source: str, where: str, optional: bool = True) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(source, where, f"must be an integer >= 0, got {value!r}")
    return value


def _mapping(value: Any, source: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(source, where, f"must be a mapping, got {type(value).__name__}")
    return value


def _gamma_key(k: Any, source: str, where: str) -> str:
    try:
        return gamma.key(gamma.parse(k, where))
    except ValueError as e:
        raise CardError(f"{source}: {e}") from None


def _parse(data: Any, source: str) -> AdapterCard:
    data = _mapping(data, source, "card")
    version = data.get("card_version")
    if version is None:
        raise _fail(source, "card_version", "missing (not a tokenskip adapter card?)")
    if type(version) is not int or version != CARD_VERSION:
        raise CardError(
            f"{source}: card_version {version!r} is not supported (this tokenskip reads version {CARD_VERSION})"
        )
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise _fail(source, unknown[0], f"unknown field (valid: {', '.join(_TOP_KEYS)})")
    base = _require(data, "base_model", source)
    if not isinstance(base, str) or not base:
        raise _fail(source, "base_model", f"must be a non-empty string, got {base!r}")
    raw_ratios = _require(data, "ratios", source)
    try:
        ratios = gamma.normalize(raw_ratios, "ratios")
    except ValueError as e:
        raise CardError(f"{source}: {e}") from None
    rows = _mapping(_require(data, "rows_per_ratio", source), source, "rows_per_ratio")
    rows_per_ratio = {
        _gamma_key(k, source, f"rows_per_ratio key {k!r}"): _int(v, source, f"rows_per_ratio[{k!r}]", False)
        for k, v in rows.items()
    }
    if set(rows_per_ratio) != {gamma.key(r) for r in ratios}:
        raise _fail(
            source,
            "rows_per_ratio",
            f"keys {sorted(rows_per_ratio, reverse=True)} do not match ratios {[gamma.key(r) for r in ratios]}",
        )
    pspec = _mapping(_require(data, "prompt", source), source, "prompt")
    fmt = _require(pspec, "format_version", source, "prompt.")
    if type(fmt) is not int or fmt != prompt.FORMAT_VERSION:
        raise _fail(
            source,
            "prompt.format_version",
            f"{fmt!r} is not this tokenskip's prompt format "
            f"({prompt.FORMAT_VERSION}); the adapter would be prompted wrongly",
        )
    sep = _require(pspec, "separator", source, "prompt.")
    if not isinstance(sep, str) or not sep:
        raise _fail(source, "prompt.separator", f"must be a non-empty string, got {sep!r}")
    train = _mapping(_require(data, "train", source), source, "train")
    for name in ("dataset", "data_sha256"):
        v = _require(train, name, source, "train.")
        if not isinstance(v, str) or not v:
            raise _fail(source, f"train.{name}", f"must be a non-empty string, got {v!r}")
    _mapping(_require(train, "config", source, "train."), source, "train.config")
    evaluation = None
    if data.get("evaluation") is not None:
        ev = _mapping(data["evaluation"], source, "evaluation")
        datasets = _mapping(_require(ev, "datasets", source, "evaluation."), source, "evaluation.datasets")
        evaluation = {
            str(name): _parse_dataset(d, source, f"evaluation.datasets[{name!r}]") for name, d in datasets.items()
        }
    return AdapterCard(
        base,
        ratios,
        dict(sorted(rows_per_ratio.items(), key=lambda kv: -float(kv[0]))),
        dict(pspec),
        dict(train),
        evaluation,
        version,
    )


def _parse_dataset(d: Any, source: str, where: str) -> DatasetEval:
    d = _mapping(d, source, where)
    results = _require(d, "results", source, f"{where}.")
    if not isinstance(results, str) or not results:
        raise _fail(source, f"{where}.results", f"must be a non-empty string, got {results!r}")
    per = _mapping(_require(d, "ratios", source, f"{where}."), source, f"{where}.ratios")
    ratios = {}
    for k, v in per.items():
        w = f"{where}.ratios[{k!r}]"
        v = _mapping(v, source, w)
        ratios[_gamma_key(k, source, f"{where}.ratios key {k!r}")] = RatioEval(
            expected_cot_tokens=_number(
                _require(v, "expected_cot_tokens", source, f"{w}."), source, f"{w}.expected_cot_tokens", optional=False
            ),
            median_cot_tokens=_number(v.get("median_cot_tokens"), source, f"{w}.median_cot_tokens"),
            actual_ratio=_number(v.get("actual_ratio"), source, f"{w}.actual_ratio"),
            accuracy=_number(v.get("accuracy"), source, f"{w}.accuracy", 0.0, 1.0),
            runaway_share=_number(v.get("runaway_share"), source, f"{w}.runaway_share", 0.0, 1.0),
        )
    split = d.get("split")
    if split is not None and not isinstance(split, str):
        raise _fail(source, f"{where}.split", f"must be a string, got {split!r}")
    return DatasetEval(
        results,
        ratios,
        _int(d.get("max_new_tokens"), source, f"{where}.max_new_tokens"),
        _int(d.get("n"), source, f"{where}.n"),
        split,
        None if d.get("evaluated_at") is None else str(d["evaluated_at"]),
    )


# --------------------------------------------------------------------------- files


def card_path(adapter_dir: str | os.PathLike) -> Path:
    return Path(adapter_dir) / CARD_FILE


def read_card(adapter_dir: str | os.PathLike, missing_ok: bool = False) -> AdapterCard | None:
    """The validated card of an adapter directory (None when absent and ``missing_ok``)."""
    path = card_path(adapter_dir)
    if not path.is_file():
        if missing_ok:
            return None
        raise CardError(f"{path}: no adapter card (train writes {CARD_FILE} beside the adapter weights)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{path}: not readable JSON: {e}") from None
    return _parse(data, str(path))


def write_card(adapter_dir: str | os.PathLike, card: AdapterCard) -> Path:
    """Validate and write the card atomically (a reader never sees half a file)."""
    from tokenskip.artifacts import atomic_write_json

    path = card_path(adapter_dir)
    data = card.to_dict()
    _parse(data, str(path))
    atomic_write_json(path, data)
    return path


def add_evaluation(
    adapter_dir: str | os.PathLike, datasets: Mapping[str, DatasetEval], dest_dir: str | os.PathLike | None = None
) -> Path:
    """Add evaluated datasets to the card of ``adapter_dir``; written atomically to
    ``dest_dir`` (default: the adapter directory itself). Returns the path written."""
    card = read_card(adapter_dir)
    return write_card(dest_dir if dest_dir is not None else adapter_dir, card.with_evaluation(datasets))


# --------------------------------------------------------------------------- building


def prompt_spec() -> dict:
    """The prompt section: format version, separator and marker of :mod:`tokenskip.prompt`."""
    return prompt.format_spec()


def rows_per_ratio(rows: Iterable[Mapping]) -> dict[str, int]:
    """Training rows per γ key, largest γ first.

    >>> rows_per_ratio([{"ratio": 1}, {"ratio": 0.5}, {"ratio": 0.50000001}])
    {'1.0': 1, '0.5': 2}
    """
    out: dict[str, int] = {}
    for i, r in enumerate(rows):
        k = gamma.key(r.get("ratio"), f"row {i}: ratio")
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -float(kv[0])))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train_summary(config: Mapping) -> dict:
    """The part of a resolved train config a card keeps (hyper-parameters, LoRA shape)."""
    out = {k: config[k] for k in TRAIN_SUMMARY_KEYS if k in config}
    lora = config.get("lora")
    if isinstance(lora, Mapping):
        out["lora"] = {k: lora[k] for k in ("r", "alpha", "dropout", "target_modules") if k in lora}
    scaling = config.get("scaling")
    if isinstance(scaling, Mapping) and "num_workers" in scaling:
        out["num_workers"] = scaling["num_workers"]
    return out


def card_for_training(
    base_model: str, rows: list[Mapping], dataset: str, train_file: str | os.PathLike, config: Mapping
) -> AdapterCard:
    """The card train writes: γ and row counts from the SFT rows it trains on, the data's
    location and content hash, and a summary of the config."""
    counts = rows_per_ratio(rows)
    train = {
        "dataset": str(dataset),
        "train_file": str(train_file),
        "data_sha256": file_sha256(train_file),
        "rows": len(rows),
        "config": train_summary(config),
    }
    card = AdapterCard(str(base_model), [gamma.parse(k) for k in counts], counts, prompt_spec(), train)
    return _parse(card.to_dict(), "<new card>")


# --------------------------------------------------------------------------- evaluation


def _first_number(row: Mapping, *names: str) -> float | None:
    for n in names:
        v = row.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def evaluation_from_results(
    results: Any, results_path: str | os.PathLike, source: str | None = None
) -> dict[str, DatasetEval]:
    """Per dataset, the TokenSkip rows of an evaluate ``results.json`` as card entries.

    Reads ``datasets.<name>.conditions[]`` rows with ``method: tokenskip``; the expected
    CoT tokens are ``mean_cot_tokens`` (``mean_tokens`` in results written before CoT
    tokens were counted separately), the runaway share ``runaway_share`` (else ``hit_limit``).

    >>> res = {"datasets": {"gsm8k": {"n": 2, "max_new_tokens": 64, "conditions": [
    ...     {"method": "original", "ratio": None, "mean_tokens": 50},
    ...     {"method": "tokenskip", "ratio": 1.0, "mean_tokens": 40, "median_tokens": 38, "accuracy": 0.5,
    ...      "hit_limit": 0.0},
    ...     {"method": "tokenskip", "ratio": 0.5, "mean_cot_tokens": 18, "mean_tokens": 25, "accuracy": 0.5}]}}}
    >>> ev = evaluation_from_results(res, "r.json")
    >>> {k: v.expected_cot_tokens for k, v in ev["gsm8k"].ratios.items()}, ev["gsm8k"].ratios["1.0"].runaway_share
    ({'1.0': 40.0, '0.5': 18.0}, 0.0)
    """
    source = source or str(results_path)
    if not isinstance(results, dict) or not isinstance(results.get("datasets"), dict):
        raise CardError(f"{source}: not an evaluate results.json (no 'datasets' mapping)")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out: dict[str, DatasetEval] = {}
    for name, ds in results["datasets"].items():
        if not isinstance(ds, dict) or not isinstance(ds.get("conditions"), list):
            raise CardError(f"{source}: datasets[{name!r}].conditions: missing or not a list")
        per: dict[str, RatioEval] = {}
        for i, row in enumerate(ds["conditions"]):
            if not isinstance(row, dict) or row.get("method") != "tokenskip" or row.get("ratio") is None:
                continue
            where = f"{source}: datasets[{name!r}].conditions[{i}]"
            try:
                k = gamma.key(row["ratio"], f"{where}.ratio")
            except ValueError as e:
                raise CardError(str(e)) from None
            tokens = _first_number(row, "mean_cot_tokens", "mean_tokens")
            if tokens is None:
                continue  # no samples at this γ: nothing to route on
            per[k] = RatioEval(
                expected_cot_tokens=tokens,
                median_cot_tokens=_first_number(row, "median_cot_tokens", "median_tokens"),
                actual_ratio=_first_number(row, "actual_ratio"),
                accuracy=_first_number(row, "accuracy"),
                runaway_share=_first_number(row, "runaway_share", "hit_limit"),
            )
        mnt = ds.get("max_new_tokens")
        n = ds.get("n")
        out[str(name)] = DatasetEval(
            str(results_path),
            per,
            mnt if isinstance(mnt, int) else None,
            n if isinstance(n, int) else None,
            ds.get("split") if isinstance(ds.get("split"), str) else None,
            now,
        )
    return out


def expected_cot_tokens(
    datasets: Mapping[str, DatasetEval], dataset: str | None = None, source: str = "evaluation"
) -> dict[float, float]:
    """γ -> expected CoT tokens of one evaluated dataset (the first one when ``dataset`` is None).

    >>> expected_cot_tokens({"gsm8k": DatasetEval("r.json", {"1.0": RatioEval(40.0), "0.5": RatioEval(18.0)})})
    {1.0: 40.0, 0.5: 18.0}
    """
    if not datasets:
        return {}
    if dataset is None:
        dataset = next(iter(datasets))
    if dataset not in datasets:
        raise CardError(f"{source}: dataset {dataset!r} was not evaluated (evaluated: {', '.join(datasets)})")
    return {gamma.parse(k): v.expected_cot_tokens for k, v in datasets[dataset].ratios.items()}


def record_evaluation(
    adapter_dir: str | os.PathLike, results: Mapping, results_path: str | os.PathLike, fallback_dir: str | os.PathLike
) -> Path | None:
    """Evaluate's one call: add the results' TokenSkip figures to the adapter's card.

    The card is updated in the adapter directory when that is writable; otherwise the
    updated card is written to ``fallback_dir`` (beside results.json) and a warning says
    so. An adapter without a card (not trained by tokenskip) is left alone: None.
    """
    card = read_card(adapter_dir, missing_ok=True)
    if card is None:
        log.warning(
            "%s has no %s (not trained by tokenskip?): evaluation not recorded on an adapter card; "
            "serve it with eval_results: %s for budget routing",
            adapter_dir,
            CARD_FILE,
            results_path,
        )
        return None
    updated = card.with_evaluation(evaluation_from_results(results, str(results_path)))
    if os.access(adapter_dir, os.W_OK):
        try:
            path = write_card(adapter_dir, updated)
            log.info("adapter card updated with the evaluation: %s", path)
            return path
        except OSError as e:
            reason = str(e)
    else:
        reason = "directory not writable"
    path = write_card(fallback_dir, updated)
    log.warning(
        "adapter directory %s: %s; the card with this evaluation is written to %s instead (copy it beside "
        "the adapter weights to serve with it)",
        adapter_dir,
        reason,
        path,
    )
    return path


__all__ = [
    "CARD_FILE",
    "CARD_VERSION",
    "AdapterCard",
    "CardError",
    "DatasetEval",
    "RatioEval",
    "add_evaluation",
    "card_for_training",
    "evaluation_from_results",
    "expected_cot_tokens",
    "read_card",
    "record_evaluation",
    "rows_per_ratio",
    "write_card",
]
