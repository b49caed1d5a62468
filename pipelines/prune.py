"""Prune stage on Ray Data: an actor pool whose actors load the scorer once and prune
whole batches at every ratio from one scoring pass.

``prune_stage(ds, cfg)`` is lazy and works on any Ray Dataset with the id and text
columns; ``run_prune(cfg)`` reads a JSONL/Parquet file or a finished stage directory,
runs the stage, commits parts as batches finish (a re-run skips committed ids), and
writes ``data.parquet``, ``rejects.jsonl`` and, last, ``manifest.json``.

Output rows: id, ratio, pruned, cot_tokens, pruned_tokens, actual_ratio (token counts
in ``cfg.target_tokenizer``'s tokens).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipelines import progress
from tokenskip import artifacts
from tokenskip.config import PruneConfig, to_dict

log = logging.getLogger("tokenskip")

OUTPUT_COLUMNS = (
    "id",
    "ratio",
    "pruned",
    "cot_tokens",
    "pruned_tokens",
    "actual_ratio",
    "numbers_kept",
    "equations_kept",
)


class PruneUDF:
    """Ray Data callable class: scorer + target tokenizer loaded once per actor."""

    def __init__(self, cfg: dict) -> None:
        from tokenskip.pruning import TokenCounter, load_scorer

        self.cfg = PruneConfig(**cfg)
        c = self.cfg
        kwargs: dict[str, Any] = {}
        if c.scorer == "llmlingua2":
            kwargs["reference_quirks"] = c.reference_quirks
        self.scorer = load_scorer(c.scorer, c.scorer_model, device=c.device, batch_size=c.model_batch_size, **kwargs)
        self.counter = TokenCounter(c.target_tokenizer)

    def __call__(self, batch: dict) -> dict:
        c = self.cfg
        for col in (c.id_field, c.text_field):
            if col not in batch:
                raise KeyError(f"prune: input batch has no column {col!r} (columns: {sorted(batch)})")
        ids = [str(x) for x in batch[c.id_field]]
        texts = ["" if t is None else str(t) for t in batch[c.text_field]]
        try:
            rows = self._prune(ids, texts)
        except Exception as batch_error:  # one row must not fail the job: retry row by row
            log.warning(
                "prune: batch of %d failed (%s: %s); retrying row by row",
                len(ids),
                type(batch_error).__name__,
                batch_error,
            )
            rows, errors = [], []
            for rid, text in zip(ids, texts):
                try:
                    rows.extend(self._prune([rid], [text]))
                except Exception as e:
                    errors.append(e)
                    rows.append(
                        _error_row(
                            rid,
                            f"scorer error: {type(e).__name__}: {e}"[:500],
                            "input" if isinstance(e, (ValueError, TypeError, KeyError, IndexError)) else "failure",
                        )
                    )
            if len(ids) > 1 and len(errors) == len(ids):
                raise RuntimeError(
                    f"prune: every one of {len(ids)} rows failed on its own too (last: "
                    f"{type(errors[-1]).__name__}: {errors[-1]}); the scorer is failing, not the rows"
                ) from errors[-1]
        return {k: [r.get(k, "") if k in ERROR_COLUMNS else r[k] for r in rows] for k in OUTPUT_COLUMNS + ERROR_COLUMNS}

    def _prune(self, ids: list[str], texts: list[str]) -> list[dict]:
        from tokenskip.pruning import prune_rows

        c = self.cfg
        return prune_rows(
            ids,
            texts,
            c.ratios,
            self.scorer,
            self.counter,
            c.force_tokens,
            c.force_reserve_digit,
            c.drop_consecutive,
            cut=c.resolved_cut(),
            protect=c.resolved_protect(),
        )


# A row whose pruning raised: kept apart as a reject (reason + kind) by run_prune.
ERROR_COLUMNS = ("error", "error_kind")


def _error_row(rid: str, reason: str, kind: str) -> dict:
    row: dict[str, Any] = {k: None for k in OUTPUT_COLUMNS}
    row.update(
        id=rid,
        ratio=float("nan"),
        pruned="",
        cot_tokens=0,
        pruned_tokens=0,
        actual_ratio=float("nan"),
        error=reason,
        error_kind=kind,
    )
    return row


def ratio_summary(sel: list[dict]) -> dict:
    """Per γ: rows, mean / std / min / max of pruned/original tokens (target model), the token-weighted
    ratio, and the share of numbers and equations kept (mean, and rows keeping every number)."""
    import statistics

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return round(sum(vals) / len(vals), 4) if vals else None

    ratios = [x["actual_ratio"] for x in sel]
    tot_cot = sum(x["cot_tokens"] for x in sel)
    nums = [x.get("numbers_kept") for x in sel if x.get("numbers_kept") is not None]
    return {
        "rows": len(sel),
        "mean_actual_ratio": mean(ratios),
        "std_actual_ratio": round(statistics.pstdev(ratios), 4) if ratios else None,
        "min_actual_ratio": round(min(ratios), 4) if ratios else None,
        "max_actual_ratio": round(max(ratios), 4) if ratios else None,
        "token_ratio": round(sum(x["pruned_tokens"] for x in sel) / tot_cot, 4) if tot_cot else None,
        "numbers_kept": mean(nums),
        "rows_with_every_number": round(sum(v >= 1.0 for v in nums) / len(nums), 4) if nums else None,
        "equations_kept": mean(x.get("equations_kept") for x in sel),
    }


def prune_stage(ds, cfg: PruneConfig):
    """Lazy Ray Data stage: ``ds`` rows (id_field, text_field) -> one row per (id, ratio)."""
    import ray.data

    cfg_dict = to_dict(cfg)
    return ds.map_batches(
        PruneUDF,
        fn_constructor_kwargs={"cfg": cfg_dict},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus or None,
    )


def _input_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        return artifacts.data_file(p)
    if not p.is_file():
        raise FileNotFoundError(f"prune.input: {p} does not exist")
    if p.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"prune.input: {p} must be .jsonl or .parquet (or a stage directory)")
    return p


def read_input(cfg: PruneConfig) -> tuple[list[dict], list[dict], str]:
    """Input rows split into (good, rejects). A bad row (a line that is not a JSON object, no id, a
    repeated id, a CoT that is not a string) is a reject naming the file and line (a Parquet file's
    row, from 1) and carrying the row as read, so nothing is lost; only a missing CoT column fails."""
    from tokenskip.data import iter_file, reject_row

    if not cfg.input:
        raise ValueError("prune.input is not set (a pipeline config sets it to <run_dir>/cots)")
    path = _input_file(cfg.input)
    entries = list(iter_file(path))
    dicts = [r for _, r, _ in entries if isinstance(r, dict)]
    if dicts and not any(cfg.text_field in r for r in dicts):
        raise KeyError(f"{path}: no column {cfg.text_field!r} (prune.text_field); columns: {sorted(dicts[0])}")
    if cfg.limit is not None:
        entries = entries[: cfg.limit]
    jsonl = path.suffix == ".jsonl"
    good, bad, seen = [], [], set()
    for line, r, err in entries:
        parsed = err is None
        rid = r.get(cfg.id_field) if isinstance(r, dict) else None
        rid = None if rid is None or str(rid) == "" else str(rid)
        if parsed:
            text = r.get(cfg.text_field) if isinstance(r, dict) else None
            if not isinstance(r, dict):
                err = f"not a JSON object (got {type(r).__name__})"
            elif rid is None:
                err = f"missing {cfg.id_field!r}"
            elif rid in seen:
                err = f"duplicate id {r[cfg.id_field]!r}"
            elif not isinstance(text, str):
                err = f"field {cfg.text_field!r} must be a string, got {type(text).__name__}"
            else:
                seen.add(rid)
                good.append({cfg.id_field: rid, cfg.text_field: text})
                continue
        where = f"{path}:{line}" if jsonl else f"{path}: row {line}"
        bad.append({"id": rid, "line": line, "reason": f"{where}: {err}", "row": reject_row(r, parsed)})
    return good, bad, str(path)


def run_prune(cfg: PruneConfig, force: bool = False) -> dict:
    """Prune ``cfg.input`` into ``cfg.output_dir``; returns the manifest."""

    if not cfg.output_dir:
        raise ValueError("prune.output_dir is not set (a pipeline config sets it from run_dir)")
    out = Path(cfg.output_dir)
    with artifacts.stage_lock(out):  # one writer per stage directory
        return _run_prune(cfg, out, force)


def _run_prune(cfg: PruneConfig, out: Path, force: bool) -> dict:
    import ray.data

    finished = artifacts.skip_if_finished(out, force, cfg)
    if finished is not None:
        return finished
    good, bad, src = read_input(cfg)
    artifacts.require_rows(len(good), f"prune: input {src}", f"{len(bad)} unusable rows" if bad else "")
    writer = artifacts.PartWriter(out)
    if bad:  # kind "load": unusable input rows, never ids that count as done
        artifacts.write_rows(writer.rejects / "part-input.jsonl", [dict(r, reason_kind="load") for r in bad], "jsonl")
    retried = writer.drop_failures()
    done = writer.done_ids()
    todo = [r for r in good if r[cfg.id_field] not in done]
    log.info(
        "prune: %d rows, %d done, %d to go (%d failed before, retried); scorer %s (%s), ratios %s",
        len(good),
        len(good) - len(todo),
        len(todo),
        retried,
        cfg.scorer,
        cfg.scorer_model,
        cfg.ratios,
    )
    t0 = time.perf_counter()
    if todo:
        ds = prune_stage(ray.data.from_items(todo), cfg)
        n = 0
        for batch in ds.iter_batches(batch_size=cfg.batch_size * len(cfg.ratios), batch_format="pyarrow"):
            rows = batch.to_pylist()
            writer.reject(
                {"id": r["id"], "reason": r["error"], "reason_kind": r.get("error_kind") or "failure"}
                for r in rows
                if r.get("error")
            )
            writer.write([{k: v for k, v in r.items() if k not in ERROR_COLUMNS} for r in rows if not r.get("error")])
            n += len(rows)
            log.info("prune: committed %d/%d rows", n, len(todo) * len(cfg.ratios))
            progress.report(n, len(todo) * len(cfg.ratios), "rows")
    elapsed = time.perf_counter() - t0
    rows, rejects = writer.finalize(cfg.format)
    kinds: dict[str, int] = {}
    for r in rejects:
        kinds[artifacts.reason_kind(r)] = kinds.get(artifacts.reason_kind(r), 0) + 1
    artifacts.check_reject_share(len(rejects), len(good) + len(bad), cfg.max_reject_share, f"prune ({out})", kinds)
    per_ratio = {str(r): ratio_summary([x for x in rows if x["ratio"] == r]) for r in cfg.ratios}
    counts = {
        "total": len(good) + len(bad),
        "pruned": len({x["id"] for x in rows}),
        "rows": len(rows),
        "rejected": len(rejects),
    }
    if writer.quarantined or retried:
        counts.update(quarantined_parts=len(writer.quarantined), retried_failures=retried)
    unit = (
        {"cut": "budget", "unit": f"{cfg.target_tokenizer} tokens (whole CoT)", "protect": cfg.resolved_protect()}
        if cfg.resolved_cut() == "budget"
        else {
            "cut": "percentile",
            "unit": "cl100k (gpt-3.5) tokens per word, per chunk (llmlingua parity)",
            "protect": "none",
        }
    )
    return artifacts.write_manifest(
        out,
        "prune",
        cfg,
        inputs={"input": src},
        counts=counts,
        per_ratio=per_ratio,
        cut=unit,
        elapsed_s=round(elapsed, 3),
        output=f"data.{cfg.format}",
    )
