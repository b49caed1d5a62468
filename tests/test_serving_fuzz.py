"""Property-based HTTP fuzz of the running Serve app (issue 15, item 2): random JSON shapes,
types, sizes and nesting, alone or spliced into otherwise valid requests, thrown at both
endpoints. Whatever arrives: never a 5xx, every error in OpenAI's schema, and the app still
answers a normal request afterwards. It runs against the session's app of tests/test_serving.py
(the docs-enabled app is checked in tests/test_serve_cli.py's `serve deploy` test).

    flock /tmp/coord/heavy.lock make test PYTEST_ARGS="tests/test_serving_fuzz.py -q -s"
"""

from __future__ import annotations

import http.client
import json
import math
import time

import pytest

pytestmark = pytest.mark.integration

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BASE = "tiny-llama"
MAX_BYTES = 64 * 1024  # the app's max_request_bytes
EXAMPLES = 400
STATS = {"cases": 0, "by_status": {}, "seconds": 0.0}


# the app of tests/test_serving.py (module-scoped there; its teardown waits for this module)
from test_serving import KEY, served  # noqa: E402, F401


def _port(app: dict) -> int:
    """The port of the session's Serve app (tests/test_serving.py), which this module shares (one engine
    start fewer): the tiny Llama with a strict chat template, two adapters, API keys, 64 KiB bodies."""
    return int(app["url"].rsplit(":", 1)[1])


# ----------------------------------------------------------------------------- strategies

FIELDS = (
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "compression_ratio",
    "max_cot_tokens",
    "thinking_token_budget",
    "max_thinking_tokens",
    "reasoning_effort",
    "budget",
    "return_prompt",
    "logprobs",
    "top_logprobs",
    "echo",
    "tools",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "response_format",
)

numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            0,
            -0.0,
            1,
            0.5,
            2**63 - 1,
            2**63,
            -(2**63) - 1,
            10**30,
            1e308,
            float("nan"),
            float("inf"),
            float("-inf"),
            1e-320,
        ]
    ),
)
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(), max_size=400),
    st.sampled_from(
        [
            "",
            "false",
            "true",
            "null",
            "tiny-llama",
            "tiny-llama:a",
            "tiny-llama:a\n",
            "tiny-llama:../a",
            "tiny-llama:s3://x/y",
            "user",
            "system",
            "tool",
            "low",
            "medium",
            "high",
            "minimal",
            "none",
            "hard",
            "soft",
            "\ud800",
        ]
    ),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)


@st.composite
def deep(draw):
    """A value nested up to far beyond Python's recursion limit."""
    depth = draw(st.one_of(st.integers(1, 60), st.integers(900, 1200), st.integers(5000, 20000)))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return opener * depth + "1" + closer * depth  # raw JSON text


@st.composite
def messages(draw):
    role = st.one_of(st.sampled_from(["user", "system", "assistant", "developer", "tool", "wizard"]), json_values)
    content = st.one_of(
        texts,
        json_values,
        st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=3),
    )
    msg = st.one_of(st.fixed_dictionaries({"role": role, "content": content}), json_values)
    return draw(st.lists(msg, max_size=6))


def _valid(kind: str) -> dict:
    base = {"model": BASE, "max_tokens": 2}
    if kind == "chat":
        return {**base, "messages": [{"role": "user", "content": "What is 2+3?"}]}
    return {**base, "prompt": "What is 2+3?"}


@st.composite
def payloads(draw):
    """(endpoint kind, raw body bytes)."""
    kind = draw(st.sampled_from(["chat", "completion"]))
    mode = draw(st.sampled_from(["mutate", "mutate", "mutate", "any", "deep", "bytes", "big"]))
    if mode == "any":
        return kind, json.dumps(draw(json_values)).encode("utf-8", "surrogatepass")
    if mode == "bytes":
        return kind, draw(st.binary(max_size=200))
    body = _valid(kind)
    if mode == "big":
        body["prompt" if kind == "completion" else "messages"] = (
            "x" * draw(st.integers(1000, 2 * MAX_BYTES))
            if kind == "completion"
            else [{"role": "user", "content": "y"}] * draw(st.integers(1, 4000))
        )
        return kind, json.dumps(body).encode()
    if mode == "deep":
        field = draw(st.sampled_from(FIELDS))
        text = json.dumps(body)[:-1] + f', "{field}": ' + draw(deep()) + "}"
        return kind, text.encode()
    for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True)):
        if field == "messages":
            body[field] = draw(messages())
        elif draw(st.booleans()):
            body[field] = draw(json_values)
        else:
            del_ = draw(st.booleans()) and field in body
            if del_:
                body.pop(field)
    if body.get("stream") is True and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64:
        body["max_tokens"] = 64  # keep generation short; everything else stays random
    return kind, json.dumps(body).encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------- the property


def _post(port: int, path: str, data: bytes, key: str = KEY) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(
            "POST", path, body=data, headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        )
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _assert_error_schema(status: int, raw: bytes) -> dict:
    body = json.loads(raw)
    err = body["error"]
    assert set(body) == {"error"} and set(err) == {"message", "type", "param", "code"}, body
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), body
    assert err["param"] is None or isinstance(err["param"], str), body
    assert err["code"] is None or isinstance(err["code"], str), body
    return body


def _check_ok(kind: str, headers: dict, raw: bytes) -> None:
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", events[-3:]
        for e in events[:-1]:
            assert "choices" in json.loads(e)
        return
    body = json.loads(raw)
    assert body["object"] == ("chat.completion" if kind == "chat" else "text_completion"), body
    assert body["usage"]["completion_tokens"] >= 0 and len(body["choices"]) == 1


def _normal_request_works(port: int) -> None:
    status, _, raw = _post(port, "/v1/chat/completions", json.dumps(_valid("chat")).encode())
    assert status == 200, raw[:500]
    assert json.loads(raw)["usage"]["completion_tokens"] == 2


def test_fuzz_never_5xx_always_openai_errors(served):  # noqa: F811 (the fixture imported above)
    app_port = _port(served)
    _normal_request_works(app_port)
    t0 = time.perf_counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(payloads())
    def one(case):
        kind, data = case
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        status, headers, raw = _post(app_port, path, data)
        STATS["cases"] += 1
        STATS["by_status"][status] = STATS["by_status"].get(status, 0) + 1
        assert status < 500, (status, data[:300], raw[:500])
        if status == 200:
            _check_ok(kind, headers, raw)
        else:
            _assert_error_schema(status, raw)
            assert 400 <= status < 500

    one()
    STATS["seconds"] = time.perf_counter() - t0
    print(f"\n[fuzz] {STATS['cases']} cases in {STATS['seconds']:.1f}s, statuses {sorted(STATS['by_status'].items())}")
    assert STATS["cases"] >= EXAMPLES * 0.9 and math.isfinite(STATS["seconds"])
    _normal_request_works(app_port)  # still serving
