"""The OpenAI wire format of the Serve app: pure functions, no Ray, no engine.

Request side: the body read with a byte limit (:func:`read_body`), parsed
(:func:`parse_json`) and validated into the model deployment's request dict
(:func:`parse_request`); the API key check (:func:`check_api_key`); the prompt rendering
whose chat-template failures are the client's (:func:`render_text`). Response side: the
full response body (:func:`completion_body`), stream chunks (:func:`stream_chunk`,
:func:`sse`), OpenAI error bodies (:func:`error_body`) and bounded metric labels.

Every client mistake is an :class:`~serving.routing.ApiError` (a 4xx naming the offending
``param``); nothing a client sends reaches the engine unchecked.

>>> req = parse_request({"model": "m:a", "messages": [{"role": "user", "content": "q"}], "n": None}, "chat", "m")
>>> req["adapter"], req["stream"], req["stop"]
('a', False, None)
>>> parse_request({"model": "m", "prompt": "q", "stream": "false"}, "completion", "m")
Traceback (most recent call last):
...
serving.routing.ApiError: 400: stream must be a boolean, got 'false'
"""

from __future__ import annotations

import hmac
import json
import math
import re
import time
import uuid
from typing import Any, AsyncIterable, Iterable

from serving.adapters import split_model
from serving.routing import (
    BUDGET_FIELDS,
    CONTROLS,
    ApiError,
    apply_ratio_to_messages,
    expected_tokens,
    normalize_messages,
)

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_STOP = 4  # OpenAI: "Up to 4 sequences"
MAX_MESSAGES = 2048  # OpenAI's limit on `messages`
MAX_DEPTH = 32  # JSON nesting depth (the deepest valid request is ~5)
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "response_format", "best_of",
               "suffix", "audio", "modalities", "prediction")
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


# ----------------------------------------------------------------------------- errors

_URI_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]*")
_PATH_RE = re.compile(r"(?<![\w.~])(?:/[^\s'\"/:]+){2,}/?")


def scrub(message: str) -> str:
    """An error message with object-store URIs and local paths replaced (clients never learn
    where adapters or models live).

    >>> scrub("adapter 's3://bucket/a' cannot be read: /tmp/x/adapter_config.json missing")
    "adapter '<uri>' cannot be read: <path> missing"
    >>> scrub("invalid adapter id '../etc': use letters (no paths)")
    "invalid adapter id '../etc': use letters (no paths)"
    """
    return _PATH_RE.sub("<path>", _URI_RE.sub("<uri>", message))


def error_body(e: ApiError) -> dict:
    """OpenAI's ``{"error": {message, type, param, code}}`` for ``e`` (message scrubbed).

    >>> error_body(ApiError(405, "Method Not Allowed"))["error"]["type"]
    'invalid_request_error'
    """
    status = int(e.status)
    default = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": scrub(str(e.message)), "type": ERROR_TYPES.get(status, default),
                      "param": e.param, "code": e.code}}


def error_headers(e: ApiError, default_retry_after: float = 1) -> dict[str, str]:
    """``Retry-After`` for 503s (and 429s)."""
    if e.status in (429, 503):
        return {"Retry-After": str(int(max(1, math.ceil(e.retry_after or default_retry_after))))}
    return {}


def dumps(obj: Any) -> str:
    """JSON text safe for any content (ASCII-escaped, so lone surrogates can't break encoding)."""
    return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


# ----------------------------------------------------------------------------- request body


async def read_body(chunks: AsyncIterable[bytes], limit: int, content_length: str | None = None) -> bytes:
    """The body, read chunk by chunk and abandoned with 413 as soon as it passes ``limit``
    bytes (a chunked upload is never buffered beyond the limit)."""
    if content_length is not None:
        declared = content_length.strip()
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    return bytes(buf)


def _depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return False
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return True


def parse_json(raw: bytes) -> Any:
    """The JSON document in ``raw``; 400 for invalid JSON, bad UTF-8 or nesting deeper than
    :data:`MAX_DEPTH`."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"the request body is nested too deeply (limit {MAX_DEPTH})", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not _depth_ok(body, MAX_DEPTH):
        raise ApiError(400, f"the request body is nested too deeply (limit {MAX_DEPTH})", code="invalid_json")
    return body


# ----------------------------------------------------------------------------- auth


def check_api_key(authorization: str | None, keys: Iterable[bytes] | None) -> None:
    """401 unless ``Authorization: Bearer <key>`` names one of ``keys``; ``keys`` None = auth
    off. Every key is compared in constant time (no early exit on the first match), and an
    empty key set accepts nothing.

    >>> check_api_key("Bearer k1", [b"k0", b"k1"])
    >>> check_api_key("Bearer k1", [])
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 401: invalid or missing API key (Authorization: Bearer <key>)
    """
    if keys is None:
        return
    header = authorization or ""
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    given = token.encode("utf-8", "replace")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    if not ok or not token:
        raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")


# ----------------------------------------------------------------------------- validation


def _show(v: Any) -> str:
    """A short description of a client value for an error message."""
    if v is None or isinstance(v, (bool, int, float)):
        text = repr(v)
    elif isinstance(v, str):
        text = repr(v[:40] + ("..." if len(v) > 40 else ""))
    else:
        text = f"a{'n' if type(v).__name__[0] in 'aeiou' else ''} {type(v).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def number(body: dict, name: str, kind: type, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> Any:
    """``body[name]`` as a finite ``kind`` in [lo, hi] (``(lo, hi]`` with ``lo_open``), None if absent.

    >>> number({"t": 0.5}, "t", float, 0, 2), number({"k": 3.0}, "k", int, 1)
    (0.5, 3)
    >>> number({"t": float("nan")}, "t", float, 0, 2)
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 400: t must be a finite number in [0, 2], got nan
    """
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok and isinstance(v, float):
        ok = math.isfinite(v) and (kind is float or v.is_integer())
    if ok:
        try:
            v = kind(v)
        except (OverflowError, ValueError):
            ok = False
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        what = "an integer" if kind is int else "a finite number"
        if lo is not None and hi is not None:
            rng = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        elif lo is not None:
            rng = f" {'>' if lo_open else '>='} {lo:g}"
        else:
            rng = ""
        raise ApiError(400, f"{name} must be {what}{rng}, got {_show(body.get(name))}", param=name)
    return v


def boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be a boolean, got {_show(v)}", param=name)
    return v


def text(value: Any, param: str, what: str | None = None) -> str:
    """A client string that is valid Unicode (JSON lets lone surrogates through)."""
    if not isinstance(value, str):
        raise ApiError(400, f"{what or param} must be a string, got {_show(value)}", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{what or param} is not valid Unicode (unpaired surrogate)", param=param) from None
    return value


def _stop(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop must be a string or a list of strings, got {_show(stop)}", param="stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} sequences, got {len(stops)}", param="stop")
    for s in stops:
        if not text(s, "stop"):
            raise ApiError(400, "stop sequences must not be empty", param="stop")
    return stops or None


def parse_request(body: Any, kind: str, base_id: str) -> dict:
    """Validate an OpenAI request body into the model deployment's request dict (400s)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_show(body)}")
    adapter = split_model(body.get("model"), base_id)
    if number(body, "n", int) not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise ApiError(400, f"{name} is not supported by this endpoint", param=name)
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise ApiError(400, "logprobs are not supported by this endpoint", param="logprobs")
    if body.get("echo") not in (None, False):
        raise ApiError(400, "echo is not supported by this endpoint", param="echo")
    max_tokens = number(body, "max_completion_tokens", int, 1, INT64_MAX)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", int, 1, INT64_MAX)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(400, f"stream_options must be an object, got {_show(stream_options)}", param="stream_options")
    ratio = number(body, "compression_ratio", float, 0.0, 1.0, lo_open=True)
    budgets = {f: number(body, f, float, 0.0, lo_open=True) for f in BUDGET_FIELDS}
    effort = body.get("reasoning_effort")
    if effort is not None:  # its value is checked against the adapter's effort map (routing.effort_ratio)
        effort = text(effort, "reasoning_effort")
    values = {"compression_ratio": ratio, **budgets, "reasoning_effort": effort}
    given = [c for c in CONTROLS if values[c] is not None]
    if len(given) > 1:
        raise ApiError(400, f"give either {given[0]} or {given[1]}, not both (one reasoning control per request: "
                            f"{', '.join(CONTROLS)})", param=given[0])
    budget_param = next((f for f in BUDGET_FIELDS if budgets[f] is not None), None)
    budget = budgets[budget_param] if budget_param else None
    mode = body.get("budget")
    if mode not in (None, "hard", "soft"):
        raise ApiError(400, f"budget must be 'hard' or 'soft', got {_show(mode)}", param="budget")
    if mode == "hard":
        if budget is None:
            raise ApiError(400, f"budget 'hard' needs a token budget: one of {', '.join(BUDGET_FIELDS)}",
                           param="budget")
        hard_cap(budget, budget_param)
    req = {
        "kind": kind, "adapter": adapter, "max_tokens": max_tokens,
        "temperature": number(body, "temperature", float, 0.0, 2.0),
        "top_p": number(body, "top_p", float, 0.0, 1.0, lo_open=True),
        "presence_penalty": number(body, "presence_penalty", float, -2.0, 2.0),
        "frequency_penalty": number(body, "frequency_penalty", float, -2.0, 2.0),
        "seed": number(body, "seed", int, INT64_MIN, INT64_MAX), "stop": _stop(body),
        "compression_ratio": ratio, "max_cot_tokens": budget, "budget_param": budget_param or "max_cot_tokens",
        "reasoning_effort": effort, "budget_mode": mode,
        "return_prompt": boolean(body, "return_prompt"), "stream": boolean(body, "stream"),
        "include_usage": boolean(stream_options or {}, "include_usage"),
        "request_id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
    }
    if kind == "chat":
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
            raise ApiError(400, f"messages: at most {MAX_MESSAGES} messages, got {len(messages)}", param="messages")
        req["messages"] = normalize_messages(messages)
        for i, m in enumerate(req["messages"]):
            text(m["content"], "messages", f"messages[{i}].content")
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str) or not p:
            raise ApiError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
        req["prompt"] = text(p, "prompt")
    return req


# ----------------------------------------------------------------------------- hard budget (issue 16)
# A hard budget B caps the CoT: the first engine call generates with max_tokens = B; when it
# stopped at B without the answer sentence, the server appends the sentence's opening
# (tokenskip.prompt.ANSWER_OPENING) and a second call continues from prompt + CoT + opening
# with a small cap, so the model writes only the answer. The deployment makes the two calls;
# every decision is here.


def hard_cap(budget: float, param: str = "max_cot_tokens") -> int:
    """The CoT token cap of a hard budget: whole tokens, at least 1.

    >>> hard_cap(40.9), hard_cap(1)
    (40, 1)
    >>> hard_cap(0.5, "thinking_token_budget")
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 400: a hard budget needs thinking_token_budget >= 1 token, got 0.5
    """
    cap = int(math.floor(budget))
    if cap < 1:
        raise ApiError(400, f"a hard budget needs {param} >= 1 token, got {_show(budget)}", param=param)
    return cap


def hard_budget(req: dict, app_default: bool) -> int | None:
    """The CoT cap for a validated request: its budget when ``budget`` is ``hard`` (or the app
    makes budgets hard by default and the request did not say ``soft``), else None.

    >>> hard_budget({"max_cot_tokens": 64.0, "budget_mode": None}, True), hard_budget({"max_cot_tokens": 64.0}, False)
    (64, None)
    >>> hard_budget({"max_cot_tokens": 64.0, "budget_mode": "soft"}, True) is None
    True
    """
    budget, mode = req.get("max_cot_tokens"), req.get("budget_mode")
    if budget is None or mode == "soft" or (mode is None and not app_default):
        return None
    return hard_cap(budget, req.get("budget_param") or "max_cot_tokens")


def forced_suffix(cot: str) -> str:
    """What the server appends to a CoT cut by a hard budget:
    :func:`tokenskip.prompt.forced_answer_suffix` (the layout evaluation's budget forcing uses too).

    >>> forced_suffix("2+3=5")
    '\\n\\nThe final answer is: $\\\\boxed{'
    >>> forced_suffix("2+3=5\\n") == "\\n" + forced_suffix("")
    True
    """
    from tokenskip.prompt import forced_answer_suffix

    return forced_answer_suffix(cot)


_PREFIX_ONLY_RE = re.compile(r"the final answer is\s*:?\s*\$?\s*$", re.IGNORECASE)


def _answer_unfinished(answer: str) -> bool:
    """Whether an answer sentence was cut before its answer: an unclosed ``\\boxed{`` or
    nothing after "The final answer is:"."""
    i = answer.rfind("\\boxed{")
    if i >= 0:
        depth = 0
        for ch in answer[i + len("\\boxed") :]:
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return False
        return True
    return bool(_PREFIX_ONLY_RE.fullmatch(answer.strip()))


def answer_step(text_: str, finish_reason: str | None, n_generated: int, cap: int) -> str | None:
    """What follows the first (CoT-capped) call of a hard-budget request: None = nothing (the
    model stopped by itself, or it finished its answer sentence within the budget); ``""`` =
    continue without forcing (the answer sentence began within the budget but was cut); any
    other string = the forced text to append before the model writes the answer (the hard cap
    fired: the CoT used the whole budget without reaching the answer sentence).

    >>> answer_step("2+3=5. The final answer is: $\\\\boxed{5}$", "stop", 12, 40) is None
    True
    >>> answer_step("2+3 is", "length", 40, 40)
    '\\n\\nThe final answer is: $\\\\boxed{'
    >>> answer_step("2+3=5\\n\\nThe final answer is: $\\\\boxed{", "length", 40, 40)
    ''
    >>> answer_step("2+3=5\\n\\nThe final answer is: $\\\\boxed{5}$ and so", "length", 40, 40) is None
    True
    """
    from tokenskip.prompt import split_answer

    if finish_reason != "length" or n_generated < cap:
        return None
    _, answer = split_answer(text_)
    if not answer:
        return forced_suffix(text_)
    return "" if _answer_unfinished(answer) else None


def answer_cap(max_answer_tokens: int, total_max_tokens: int, used: int, context_left: int) -> int:
    """Tokens the answer continuation may generate: the configured cap, within what is left of
    the request's ``max_tokens`` after ``used`` completion tokens (CoT + forced text) and of the
    context. 0 = no room: the request ends where the CoT stopped.

    >>> answer_cap(24, 512, 40 + 12, 10_000), answer_cap(24, 60, 52, 10_000), answer_cap(24, 512, 52, 5)
    (24, 8, 5)
    >>> answer_cap(24, 50, 52, 100)
    0
    """
    return max(0, min(max_answer_tokens, total_max_tokens - used, context_left))


def continuation_ids(prompt_ids: list[int], generated_ids: list[int], forced_ids: list[int]) -> list[int]:
    """The prompt of the answer continuation: the original prompt ids, the CoT exactly as the
    model generated it (its token ids, not re-tokenized text), then the forced opening.

    >>> continuation_ids([1, 2], [3, 4], [5])
    [1, 2, 3, 4, 5]
    """
    return [*prompt_ids, *generated_ids, *forced_ids]


def reasoning_tokens(tokenizer: Any, text_: str, cot_generated: int | None = None) -> int:
    """CoT tokens of an output: the target tokenizer's tokens of the text before the answer
    sentence (:func:`tokenskip.prompt.split_answer`, as evaluation counts them), at most
    ``cot_generated`` (the tokens the engine generated before the sentence could start: a
    hard budget's CoT call), so a re-tokenization never reports more than was generated."""
    from tokenskip.prompt import split_answer

    cot, _ = split_answer(text_)
    n = len(tokenizer(cot, add_special_tokens=False)["input_ids"]) if cot else 0
    return n if cot_generated is None else min(n, cot_generated)


def realized_ratio(reasoning: int, table: dict[float, float] | None) -> float | None:
    """Reasoning tokens over the adapter's expected CoT length at γ = 1 (None when unknown).

    >>> realized_ratio(50, {1.0: 200.0}), realized_ratio(50, {}), realized_ratio(7, {0.5: 90.0})
    (0.25, None, None)
    """
    base = expected_tokens(table or {}, 1.0)
    return round(reasoning / base, 4) if base else None


def usage(prompt_tokens: int, completion_tokens: int, reasoning: int | None) -> dict:
    """OpenAI's ``usage`` with ``completion_tokens_details.reasoning_tokens``.

    >>> usage(3, 5, 4)["completion_tokens_details"]
    {'reasoning_tokens': 4}
    """
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


# ----------------------------------------------------------------------------- prompt


def render_text(tokenizer: Any, req: dict, ratio: float | None) -> tuple[str, bool]:
    """(prompt text, add_special_tokens) for a validated request at γ ``ratio``; a chat
    template that rejects the messages (roles it doesn't support, ...) is the client's 400."""
    from tokenskip import prompt as tsprompt

    param = "messages" if req["kind"] == "chat" else "prompt"
    try:
        if req["kind"] == "chat":
            messages = apply_ratio_to_messages(req["messages"], ratio)
            return tsprompt.render_messages(tokenizer, messages), False  # the template placed special tokens
        if ratio is not None:
            return tsprompt.render_prompt(tokenizer, req["prompt"], ratio), False
    except ApiError:
        raise
    except Exception as e:  # jinja2.TemplateError (raise_exception in a template), ValueError, ...
        if not _is_template_error(e):
            raise
        raise ApiError(400, f"the model's chat template rejected the {param}: {str(e)[:300]}", param=param,
                       code="invalid_messages") from None
    return req["prompt"], True


def _is_template_error(e: Exception) -> bool:
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - transformers depends on jinja2
        TemplateError = ()  # noqa: N806
    return isinstance(e, (TemplateError, ValueError, TypeError, KeyError, IndexError))


def check_context(n_prompt: int, max_tokens: int, max_model_len: int, kind: str) -> None:
    """400 ``context_length_exceeded`` when the prompt (plus ``max_tokens``) doesn't fit.

    >>> check_context(600, 10, 512, "chat")
    Traceback (most recent call last):
    ...
    serving.routing.ApiError: 400: the prompt is 600 tokens; this model's context is 512 tokens
    """
    if n_prompt >= max_model_len:
        raise ApiError(400, f"the prompt is {n_prompt} tokens; this model's context is {max_model_len} tokens",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    if n_prompt + max_tokens > max_model_len:
        raise ApiError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                            f"{max_model_len} tokens", param="max_tokens", code="context_length_exceeded")


# ----------------------------------------------------------------------------- responses


def model_name(base_id: str, adapter: str | None) -> str:
    return base_id + (f":{adapter}" if adapter else "")


def completion_body(req: dict, out: dict, model: str, created: int | None = None) -> dict:
    """The non-streaming response (``chat.completion`` / ``text_completion``)."""
    usage_ = usage(out["prompt_tokens"], out["completion_tokens"], out.get("reasoning_tokens"))
    if req["kind"] == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                  "finish_reason": out["finish_reason"], "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": out["text"], "finish_reason": out["finish_reason"], "logprobs": None}
        obj = "text_completion"
    return {"id": req["request_id"], "object": obj, "created": int(time.time()) if created is None else created,
            "model": model, "choices": [choice], "usage": usage_, "compression_ratio": out["compression_ratio"],
            "tokenskip": out["tokenskip"]}


def stream_chunk(req: dict, model: str, created: int, gamma: float | None, text_: str | None, finish: str | None,
                 first: dict | None = None, usage: dict | None = None, final: dict | None = None) -> dict:
    """One streamed chunk; ``first`` (the ``tokenskip`` metadata) marks the opening chunk,
    ``usage`` the final usage-only chunk, ``final`` (the ``tokenskip`` metadata with the
    request's outcome: reasoning tokens, realized ratio, whether a hard cap fired) the chunk
    that carries the finish reason."""
    if req["kind"] == "chat":
        if first is not None:
            delta: dict = {"role": "assistant", "content": text_ or ""}
        else:
            delta = {"content": text_} if text_ else {}
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        obj = "chat.completion.chunk"
    else:
        choices = [{"index": 0, "text": text_ or "", "finish_reason": finish, "logprobs": None}]
        obj = "text_completion"
    body = {"id": req["request_id"], "object": obj, "created": created, "model": model, "choices": choices,
            "compression_ratio": gamma}
    if first is not None:
        body["tokenskip"] = first
    if final is not None:
        body["tokenskip"] = final
    if usage is not None:
        body["choices"], body["usage"] = [], usage
    return body


def sse(obj: dict) -> str:
    return f"data: {dumps(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- metric labels


def gamma_label(ratio: Any, known: Iterable[float]) -> str:
    """A bounded metric label for γ: its key when it is one of ``known``, ``none`` when
    absent, else ``invalid`` (clients can't create new series).

    >>> gamma_label(0.5, [1.0, 0.5]), gamma_label(None, []), gamma_label(0.0, [1.0]), gamma_label(0.3, [1.0])
    ('0.5', 'none', 'invalid', 'invalid')
    """
    if ratio is None:
        return "none"
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        return "invalid"
    for g in known:
        if abs(float(ratio) - g) < 1e-6:
            from tokenskip.prompt import format_ratio

            return format_ratio(g)
    return "invalid"


def adapter_label(adapter: str | None, known: Iterable[str]) -> str:
    """``base``, a known adapter id, or ``unknown``.

    >>> adapter_label(None, []), adapter_label("a", ["a"]), adapter_label("zz", ["a"])
    ('base', 'a', 'unknown')
    """
    if not adapter:
        return "base"
    return adapter if adapter in known else "unknown"
