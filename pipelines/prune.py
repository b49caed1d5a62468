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

from tokenskip import artifacts
from tokenskip.config import PruneConfig, to_dict

log = logging.getLogger("tokenskip")

OUTPUT_COLUMNS = ("id", "ratio", "pruned", "cot_tokens", "pruned_tokens", "actual_ratio")


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
        from tokenskip.pruning import prune_rows

        c = self.cfg
        for col in (c.id_field, c.text_field):
            if col not in batch:
                raise KeyError(f"prune: input batch has no column {col!r} (columns: {sorted(batch)})")
        ids = [str(x) for x in batch[c.id_field]]
        texts = ["" if t is None else str(t) for t in batch[c.text_field]]
        rows = prune_rows(ids, texts, c.ratios, self.scorer, self.counter, c.force_tokens, c.force_reserve_digit,
                          c.drop_consecutive)
        return {k: [r[k] for r in rows] for k in OUTPUT_COLUMNS}


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
    """Input rows split into (good, rejects); rejects carry a reason naming the field."""
    if not cfg.input:
        raise ValueError("prune.input is not set (a pipeline config sets it to <run_dir>/cots)")
    path = _input_file(cfg.input)
    rows = artifacts.read_rows(path)
    if rows and cfg.text_field not in rows[0] and not any(cfg.text_field in r for r in rows):
        raise KeyError(f"{path}: no column {cfg.text_field!r} (prune.text_field); columns: {sorted(rows[0])}")
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    good, bad, seen = [], [], set()
    for i, r in enumerate(rows):
        rid, text = r.get(cfg.id_field), r.get(cfg.text_field)
        where = f"{path}: row {i}"
        if rid is None or str(rid) == "":
            bad.append({"id": None, "line": i, "reason": f"{where}: missing {cfg.id_field!r}"})
        elif str(rid) in seen:
            bad.append({"id": str(rid), "line": i, "reason": f"{where}: duplicate id {rid!r}"})
        elif not isinstance(text, str):
            bad.append({"id": str(rid), "line": i, "reason": f"{where}: field {cfg.text_field!r} must be a string, got {type(text).__name__}"})
        else:
            seen.add(str(rid))
            good.append({cfg.id_field: str(rid), cfg.text_field: text})
    return good, bad, str(path)


def run_prune(cfg: PruneConfig, force: bool = False) -> dict:
    """Prune ``cfg.input`` into ``cfg.output_dir``; returns the manifest."""
    import ray.data

    if not cfg.output_dir:
        raise ValueError("prune.output_dir is not set (a pipeline config sets it from run_dir)")
    out = Path(cfg.output_dir)
    finished = artifacts.skip_if_finished(out, force, cfg)
    if finished is not None:
        return finished
    good, bad, src = read_input(cfg)
    writer = artifacts.PartWriter(out)
    if bad:
        artifacts.write_rows(writer.rejects / "part-input.jsonl", bad, "jsonl")
    done = writer.done_ids(include_rejects=False)
    todo = [r for r in good if r[cfg.id_field] not in done]
    log.info("prune: %d rows, %d done, %d to go; scorer %s (%s), ratios %s", len(good), len(good) - len(todo), len(todo),
             cfg.scorer, cfg.scorer_model, cfg.ratios)
    t0 = time.perf_counter()
    if todo:
        ds = prune_stage(ray.data.from_items(todo), cfg)
        n = 0
        for batch in ds.iter_batches(batch_size=cfg.batch_size * len(cfg.ratios), batch_format="pyarrow"):
            rows = batch.to_pylist()
            writer.write(rows)
            n += len(rows)
            log.info("prune: committed %d/%d rows", n, len(todo) * len(cfg.ratios))
    elapsed = time.perf_counter() - t0
    rows, rejects = writer.finalize(cfg.format)
    per_ratio = {}
    for r in cfg.ratios:
        sel = [x for x in rows if x["ratio"] == r]
        tot_cot = sum(x["cot_tokens"] for x in sel)
        per_ratio[str(r)] = {
            "rows": len(sel),
            "mean_actual_ratio": (sum(x["actual_ratio"] for x in sel) / len(sel)) if sel else None,
            "token_ratio": (sum(x["pruned_tokens"] for x in sel) / tot_cot) if tot_cot else None,
        }
    counts = {"total": len(good) + len(bad), "pruned": len({x["id"] for x in rows}), "rows": len(rows),
              "rejected": len(rejects)}
    return artifacts.write_manifest(out, "prune", cfg, inputs={"input": src}, counts=counts, per_ratio=per_ratio,
                                    elapsed_s=round(elapsed, 3), output=f"data.{cfg.format}")
