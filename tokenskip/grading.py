"""Answer extraction and equivalence checking for GSM8K and MATH.

This is the grader used by the TokenSkip evaluation: it pulls the final answer out of a
chain-of-thought (``\\boxed{...}``, "The answer is ...", or the last number), normalises
LaTeX, and decides whether two answers are the same.  It is pure Python; sympy is imported
lazily and only for answers that cannot be compared as numbers or normalised strings.

Design rules:

* No public function ever raises: on any input (``None`` included) they return
  ``None`` / ``False`` / ``""`` instead.
* No ``signal`` based timeouts (Ray and Serve workers are not the main thread).  sympy is
  bounded instead: expressions are length-limited (160 chars / 120 tokens), parsed with
  ``evaluate=False`` and only evaluated numerically (``evalf``) at a few sample points --
  there is no ``simplify``.  Before ``evalf`` a plain-float probe refuses anything that could
  be slow (integer powers above 2000, towers, overflow); one ``is_equiv`` call makes at most
  64 sympy checks and spends at most ~0.5 s of wall time per check; results are memoised.
* The LaTeX to sympy translation is done here by a small recursive-descent converter whose
  output only contains numbers, single-letter symbols, whitelisted function names and
  arithmetic operators, so the string handed to ``parse_expr`` is always safe to evaluate.

Math-Verify (``grader="math_verify"``, or ``"both"``: correct only when both accept) is
offered next to this grader, run in worker processes (:class:`MathVerifyPool`) because its
timeouts need a main thread.  ``benchmarks/grading_agreement.py`` compares the two on GSM8K
test and MATH-500 (golds, solutions, reformatted twins, wrong answers, saved samples): of
their disagreements this grader was right on 31 of 34, so it stays the default.
"""

from __future__ import annotations

import cmath
import math
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

__all__ = [
    "GRADERS",
    "Grade",
    "MathVerifyPool",
    "disagreements",
    "grade_many",
    "math_verify_pool",
    "all_boxed",
    "extract_answer",
    "extract_gold",
    "grade",
    "is_equiv",
    "last_boxed",
    "normalize_answer",
]

# --------------------------------------------------------------------------------------
# \boxed{...} extraction
# --------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def _brace_matches(text: str) -> dict[int, int]:
    """Map each opening brace to its closing brace (backslash-escaped braces are skipped)."""
    matches: dict[int, int] = {}
    stack: list[int] = []
    k = 0
    n = len(text)
    while k < n:
        c = text[k]
        if c == "\\":
            k += 2
            continue
        if c == "{":
            stack.append(k)
        elif c == "}" and stack:
            matches[stack.pop()] = k
        k += 1
    return matches


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """Top-level ``\\boxed``/``\\fbox`` occurrences as (start, end, content). Linear time."""
    spans: list[tuple[int, int, str]] = []
    n = len(text)
    pos = 0
    matches: dict[int, int] | None = None
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            break
        j = m.end()
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] == "{":
            if matches is None:
                matches = _brace_matches(text)
            end = matches.get(j, -1)
            if end < 0:  # unbalanced: ignore this box, look for a later one
                pos = m.end()
                continue
            spans.append((m.start(), end + 1, text[j + 1 : end]))
            pos = end + 1
        else:
            # "\\boxed 5" form: the argument runs to the next space / dollar sign.
            k = j
            while k < n and not text[k].isspace() and text[k] != "$":
                k += 1
            if k > j:
                spans.append((m.start(), k, text[j:k]))
            pos = max(k, m.end())
    return spans


def all_boxed(text: str) -> list[str]:
    """Contents of every top-level ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, in order.

    >>> all_boxed(r"first \\boxed{1} then \\fbox{\\frac{1}{2}}")
    ['1', '\\\\frac{1}{2}']
    >>> all_boxed("no boxes here")
    []
    """
    try:
        if not text:
            return []
        return [c for _, _, c in _boxed_spans(str(text))]
    except Exception:
        return []


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` (nested braces matched), else None.

    >>> last_boxed(r"so $x = \\boxed{\\frac{a}{b^{2}}}$.")
    '\\\\frac{a}{b^{2}}'
    >>> last_boxed(r"\\boxed 5 and \\boxed{6}")
    '6'
    >>> last_boxed("nothing") is None
    True
    """
    try:
        if not text:
            return None
        spans = _boxed_spans(str(text))
        return spans[-1][2] if spans else None
    except Exception:
        return None


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _kind(dataset) -> str:
    try:
        return "math" if "math" in str(dataset).lower() else "gsm8k"
    except Exception:
        return "gsm8k"


# A plain number as written in text: 1,000  -3  2.5  .5  (not part of a word like x2)
_NUM_RE = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)" r"|(?<![\w.\d])-?\.\d+(?!\d)"
)
_ANSWER_IS_RE = re.compile(r"\banswer\s*(?:is|was|would\s+be|will\s+be|:|=)\s*:?", re.IGNORECASE)
_HASH_RE = re.compile(r"####\s*")

_MAX_NUM_CHARS = 80


def _to_number(s: str) -> Fraction | None:
    """Exact value of a normalised numeric answer (int, decimal, fraction, mixed number)."""
    if not s or len(s) > _MAX_NUM_CHARS:
        return None
    s = s.strip()
    while len(s) > 2 and s[0] == "(" and s[-1] == ")" and "(" not in s[1:-1] and ")" not in s[1:-1]:
        s = s[1:-1]
    sign = 1
    if s.startswith("-"):
        sign, s = -1, s[1:]
    elif s.startswith("+"):
        s = s[1:]
    if not s:
        return None
    try:
        if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", s):
            return sign * Fraction(s)
        m = re.fullmatch(r"(\d+(?:\.\d+)?)[eE]([+-]?\d{1,3})", s)
        if m:
            return sign * Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
        m = re.fullmatch(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
        if m:
            den = Fraction(m.group(2))
            return None if den == 0 else sign * Fraction(m.group(1)) / den
        m = re.fullmatch(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s)
        if m:
            den = Fraction(m.group(2))
            return None if den == 0 else sign * Fraction(m.group(1)) / den
        m = re.fullmatch(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)  # mixed number 1\frac{4}{5}
        if m:
            num, den = int(m.group(2)), int(m.group(3))
            if den != 0 and num < den:
                return sign * (int(m.group(1)) + Fraction(num, den))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return None


def _fmt_number(x: Fraction) -> str:
    """Canonical string for an exact number: ``18``, ``-2.5``, ``1/3``."""
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    twos = fives = 0
    while d % 2 == 0:
        d //= 2
        twos += 1
    while d % 5 == 0:
        d //= 5
        fives += 1
    if d == 1:
        k = max(twos, fives)
        scaled = abs(x.numerator) * (10**k) // x.denominator
        digits = str(scaled).rjust(k + 1, "0")
        out = (digits[:-k] + "." + digits[-k:]).rstrip("0").rstrip(".")
        return ("-" if x < 0 else "") + out
    return f"{x.numerator}/{x.denominator}"


def _clean_number_token(tok: str) -> str:
    val = _to_number(tok.replace(",", ""))
    return _fmt_number(val) if val is not None else tok.replace(",", "")


def _first_math_span(s: str) -> str:
    """Answer text after "the answer is": prefer the first $...$ span, else up to the sentence end."""
    m = re.search(r"(?<!\\)\$((?:\\\$|[^$])+?)(?<!\\)\$", s)
    if m and s[: m.start()].strip(" :*") == "":
        return m.group(1).strip()
    s = re.split(r"\.(?:\s|$)|\n", s, maxsplit=1)[0]
    return s.strip().strip("*").strip()


# --------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------

_UNIT_WORDS = (
    r"(?:sq(?:uare)?\.?\s*)?(?:cubic\s*)?"
    r"(?:units?|dollars?|cents?|degrees?|percent|cm|mm|km|meters?|metres?|inches|inch|feet|foot"
    r"|ft|yards?|yd|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?"
    r"|years?|pounds?|lbs?|ounces?|oz|grams?|kg|kilograms?|liters?|litres?|ml|gallons?|points?"
    r"|people|students|eggs|marbles|apples|books|coins|pages|times|ways|numbers|integers"
    r"|values|solutions|tiles|squares|triangles|handshakes|games|boxes|bags|cups|pieces)"
)
_TRAILING_UNIT_RE = re.compile(
    r"(?<=[\d}\s])\s*" + _UNIT_WORDS + r"\s*(?:\^\{?[23]\}?|²|³)?\s*\.?\s*$", re.IGNORECASE
)
_TEXT_CMD_RE = re.compile(
    r"\\(?:text|mbox|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mathsf|mathtt|operatorname)\s*\{"
)
_SPACE_CMDS = ("\\!", "\\,", "\\;", "\\:", "\\>", "\\quad", "\\qquad", "\\ ", "~")
_UNICODE = {
    "\u2212": "-",
    "\u2013": "-",
    "\u00d7": "\\times ",
    "\u00b7": "\\cdot ",
    "\u00f7": "\\div ",
    "\u03c0": "\\pi ",
    "\u221e": "\\infty ",
    "\u00b0": "",
    "\u221a": "\\sqrt",
    "\u00a0": " ",
}
_SENTINEL = "\ue000"
_ROWSEP = "\ue001"


def _read_arg(s: str, i: int, matches: dict[int, int]) -> tuple[str, int] | None:
    """A LaTeX macro argument at ``s[i:]``: a balanced {group} (inner text) or a single char."""
    n = len(s)
    while i < n and s[i] == " ":
        i += 1
    if i >= n:
        return None
    if s[i] == "{":
        k = matches.get(i, -1)
        if k < 0:
            return None
        return s[i + 1 : k], k + 1
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return m.group(0), i + m.end()
        return None
    if s[i] in "}^_":
        return None
    return s[i], i + 1


def _fix_macro_args(s: str, macro: str, nargs: int) -> str:
    """Brace the arguments of ``\\frac12``, ``\\frac 59``, ``\\frac{270}7``, ``\\sqrt2``."""
    if macro not in s:
        return s
    out = []
    i = 0
    matches = _brace_matches(s)
    pat = re.compile(re.escape(macro) + r"(?![a-zA-Z])")
    while True:
        m = pat.search(s, i)
        if m is None:
            out.append(s[i:])
            break
        out.append(s[i : m.end()])
        j = m.end()
        if macro == "\\sqrt":
            k = j
            while k < len(s) and s[k] == " ":
                k += 1
            if k < len(s) and s[k] == "[":
                close = s.find("]", k)
                if close < 0:
                    i = j
                    continue
                out.append(s[k : close + 1])
                j = close + 1
        args = []
        k = j
        for _ in range(nargs):
            a = _read_arg(s, k, matches)
            if a is None:
                break
            args.append(a[0])
            k = a[1]
        if len(args) == nargs:
            out.append("".join("{" + a + "}" for a in args))
            i = k
        else:
            i = j
    return "".join(out)


def _unwrap_box(s: str) -> str:
    for _ in range(3):
        spans = _boxed_spans(s)
        if len(spans) == 1 and spans[0][0] == 0 and spans[0][1] == len(s):
            s = spans[0][2].strip()
        else:
            break
    return s


def _strip_text(s: str) -> str:
    s = _TEXT_CMD_RE.sub(r"\\text{", s)
    if "\\text{" not in s:
        return s
    m = re.fullmatch(r"\s*\\text\{([^{}]*)\}\s*", s)
    if m:
        return m.group(1)
    # trailing \text{ units} (possibly squared) after something else is a unit: drop it
    for _ in range(3):
        m = re.search(r"\\text\{[^{}]*\}\s*(?:\^\{?[23]\}?)?\s*$", s)
        if m and s[: m.start()].strip():
            s = s[: m.start()]
        else:
            break
    return re.sub(r"\\text\{([^{}]*)\}", r"\1", s)


_CACHE_MAX_CHARS = 512


def _normalize_math(s: str) -> str:
    s = str(s)
    return _normalize_math_cached(s) if len(s) <= _CACHE_MAX_CHARS else _normalize_math_impl(s)


@lru_cache(maxsize=65536)
def _normalize_math_cached(s: str) -> str:
    return _normalize_math_impl(s)


def _normalize_math_impl(s: str) -> str:
    s = re.sub(r"\s+", " ", str(s)).strip()
    for k, v in _UNICODE.items():
        if k in s:
            s = s.replace(k, v)
    s = _unwrap_box(s)
    s = s.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    s = s.replace("\\$", " ").replace("$", " ")
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s.strip())
    s = s.replace("\\\\", _ROWSEP)  # protect the \\ row separator from "\ " (a space)
    for t in _SPACE_CMDS:
        if t in s:
            s = s.replace(t, "" if t == "\\!" else " ")
    s = s.replace(_ROWSEP, "\\\\")
    s = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg|displaystyle)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    # degrees
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}", "", s)
    s = re.sub(r"\^\s*\\circ(?![a-zA-Z])", "", s)
    s = re.sub(r"\\circ(?![a-zA-Z])", "", s)
    s = _strip_text(s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\bdegrees?\b", "", s) if re.search(r"\d", s) else s
    for _ in range(2):
        head, tail = s[:-60], s[-60:]
        new = head + _TRAILING_UNIT_RE.sub("", tail)
        if not new.strip():
            break
        s = new
    s = s.strip()
    # leading "x =", "y=", "\theta =", "x \in"
    m = re.match(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w\}?)?\s*(?:=|\\in(?![a-zA-Z]))\s*(.+)$", s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    # brace macro arguments
    s = re.sub(r"\\frac\s+", r"\\frac", s)
    s = _fix_macro_args(s, "\\frac", 2)
    s = _fix_macro_args(s, "\\sqrt", 1)
    # remove spaces, keeping one between a \command and a following letter (\cot x, \pi r)
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", r"\1" + _SENTINEL, s)
    s = re.sub(r"\s+", "", s).replace(_SENTINEL, " ")
    s = s.rstrip(".").rstrip(",").rstrip(".")
    s = re.sub(r"\^\{(\w)\}", r"^\1", s)
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)
    s = re.sub(r"\\(?:bmatrix|matrix)\b", "pmatrix", s)
    s = s.replace("{bmatrix}", "{pmatrix}")
    # numbers: 1,000 -> 1000 ; .5 -> 0.5 ; 2.50 -> 2.5 ; 18.0 -> 18
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
    s = re.sub(r"(\d\.\d*?)0+(?!\d)", r"\1", s)
    s = re.sub(r"(\d)\.(?!\d)", r"\1", s)
    # a/b -> \frac{a}{b} for plain integers
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    # multiple choice (C) / \text{(C)}
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)
    if m:
        s = m.group(1).upper()
    if s in ("infinity", "inf", "\\inf"):
        s = "\\infty"
    if re.fullmatch(r"[A-Za-z]{3,}", s):
        s = s.lower()
    if s.startswith("+") and len(s) > 1:
        s = s[1:]
    return s


def _normalize_gsm8k(s: str) -> str:
    s = str(s)
    return _normalize_gsm8k_cached(s) if len(s) <= _CACHE_MAX_CHARS else _normalize_gsm8k_impl(s)


@lru_cache(maxsize=65536)
def _normalize_gsm8k_cached(s: str) -> str:
    return _normalize_gsm8k_impl(s)


def _normalize_gsm8k_impl(s: str) -> str:
    base = _normalize_math(s)
    val = _to_number(base)
    if val is not None:
        return _fmt_number(val)
    nums = _NUM_RE.findall(str(s).replace("\\!", "").replace("{,}", ","))
    if nums:
        return _clean_number_token(nums[-1])
    return base


def normalize_answer(ans: str, dataset: str = "math") -> str:
    """Normalise an answer string for comparison (never raises; ``None`` gives ``""``).

    MATH: LaTeX clean-up (``\\left``/``\\right``, ``\\dfrac``, ``\\frac12``, degrees, units,
    ``\\%``, dollars, spaces, leading ``x =``).  GSM8K: the canonical number in the answer.

    >>> normalize_answer(r"\\dfrac12")
    '\\\\frac{1}{2}'
    >>> normalize_answer(r"x = 90^{\\circ}")
    '90'
    >>> normalize_answer(r"\\$1,000.00 dollars", "gsm8k")
    '1000'
    """
    try:
        if ans is None:
            return ""
        if _kind(dataset) == "gsm8k":
            return _normalize_gsm8k(str(ans))
        return _normalize_math(str(ans))
    except Exception:
        try:
            return str(ans).strip()
        except Exception:
            return ""


# --------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------


def _gsm8k_from_candidate(cand: str) -> str | None:
    norm = _normalize_gsm8k(cand)
    return norm if norm != "" else None


def extract_answer(text: str, dataset: str = "gsm8k") -> str | None:
    """The final answer in a model output, or None.

    Order: last ``\\boxed{}``/``\\fbox{}``; ``#### X``; "the answer is X"; the last number.
    For GSM8K the result is the canonical number (commas, ``$`` and units stripped); for
    MATH it is the raw answer text (normalise it with :func:`normalize_answer`).

    >>> extract_answer("She pays $1,000 in total. The answer is $1,000.")
    '1000'
    >>> extract_answer(r"so the result is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "math")
    '\\\\frac{\\\\sqrt{3}}{2}'
    >>> extract_answer("3 + 4 = 7 apples") , extract_answer("no digits") is None
    ('7', True)
    """
    try:
        if text is None:
            return None
        text = str(text)
        if not text.strip():
            return None
        kind = _kind(dataset)
        boxed = last_boxed(text)
        if kind == "gsm8k":
            if boxed is not None and boxed.strip():
                return _gsm8k_from_candidate(boxed)
            hashes = list(_HASH_RE.finditer(text))
            if hashes:
                rest = text[hashes[-1].end() :][:200]
                nums = _NUM_RE.findall(rest.split("\n", 1)[0])
                if nums:
                    return _clean_number_token(nums[0])
            answer_is = list(_ANSWER_IS_RE.finditer(text))
            if answer_is:
                rest = text[answer_is[-1].end() :][:300].split("\n", 1)[0]
                nums = _NUM_RE.findall(rest.replace("\\!", ""))
                if nums:
                    return _clean_number_token(nums[0])
            nums = _NUM_RE.findall(text.replace("\\!", ""))
            if nums:
                return _clean_number_token(nums[-1])
            return None
        # MATH
        if boxed is not None and boxed.strip():
            return boxed.strip()
        answer_is = list(_ANSWER_IS_RE.finditer(text))
        if answer_is:
            rest = text[answer_is[-1].end() :][:500]
            ans = _first_math_span(rest)
            if ans:
                return ans
        nums = _NUM_RE.findall(text)
        if nums:
            return nums[-1].replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", nums[-1]) else nums[-1]
        return None
    except Exception:
        return None


def extract_gold(solution: str, dataset: str) -> str:
    """The gold answer of a dataset row (``""`` if none can be found).

    GSM8K: the text after the last ``#### `` with commas stripped.  MATH: the last boxed
    answer of the reference solution.

    >>> extract_gold("16 - 3 - 4 = 9 eggs\\n#### 1,800", "gsm8k")
    '1800'
    >>> extract_gold(r"so $p(8) = \\boxed{\\frac{3}{56}}.$", "math")
    '\\\\frac{3}{56}'
    """
    try:
        if solution is None:
            return ""
        solution = str(solution)
        if _kind(dataset) == "gsm8k":
            if "####" in solution:
                ans = solution.rsplit("####", 1)[1].strip()
                ans = ans.split("\n", 1)[0].strip()
                return ans.replace(",", "").replace("$", "").strip()
            return extract_answer(solution, "gsm8k") or ""
        boxed = last_boxed(solution)
        if boxed is not None:
            return boxed.strip()
        stripped = solution.strip()
        if stripped and len(stripped) <= 64 and "\n" not in stripped and "answer" not in stripped.lower():
            return stripped
        return extract_answer(solution, "math") or ""
    except Exception:
        return ""


# --------------------------------------------------------------------------------------
# equivalence
# --------------------------------------------------------------------------------------

_OPEN = "([{"
_CLOSE = ")]}"


def _match_close(s: str, i: int) -> int:
    """Index of the bracket closing the one at ``s[i]`` (any of ([{ vs )]}), or -1."""
    depth = 0
    for k in range(i, len(s)):
        c = s[k]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                return k
    return -1


def _split_top(s: str, sep: str = ",") -> list[str]:
    parts = []
    depth = 0
    last = 0
    i = 0
    n = len(s)
    L = len(sep)
    while i < n:
        c = s[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[last:i])
            i += L
            last = i
            continue
        i += 1
    parts.append(s[last:])
    return parts


def _group(s: str):
    """(open, inner, close) when ``s`` is one bracketed group: ``(1,2)``, ``[a,b)``, ``\\{x\\}``."""
    if s.startswith("\\{") and s.endswith("\\}") and len(s) >= 4:
        if _match_close(s, 1) == len(s) - 1:
            return "{", s[2:-2], "}"
        return None
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _match_close(s, 0) == len(s) - 1:
        return s[0], s[1:-1], s[-1]
    return None


_MATRIX_RE = re.compile(r"\\begin\{[pbvBV]?matrix\}(.*)\\end\{[pbvBV]?matrix\}", re.S)


def _matrix(s: str):
    m = _MATRIX_RE.fullmatch(s)
    if not m:
        return None
    rows = [r for r in m.group(1).split("\\\\")]
    if rows and rows[-1] == "":
        rows = rows[:-1]
    return [r.split("&") for r in rows]


def _unordered_match(xs: list[str], ys: list[str], kind: str, depth: int) -> bool:
    if len(xs) != len(ys):
        return False
    # exact matches first (cheap), then pairwise equivalence on the few left over
    pool = Counter(ys)
    rest_x = []
    for x in xs:
        if pool[x] > 0:
            pool[x] -= 1
        else:
            rest_x.append(x)
    rest_y = list(pool.elements())
    if not rest_x:
        return True
    if len(rest_x) > 12:
        return False
    xs, ys = rest_x, rest_y
    used = [False] * len(ys)
    for x in xs:
        for j, y in enumerate(ys):
            if not used[j] and _equiv_norm(x, y, kind, depth + 1):
                used[j] = True
                break
        else:
            return False
    return True


_MAX_ELEMENTWISE = 64  # longer tuples / matrices must match element strings exactly


def _ordered_match(xs: list[str], ys: list[str], kind: str, depth: int) -> bool:
    if len(xs) != len(ys):
        return False
    if len(xs) > _MAX_ELEMENTWISE:
        return xs == ys
    return all(_equiv_norm(x, y, kind, depth + 1) for x, y in zip(xs, ys))


def _expand_pm(s: str):
    if s.count("\\pm") == 1 and "\\mp" not in s and "," not in s:
        return [s.replace("\\pm", "+"), s.replace("\\pm", "-")]
    return None


def _equiv_norm(a: str, b: str, kind: str, depth: int = 0) -> bool:
    """Equivalence of two already-normalised answers."""
    if a == b:
        return True
    if not a or not b or depth > 6:
        return False
    # matrices / column vectors
    ma, mb = _matrix(a), _matrix(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None or len(ma) != len(mb) or any(len(x) != len(y) for x, y in zip(ma, mb)):
            return False
        cells_a = [_normalize_math(x) for row in ma for x in row]
        cells_b = [_normalize_math(y) for row in mb for y in row]
        return _ordered_match(cells_a, cells_b, kind, depth)
    # unions of intervals
    if "\\cup" in a or "\\cup" in b:
        pa, pb = _split_top(a, "\\cup"), _split_top(b, "\\cup")
        if len(pa) != len(pb) or len(pa) < 2:
            return False
        return _ordered_match(pa, pb, kind, depth)
    # \pm
    pma, pmb = _expand_pm(a), _expand_pm(b)
    if pma is not None or pmb is not None:
        xs = pma if pma is not None else _split_top(a)
        ys = pmb if pmb is not None else _split_top(b)
        return _unordered_match(xs, ys, kind, depth)
    # tuples, intervals, sets
    ga, gb = _group(a), _group(b)
    ta = ga is not None and (ga[0] == "{" or len(_split_top(ga[1])) > 1)
    tb = gb is not None and (gb[0] == "{" or len(_split_top(gb[1])) > 1)
    if ta or tb:
        if ta and tb:
            if ga[0] == "{" or gb[0] == "{":
                if ga[0] != gb[0]:
                    return False
                return _unordered_match(_split_top(ga[1]), _split_top(gb[1]), kind, depth)
            if ga[0] != gb[0] or ga[2] != gb[2]:
                return False
            return _ordered_match(_split_top(ga[1]), _split_top(gb[1]), kind, depth)
        # "(1,2)" vs "1,2": same ordered elements; a set vs a bare list: same elements
        g, other = (ga, b) if ta else (gb, a)
        ys = _split_top(other)
        if len(ys) < 2:
            return False
        xs = _split_top(g[1])
        if g[0] == "{":
            return _unordered_match(xs, ys, kind, depth)
        if g[0] != "(" or g[2] != ")":
            return False
        return _ordered_match(xs, ys, kind, depth)
    # bare comma-separated lists (e.g. all solutions): order does not matter
    la, lb = _split_top(a), _split_top(b)
    if len(la) > 1 or len(lb) > 1:
        return _unordered_match(la, lb, kind, depth)
    return _scalar_equiv(a, b, kind)


def _scalar_equiv(a: str, b: str, kind: str) -> bool:
    if a == b:
        return True
    fa, fb = _to_number(a), _to_number(b)
    if fa is not None and fb is not None:
        if fa == fb:
            return True
        if kind == "gsm8k":
            return abs(fa - fb) < Fraction(1, 1000)
        return False
    if a.lower() == b.lower() and re.fullmatch(r"[A-Za-z ]+", a):
        return True
    if (fa is not None and re.fullmatch(r"[A-Za-z]{2,}", b)) or (fb is not None and re.fullmatch(r"[A-Za-z]{2,}", a)):
        return False
    return _sympy_equiv(a, b)


# --------------------------------------------------------------------------------------
# sympy fallback (bounded, memoised)
# --------------------------------------------------------------------------------------

_SYMPY_MAX_CHARS = 160
_SYMPY_MAX_TOKENS = 120
_TOKEN_RE = re.compile(r"\\[a-zA-Z]+|\\.|\d+\.\d*|\.\d+|\d+|[a-zA-Z]|\S")
_FUNCS = {
    "\\sin": "sin",
    "\\cos": "cos",
    "\\tan": "tan",
    "\\cot": "cot",
    "\\sec": "sec",
    "\\csc": "csc",
    "\\arcsin": "asin",
    "\\arccos": "acos",
    "\\arctan": "atan",
    "\\sinh": "sinh",
    "\\cosh": "cosh",
    "\\tanh": "tanh",
    "\\log": "log",
    "\\ln": "log",
    "\\exp": "exp",
}
_CONSTS = {"\\pi": "pi", "\\infty": "oo", "\\infinity": "oo"}
_MUL = {"\\cdot", "\\times", "*"}
_DIV = {"\\div", "/"}


class _Refuse(Exception):
    pass


class _LatexToSympy:
    """Tiny recursive-descent LaTeX -> sympy-syntax translator (raises _Refuse if unsure)."""

    def __init__(self, s: str):
        self.toks = _TOKEN_RE.findall(s)
        if len(self.toks) > _SYMPY_MAX_TOKENS:
            raise _Refuse
        self.i = 0

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self):
        t = self.peek()
        self.i += 1
        return t

    def convert(self) -> str:
        out = self.seq(None)
        if self.i != len(self.toks):
            raise _Refuse
        return out

    def seq(self, closer) -> str:
        items: list[tuple[str, str]] = []  # ("v", operand) or ("o", operator)

        def push_operand(v: str):
            if items and items[-1][0] == "v":
                items.append(("o", "*"))
            items.append(("v", v))

        while True:
            t = self.peek()
            if t is None:
                if closer is not None:
                    raise _Refuse
                break
            if t == closer:
                break
            if t in (")", "]", "}"):
                raise _Refuse
            self.take()
            if t in ("(", "[", "{"):
                inner = self.seq({"(": ")", "[": "]", "{": "}"}[t])
                self.take()
                push_operand("(" + inner + ")")
            elif t in ("+", "-"):
                items.append(("o", t))
            elif t in _MUL:
                items.append(("o", "*"))
            elif t in _DIV:
                items.append(("o", "/"))
            elif t == "^":
                if not items or items[-1][0] != "v":
                    raise _Refuse
                exp = self.arg()
                items[-1] = ("v", "(" + items[-1][1] + ")**(" + exp + ")")
            elif t[0].isdigit() or t[0] == ".":
                if len(t) > 40:
                    raise _Refuse
                push_operand(t)
            elif len(t) == 1 and t.isalpha():
                if t == "i":
                    push_operand("imagunit")
                else:
                    push_operand(t)
            elif t == "\\frac":
                num = self.arg()
                den = self.arg()
                push_operand("((" + num + ")/(" + den + "))")
            elif t == "\\sqrt":
                index = None
                if self.peek() == "[":
                    self.take()
                    index = self.seq("]")
                    self.take()
                body = self.arg()
                if index is None:
                    push_operand("sqrt(" + body + ")")
                else:
                    push_operand("((" + body + ")**(1/(" + index + ")))")
            elif t in _CONSTS:
                push_operand(_CONSTS[t])
            elif t in _FUNCS:
                power = None
                if self.peek() == "^":
                    self.take()
                    power = self.arg()
                body = self.func_arg()
                v = _FUNCS[t] + "(" + body + ")"
                push_operand(v if power is None else "(" + v + ")**(" + power + ")")
            else:
                raise _Refuse
        if not items or items[-1][0] == "o":
            raise _Refuse
        return "".join(v for _, v in items)

    def arg(self) -> str:
        t = self.take()
        if t is None:
            raise _Refuse
        if t == "{":
            inner = self.seq("}")
            self.take()
            return "(" + inner + ")"
        if t[0].isdigit():
            return t
        if len(t) == 1 and t.isalpha():
            return "imagunit" if t == "i" else t
        if t in _CONSTS:
            return _CONSTS[t]
        if t == "-" and self.peek() is not None and self.peek()[0].isdigit():
            return "(-" + self.take() + ")"
        raise _Refuse

    def func_arg(self) -> str:
        t = self.peek()
        if t in ("(", "{", "["):
            self.take()
            inner = self.seq({"(": ")", "[": "]", "{": "}"}[t])
            self.take()
            return inner
        parts = []
        while True:
            t = self.peek()
            if t is None:
                break
            if t[0].isdigit() or (len(t) == 1 and t.isalpha()) or t in _CONSTS:
                self.take()
                parts.append("imagunit" if t == "i" else _CONSTS.get(t, t))
            else:
                break
        if not parts:
            raise _Refuse
        return "*".join(parts)


_sympy_lock = threading.Lock()
_sympy_ns: dict | None = None


def _sympy_namespace() -> dict | None:
    global _sympy_ns
    if _sympy_ns is not None:
        return _sympy_ns
    with _sympy_lock:
        if _sympy_ns is None:
            try:
                import sympy
                from sympy.parsing import sympy_parser as sp
            except Exception:  # sympy missing: no symbolic fallback
                _sympy_ns = {}
                return _sympy_ns
            local = {c: sympy.Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
            local.update(
                {
                    "imagunit": sympy.I,
                    "pi": sympy.pi,
                    "oo": sympy.oo,
                    "sqrt": sympy.sqrt,
                    "sin": sympy.sin,
                    "cos": sympy.cos,
                    "tan": sympy.tan,
                    "cot": sympy.cot,
                    "sec": sympy.sec,
                    "csc": sympy.csc,
                    "asin": sympy.asin,
                    "acos": sympy.acos,
                    "atan": sympy.atan,
                    "sinh": sympy.sinh,
                    "cosh": sympy.cosh,
                    "tanh": sympy.tanh,
                    "log": sympy.log,
                    "exp": sympy.exp,
                }
            )
            _sympy_ns = {
                "sympy": sympy,
                "parser": sp,
                "local": local,
                "transformations": sp.standard_transformations + (sp.implicit_multiplication, sp.convert_xor),
            }
    return _sympy_ns


def _plain_to_latexish(s: str) -> str:
    """Let plain-text math (``sqrt(3)/2``, ``2*pi``, ``x**2``) through the LaTeX converter."""
    s = s.replace("**", "^")
    s = re.sub(r"(?<!\\)(sqrt|sin|cos|tan|cot|sec|csc|log|ln|exp)(?=\()", r"\\\1", s)
    s = re.sub(r"(?<![\\a-zA-Z])pi(?![a-zA-Z])", r"\\pi", s)
    s = re.sub(r"\\sqrt\(", r"\\sqrt(", s)
    # \sqrt(...) -> \sqrt{...}
    out = []
    i = 0
    while True:
        k = s.find("\\sqrt(", i)
        if k < 0:
            out.append(s[i:])
            break
        close = _match_close(s, k + 5)
        if close < 0:
            out.append(s[i:])
            break
        out.append(s[i:k] + "\\sqrt{" + s[k + 6 : close] + "}")
        i = close + 1
    return "".join(out)


def _to_sympy_string(s: str) -> str:
    if len(s) > _SYMPY_MAX_CHARS or "_" in s or "\\pm" in s or "\\mp" in s:
        raise _Refuse
    s = _plain_to_latexish(s)
    if re.search(r"[A-Za-z]{3,}", re.sub(r"\\[a-zA-Z]+", "", s)):
        raise _Refuse  # words ("Evelyn", "ellipse") are not products of symbols
    return _LatexToSympy(s).convert()


_SAMPLE_SEEDS = (1, 2, 3)
# CPU-time budget of one comparison across sample points (each point is pre-bounded by
# _float_probe).  CPU time of this thread, not wall clock: a loaded machine must not turn
# a true equivalence into False.  Running out raises _OverBudget, which lru_cache does not
# memoise, so a verdict cut short is never served again from the cache.
_SYMPY_BUDGET_S = 0.5


class _OverBudget(Exception):
    """The comparison ran out of its CPU budget: no verdict (not cached)."""


def _numeric_close(x: complex, y: complex) -> bool:
    if not (math.isfinite(x.real) and math.isfinite(x.imag) and math.isfinite(y.real) and math.isfinite(y.imag)):
        return x == y
    return abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y))


_MAX_INT_EXPONENT = 2000
_CMATH_FUNCS = {
    "sin": cmath.sin,
    "cos": cmath.cos,
    "tan": cmath.tan,
    "cot": lambda z: 1 / cmath.tan(z),
    "sec": lambda z: 1 / cmath.cos(z),
    "csc": lambda z: 1 / cmath.sin(z),
    "asin": cmath.asin,
    "acos": cmath.acos,
    "atan": cmath.atan,
    "sinh": cmath.sinh,
    "cosh": cmath.cosh,
    "tanh": cmath.tanh,
    "log": cmath.log,
    "exp": cmath.exp,
}


def _float_probe(e, subs: dict, budget: list) -> complex:
    """Evaluate ``e`` in plain complex floats, raising _Refuse where sympy's exact ``evalf``
    could take unbounded time (huge integer powers, towers, overflow).  This is the time
    limit of the sympy fallback: nothing reaches ``evalf`` unless this probe is cheap."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _Refuse
    try:
        if e.is_Symbol:
            return subs[e]
        if e.is_Number:
            if e.is_Integer and abs(int(e)) > 10**300:
                raise _Refuse
            return complex(float(e))
        if e.is_NumberSymbol:
            return complex(float(e))
        if type(e).__name__ == "ImaginaryUnit":
            return 1j
        if e.is_Add:
            return sum((_float_probe(a, subs, budget) for a in e.args), 0j)
        if e.is_Mul:
            out = 1 + 0j
            for a in e.args:
                out *= _float_probe(a, subs, budget)
            return out
        if e.is_Pow:
            base = _float_probe(e.args[0], subs, budget)
            ex = _float_probe(e.args[1], subs, budget)
            if abs(ex) > _MAX_INT_EXPONENT:
                raise _Refuse
            if base == 0:
                return 0j if ex.real > 0 else complex("nan")
            return base**ex
        name = getattr(getattr(e, "func", None), "__name__", "")
        if name in _CMATH_FUNCS and len(e.args) == 1:
            arg = _float_probe(e.args[0], subs, budget)
            if abs(arg) > 1e6:
                raise _Refuse
            return _CMATH_FUNCS[name](arg)
    except (OverflowError, ZeroDivisionError, ValueError):
        raise _Refuse from None
    raise _Refuse


def _exprs_equal(xa, xb, ns) -> bool:
    sympy = ns["sympy"]
    syms = sorted(xa.free_symbols | xb.free_symbols, key=lambda v: v.name)
    if len(syms) > 6:
        return False
    valid = 0
    points = _SAMPLE_SEEDS if syms else (0,)
    started = time.thread_time()
    for seed in points:
        if time.thread_time() - started > _SYMPY_BUDGET_S:
            raise _OverBudget
        rng = random.Random(seed * 7919 + len(syms))
        subs = {v: sympy.Float(round(rng.uniform(0.31, 2.37), 6)) for v in syms}
        fsubs = {v: complex(float(x)) for v, x in subs.items()}
        for x in (xa, xb):
            probe = _float_probe(x, fsubs, [400])  # raises _Refuse: too costly for evalf
            if not (math.isfinite(probe.real) and math.isfinite(probe.imag)) and not math.isnan(probe.real):
                raise _Refuse
        try:
            va = complex(xa.evalf(30, subs=subs))
            vb = complex(xb.evalf(30, subs=subs))
        except (TypeError, ValueError, OverflowError, ZeroDivisionError, AttributeError):
            return False
        if math.isnan(va.real) or math.isnan(vb.real):
            if math.isnan(va.real) and math.isnan(vb.real):
                continue
            return False
        if not _numeric_close(va, vb):
            return False
        valid += 1
    return valid >= (1 if not syms else 2)


def _parse(expr: str, ns):
    sp = ns["parser"]
    return sp.parse_expr(
        expr, local_dict=dict(ns["local"]), transformations=ns["transformations"], evaluate=False
    )


_SYMPY_CALLS_PER_COMPARISON = 64
_budget = threading.local()


def _sympy_equiv(a: str, b: str) -> bool:
    if len(a) > _SYMPY_MAX_CHARS or len(b) > _SYMPY_MAX_CHARS:
        return False
    left = getattr(_budget, "calls_left", _SYMPY_CALLS_PER_COMPARISON)
    if left <= 0:  # one is_equiv() may not fan out into unbounded sympy work
        return False
    _budget.calls_left = left - 1
    try:
        return _sympy_equiv_cached(a, b)
    except _OverBudget:
        return False


@lru_cache(maxsize=16384)
def _sympy_equiv_cached(a: str, b: str) -> bool:
    try:
        ca = a.count("=")
        cb = b.count("=")
        if ca != cb or ca > 1:
            return False
        if ca == 1:
            la, ra = a.split("=")
            lb, rb = b.split("=")
            sa = f"({_to_sympy_string(la)})-({_to_sympy_string(ra)})"
            sb = f"({_to_sympy_string(lb)})-({_to_sympy_string(rb)})"
        else:
            sa, sb = _to_sympy_string(a), _to_sympy_string(b)
        ns = _sympy_namespace()
        if not ns:
            return False
        xa, xb = _parse(sa, ns), _parse(sb, ns)
        if _exprs_equal(xa, xb, ns):
            return True
        if ca == 1:  # the same equation written the other way round
            return _exprs_equal(xa, ns["sympy"].Mul(-1, xb, evaluate=False), ns)
        return False
    except _OverBudget:
        raise
    except _Refuse:
        return False
    except Exception:
        return False


# --------------------------------------------------------------------------------------
# public comparison API
# --------------------------------------------------------------------------------------


def is_equiv(pred: str | None, gold: str | None, dataset: str = "gsm8k") -> bool:
    """Whether ``pred`` and ``gold`` are the same answer (never raises; None is never equal).

    >>> is_equiv("1,000", "1000"), is_equiv("0.5", r"\\frac12", "math")
    (True, True)
    >>> is_equiv(r"\\frac{\\sqrt{3}}{2}", "sqrt(3)/2", "math"), is_equiv("3", "4")
    (True, False)
    """
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred), str(gold)
        kind = _kind(dataset)
        _budget.calls_left = _SYMPY_CALLS_PER_COMPARISON
        if kind == "gsm8k":
            np_, ng = _normalize_gsm8k(pred), _normalize_gsm8k(gold)
            if np_ == "" or ng == "":
                return False
            vp, vg = _to_number(np_), _to_number(ng)
            if vp is not None and vg is not None:
                return vp == vg or abs(vp - vg) < Fraction(1, 1000)
            return _equiv_norm(_normalize_math(pred), _normalize_math(gold), "gsm8k")
        np_, ng = _normalize_math(pred), _normalize_math(gold)
        if np_ == "" or ng == "":
            return False
        return _equiv_norm(np_, ng, "math")
    except Exception:
        return False


@dataclass(frozen=True)
class Grade:
    """Result of grading one model output: the extracted answer and whether it is correct.

    ``verdicts`` (``grader="both"`` only): each grader's verdict and Math-Verify's extracted
    answer, e.g. ``{"ours": True, "math_verify": False, "math_verify_extracted": "33.333"}``.

    >>> Grade("42", True).correct
    True
    """

    extracted: str | None
    correct: bool
    verdicts: dict | None = field(default=None, compare=False, repr=False)


def grade(output: str, gold: str, dataset: str = "gsm8k", grader: str | None = None) -> Grade:
    """Extract the answer from a model ``output`` and compare it with the ``gold`` answer.

    ``gold`` is the gold *answer*; a full GSM8K solution (``... #### 18``) or a boxed MATH
    solution is accepted too and reduced with :func:`extract_gold`.  ``grader``: ``None`` /
    ``"ours"`` (this module), ``"math_verify"`` (Math-Verify in worker processes, see
    :class:`MathVerifyPool`) or ``"both"`` (correct only when both say so); many outputs at
    once: :func:`grade_many`.

    >>> grade("9 * 2 = 18 dollars. The answer is 18.", "18")
    Grade(extracted='18', correct=True)
    >>> grade(r"Hence $\\boxed{\\dfrac{3}{4}}$.", "3/4", "math").correct
    True
    >>> grade(None, "3")
    Grade(extracted=None, correct=False)
    """
    if grader not in (None, "ours"):
        return grade_many([output], [gold], dataset, grader)[0]
    try:
        extracted = extract_answer(output, dataset)
        try:
            g = "" if gold is None else str(gold)
            if _kind(dataset) == "gsm8k":
                if "####" in g:
                    g = extract_gold(g, dataset)
            elif "\\boxed" in g or "\\fbox" in g:
                g = last_boxed(g) or g
        except Exception:
            g = None
        correct = bool(is_equiv(extracted, g, dataset)) if g is not None else False
        return Grade(extracted, correct)
    except Exception:
        return Grade(None, False)


# --------------------------------------------------------------------------------------
# Math-Verify backend, in worker processes
# --------------------------------------------------------------------------------------
#
# Math-Verify (huggingface ``math-verify``) bounds its sympy work with ``signal.alarm``,
# which only works in a process's main thread: in Ray actors, Serve replicas or any worker
# thread it raises or runs unbounded.  It therefore never runs in the caller's process here:
# each call goes to a small pool of ``python -m tokenskip.grading --math-verify-worker``
# subprocesses (plain subprocesses, not multiprocessing, so nothing depends on the caller's
# ``__main__`` or start method).  A worker grades in its own main thread with Math-Verify's
# alarms set, and the caller enforces a hard per-call wall-clock limit on top: a worker that
# overruns it (e.g. a C-level bignum power that no signal interrupts) is killed by PID and
# replaced, and that call is graded incorrect.

GRADERS = ("ours", "math_verify", "both")
MATH_VERIFY_TIMEOUT_S = 5.0
_WORKER_FLAG = "--math-verify-worker"


def _mv_gold_text(gold: str, kind: str) -> str:
    """The gold answer as LaTeX for Math-Verify's parser (a full GSM8K / boxed solution reduced)."""
    g = "" if gold is None else str(gold)
    if kind == "gsm8k":
        return extract_gold(g, "gsm8k") if "####" in g else g.strip()
    if "\\boxed" in g or "\\fbox" in g:
        return last_boxed(g) or g
    return g.strip()


def _mv_grade_here(output, gold, dataset: str, alarm_s: int, answer: bool = False) -> tuple[str | None, bool]:
    """Math-Verify in the calling thread, with its ``signal.alarm`` limits: main thread only.

    ``answer=False``: ``output`` is a model output (Math-Verify extracts the answer);
    ``answer=True``: ``output`` is already an answer, parsed like the gold.
    """
    from math_verify import parse, verify

    if output is None or gold is None:
        return None, False
    g = _mv_gold_text(gold, _kind(dataset))
    if not g:
        return None, False
    gold_parsed = _mv_parse_answer(g, alarm_s)
    pred = _mv_parse_answer(str(output).strip(), alarm_s) if answer else parse(str(output), parsing_timeout=alarm_s)
    extracted = None
    if pred:
        extracted = next((p for p in pred if isinstance(p, str)), None)
        extracted = extracted if extracted is not None else str(pred[0])
    if not gold_parsed or not pred:
        return extracted, False
    return extracted, bool(verify(gold_parsed, pred, timeout_seconds=alarm_s))


_PLAIN_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


_mv_answer_cache: dict[str, list] = {}


def _mv_parse_answer(ans: str, alarm_s: int):
    """A bare answer (gold, or an already extracted prediction) parsed as Math-Verify's docs do:
    inside ``$...$``.  Plain numbers skip the ANTLR LaTeX parser (5 ms each) for the expression
    parser, which gives the same sympy number.  Memoised, but a failed parse (which may have been
    a timeout) is not."""
    from math_verify import ExprExtractionConfig, parse

    if not ans:
        return []
    hit = _mv_answer_cache.get(ans)
    if hit is not None:
        return hit
    if _PLAIN_NUMBER_RE.fullmatch(ans):
        res = parse(ans, extraction_config=[ExprExtractionConfig()], parsing_timeout=alarm_s)
    else:
        res = parse("$" + ans + "$", parsing_timeout=alarm_s)
    if res:
        if len(_mv_answer_cache) >= 8192:
            _mv_answer_cache.clear()
        _mv_answer_cache[ans] = res
    return res


def _worker_main() -> None:
    """Worker loop: one JSON request per stdin line -> one JSON result per stdout line."""
    import json
    import logging
    import sys

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are reported as results
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    # Warm up before "ready": the first LaTeX parse / sympy comparison of a worker loads
    # parser tables and sympy submodules (1-2 s), which must not count against a call's limit.
    _mv_grade_here(r"so $\boxed{\left( 3, \frac{\pi}{2} \right)}$", r"\left( 3, \frac{\pi}{2} \right)", "math", 30)
    _mv_grade_here(r"$x \in [\frac{\sqrt{2}}{2}, 10^{3}]$", r"[\frac{1}{\sqrt{2}}, 1000]", "math", 30)
    _mv_grade_here("The answer is 1,000.", "1000", "gsm8k", 30)
    _mv_answer_cache.clear()
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            extracted, ok = _mv_grade_here(req["o"], req["g"], req["d"], int(req["a"]), bool(req.get("m")))
            res = {"x": extracted, "c": ok}
        except BaseException as e:  # noqa: BLE001 - one bad input must not end the worker
            if isinstance(e, KeyboardInterrupt):
                raise
            res = {"x": None, "c": False, "e": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps(res) + "\n")
        out.flush()


class _Worker:
    def __init__(self, python: str):
        import os
        import subprocess
        import sys
        from pathlib import Path

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [python or sys.executable, "-m", "tokenskip.grading", _WORKER_FLAG],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=root,
        )
        self.buf = b""
        self.ready = False

    @property
    def fd(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, payload: bytes) -> None:
        self.proc.stdin.write(payload)
        self.proc.stdin.flush()

    def read_lines(self) -> list[bytes] | None:
        """Lines available now (None at EOF: the worker died)."""
        import os

        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return lines

    def kill(self) -> None:
        try:
            self.proc.kill()  # this worker's own PID, never by name
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


class MathVerifyPool:
    """Math-Verify in ``workers`` subprocesses with a hard ``timeout_s`` per call.

    Safe from any thread (Ray actors, Serve replicas, thread pools); calls from several
    threads are served one batch at a time.  Workers start on first use (about a second
    each: they import sympy and the ANTLR LaTeX parser) and live until :meth:`close`.
    Raises ``RuntimeError`` only when a worker cannot start at all (math-verify missing);
    inputs never raise: a call that fails or overruns ``timeout_s`` grades incorrect.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = MATH_VERIFY_TIMEOUT_S, python: str | None = None):
        import os

        if timeout_s <= 0:
            raise ValueError(f"MathVerifyPool timeout_s must be > 0, got {timeout_s}")
        self.workers = max(1, int(workers or min(4, os.cpu_count() or 1)))
        self.timeout_s = float(timeout_s)
        # Math-Verify's own alarms (whole seconds) fire first, so an ordinary slow sympy
        # call ends gracefully; the hard kill is the backstop for what signals cannot stop.
        self._alarm_s = max(1, int(self.timeout_s / 2))
        self._python = python
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self.timeouts = 0  # calls killed at the hard limit, for reporting

    def _spawn(self) -> _Worker:
        import select

        w = _Worker(self._python)
        deadline = time.monotonic() + 120
        while not w.ready:
            left = deadline - time.monotonic()
            r, _, _ = select.select([w.fd], [], [], max(0.0, left))
            lines = w.read_lines() if r else None
            if lines is None:
                w.kill()
                raise RuntimeError(
                    "the Math-Verify grading worker did not start (is `math-verify[antlr4_13_2]` installed "
                    "in this Python?): `python -m tokenskip.grading --math-verify-worker` exited"
                    if r else "the Math-Verify grading worker did not start within 120 s"
                )
            w.ready = b"ready" in lines
        return w

    _WINDOW_BYTES = 60_000  # below a pipe buffer: queued requests never block the caller

    def grade_many(self, items, answers: bool = False) -> list[Grade]:
        """Grade ``(output, gold, dataset)`` triples; results in input order.  With
        ``answers=True`` each ``output`` is an extracted answer compared as it is.

        Requests are pipelined (several queued per worker, in order); the time limit applies
        to each call from the moment its worker starts on it.
        """
        import json
        from collections import deque

        items = list(items)
        payloads = []
        for o, g, d in items:
            try:
                payloads.append(
                    (json.dumps({"o": None if o is None else str(o), "g": None if g is None else str(g),
                                 "d": str(d), "a": self._alarm_s, "m": answers}) + "\n").encode("utf-8", "replace")
                )
            except Exception:
                payloads.append(None)
        results: list[Grade] = [Grade(None, False)] * len(items)
        todo = deque(i for i, p in enumerate(payloads) if p is not None)
        if not todo:
            return results
        with self._lock:
            try:
                return self._run(payloads, todo, results)
            except BaseException:  # interrupted mid-batch: queued answers must not reach the next batch
                for w in self._pool:
                    w.kill()
                self._pool = []
                raise

    def _run(self, payloads: list, todo, results: list[Grade]) -> list[Grade]:
        import json
        import select
        from collections import deque

        while len(self._pool) < min(self.workers, len(todo)):
            self._pool.append(self._spawn())
        queued: dict[int, deque] = {id(w): deque() for w in self._pool}  # item ids sent, in order
        inflight_bytes = {id(w): 0 for w in self._pool}
        head_deadline: dict[int, float] = {}
        by_fd = {w.fd: w for w in self._pool}

        def reset(w_old: _Worker) -> None:
            q = queued.pop(id(w_old))
            inflight_bytes.pop(id(w_old))
            head_deadline.pop(id(w_old), None)
            by_fd.pop(w_old.fd, None)
            todo.extendleft(reversed(q))  # not started: send again to a fresh worker
            w_new = self._replace(w_old)
            queued[id(w_new)] = deque()
            inflight_bytes[id(w_new)] = 0
            by_fd[w_new.fd] = w_new

        while todo or any(queued.values()):
            for w in list(self._pool):
                q = queued[id(w)]
                while todo and (not q or inflight_bytes[id(w)] + len(payloads[todo[0]]) <= self._WINDOW_BYTES):
                    i = todo.popleft()
                    try:
                        w.send(payloads[i])
                    except (BrokenPipeError, OSError):
                        todo.appendleft(i)
                        reset(w)
                        break
                    if not q:
                        head_deadline[id(w)] = time.monotonic() + self.timeout_s
                    q.append(i)
                    inflight_bytes[id(w)] += len(payloads[i])
            busy = [w for w in self._pool if queued[id(w)]]
            if not busy:
                continue
            wait = max(0.0, min(head_deadline[id(w)] for w in busy) - time.monotonic())
            ready, _, _ = select.select([w.fd for w in busy], [], [], wait)
            for fd in ready:
                w = by_fd[fd]
                lines = w.read_lines()
                if lines is None:  # died mid-call (e.g. out of memory): that call is incorrect
                    queued[id(w)].popleft()
                    reset(w)
                    continue
                q = queued[id(w)]
                for line in lines:
                    i = q.popleft()
                    inflight_bytes[id(w)] -= len(payloads[i])
                    res = json.loads(line)
                    results[i] = Grade(res.get("x"), bool(res.get("c")))
                    head_deadline[id(w)] = time.monotonic() + self.timeout_s
            now = time.monotonic()
            for w in list(self._pool):
                if queued[id(w)] and now >= head_deadline[id(w)]:
                    queued[id(w)].popleft()  # the overrunning call: graded incorrect
                    self.timeouts += 1
                    reset(w)
        return results

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        new = self._spawn()
        self._pool[self._pool.index(w)] = new
        return new

    def close(self) -> None:
        with self._lock:
            for w in self._pool:
                w.kill()
            self._pool = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_default_pool: MathVerifyPool | None = None
_default_pool_lock = threading.Lock()


def math_verify_pool() -> MathVerifyPool:
    """The process-wide :class:`MathVerifyPool` (started lazily, closed at exit)."""
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            import atexit

            _default_pool = MathVerifyPool()
            atexit.register(_default_pool.close)
        return _default_pool


def _check_grader(grader: str | None) -> str:
    g = grader or "ours"
    if g not in GRADERS:
        raise ValueError(f"grader must be one of {', '.join(GRADERS)}, got {grader!r}")
    return g


def grade_many(outputs, golds, dataset: str = "gsm8k", grader: str | None = None) -> list[Grade]:
    """:func:`grade` for many outputs (one Math-Verify batch instead of one call each).

    >>> [g.correct for g in grade_many(["The answer is 4.", "so 5"], ["4", "4"])]
    [True, False]
    """
    g = _check_grader(grader)
    outputs, golds = list(outputs), list(golds)
    if len(outputs) != len(golds):
        raise ValueError(f"grade_many: {len(outputs)} outputs but {len(golds)} golds")
    if g == "ours":
        return [grade(o, gold, dataset) for o, gold in zip(outputs, golds)]
    mv = math_verify_pool().grade_many([(o, gold, dataset) for o, gold in zip(outputs, golds)])
    if g == "math_verify":
        return mv
    out = []
    for o, gold, m in zip(outputs, golds, mv):
        ours = grade(o, gold, dataset)
        out.append(Grade(ours.extracted, ours.correct and m.correct,
                         {"ours": ours.correct, "math_verify": m.correct, "math_verify_extracted": m.extracted}))
    return out


def disagreements(samples) -> dict:
    """``{"grader_disagreements": [...]}`` for sample rows graded with ``grader="both"``
    (rows carrying ``grader_verdicts``), listing each row where the graders differ; ``{}``
    when the rows were graded by one grader.

    >>> disagreements([{"id": 1, "extracted": "33", "grader_verdicts": {"ours": True, "math_verify": False}}])
    {'grader_disagreements': [{'id': 1, 'extracted': '33', 'ours': True, 'math_verify': False}]}
    >>> disagreements([{"id": 1, "correct": True}])
    {}
    """
    rows = [s for s in samples if s.get("grader_verdicts")]
    if not rows:
        return {}
    return {"grader_disagreements": [
        {"id": s.get("id"), "extracted": s.get("extracted"), **s["grader_verdicts"]}
        for s in rows if s["grader_verdicts"].get("ours") != s["grader_verdicts"].get("math_verify")
    ]}


if __name__ == "__main__" and _WORKER_FLAG in __import__("sys").argv:
    _worker_main()
