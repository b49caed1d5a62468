"""Question datasets in one schema: ``id``, ``question``, ``gold``, ``source``, plus
``solution`` (the dataset's own worked solution, usable as a gold CoT) and ``kind``
(``gsm8k`` or ``math``: which grader applies).

Sources: the embedded ``gsm8k`` / ``math`` / ``math500`` files, local JSONL / JSON /
Parquet files, or Hugging Face dataset ids. Recognised raw layouts: GSM8K
(``question``, ``answer`` with the gold after ``####``), MATH (``problem``, ``solution``
with the gold in the last ``\\boxed{}``, optional ``answer``), and this schema itself.

A malformed row raises :class:`DataError` naming the file and line, or, with
``lenient=True``, goes to the rejects list with the reason.

>>> normalize_row({"question": "2+2?", "answer": "2+2=<<2+2=4>>4\\n#### 4"}, "gsm8k", 0, "f.jsonl")
{'id': 'gsm8k-0', 'question': '2+2?', 'gold': '4', 'solution': '2+2=4', 'source': 'f.jsonl', 'kind': 'gsm8k'}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tokenskip import assets

SCHEMA = ("id", "question", "gold", "solution", "source", "kind")
_CALC = re.compile(r"<<[^<>]*>>")


class DataError(ValueError):
    """A dataset row or file is malformed; the message names file and line."""


@dataclass
class LoadResult:
    rows: list[dict]
    rejects: list[dict] = field(default_factory=list)


def infer_kind(name: str) -> str:
    """Grading flavour from a dataset name.

    >>> infer_kind("gsm8k"), infer_kind("math500"), infer_kind("HuggingFaceH4/MATH-500")
    ('gsm8k', 'math', 'math')
    """
    return "math" if "math" in name.lower() else "gsm8k"


def gsm8k_cot(answer: str) -> str:
    """The worked solution of a GSM8K answer, calculator annotations removed.

    >>> gsm8k_cot("He has 2*3=<<2*3=6>>6 apples.\\n#### 6")
    'He has 2*3=6 apples.'
    """
    body = answer.rsplit("####", 1)[0]
    return _CALC.sub("", body).strip()


def normalize_row(
    raw: Any, kind: str, index: int, source: str, fields: dict | None = None, prefix: str | None = None
) -> dict:
    """Map one raw row to the schema, or raise ``ValueError`` with the reason."""
    from tokenskip.grading import extract_gold, last_boxed

    if not isinstance(raw, dict):
        raise ValueError(f"row is a {type(raw).__name__}, not an object")
    f = fields or {}
    q_key = f.get("question") or next((k for k in ("question", "problem", "prompt") if k in raw), None)
    if q_key is None or raw.get(q_key) is None:
        raise ValueError("no question field (looked for question/problem/prompt)")
    question = raw[q_key]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"field {q_key!r} is empty or not text")
    solution = raw.get(f.get("solution") or "solution")
    gold = raw.get(f["gold"]) if f.get("gold") else raw.get("gold")
    if (
        gold is None
        and "answer" in raw
        and kind == "gsm8k"
        and isinstance(raw["answer"], str)
        and "####" in raw["answer"]
    ):
        gold = extract_gold(raw["answer"], "gsm8k")
        solution = solution if solution is not None else gsm8k_cot(raw["answer"])
    if gold is None and raw.get("answer") is not None:
        gold = raw["answer"]
    if gold is None and isinstance(solution, str):
        gold = last_boxed(solution)
    if gold is None or (isinstance(gold, str) and not gold.strip()):
        raise ValueError("no gold answer (looked for gold/answer/#### /\\boxed{} in solution)")
    if not isinstance(gold, (str, int, float)):
        raise ValueError(f"gold answer has type {type(gold).__name__}")
    rid = raw.get(f.get("id") or "id")
    if rid is None:
        rid = f"{prefix or kind}-{index}"
    return {
        "id": str(rid),
        "question": question.strip(),
        "gold": str(gold).strip(),
        "solution": solution.strip() if isinstance(solution, str) else None,
        "source": source,
        "kind": kind,
    }


def iter_file(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    """(line number, parsed row, parse error) for JSONL / JSON / Parquet: a JSONL line that does not
    parse is yielded as its text (undecodable bytes replaced) with the error, not raised; JSON and
    Parquet rows are numbered from 1."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    text = raw.decode("utf-8", "replace").rstrip("\r\n")
                    yield lineno, text, f"not valid UTF-8 (byte {raw[e.start : e.start + 1]!r} at column {e.start + 1})"
                    continue
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield lineno, line.rstrip("\r\n"), f"invalid JSON: {e.msg}"
    elif suffix == ".json":
        blob = path.read_bytes()
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError as e:
            line = blob.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 (byte {blob[e.start : e.start + 1]!r})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if isinstance(data, dict):
            data = data.get("data") or data.get("rows") or [data]
        for i, row in enumerate(data, 1):
            yield i, row, None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row, None
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def reject_row(raw: Any, parsed: bool = True) -> str | None:
    """A rejected row as it was read, for a rejects file: its JSON, or the text of a line that did not
    parse (2,000 characters at most)."""
    if raw is None:
        return None
    return (json.dumps(raw, default=str, ensure_ascii=False) if parsed else str(raw))[:2000]


def load_questions(
    name: str,
    split: str = "train",
    *,
    kind: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    subset: str | None = None,
    fields: dict | None = None,
    lenient: bool = False,
) -> LoadResult:
    """Load questions into the schema.

    ``name``: embedded name, local file path, or HF dataset id. ``lenient``: bad rows go
    to ``rejects`` (each with ``source``, ``line``, ``reason``, ``row``) instead of raising.
    """
    kind = kind or infer_kind(name)
    rows: list[dict] = []
    rejects: list[dict] = []

    def take(index: int, raw: Any, err: str | None, src: str, line: int, prefix: str) -> None:
        parsed = err is None
        if parsed:
            try:
                rows.append(normalize_row(raw, kind, index, src, fields, prefix))
                return
            except ValueError as e:
                err = str(e)
        if not lenient:
            raise DataError(f"{src}:{line}: {err}")
        rejects.append(
            {
                "source": src,
                "line": line,
                "reason": err,
                "row": reject_row(raw, parsed),
            }
        )

    path = Path(name)
    if assets.is_embedded_dataset(name):
        path = assets.dataset_file(name, split)
        prefix = f"{name}-{split}"
        for i, (line, raw, err) in enumerate(iter_file(path)):
            take(i, raw, err, str(path), line, prefix)
    elif path.suffix.lower() in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise DataError(f"dataset file not found: {path}")
        prefix = path.stem
        for i, (line, raw, err) in enumerate(iter_file(path)):
            take(i, raw, err, str(path), line, prefix)
    else:
        try:
            import datasets
        except ImportError as e:  # pragma: no cover
            raise DataError(
                f"{name!r} is neither an embedded dataset nor a file, and `datasets` is not installed"
            ) from e
        try:
            ds = datasets.load_dataset(name, subset, split=split)
        except Exception as e:
            raise DataError(
                f"could not load dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
                f"Embedded datasets: {', '.join(assets.EMBEDDED_DATASETS)}"
            ) from None
        prefix = f"{name.split('/')[-1]}-{split}"
        for i, raw in enumerate(ds):
            take(i, raw, None, f"hf:{name}:{split}", i + 1, prefix)
    seen: set[str] = set()
    for r in rows:
        if r["id"] in seen:
            raise DataError(f"{r['source']}: duplicate id {r['id']!r}")
        seen.add(r["id"])
    if offset:
        rows = rows[offset:]
    if limit is not None:
        rows = rows[:limit]
    return LoadResult(rows, rejects)


def load_from_config(cfg: Any, lenient: bool = True) -> LoadResult:
    """Load from a :class:`tokenskip.config.DataSourceConfig` (stages load leniently:
    bad rows go to their rejects file instead of stopping the job)."""
    return load_questions(
        cfg.name,
        cfg.split,
        kind=cfg.kind,
        limit=cfg.limit,
        offset=cfg.offset,
        subset=cfg.subset,
        fields=cfg.fields,
        lenient=lenient,
    )


def default_max_new_tokens(kind: str) -> int:
    """docs/method.md §1: 512 for GSM8K, 1024 for MATH."""
    return 1024 if kind == "math" else 512
