"""The compression ratio γ: the one place that validates it, rounds it and spells it.

γ is the share of CoT tokens a TokenSkip prompt asks the model to keep, in (0, 1]. Every
stage, the adapter card and the Serve app go through these functions, so a γ is checked
with the same message everywhere, compared after the same rounding (0.70000001 is 0.7),
and keyed by the same string ("1.0", "0.7", "0.75", never "1"). The string key is also
the text of the prompt marker (:func:`tokenskip.prompt.format_ratio`).

>>> check(0.5), canonical(0.70000001), key(1), parse("0.75")
(0.5, 0.7, '1.0', 0.75)
>>> normalize([0.5, 1, 0.70000001, 0.5])
[1.0, 0.7, 0.5]
>>> check(True)
Traceback (most recent call last):
...
ValueError: ratio: compression ratio must be a number in (0, 1], got True
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

DIGITS = 4  # γ values are compared and keyed after rounding to this many decimals
DEFAULT_RATIOS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
PRUNE_RATIOS: tuple[float, ...] = tuple(r for r in DEFAULT_RATIOS if r < 1.0)  # γ = 1 keeps the CoT as is


def check(value: Any, where: str = "ratio") -> float:
    """γ as a float, or ``ValueError`` naming ``where``: a real number (not a bool, not a
    string), finite, in (0, 1].

    >>> check(1), check(0.25)
    (1.0, 0.25)
    >>> check(1.5, "ratios[0]")
    Traceback (most recent call last):
    ...
    ValueError: ratios[0]: compression ratio must be in (0, 1], got 1.5
    >>> check("0.5", "eval.ratios[1]")
    Traceback (most recent call last):
    ...
    ValueError: eval.ratios[1]: compression ratio must be a number in (0, 1], got '0.5'
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: compression ratio must be a number in (0, 1], got {value!r}")
    r = float(value)
    if not math.isfinite(r) or not 0.0 < r <= 1.0:
        raise ValueError(f"{where}: compression ratio must be in (0, 1], got {value!r}")
    return r


def canonical(value: Any, where: str = "ratio") -> float:
    """The checked γ rounded to :data:`DIGITS` places: equal γ compare equal.

    >>> canonical(0.70000001) == canonical(0.7) == 0.7, canonical(0.123456)
    (True, 0.1235)
    >>> canonical(0.00001)
    Traceback (most recent call last):
    ...
    ValueError: ratio: 0.00001 rounds to 0 (γ needs at most 4 decimals)
    """
    r = round(check(value, where), DIGITS)
    if r <= 0.0:
        raise ValueError(f"{where}: {value:.{DIGITS + 1}f} rounds to 0 (γ needs at most {DIGITS} decimals)")
    return r


def key(value: Any, where: str = "ratio") -> str:
    """The γ string used in manifests, cards, condition ids and the prompt marker: the
    shortest decimal with at least one digit after the point.

    >>> [key(x) for x in (1, 1.0, 0.5, 0.70000001, 0.75, 0.1235)]
    ['1.0', '1.0', '0.5', '0.7', '0.75', '0.1235']
    """
    text = f"{canonical(value, where):.{DIGITS}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def parse(text: Any, where: str = "ratio") -> float:
    """A γ key (or a JSON/YAML number) back to its canonical float.

    >>> parse("1.0"), parse("0.7"), parse("1"), parse(0.5)
    (1.0, 0.7, 1.0, 0.5)
    >>> parse("half", "expected_cot_tokens key")
    Traceback (most recent call last):
    ...
    ValueError: expected_cot_tokens key: compression ratio must be a number in (0, 1], got 'half'
    """
    if isinstance(text, str):
        try:
            value: Any = float(text.strip())
        except ValueError:
            raise ValueError(f"{where}: compression ratio must be a number in (0, 1], got {text!r}") from None
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"{where}: compression ratio must be in (0, 1], got {text!r}")
        return canonical(value, where)
    return canonical(text, where)


def check_list(values: Iterable[Any], where: str = "ratios", unique: bool = False) -> list[float]:
    """A non-empty list of canonical γ in the given order; each bad one is named by index.

    ``unique``: two entries with the same canonical γ are an error.

    >>> check_list([0.9, 0.50000001])
    [0.9, 0.5]
    >>> check_list([0.5, 1.2])
    Traceback (most recent call last):
    ...
    ValueError: ratios[1]: compression ratio must be in (0, 1], got 1.2
    >>> check_list([0.5, 0.5], "prune.ratios", unique=True)
    Traceback (most recent call last):
    ...
    ValueError: prune.ratios has duplicates: [0.5, 0.5]
    >>> check_list([])
    Traceback (most recent call last):
    ...
    ValueError: ratios must not be empty
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{where} must be a list of compression ratios, got {values!r}")
    out = [canonical(v, f"{where}[{i}]") for i, v in enumerate(values)]
    if not out:
        raise ValueError(f"{where} must not be empty")
    if unique and len(set(out)) != len(out):
        raise ValueError(f"{where} has duplicates: {out}")
    return out


def normalize(values: Iterable[Any], where: str = "ratios") -> list[float]:
    """The distinct canonical γ, largest first (the order serving lists them in).

    >>> normalize((0.6, 1.0, 0.6))
    [1.0, 0.6]
    """
    return sorted(set(check_list(values, where)), reverse=True)


__all__ = ["DIGITS", "DEFAULT_RATIOS", "PRUNE_RATIOS", "check", "canonical", "key", "parse", "check_list", "normalize"]
