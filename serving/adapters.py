"""Adapter ids: validation, resolution to a local PEFT dir (downloading URIs), metadata
(the adapter card, :mod:`tokenskip.card`).

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

from serving.routing import ApiError, table_from_eval_results
from tokenskip import card as tscard

log = logging.getLogger("tokenskip.serving")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_URI_RE = re.compile(r"^[a-z][a-z0-9+.-]*://")


def validate_adapter_id(adapter_id: str) -> str:
    """A safe adapter name: no separators, no '..', no absolute paths, no URIs.

    >>> validate_adapter_id("tokenskip-gsm8k_v1.2")
    'tokenskip-gsm8k_v1.2'
    >>> validate_adapter_id("/abs/path")
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 400: invalid adapter id '/abs/path': use letters, digits, '.', '_', '-' (no paths)
    """
    if not isinstance(adapter_id, str) or not _ID_RE.fullmatch(adapter_id) or ".." in adapter_id:
        raise ApiError(
            400,
            f"invalid adapter id {adapter_id!r}: use letters, digits, '.', '_', '-' (no paths)",
            param="model",
            code="invalid_adapter_id",
        )
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
        raise ApiError(
            404,
            f"model {model!r} not found; this endpoint serves {base_id!r} and {base_id + ':<adapter>'!r}",
            param="model",
            code="model_not_found",
        )
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
    efforts: dict[str, float] | None = None  # reasoning_effort -> γ (None: efforts_error says why not)
    efforts_error: str | None = None


def _remote_listing(fs: Any, path: str) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime ns) of every file under an adapter dir: a changed adapter
    at the same URI gets another listing, hence another cache entry."""
    import pyarrow.fs as pafs

    base = path.rstrip("/")
    out = []
    for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if f.type == pafs.FileType.File:
            mtime = f.mtime_ns if f.mtime_ns is not None else 0
            out.append((f.path[len(base) :].lstrip("/"), int(f.size or 0), int(mtime)))
    return sorted(out)


def _download(uri: str, cache_dir: str, name: str = "") -> str:
    """Copy an adapter dir from an object store (pyarrow.fs: s3://, gs://, file://, ...).

    The cache entry is keyed by the URI and the listing (names, sizes, mtimes) of its files,
    so an adapter replaced at the same URI is downloaded again. The copy lands in a temp dir
    and is renamed, so concurrent loaders never see half a dir. Error messages name the
    adapter, never the URI (the details go to the log).
    """
    import pyarrow.fs as pafs

    label = name or "adapter"
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
        found = (
            info.type == pafs.FileType.Directory
            and fs.get_file_info(path.rstrip("/") + "/adapter_config.json").type == pafs.FileType.File
        )
        listing = _remote_listing(fs, path) if found else []
    except Exception as e:  # bad scheme, missing credentials, unreachable store
        log.warning("adapter %s: cannot read %s: %s", label, uri, e)
        raise ApiError(
            404, f"adapter {label!r} cannot be read from its store", param="model", code="adapter_not_found"
        ) from None
    if not found:
        log.info("adapter %s: no adapter_config.json under %s", label, uri)
        raise ApiError(404, f"adapter {label!r} not found", param="model", code="adapter_not_found")
    version = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:12]
    dest = Path(cache_dir) / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{version}"
    if (dest / "adapter_config.json").is_file():
        return str(dest)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    if os.path.isdir(dest):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return str(dest)


def adapter_exists(src: str) -> bool:
    """Whether ``src`` (a local dir or an object-store URI) holds an adapter_config.json."""
    if not is_uri(src):
        return (Path(src) / "adapter_config.json").is_file()
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(src)
        return fs.get_file_info(path.rstrip("/") + "/adapter_config.json").type == pafs.FileType.File
    except Exception as e:  # unreachable store: treat as missing (negative-cached briefly by the caller)
        log.warning("cannot check adapter at %s: %s", src, e)
        return False


def adapter_start_warnings(cfg: Any) -> list[str]:
    """One line per configured local adapter that is not there (yet), or that was trained on another
    base model (:func:`tokenskip.memory.adapter_mismatch`), for the start of the app. The app still
    starts (an adapter may finish training later, and each request looks it up), but a request for
    such an adapter fails until it is fixed. Object-store adapters are fetched on first use, not here."""
    from tokenskip.memory import adapter_mismatch

    out = []
    for a in cfg.adapters:
        if is_uri(a.path):
            continue
        if not adapter_exists(a.path):
            out.append(
                f"adapter {a.name!r}: nothing at {a.path} yet (no adapter_config.json); requests for "
                f"'{cfg.model_id}:{a.name}' get 404 adapter_not_found until it is there"
            )
        elif wrong := adapter_mismatch(a.path, cfg.model):
            out.append(f"adapter {a.name!r}: {wrong}; requests for '{cfg.model_id}:{a.name}' will fail")
    return out


def read_adapter_card(adapter_id: str, local_dir: str) -> tscard.AdapterCard | None:
    """The adapter's card (None when it has none); a broken card is a server-side error."""
    try:
        return tscard.read_card(local_dir, missing_ok=True)
    except tscard.CardError as e:
        log.error("adapter %s: %s", adapter_id, e)
        raise ApiError(
            500,
            f"adapter {adapter_id!r} has an invalid adapter card (details in the server log)",
            param="model",
            code="adapter_invalid",
        ) from None


def _eval_results_table(adapter_id: str, path: str, dataset: str | None) -> dict[float, float]:
    """Expected CoT tokens from the ``eval_results:`` file an adapter's config names."""
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        return table_from_eval_results(results, dataset, path)
    except (OSError, ValueError) as e:  # missing file, bad JSON, not a results.json (CardError)
        log.error("adapter %s: eval_results %s cannot be used: %s", adapter_id, path, e)
        raise ApiError(
            500,
            f"adapter {adapter_id!r}: its configured eval_results cannot be used (details in the server log)",
            param="model",
            code="adapter_invalid",
        ) from None


class AdapterResolver:
    """Resolve adapter ids with the app config (configured table, then adapter_root)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.cache_dir = cfg.adapter_cache_dir or os.path.join(
            os.environ.get("TOKENSKIP_HOME", os.path.expanduser("~/.cache/tokenskip")), "serve-adapters"
        )

    def source(self, adapter_id: str) -> str:
        validate_adapter_id(adapter_id)
        spec = self.cfg.adapter(adapter_id)
        if spec is not None:
            return spec.path
        if self.cfg.adapter_root:
            return join(self.cfg.adapter_root, adapter_id)
        raise ApiError(
            404,
            f"adapter {adapter_id!r} not found (known: {', '.join(self.known()) or 'none'})",
            param="model",
            code="adapter_not_found",
        )

    def known(self) -> list[str]:
        """Configured adapters plus adapter dirs under a local adapter_root."""
        names = [a.name for a in self.cfg.adapters]
        root = self.cfg.adapter_root
        if root and not is_uri(root) and os.path.isdir(root):
            for entry in sorted(os.listdir(root)):
                if (
                    _ID_RE.fullmatch(entry)
                    and (Path(root) / entry / "adapter_config.json").is_file()
                    and entry not in names
                ):
                    names.append(entry)
        return names

    def resolve(self, adapter_id: str) -> AdapterInfo:
        src = self.source(adapter_id)
        if is_uri(src):
            local = _download(src, self.cache_dir, adapter_id)
        else:
            local = src
            if not (Path(local) / "adapter_config.json").is_file():
                raise ApiError(404, f"adapter {adapter_id!r} not found", param="model", code="adapter_not_found")
        card = read_adapter_card(adapter_id, local)
        spec = self.cfg.adapter(adapter_id)
        if card is not None and card.base_model != self.cfg.model:
            log.warning("adapter %s was trained on %s; serving it on %s", adapter_id, card.base_model, self.cfg.model)
        # valid γ: the config's, else the card's; expected CoT tokens: the config's table, else
        # its eval_results file, else the evaluation recorded on the card
        ratios = (spec.ratios if spec else None) or (card.ratios if card else None) or list(self.cfg.default_ratios)
        table: dict[float, float] = dict(spec.expected_cot_tokens or {}) if spec else {}
        if not table and spec is not None and spec.eval_results:
            table = _eval_results_table(adapter_id, spec.eval_results, spec.eval_dataset)
        if not table and card is not None:
            try:
                table = card.expected_cot_tokens(spec.eval_dataset if spec else None)
            except tscard.CardError as e:  # eval_dataset names a dataset the card has no evaluation of
                log.error("adapter %s: %s", adapter_id, e)
                raise ApiError(
                    500,
                    f"adapter {adapter_id!r}: its card has no evaluation of eval_dataset {spec.eval_dataset!r}",
                    param="model",
                    code="adapter_invalid",
                ) from None
        efforts, efforts_error = None, None
        try:
            efforts = self.cfg.efforts_for(adapter_id, list(ratios))
        except ValueError as e:  # an app-wide map that this adapter (under adapter_root) can't honour
            log.error("adapter %s: %s", adapter_id, e)
            efforts_error = str(e)
        return AdapterInfo(adapter_id, local, list(ratios), table, src, efforts, efforts_error)


def check_efforts(cfg: Any, resolver: AdapterResolver | None = None) -> None:
    """Fail closed at deploy time: every configured adapter that a configured reasoning_effort
    map applies to is resolved (its card read) and the map checked against its trained ratios;
    a mapped γ it was not trained for, or an adapter whose ratios can't be read, is a
    :class:`~tokenskip.config.ConfigError` naming the adapter and the entry."""
    from tokenskip.config import ConfigError

    resolver = resolver or AdapterResolver(cfg)
    for spec in cfg.adapters:
        if not (cfg.reasoning_effort or spec.reasoning_effort):
            continue  # the default map is derived from the ratios: always valid
        try:
            info = resolver.resolve(spec.name)
        except ApiError as e:
            raise ConfigError(
                f"adapters[{spec.name}]: cannot read its trained ratios to check reasoning_effort: {e.message}"
            ) from None
        if info.efforts_error:
            raise ConfigError(info.efforts_error)
