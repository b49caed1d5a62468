"""Integration: the Serve app on a local Ray, tiny Llama + two tiny adapters, the `openai` SDK
as the client. One app for the whole module (engine start ~25 s).

    flock /tmp/tokenskip-heavy.lock .venv/bin/python -m pytest -q tests/test_serving.py -s
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tokenskip.testing import free_ports

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")

KEY = "test-key"
BASE = "tiny-llama"
QUESTION = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"


@pytest.fixture(scope="module")
def served(ray_local, tiny_llama, tiny_adapters, tmp_path_factory):
    """Adapter `a`: a local dir, ratios from the train manifest (../manifest.json), expected CoT
    tokens from the app config. Adapter `adapter-b`: under a file:// URI root (the object-store
    path, downloaded with pyarrow.fs), metadata from its tokenskip.json."""
    from ray import serve

    from serving.app import build_app

    tmp = tmp_path_factory.mktemp("serve")
    shutil.copytree(tiny_adapters[0], tmp / "train" / "adapter")
    (tmp / "train" / "manifest.json").write_text(json.dumps({"stage": "train", "config": {"ratios": [1.0, 0.8, 0.5]}}))
    root = tmp / "store"
    shutil.copytree(tiny_adapters[1], root / "adapter-b")
    (root / "adapter-b" / "tokenskip.json").write_text(json.dumps({"ratios": [1.0, 0.9, 0.6],
                                                                  "expected_cot_tokens": {"1.0": 200}}))
    args = {
        "model": tiny_llama, "model_id": BASE, "engine_kwargs": {"max_model_len": 512},
        "adapters": [{"name": "a", "path": str(tmp / "train" / "adapter"),
                      "expected_cot_tokens": {"1.0": 300, "0.8": 220, "0.5": 140}}],
        "adapter_root": f"file://{root}", "adapter_cache_dir": str(tmp / "cache"),
        "default_max_tokens": 16, "max_request_bytes": 64 * 1024, "api_keys": [KEY],
        "ingress_deployment": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 1000},
        "model_deployment": {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 16,
                             "max_queued_requests": 110,
                             "autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}},
    }
    port = free_ports(1)[0]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.time()
    serve.run(build_app(args), name="tokenskip", route_prefix="/")
    print(f"\n[serve] app ready in {time.time() - t0:.1f}s on port {port}")
    yield {"url": f"http://127.0.0.1:{port}", "tmp": tmp}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, model=BASE, question=QUESTION, max_tokens=12, **extra):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=max_tokens, temperature=0.0, extra_body=extra or None)


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
        model=f"{BASE}:adapter-b", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=0.0,
        stream=True, stream_options={"include_usage": True}, extra_body={"compression_ratio": 0.6})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _extra(chunks[0], "tokenskip")["valid_ratios"] == [1.0, 0.9, 0.6]  # from tokenskip.json via file:// URI
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 10 and all(_extra(c, "compression_ratio") == 0.6 for c in chunks)
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
    req = urllib.request.Request(served["url"] + path, data=data if data is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read())


@pytest.mark.parametrize("extra,status,needle", [
    ({"compression_ratio": 0.7}, 400, "valid values: 1.0, 0.8, 0.5"),
    ({"compression_ratio": "half"}, 400, "compression_ratio"),
    ({"compression_ratio": 0.5, "max_cot_tokens": 10}, 400, "not both"),
    ({"max_cot_tokens": -3}, 400, "max_cot_tokens"),
])
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
    for body in ({"model": BASE, "messages": []}, {"model": BASE, "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": BASE, "messages": "hi"}, {"model": 3, "messages": [{"role": "user", "content": "x"}]},
                 {"model": BASE, "messages": [{"role": "user", "content": "x"}], "stop": 5}, [1, 2]):
        status, _, err = _raw(served, "/v1/chat/completions", body)
        assert status == 400 and err["error"]["type"] == "invalid_request_error", (body, err)
    status, _, err = _raw(served, "/v1/completions", None, data=b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    status, _, err = _raw(served, "/v1/completions", {"model": BASE, "prompt": ""})
    assert status == 400 and err["error"]["param"] == "prompt"


def test_oversized_413(served, client):
    status, _, err = _raw(served, "/v1/completions", {"model": BASE, "prompt": "x" * 100_000})
    assert status == 413 and err["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:  # under the byte limit, over the 512-token context
        client.completions.create(model=BASE, prompt="hello " * 2000, max_tokens=2)
    assert e.value.status_code == 413 and "context" in e.value.body["message"]


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
    node = next(n for n in ray_local.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    deadline, text = time.time() + 40, ""
    while time.time() < deadline:
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            text = ""
        if "tokenskip_requests" in text and "tokenskip_request_latency_s" in text:
            break
        time.sleep(2)
    assert 'adapter="a"' in text and 'gamma="0.5"' in text, text[-2000:]
    assert "tokenskip_generated_tokens" in text
