"""γ routing for the Serve app: pure functions, no Ray, no model (docs/method.md §5).

A request picks its compression in one of three ways:

* no ``compression_ratio`` and no budget: the messages / prompt pass through unchanged;
* ``compression_ratio`` = γ: the last user message becomes
  ``prompt.user_content(message, γ)`` (the TokenSkip instruction, the question, and the
  marker when γ < 1), exactly the training format; γ must be one the adapter was
  trained for;
* ``max_cot_tokens`` = B (a reasoning budget; ``thinking_token_budget`` and
  ``max_thinking_tokens`` are the same control under the names other servers use): the
  largest valid γ whose expected CoT length fits in B is chosen, from the adapter's table
  of expected CoT tokens per γ;
* ``reasoning_effort`` (OpenAI's ``minimal|low|medium|high``): γ from the adapter's effort
  map (:func:`effort_map`: by default ``high`` → 1.0, ``medium`` → the middle trained γ,
  ``low`` → the smallest trained γ; ``minimal`` only when configured).

>>> r = route(0.5, None, [1.0, 0.5])
>>> (r.ratio, r.source)
(0.5, 'explicit')
>>> route(None, None, [1.0, 0.5]).ratio is None
True
>>> route(None, 120, [1.0, 0.7, 0.5], {1.0: 200, 0.7: 140, 0.5: 100}).ratio
0.5
>>> route(None, None, [1.0, 0.7, 0.5], reasoning_effort="medium")
Route(ratio=0.7, source='effort', expected_cot_tokens=None, budget_fits=None)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tokenskip import card as tscard
from tokenskip import gamma
from tokenskip import prompt as tsprompt


class ApiError(Exception):
    """An error the client caused (or overload), rendered in OpenAI's error format.

    Picklable across Ray (all state in ``args``), so a model replica can raise it and the
    ingress can turn it into the HTTP response.

    >>> e = ApiError(400, "bad", param="compression_ratio")
    >>> e.body()["error"]["param"], e.status
    ('compression_ratio', 400)
    """

    _TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "request_too_large",
        503: "overloaded_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(status, message, param, code, retry_after)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def __str__(self) -> str:
        return f"{self.status}: {self.message}"

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self._TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def parse_ratio_table(table: Mapping[Any, Any] | None, where: str = "expected_cot_tokens") -> dict[float, float]:
    """``{γ: expected CoT tokens}`` from a mapping with γ-key or number keys (YAML/JSON).

    >>> parse_ratio_table({"1.0": 200, 0.5: 110.5})
    {1.0: 200.0, 0.5: 110.5}
    >>> parse_ratio_table({"1.0": -3})
    Traceback (most recent call last):
    ...
    ValueError: expected_cot_tokens: expected tokens for γ=1.0 must be >= 0, got -3
    """
    out: dict[float, float] = {}
    for k, v in (table or {}).items():
        g = gamma.parse(k, f"{where} key {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{where}: expected tokens for γ={gamma.key(g)} must be >= 0, got {v!r}")
        out[g] = float(v)
    return out


def table_from_eval_results(
    results: Any, dataset: str | None = None, source: str = "results.json"
) -> dict[float, float]:
    """Expected CoT tokens per γ from an evaluate stage ``results.json``: its TokenSkip
    rows under ``datasets.<name>.conditions`` (``dataset`` None: the first dataset), read
    the same way the adapter card's evaluation is (:func:`tokenskip.card.evaluation_from_results`).

    >>> table_from_eval_results({"datasets": {"gsm8k": {"conditions": [
    ...     {"method": "original", "ratio": None, "mean_tokens": 260},
    ...     {"method": "tokenskip", "ratio": 1.0, "mean_cot_tokens": 200, "mean_tokens": 210},
    ...     {"method": "truncation", "ratio": 0.5, "mean_tokens": 100},
    ...     {"method": "tokenskip", "ratio": 0.5, "mean_tokens": 90}]}}})
    {1.0: 200.0, 0.5: 90.0}
    >>> table_from_eval_results({"rows": []})
    Traceback (most recent call last):
    ...
    tokenskip.card.CardError: results.json: not an evaluate results.json (no 'datasets' mapping)
    """
    return tscard.expected_cot_tokens(tscard.evaluation_from_results(results, source), dataset, source)


def expected_tokens(table: Mapping[float, float], ratio: float) -> float | None:
    """Expected CoT tokens at γ: the table entry, else γ × the γ=1 entry, else None.

    >>> expected_tokens({1.0: 200.0}, 0.5), expected_tokens({0.5: 90.0}, 0.5), expected_tokens({}, 0.5)
    (100.0, 90.0, None)
    """
    if ratio in table:
        return float(table[ratio])
    if 1.0 in table:
        return float(table[1.0]) * ratio
    return None


# ----------------------------------------------------------------------------- reasoning_effort

EFFORTS = ("minimal", "low", "medium", "high")  # OpenAI's reasoning_effort values a config may map
BUDGET_FIELDS = ("max_cot_tokens", "thinking_token_budget", "max_thinking_tokens")  # one control, three names
CONTROLS = ("compression_ratio", *BUDGET_FIELDS, "reasoning_effort")  # at most one per request


def default_effort_map(ratios: Sequence[float]) -> dict[str, float]:
    """The effort → γ map an adapter gets from its trained ratios alone: ``high`` → 1.0 (the
    largest trained γ if 1.0 is not one), ``medium`` → the middle trained γ (of an even count,
    the larger of the two middle ones: less compression), ``low`` → the smallest trained γ.
    ``minimal`` is not mapped: an adapter cannot think less than its smallest trained γ, so
    ``minimal`` is a 400 unless the app's config maps it explicitly.

    >>> default_effort_map([1.0, 0.7, 0.5])
    {'high': 1.0, 'medium': 0.7, 'low': 0.5}
    >>> default_effort_map([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    {'high': 1.0, 'medium': 0.8, 'low': 0.5}
    >>> default_effort_map([1.0])
    {'high': 1.0, 'medium': 1.0, 'low': 1.0}
    """
    desc = gamma.normalize(ratios, "trained ratios")
    return {"high": desc[0], "medium": desc[(len(desc) - 1) // 2], "low": desc[-1]}


def parse_effort_config(mapping: Any, where: str = "reasoning_effort") -> dict[str, float | None]:
    """A configured ``{effort: γ}`` map, checked for shape (keys from :data:`EFFORTS`, values a
    γ or null = "this effort is not offered"); ValueError naming the entry.

    >>> parse_effort_config({"minimal": "0.5", "medium": None})
    {'minimal': 0.5, 'medium': None}
    >>> parse_effort_config({"none": 0.5})
    Traceback (most recent call last):
    ...
    ValueError: reasoning_effort: unknown effort 'none' (valid keys: minimal, low, medium, high)
    """
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where} must be a mapping effort -> compression ratio, got {mapping!r}")
    out: dict[str, float | None] = {}
    for k, v in mapping.items():
        if k not in EFFORTS:
            raise ValueError(f"{where}: unknown effort {k!r} (valid keys: {', '.join(EFFORTS)})")
        out[k] = None if v is None else gamma.parse(v, f"{where}.{k}")
    return out


def effort_map(
    ratios: Sequence[float], configured: Mapping[str, float | None] | None = None, where: str = "reasoning_effort"
) -> dict[str, float]:
    """The effort → γ map of a model with these trained ``ratios``: :func:`default_effort_map`
    with the configured entries laid over it (a null entry removes that effort). A configured
    γ that the model was not trained for is a ValueError naming it and the trained ratios (the
    app refuses to start with such a config).

    >>> effort_map([1.0, 0.7, 0.5], {"minimal": 0.5, "medium": None})
    {'high': 1.0, 'low': 0.5, 'minimal': 0.5}
    >>> effort_map([1.0, 0.8, 0.5], {"low": 0.7}, "adapters[a].reasoning_effort")
    Traceback (most recent call last):
    ...
    ValueError: adapters[a].reasoning_effort.low: γ=0.7 is not a trained ratio of this model (trained: 1.0, 0.8, 0.5)
    """
    valid = gamma.normalize(ratios, "trained ratios")
    out: dict[str, float] = default_effort_map(valid)
    for k, v in parse_effort_config(configured or {}, where).items():
        if v is None:
            out.pop(k, None)
            continue
        if not any(abs(v - g) < 1e-6 for g in valid):
            raise ValueError(f"{where}.{k}: γ={gamma.key(v)} is not a trained ratio of this model "
                             f"(trained: {_valid_list(valid)})")
        out[k] = v
    return out


def effort_ratio(effort: Any, efforts: Mapping[str, float]) -> float:
    """The γ for a request's ``reasoning_effort``; a 400 naming the supported values for an
    effort this model can't honour (``none``, ``minimal`` when not configured, unknown words).

    >>> effort_ratio("low", {"high": 1.0, "low": 0.5})
    0.5
    >>> effort_ratio("none", {"high": 1.0, "low": 0.5})
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 400: reasoning_effort 'none' is not supported by this model; supported values: low, high
    """
    supported = [e for e in EFFORTS if e in efforts]
    if not isinstance(effort, str):
        raise ApiError(400, f"reasoning_effort must be a string (one of {', '.join(supported)}), got {effort!r}",
                       param="reasoning_effort")
    if effort not in efforts:
        shown = effort if len(effort) <= 40 else effort[:40] + "..."
        raise ApiError(400, f"reasoning_effort {shown!r} is not supported by this model; supported values: "
                            f"{', '.join(supported)}", param="reasoning_effort", code="unsupported_reasoning_effort")
    return efforts[effort]


@dataclass(frozen=True)
class Route:
    """The γ a request runs at. ``ratio`` None = no TokenSkip formatting at all."""

    ratio: float | None
    source: str  # "none" | "explicit" | "budget" | "effort"
    expected_cot_tokens: float | None = None
    budget_fits: bool | None = None


def _valid_list(valid: Sequence[float]) -> str:
    return ", ".join(gamma.key(v) for v in valid)


def route(
    compression_ratio: Any,
    max_cot_tokens: Any,
    valid_ratios: Sequence[float],
    expected: Mapping[float, float] | None = None,
    *,
    reasoning_effort: Any = None,
    efforts: Mapping[str, float] | None = None,
    budget_param: str = "max_cot_tokens",
) -> Route:
    """Choose γ for a request; :class:`ApiError` (400) for invalid parameters.

    ``budget_param`` is the field the budget came in (errors name it); ``efforts`` the
    model's effort map (default: :func:`default_effort_map` of ``valid_ratios``).

    >>> route(0.3, None, [1.0, 0.5])
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 400: compression_ratio 0.3 is not supported by this model; valid values: 1.0, 0.5
    >>> route(None, 50, [1.0, 0.5], {1.0: 200})          # nothing fits: smallest γ, flagged
    Route(ratio=0.5, source='budget', expected_cot_tokens=100.0, budget_fits=False)
    >>> route(0.5, 100, [1.0, 0.5]).source
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 400: give either compression_ratio or max_cot_tokens, not both
    """
    valid = gamma.normalize(valid_ratios, "valid ratios")
    given = [n for n, v in (("compression_ratio", compression_ratio), (budget_param, max_cot_tokens),
                            ("reasoning_effort", reasoning_effort)) if v is not None]
    if len(given) > 1:
        raise ApiError(400, f"give either {given[0]} or {given[1]}, not both", param=given[0])
    if reasoning_effort is not None:
        g = effort_ratio(reasoning_effort, default_effort_map(valid) if efforts is None else efforts)
        g = next((v for v in valid if abs(g - v) < 1e-6), None)
        if g is None:  # pragma: no cover - effort_map validated the map against these ratios
            raise ApiError(500, "the reasoning_effort map does not fit this model's ratios", code="adapter_invalid")
        return Route(g, "effort", expected_tokens(expected or {}, g))
    if compression_ratio is not None:
        if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)):
            raise ApiError(
                400, f"compression_ratio must be a number, got {compression_ratio!r}", param="compression_ratio"
            )
        g = float(compression_ratio)
        if not math.isfinite(g) or not any(abs(g - v) < 1e-6 for v in valid):
            raise ApiError(
                400,
                f"compression_ratio {compression_ratio} is not supported by this model; valid values: "
                f"{_valid_list(valid)}",
                param="compression_ratio",
                code="invalid_compression_ratio",
            )
        g = next(v for v in valid if abs(g - v) < 1e-6)
        return Route(g, "explicit", expected_tokens(expected or {}, g))
    if max_cot_tokens is not None:
        if isinstance(max_cot_tokens, bool) or not isinstance(max_cot_tokens, (int, float)) or max_cot_tokens <= 0:
            raise ApiError(
                400, f"{budget_param} must be a positive number, got {max_cot_tokens!r}", param=budget_param
            )
        table = expected or {}
        known = [(v, expected_tokens(table, v)) for v in valid]
        known = [(v, t) for v, t in known if t is not None]
        if not known:
            raise ApiError(
                400,
                f"{budget_param} needs expected CoT lengths for this model (the evaluation on its "
                "adapter card, the config's eval_results or expected_cot_tokens); give "
                "compression_ratio instead",
                param=budget_param,
            )
        fitting = [(v, t) for v, t in known if t <= max_cot_tokens]
        if fitting:
            g, t = max(fitting)
            return Route(g, "budget", t, True)
        g, t = min(known)
        return Route(g, "budget", t, False)
    return Route(None, "none")


def _text_of(content: Any, where: str) -> str:
    """Message content as text: a string or OpenAI text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"{where}[{i}]: only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, f"{where} must be a string or a list of text parts", param="messages")


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Validate chat messages into ``[{"role", "content"}]`` with text content.

    >>> normalize_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    [{'role': 'user', 'content': 'hi'}]
    >>> normalize_messages([])
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 400: messages must be a non-empty list
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(400, f"messages[{i}] needs a role of system/user/assistant", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text_of(m.get("content"), f"messages[{i}].content")})
    return out


def apply_ratio_to_messages(messages: Sequence[dict[str, str]], ratio: float | None) -> list[dict[str, str]]:
    """Put the TokenSkip instruction + γ marker on the LAST user message.

    The user's message is the question; the adapter was trained on
    ``INSTRUCTION + "\\n" + question (+ marker)``, so the instruction is prepended too.
    ``ratio`` None leaves the messages unchanged.

    >>> msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
    ...         {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
    >>> apply_ratio_to_messages(msgs, 0.5)[-1]["content"].endswith("\\nQ2<|eot_id|>0.5<|eot_id|>")
    True
    >>> apply_ratio_to_messages(msgs, 0.5)[1]["content"]
    'Q1'
    >>> apply_ratio_to_messages(msgs, None) == msgs
    True
    """
    out = [dict(m) for m in messages]
    if ratio is None:
        return out
    idx = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
    if idx is None:
        raise ApiError(400, "compression_ratio, budgets and reasoning_effort need a user message (the question)",
                       param="messages")
    out[idx]["content"] = tsprompt.user_content(out[idx]["content"], ratio)
    return out
