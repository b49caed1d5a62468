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
from serving.routing import ApiError, apply_ratio_to_messages, normalize_messages

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
    budget = number(body, "max_cot_tokens", float, 0.0, lo_open=True)
    if ratio is not None and budget is not None:
        raise ApiError(400, "give either compression_ratio or max_cot_tokens, not both", param="compression_ratio")
    req = {
        "kind": kind, "adapter": adapter, "max_tokens": max_tokens,
        "temperature": number(body, "temperature", float, 0.0, 2.0),
        "top_p": number(body, "top_p", float, 0.0, 1.0, lo_open=True),
        "presence_penalty": number(body, "presence_penalty", float, -2.0, 2.0),
        "frequency_penalty": number(body, "frequency_penalty", float, -2.0, 2.0),
        "seed": number(body, "seed", int, INT64_MIN, INT64_MAX), "stop": _stop(body),
        "compression_ratio": ratio, "max_cot_tokens": budget,
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
    usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
             "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
    if req["kind"] == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                  "finish_reason": out["finish_reason"], "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": out["text"], "finish_reason": out["finish_reason"], "logprobs": None}
        obj = "text_completion"
    return {"id": req["request_id"], "object": obj, "created": int(time.time()) if created is None else created,
            "model": model, "choices": [choice], "usage": usage, "compression_ratio": out["compression_ratio"],
            "tokenskip": out["tokenskip"]}


def stream_chunk(req: dict, model: str, created: int, gamma: float | None, text_: str | None, finish: str | None,
                 first: dict | None = None, usage: dict | None = None) -> dict:
    """One streamed chunk; ``first`` (the ``tokenskip`` metadata) marks the opening chunk,
    ``usage`` the final usage-only chunk."""
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
