"""The Serve app's wire format, auth config and adapter cache without Ray (serving/protocol.py,
serving/config.py, serving/adapters.py, serving/run.py's checks)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving import protocol
from serving.adapters import AdapterResolver, split_model, validate_adapter_id
from serving.config import ServeAppConfig
from serving.routing import ApiError
from tokenskip.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MSG = [{"role": "user", "content": "q"}]


def chat(**extra):
    return {"model": "m", "messages": MSG, **extra}


def bad(body, kind="chat", param=None, status=400):
    with pytest.raises(ApiError) as e:
        protocol.parse_request(body, kind, "m")
    assert e.value.status == status, (body, e.value)
    if param is not None:
        assert e.value.param == param, (body, e.value.body())
    return e.value


# ----------------------------------------------------------------------------- 1. auth


def test_api_key_env_that_yields_no_keys_refuses_to_start(monkeypatch):
    monkeypatch.delenv("TSK_TEST_KEYS", raising=False)
    cfg = ServeAppConfig.from_dict({"model": "m", "api_key_env": "TSK_TEST_KEYS"})
    with pytest.raises(ConfigError, match="TSK_TEST_KEYS is not set"):
        cfg.valid_api_keys()
    for blank in ("", " , ,"):
        monkeypatch.setenv("TSK_TEST_KEYS", blank)
        with pytest.raises(ConfigError, match="TSK_TEST_KEYS holds no key"):
            cfg.valid_api_keys()
    # configured keys plus an empty env source: still refused (the env source is configured)
    with pytest.raises(ConfigError, match="TSK_TEST_KEYS"):
        ServeAppConfig.from_dict({"model": "m", "api_keys": ["k"], "api_key_env": "TSK_TEST_KEYS"}).valid_api_keys()
    with pytest.raises(ConfigError, match=r"api_keys\[0\]"):
        ServeAppConfig.from_dict({"model": "m", "api_keys": [" "]}).valid_api_keys()
    monkeypatch.setenv("TSK_TEST_KEYS", "k1, k2")
    assert cfg.valid_api_keys() == {"k1", "k2"}
    assert ServeAppConfig.from_dict({"model": "m"}).valid_api_keys() is None  # auth off


def test_build_app_refuses_missing_key_source(monkeypatch):
    from serving.app import build_app

    monkeypatch.delenv("TSK_TEST_KEYS", raising=False)
    with pytest.raises(ConfigError, match="TSK_TEST_KEYS"):
        build_app({"model": "m", "api_key_env": "TSK_TEST_KEYS"})


def test_check_api_key_fails_closed_and_compares_every_key(monkeypatch):
    protocol.check_api_key(None, None)  # auth off
    keys = [b"alpha", b"beta", b"gamma"]
    protocol.check_api_key("Bearer beta", keys)
    protocol.check_api_key("bearer  gamma ", keys)
    for header in (None, "", "Bearer", "Bearer ", "Basic beta", "Bearer bet", "Bearer betaa", "beta"):
        with pytest.raises(ApiError) as e:
            protocol.check_api_key(header, keys)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(ApiError):  # configured but empty: nothing is accepted
        protocol.check_api_key("Bearer ", [])
    calls = []
    real = protocol.hmac.compare_digest
    monkeypatch.setattr(protocol.hmac, "compare_digest", lambda a, b: calls.append(b) or real(a, b))
    protocol.check_api_key("Bearer alpha", keys)
    assert calls == keys  # no early exit on the first match: every key is compared, in constant time


def test_a_configured_adapter_that_is_not_there_or_does_not_fit_is_named_at_start(tmp_path, tiny_adapters, tiny_llama):
    """The app still starts (an adapter may be trained later; each request looks it up), but the
    console says which configured adapter a request would fail for: one not there yet, one trained on
    another base model. One that is there and fits is silent."""
    from serving.run import check_apps, load_serve_config

    there, _ = tiny_adapters  # trained on the tiny Llama
    adapters = f"adapters=[{{name: a, path: {there}}}, {{name: later, path: {tmp_path / 'not-yet'}}}]"
    serve_yaml = str(ROOT / "serving" / "serve_config.yaml")
    conf = load_serve_config(serve_yaml, [f"model={tiny_llama}", "model_id=base", adapters])
    assert check_apps(conf, "127.0.0.1") == [
        f"adapter 'later': nothing at {tmp_path / 'not-yet'} yet (no adapter_config.json); requests for "
        "'base:later' get 404 adapter_not_found until it is there"
    ]
    conf = load_serve_config(serve_yaml, ["model=smollm2-135m-instruct", "model_id=base", adapters])
    warned = check_apps(conf, "127.0.0.1")
    assert len(warned) == 2 and warned[0].startswith(f"adapter 'a': {there}: was trained on another base model: ")
    assert "smollm2-135m-instruct needs" in warned[0] and warned[0].endswith("requests for 'base:a' will fail")


def test_open_endpoint_warning_and_cli_refusal(tmp_path, monkeypatch):
    from serving.app import open_endpoint_warning
    from serving.run import check_apps, load_serve_config

    assert open_endpoint_warning("0.0.0.0", auth_enabled=False)
    assert open_endpoint_warning("10.1.2.3", auth_enabled=False)
    assert open_endpoint_warning("0.0.0.0", auth_enabled=True) is None
    assert open_endpoint_warning("127.0.0.1", auth_enabled=False) is None
    conf = load_serve_config(str(ROOT / "serving" / "serve_config.yaml"), [])
    assert not [w for w in check_apps(conf, "127.0.0.1") if "AUTHENTICATION" in w]
    assert "WITHOUT AUTHENTICATION" in check_apps(conf, "0.0.0.0")[0]
    monkeypatch.delenv("TSK_NO_SUCH_KEYS", raising=False)
    conf = load_serve_config(str(ROOT / "serving" / "serve_config.yaml"), ["api_key_env=TSK_NO_SUCH_KEYS"])
    with pytest.raises(ConfigError, match="TSK_NO_SUCH_KEYS"):
        check_apps(conf, "127.0.0.1")
    # the CLI refuses before starting Ray, naming the variable
    env = {k: v for k, v in os.environ.items() if k not in ("TSK_NO_SUCH_KEYS", "RAY_ADDRESS")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.cli",
            "serve",
            "--config",
            str(ROOT / "serving" / "serve_config.yaml"),
            "api_key_env=TSK_NO_SUCH_KEYS",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "TSK_NO_SUCH_KEYS is not set" in r.stderr, r.stdout + r.stderr


def test_shipped_configs_time_out_requests_and_require_keys_beyond_loopback():
    for name in ("serve_config.yaml", "serve_config.gpu.yaml"):
        conf = yaml.safe_load((ROOT / "serving" / name).read_text())
        assert conf["http_options"]["request_timeout_s"] > 0, name
        args = conf["applications"][0]["args"]
        if conf["http_options"]["host"] not in ("127.0.0.1", "localhost"):
            assert args.get("api_key_env") or args.get("api_keys"), name
    svc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    served = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert served["http_options"]["request_timeout_s"] > 0
    var = served["applications"][0]["args"]["api_key_env"]
    groups = [svc["spec"]["rayClusterConfig"]["headGroupSpec"], *svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    for g in groups:
        env = {e["name"]: e for e in g["template"]["spec"]["containers"][0].get("env", [])}
        assert "secretKeyRef" in env[var]["valueFrom"], g  # keys from a Kubernetes Secret, never inline
    assert "api_keys" not in served["applications"][0]["args"]


# ----------------------------------------------------------------------------- 2. no client input gives a 5xx


@pytest.mark.parametrize("value", [0, 0.0, -0.0, float("nan"), float("inf"), -0.5, 1.5, "0.5", True, [0.5]])
def test_compression_ratio_out_of_range_is_400(value):
    bad(chat(compression_ratio=value), param="compression_ratio")


def test_gamma_label_never_raises():
    for v in (0, -0.0, float("nan"), float("inf"), 7, "x", True, [1]):
        assert protocol.gamma_label(v, [1.0, 0.5]) == "invalid"
    assert protocol.gamma_label(0.5, [1.0, 0.5]) == "0.5" and protocol.gamma_label(None, []) == "none"


def test_deeply_nested_json_is_400():
    for depth in (40, 100_000):
        raw = b"[" * depth + b"]" * depth
        with pytest.raises(ApiError) as e:
            protocol.parse_json(raw)
        assert e.value.status == 400 and "nested" in e.value.message
    raw = ('{"model": "m", "messages": ' + "[" * 5000 + "]" * 5000 + "}").encode()
    with pytest.raises(ApiError, match="nested"):
        protocol.parse_json(raw)
    for raw in (b"{not json", b"\xff\xfe{", b'{"a": ' + b"9" * 5000 + b"}"):  # bad JSON, bad UTF-8, int digit limit
        with pytest.raises(ApiError) as e:
            protocol.parse_json(raw)
        assert e.value.status == 400


def test_seed_capped_to_int64():
    assert protocol.parse_request(chat(seed=2**63 - 1), "chat", "m")["seed"] == 2**63 - 1
    assert protocol.parse_request(chat(seed=-(2**63)), "chat", "m")["seed"] == -(2**63)
    for seed in (2**63, -(2**63) - 1, 10**400, 1.5, "1"):
        bad(chat(seed=seed), param="seed")


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", -1),
        ("top_p", 0),
        ("top_p", float("nan")),
        ("max_cot_tokens", float("inf")),
        ("max_cot_tokens", float("nan")),
        ("max_cot_tokens", 0),
        ("max_tokens", 10**400),
        ("max_tokens", 2**64),
        ("max_tokens", float("inf")),
        ("max_tokens", 0),
        ("max_completion_tokens", 1e300),
        ("presence_penalty", float("-inf")),
        ("frequency_penalty", 3),
        ("n", 2),
        ("n", "1"),
        ("n", float("nan")),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_400(name, value):
    bad(chat(**{name: value}), param=name)


def test_booleans_must_be_booleans_and_n_null_is_the_default():
    for name in ("stream", "return_prompt"):
        for value in ("false", "true", 0, 1, [], {}):
            bad(chat(**{name: value}), param=name)
    bad(chat(stream=True, stream_options={"include_usage": "yes"}), param="include_usage")
    bad(chat(stream_options=[1]), param="stream_options")
    req = protocol.parse_request(chat(n=None, stream=False, stream_options=None, logprobs=None), "chat", "m")
    assert req["stream"] is False and req["include_usage"] is False
    assert protocol.parse_request(chat(n=1), "chat", "m")["stream"] is False


def test_chat_template_rejection_is_400(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + tok.chat_template
    )
    req = protocol.parse_request({"model": "m", "messages": [{"role": "system", "content": "S"}, *MSG]}, "chat", "m")
    with pytest.raises(ApiError) as e:
        protocol.render_text(tok, req, None)
    assert e.value.status == 400 and e.value.param == "messages" and "System role not supported" in e.value.message
    with pytest.raises(ApiError) as e:
        protocol.render_text(tok, req, 1.0)
    assert e.value.status == 400
    ok = protocol.parse_request(chat(), "chat", "m")
    text, special = protocol.render_text(tok, ok, 0.5)
    assert "q<|eot_id|>0.5<|eot_id|>" in text and special is False
    assert protocol.render_text(
        tok, protocol.parse_request({"model": "m", "prompt": "raw"}, "completion", "m"), None
    ) == ("raw", True)


def test_strings_must_be_valid_unicode():
    bad(chat(messages=[{"role": "user", "content": "a\ud800b"}]), param="messages")
    bad({"model": "m", "prompt": "\udfff"}, kind="completion", param="prompt")
    bad(chat(stop=["\ud800"]), param="stop")
    body = json.loads(protocol.dumps({"x": "\ud800", "y": "é"}))  # responses never fail to encode
    assert body == {"x": "\ud800", "y": "é"}


def test_other_shapes_are_400():
    for body in (
        None,
        [],
        "x",
        3,
        chat(messages={"role": "user"}),
        chat(messages=[{"role": ["user"], "content": "q"}]),
        chat(messages=[{"role": "user", "content": {"a": 1}}]),
        chat(tools=[{"x": 1}]),
        chat(logprobs=True),
        chat(logprobs=float("nan")),
        chat(echo=1),
        {"model": ["m"], "messages": MSG},
        {"messages": MSG},
    ):
        e = bad(body)
        assert protocol.error_body(e)["error"]["type"] == "invalid_request_error"


# ----------------------------------------------------------------------------- 3. body size


def test_read_body_stops_at_the_limit():
    consumed = []

    async def endless():
        while True:
            consumed.append(1)
            yield b"x" * 1000

    with pytest.raises(ApiError) as e:
        asyncio.run(protocol.read_body(endless(), 10_000))
    assert e.value.status == 413 and e.value.code == "request_too_large" and len(consumed) == 11

    async def chunks(parts):
        for p in parts:
            yield p

    assert asyncio.run(protocol.read_body(chunks([b"ab", b"cd"]), 4)) == b"abcd"
    with pytest.raises(ApiError) as e:
        asyncio.run(protocol.read_body(chunks([b"ab"]), 4, content_length="99"))
    assert e.value.status == 413
    with pytest.raises(ApiError) as e:
        asyncio.run(protocol.read_body(chunks([b"ab"]), 4, content_length="-1"))
    assert e.value.status == 400


# ----------------------------------------------------------------------------- 4. metric labels, handles


def test_adapter_labels_are_bounded():
    assert protocol.adapter_label("zz-random", {"a"}) == "unknown"
    assert protocol.adapter_label("a", {"a"}) == "a" and protocol.adapter_label(None, set()) == "base"


def test_ingress_caches_its_handles():
    """One handle per (adapter, stream) kind, built once: not one per request."""
    import collections
    from types import SimpleNamespace

    from serving.app import OpenAIIngress

    class FakeHandle:
        built = 0

        def __init__(self, opts=()):
            self.opts = dict(opts)

        def options(self, **kw):
            FakeHandle.built += 1
            return FakeHandle({**self.opts, **kw})

    cls = OpenAIIngress.func_or_class
    fake = SimpleNamespace(model=FakeHandle(), _handles=collections.OrderedDict())
    h1 = cls._handle(fake, "a", False)
    assert h1.opts == {"multiplexed_model_id": "a"} and FakeHandle.built == 1
    for _ in range(50):
        assert cls._handle(fake, "a", False) is h1
    hs = cls._handle(fake, "a", True)
    assert hs.opts == {"multiplexed_model_id": "a", "stream": True} and cls._handle(fake, "a", True) is hs
    assert cls._handle(fake, None, False) is fake.model
    assert FakeHandle.built == 3


def test_ingress_counts_a_stream_that_ended_before_its_first_token():
    """A stream dropped or failed before any token has 0 tokens: Ray's Counter.inc(0) raises
    ValueError, which lost the request's latency and raised out of the stream's ``finally``."""
    import time
    from types import SimpleNamespace

    from ray.util.metrics import Counter, Histogram

    from serving.app import OpenAIIngress

    seen = []

    class Recorded:
        def _record(self, value, tags=None):
            seen.append((self._name, value, dict(tags or {})))

    class C(Recorded, Counter):
        pass

    class H(Recorded, Histogram):
        pass

    keys = ("endpoint", "adapter", "gamma")
    fake = SimpleNamespace(
        m_requests=C("t_requests", tag_keys=(*keys, "status")),
        m_tokens=C("t_tokens", tag_keys=keys),
        m_latency=H("t_latency", boundaries=[1.0], tag_keys=keys),
    )
    tags = {"endpoint": "chat", "adapter": "a", "gamma": "0.5"}
    OpenAIIngress.func_or_class._finished(fake, tags, 499, 0, time.perf_counter())
    assert [(n, v) for n, v, _ in seen[:1]] == [("t_requests", 1.0)] and seen[0][2]["status"] == "499"
    assert [n for n, _, _ in seen] == ["t_requests", "t_latency"], seen  # no token count, the latency kept
    seen.clear()
    OpenAIIngress.func_or_class._finished(fake, tags, 200, 7, time.perf_counter())
    assert [(n, v) for n, v, _ in seen[:2]] == [("t_requests", 1.0), ("t_tokens", 7)]
    assert seen[2][0] == "t_latency" and seen[2][1] >= 0


# ----------------------------------------------------------------------------- 6. smaller items


def test_stop_and_message_count_are_capped():
    assert protocol.parse_request(chat(stop=["a", "b", "c", "d"]), "chat", "m")["stop"] == ["a", "b", "c", "d"]
    bad(chat(stop=["a", "b", "c", "d", "e"]), param="stop")
    bad(chat(stop=[""]), param="stop")
    many = [{"role": "user", "content": "x"}] * protocol.MAX_MESSAGES
    assert len(protocol.parse_request(chat(messages=many), "chat", "m")["messages"]) == protocol.MAX_MESSAGES
    bad(chat(messages=many + many[:1]), param="messages")


@pytest.mark.parametrize("adapter_id", ["a\n", "a\r\n", "\na", "a ", "a/b", "..", "a..b", "", "x" * 200])
def test_adapter_id_is_matched_whole(adapter_id):
    with pytest.raises(ApiError) as e:
        validate_adapter_id(adapter_id)
    assert e.value.status == 400 and e.value.param == "model"
    with pytest.raises(ApiError):
        split_model(f"m:{adapter_id}", "m")


def test_error_bodies_never_echo_uris_or_paths(tmp_path):
    e = ApiError(404, "adapter 's3://bucket/adapters/x' cannot be read: [Errno 2] /srv/models/x/adapter_config.json")
    msg = protocol.error_body(e)["error"]["message"]
    assert "s3://" not in msg and "/srv/models" not in msg and "<uri>" in msg and "<path>" in msg
    root = tmp_path / "store"
    root.mkdir()
    cfg = ServeAppConfig.from_dict(
        {"model": "m", "adapter_root": f"file://{root}", "adapter_cache_dir": str(tmp_path / "c")}
    )
    with pytest.raises(ApiError) as err:
        AdapterResolver(cfg).resolve("nope")
    assert err.value.status == 404 and str(root) not in err.value.message and "file://" not in err.value.message
    cfg = ServeAppConfig.from_dict(
        {"model": "m", "adapter_root": "nosuchscheme://secret-bucket/x", "adapter_cache_dir": str(tmp_path / "c")}
    )
    with pytest.raises(ApiError) as err:  # an unreadable store: the error names the adapter, not the store
        AdapterResolver(cfg).resolve("nope")
    assert err.value.status == 404 and "://" not in err.value.message and "secret-bucket" not in err.value.message


def test_prompt_over_context_is_400_context_length_exceeded():
    for n, max_tokens, param in ((600, 1, "messages"), (500, 20, "max_tokens")):
        with pytest.raises(ApiError) as e:
            protocol.check_context(n, max_tokens, 512, "chat")
        assert e.value.status == 400 and e.value.code == "context_length_exceeded" and e.value.param == param
    protocol.check_context(500, 12, 512, "chat")


def test_download_cache_notices_a_changed_adapter(tiny_adapters, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_adapters[0], root / "x")
    cfg = ServeAppConfig.from_dict(
        {"model": "m", "adapter_root": f"file://{root}", "adapter_cache_dir": str(tmp_path / "c")}
    )
    first = AdapterResolver(cfg).resolve("x").local_dir
    assert AdapterResolver(cfg).resolve("x").local_dir == first  # unchanged: the cached copy
    weights = "adapter_model.safetensors"
    os.remove(root / "x" / weights)
    shutil.copy(Path(tiny_adapters[1]) / weights, root / "x" / weights)  # another adapter at the same URI
    second = AdapterResolver(cfg).resolve("x").local_dir
    assert second != first
    assert (Path(second) / weights).read_bytes() == (Path(tiny_adapters[1]) / weights).read_bytes()
    assert (Path(first) / weights).read_bytes() == (Path(tiny_adapters[0]) / weights).read_bytes()


# ----------------------------------------------------------------------------- responses


def test_response_and_chunk_shapes():
    req = protocol.parse_request(chat(), "chat", "m")
    out = {
        "compression_ratio": 0.5,
        "prompt_tokens": 3,
        "text": "hi",
        "completion_tokens": 2,
        "finish_reason": "stop",
        "tokenskip": {"source": "explicit"},
    }
    body = protocol.completion_body(req, out, "m:a", created=1)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "hi"
    assert body["usage"]["total_tokens"] == 5 and body["model"] == "m:a" and body["compression_ratio"] == 0.5
    first = protocol.stream_chunk(req, "m", 1, 0.5, None, None, first={"source": "explicit"})
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["tokenskip"]
    usage = protocol.stream_chunk(req, "m", 1, 0.5, None, None, usage={"total_tokens": 5})
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
    assert protocol.sse({"a": 1}) == 'data: {"a":1}\n\n'
    e = ApiError(503, "busy", code="overloaded")
    assert protocol.error_headers(e) == {"Retry-After": "1"} and protocol.error_headers(ApiError(400, "x")) == {}
    assert set(protocol.error_body(e)["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------- split


def test_protocol_imports_without_ray_and_serving_without_pipelines():
    code = (
        "import sys, serving.protocol, serving.routing, serving.adapters, serving.config; "
        "assert 'ray' not in sys.modules, 'ray imported'; "
        "import serving.app, serving.run; "
        "assert not [m for m in sys.modules if m == 'pipelines' or m.startswith('pipelines.')], 'pipelines imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for path in (ROOT / "serving").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n.split(".")[0] in ("pipelines", "ray_jobs")], (path, names)
