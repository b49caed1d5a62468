"""Stages 2 and 4: select CoTs for pruning, then build the SFT set.

``select_cots`` (the ``cots`` stage, :class:`~tokenskip.config.CotsConfig`): keep correct
generations whose CoT is within ``max_cot_tokens`` (or use the dataset's own solutions with
``cot_source: gold``) -> the ``cots`` stage directory that the prune stage reads.

``run_build_sft`` (the ``build_sft`` stage, :class:`~tokenskip.config.BuildSFTConfig`): join
each CoT of the ``cots`` directory with its pruned versions, draw γ per question (seeded; or
keep every γ), format user turn and completion with :mod:`tokenskip.prompt` (via
:mod:`tokenskip.sft`), split train/validation by question, write both files and the
manifest (last).

These stages are light (a tokenizer and a join), so they run in the driver without Ray;
the heavy stages before them (generate, prune) are the Ray Data ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tokenskip import artifacts, data, gamma, sft
from tokenskip.config import MOVED_KEYS, BuildSFTConfig, CotsConfig

log = logging.getLogger("tokenskip.build_sft")

COT_COLUMNS = ("id", "question", "gold", "kind", "cot", "cot_tokens")


def _count_tokens(tokenizer_name: str, texts: list[str]) -> list[int]:
    from transformers import AutoTokenizer

    from tokenskip import assets

    tok = AutoTokenizer.from_pretrained(assets.resolve_model(tokenizer_name))
    if not texts:
        return []
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    return [len(e) for e in enc]


def select_cots(cfg: CotsConfig, force: bool = False) -> dict:
    """Write the ``cots`` stage dir (rows: id, question, gold, kind, cot, cot_tokens)."""
    if not cfg.output_dir:
        raise ValueError("cots.output_dir is not set (a pipeline config sets it to <run_dir>/cots)")
    out = Path(cfg.output_dir)
    done = artifacts.skip_if_finished(out, force, cfg, stage="cots")
    if done is not None:
        return done
    kept: list[dict] = []
    rejects: list[dict] = []
    if cfg.cot_source == "generated":
        if not cfg.generations:
            raise ValueError("cots.generations is not set (needed for cot_source: generated)")
        gen_dir = Path(cfg.generations)
        artifacts.require_complete(gen_dir)
        rows = artifacts.read_rows(gen_dir)
        total, correct = len(rows), sum(1 for r in rows if r.get("correct"))
        inputs = {"generations": str(gen_dir)}
        for r in rows:
            for key in ("id", "question", "gold", "correct", "cot_tokens"):
                if key not in r:
                    raise artifacts.StageError(f"{gen_dir}: row {r.get('id')!r} has no field {key!r}")
            cot = r.get("cot") if r.get("cot") is not None else r.get("output")
            why = sft.select_cot(cot, r.get("cot_tokens"), cfg.max_cot_tokens, bool(r.get("correct")))
            if why:
                rejects.append({"id": r["id"], "reason": why})
            else:
                kept.append(
                    {
                        "id": r["id"],
                        "question": r["question"],
                        "gold": r["gold"],
                        "kind": r.get("kind"),
                        "cot": cot,
                        "cot_tokens": int(r["cot_tokens"]),
                    }
                )
    else:
        loaded = data.load_from_config(cfg.data, lenient=True)
        rejects.extend(
            {"id": None, "reason": f"unreadable row: {r['reason']}", "line": r.get("line")} for r in loaded.rejects
        )
        with_solution = [q for q in loaded.rows if q.get("solution") and q["solution"].strip()]
        rejects.extend({"id": q["id"], "reason": "no gold solution"} for q in loaded.rows if q not in with_solution)
        counts_tok = _count_tokens(cfg.target_tokenizer, [q["solution"] for q in with_solution])
        total, correct = len(loaded.rows) + len(loaded.rejects), len(with_solution)
        inputs = {"data": cfg.data.name, "split": cfg.data.split}
        for q, n in zip(with_solution, counts_tok):
            why = sft.select_cot(q["solution"], n, cfg.max_cot_tokens)
            if why:
                rejects.append({"id": q["id"], "reason": why})
            else:
                kept.append(
                    {
                        "id": q["id"],
                        "question": q["question"],
                        "gold": q["gold"],
                        "kind": q["kind"],
                        "cot": q["solution"],
                        "cot_tokens": n,
                    }
                )
    kept.sort(key=lambda r: r["id"])
    why_not = {}
    for r in rejects:
        why_not[str(r["reason"]).split(":")[0]] = why_not.get(str(r["reason"]).split(":")[0], 0) + 1
    artifacts.require_rows(len(kept), f"select_cots ({out}): CoTs kept", f"{total} read, rejected: {why_not}")
    artifacts.write_rows(out / "data.parquet", kept, "parquet")
    artifacts.write_rows(out / "rejects.jsonl", rejects, "jsonl")
    counts = {
        "total": total,
        "correct": correct,
        "kept": len(kept),
        "rejected": len(rejects),
        "mean_cot_tokens": round(sum(r["cot_tokens"] for r in kept) / len(kept), 2) if kept else 0.0,
    }
    log.info("select_cots: %s", counts)
    return artifacts.write_manifest(
        out,
        "cots",
        cfg,
        inputs=dict(inputs, cot_source=cfg.cot_source, target_tokenizer=cfg.target_tokenizer),
        counts=counts,
    )


def _pruned_index(pruned_dir: Path) -> dict[tuple[str, float], dict]:
    artifacts.require_complete(pruned_dir)
    index = {}
    for r in artifacts.read_rows(pruned_dir):
        for key in ("id", "ratio", "pruned", "pruned_tokens"):
            if key not in r:
                raise artifacts.StageError(f"{pruned_dir}: row {r.get('id')!r} has no field {key!r}")
        index[(str(r["id"]), gamma.canonical(r["ratio"]))] = r
    return index


def _upgrade_fingerprint(out: Path, cfg: BuildSFTConfig) -> None:
    """A build_sft directory fingerprinted while its config still held the cots stage's keys
    (``MOVED_KEYS``) and read ``<output_dir>/../cots``: drop those keys and record the cots
    directory, so that a stage finished then is reused, and a real change still refused."""
    path = out / artifacts.FINGERPRINT
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    moved = set(MOVED_KEYS[BuildSFTConfig])
    if not isinstance(old, dict) or old.get("_stage", "build_sft") != "build_sft" or "cot_source" not in old:
        return
    if old.get("cots_dir") is not None or Path(cfg.cots_dir).resolve() != (out.parent / "cots").resolve():
        return  # it read another directory: leave the difference to check_fingerprint
    kept = {k: v for k, v in old.items() if k.removeprefix("_upstream.").split(".")[0] not in moved}
    new = artifacts.config_fingerprint(cfg, "build_sft")
    kept.update({k: new[k] for k in ("cots_dir", "_upstream.cots_dir") if k in new})
    artifacts.atomic_write_json(path, kept)
    log.info("%s: fingerprint upgraded (the cots stage's keys moved to its own config)", out)


def run_build_sft(cfg: BuildSFTConfig, force: bool = False) -> dict:
    """Join CoTs with pruned CoTs, draw γ, format, split, write train/validation + manifest."""
    if not cfg.output_dir:
        raise ValueError("build_sft.output_dir is not set (a pipeline config sets it from run_dir)")
    if not cfg.cots_dir:
        raise ValueError("build_sft.cots_dir is not set (a pipeline config sets it to <run_dir>/cots)")
    out = Path(cfg.output_dir)
    _upgrade_fingerprint(out, cfg)
    done = artifacts.skip_if_finished(out, force, cfg)
    if done is not None:
        return done
    cdir = Path(cfg.cots_dir)
    artifacts.require_complete(cdir)
    cots = artifacts.read_rows(cdir)
    needs_pruned = any(gamma.canonical(r) < 1.0 for r in cfg.ratios)
    index = {}
    if needs_pruned:
        if not cfg.pruned:
            raise ValueError("build_sft.pruned is not set but ratios < 1 need the prune stage's output")
        index = _pruned_index(Path(cfg.pruned))

    rows, rejects = [], []
    for c in cots:
        for ratio in sft.ratios_for(str(c["id"]), cfg.ratios, cfg.ratio_sampling, cfg.seed):
            if gamma.canonical(ratio) >= 1.0:
                rows.append(sft.sft_row(c, 1.0, c["cot"], int(c["cot_tokens"])))
                continue
            p = index.get((str(c["id"]), gamma.canonical(ratio)))
            if p is None:
                rejects.append({"id": c["id"], "ratio": ratio, "reason": f"no pruned CoT at ratio {ratio}"})
                continue
            if not str(p["pruned"]).strip():
                rejects.append({"id": c["id"], "ratio": ratio, "reason": "pruned CoT is empty"})
                continue
            # Token counts from the prune stage (target tokenizer) are authoritative.
            cot_tokens = int(p.get("cot_tokens") or c["cot_tokens"])
            rows.append(sft.sft_row(c, ratio, p["pruned"], cot_tokens, int(p["pruned_tokens"])))
    artifacts.require_rows(len(rows), f"build_sft ({out}): SFT rows", f"{len(cots)} CoTs, {len(rejects)} rejected")
    train, val = sft.assign_splits(rows, cfg.val_fraction, cfg.seed)
    ext = "parquet" if cfg.format == "parquet" else "jsonl"
    artifacts.write_rows(out / f"train.{ext}", train, cfg.format)
    artifacts.write_rows(out / f"validation.{ext}", val, cfg.format)
    artifacts.write_rows(out / "rejects.jsonl", rejects, "jsonl")
    per_ratio = sft.ratio_stats(rows)
    counts = {
        "cots": len(cots),
        "rows": len(rows),
        "train": len(train),
        "validation": len(val),
        "rejected": len(rejects),
        "per_ratio": {k: v["rows"] for k, v in per_ratio.items()},
    }
    log.info("build_sft: %s", counts)
    return artifacts.write_manifest(
        out,
        "build_sft",
        cfg,
        inputs={"cots": str(cdir), "pruned": str(cfg.pruned) if needs_pruned else None},
        counts=counts,
        ratio_stats=per_ratio,
        mean_actual_ratio={k: v["mean_actual_ratio"] for k, v in per_ratio.items()},
        files={"train": f"train.{ext}", "validation": f"validation.{ext}"},
    )
