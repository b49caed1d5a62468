"""Adapter ids: validation, resolution to a local PEFT dir (downloading URIs), metadata.

No Ray here. ``<base>:<adapter>`` names an adapter; the adapter id is a plain name
(never a path from the client): it is looked up in the app config's adapter table,
else joined to ``adapter_root`` (a local/NFS dir or an object-store URI).

>>> split_model("tiny:gsm8k-lora", "tiny")
'gsm8k-lora'
>>> split_model("tiny", "tiny") is None
True
>>> validate_adapter_id("../etc")
Traceback (most recent call last):
...
serving.routing.ApiError: 400: invalid adapter id '../etc': use letters, digits, '.', '_', '-' (no paths)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.routing import ApiError, normalize_ratios, parse_ratio_table, table_from_eval_results

log = logging.getLogger("tokenskip.serving")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_URI_RE = re.compile(r"^[a-z][a-z0-9+.-]*://")
ADAPTER_META = "tokenskip.json"


def validate_adapter_id(adapter_id: str) -> str:
    """A safe adapter name: no separators, no '..', no absolute paths, no URIs.

    >>> validate_adapter_id("tokenskip-gsm8k_v1.2")
    'tokenskip-gsm8k_v1.2'
    >>> validate_adapter_id("/abs/path")
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 400: invalid adapter id '/abs/path': use letters, digits, '.', '_', '-' (no paths)
    """
    if not isinstance(adapter_id, str) or not _ID_RE.match(adapter_id) or ".." in adapter_id:
        raise ApiError(400, f"invalid adapter id {adapter_id!r}: use letters, digits, '.', '_', '-' (no paths)",
                       param="model", code="invalid_adapter_id")
    return adapter_id


def split_model(model: Any, base_id: str) -> str | None:
    """The adapter id in ``model`` (None = the base model); 404 for another base.

    >>> split_model("other:x", "tiny")
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 404: model 'other:x' not found; this endpoint serves 'tiny' and 'tiny:<adapter>'
    """
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model must be a non-empty string", param="model")
    base, sep, adapter = model.partition(":")
    if base != base_id:
        raise ApiError(404, f"model {model!r} not found; this endpoint serves {base_id!r} and {base_id + ':<adapter>'!r}",
                       param="model", code="model_not_found")
    if not sep:
        return None
    return validate_adapter_id(adapter)


def is_uri(path: str) -> bool:
    return bool(_URI_RE.match(path))


def join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_uri(root) else os.path.join(root, name)


@dataclass
class AdapterInfo:
    """What a replica needs to serve an adapter."""

    name: str
    local_dir: str
    ratios: list[float]
    expected_cot_tokens: dict[float, float] = field(default_factory=dict)
    source: str = ""


def _download(uri: str, cache_dir: str) -> str:
    """Copy an adapter dir from an object store (pyarrow.fs: s3://, gs://, file://, ...).

    The copy lands in a temp dir and is renamed, so concurrent loaders never see half a dir.
    """
    import pyarrow.fs as pafs

    dest = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (dest / "adapter_config.json").is_file():
        return str(dest)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
    except Exception as e:  # bad scheme, missing credentials, unreachable store
        raise ApiError(404, f"adapter {uri!r} cannot be read: {e}", param="model", code="adapter_not_found") from None
    if info.type != pafs.FileType.Directory or fs.get_file_info(path.rstrip("/") + "/adapter_config.json").type != pafs.FileType.File:
        raise ApiError(404, f"adapter {uri!r} not found (no adapter_config.json)", param="model", code="adapter_not_found")
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    if os.path.isdir(dest):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return str(dest)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _find_key(obj: Any, key: str, depth: int = 3) -> Any:
    """The first ``key`` in a nested dict (a manifest keeps ratios under config.*)."""
    if not isinstance(obj, dict) or depth < 0:
        return None
    if key in obj:
        return obj[key]
    for v in obj.values():
        found = _find_key(v, key, depth - 1)
        if found is not None:
            return found
    return None


def read_adapter_metadata(local_dir: str) -> tuple[list[float] | None, dict[float, float]]:
    """(ratios, expected CoT tokens per γ) from ``<dir>/tokenskip.json`` or the train
    stage's ``<dir>/../manifest.json`` (+ an evaluation ``results.json`` it names)."""
    ratios, table = None, {}
    for path in (Path(local_dir) / ADAPTER_META, Path(local_dir).parent / "manifest.json"):
        meta = _read_json(path) if path.is_file() else None
        if not isinstance(meta, dict):
            continue
        r = _find_key(meta, "ratios")
        if ratios is None and isinstance(r, list) and r:
            try:
                ratios = normalize_ratios(r, f"{path}: ratios")
            except ValueError as e:
                log.warning("ignoring ratios in %s: %s", path, e)
        t = meta.get("expected_cot_tokens")
        if isinstance(t, dict) and not table:
            table = parse_ratio_table(t, f"{path}: expected_cot_tokens")
    return ratios, table


class AdapterResolver:
    """Resolve adapter ids with the app config (configured table, then adapter_root)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.cache_dir = cfg.adapter_cache_dir or os.path.join(
            os.environ.get("TOKENSKIP_HOME", os.path.expanduser("~/.cache/tokenskip")), "serve-adapters")

    def source(self, adapter_id: str) -> str:
        validate_adapter_id(adapter_id)
        spec = self.cfg.adapter(adapter_id)
        if spec is not None:
            return spec.path
        if self.cfg.adapter_root:
            return join(self.cfg.adapter_root, adapter_id)
        raise ApiError(404, f"adapter {adapter_id!r} not found (known: {', '.join(self.known()) or 'none'})",
                       param="model", code="adapter_not_found")

    def known(self) -> list[str]:
        """Configured adapters plus adapter dirs under a local adapter_root."""
        names = [a.name for a in self.cfg.adapters]
        root = self.cfg.adapter_root
        if root and not is_uri(root) and os.path.isdir(root):
            for entry in sorted(os.listdir(root)):
                if _ID_RE.match(entry) and (Path(root) / entry / "adapter_config.json").is_file() and entry not in names:
                    names.append(entry)
        return names

    def resolve(self, adapter_id: str) -> AdapterInfo:
        src = self.source(adapter_id)
        if is_uri(src):
            local = _download(src, self.cache_dir)
        else:
            local = src
            if not (Path(local) / "adapter_config.json").is_file():
                raise ApiError(404, f"adapter {adapter_id!r} not found", param="model", code="adapter_not_found")
        ratios, table = read_adapter_metadata(local)
        spec = self.cfg.adapter(adapter_id)
        if spec is not None:
            ratios = spec.ratios or ratios
            if spec.eval_results:
                results = _read_json(Path(spec.eval_results))
                table = table_from_eval_results(results) or table
            table = dict(spec.expected_cot_tokens or {}) or table
        return AdapterInfo(adapter_id, local, ratios or list(self.cfg.default_ratios), table, src)
