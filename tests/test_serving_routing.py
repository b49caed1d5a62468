"""Pure tests of the Serve app's γ routing, adapter ids, request parsing and config (no Ray, no model)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving import adapters, config, routing
from serving.adapters import AdapterResolver, split_model, validate_adapter_id
from serving.config import ServeAppConfig
from serving.routing import ApiError, apply_ratio_to_messages, route
from tokenskip import card, gamma, prompt
from tokenskip.config import ConfigError


@pytest.mark.parametrize("mod", [routing, adapters, config])
def test_doctests(mod):
    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted > 0


def test_route_explicit_snaps_to_valid_and_lists_valid_on_error():
    assert route(0.50000001, None, [1.0, 0.5]).ratio == 0.5
    with pytest.raises(ApiError) as e:
        route(0.7, None, [0.5, 1.0, 0.9])
    assert e.value.status == 400 and "valid values: 1.0, 0.9, 0.5" in e.value.message
    for bad in ("0.5", True, float("nan"), [0.5]):
        with pytest.raises(ApiError):
            route(bad, None, [1.0, 0.5])


def test_route_budget_largest_fitting():
    table = {1.0: 300.0, 0.8: 220.0, 0.5: 140.0}
    assert route(None, 300, [1.0, 0.8, 0.5], table).ratio == 1.0
    assert route(None, 299, [1.0, 0.8, 0.5], table).ratio == 0.8
    assert route(None, 140, [1.0, 0.8, 0.5], table).ratio == 0.5
    r = route(None, 1, [1.0, 0.8, 0.5], table)
    assert (r.ratio, r.budget_fits) == (0.5, False)
    with pytest.raises(ApiError, match="expected CoT lengths"):
        route(None, 100, [1.0, 0.5], {})


@given(
    budget=st.floats(1, 1000),
    gammas=st.lists(st.sampled_from([1.0, 0.9, 0.8, 0.7, 0.6, 0.5]), min_size=1, unique=True),
    base=st.floats(10, 800),
)
def test_route_budget_property(budget, gammas, base):
    r = route(None, budget, gammas, {1.0: base})
    assert r.ratio in gammas
    fitting = [g for g in gammas if g * base <= budget]
    assert r.ratio == (max(fitting) if fitting else min(gammas))
    assert r.budget_fits == bool(fitting)


def test_messages_get_training_format_on_last_user_turn():
    msgs = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    out = apply_ratio_to_messages(msgs, 0.6)
    assert out[-1]["content"] == prompt.user_content("Q2", 0.6) and out[0]["content"] == "Q1"
    assert apply_ratio_to_messages(msgs, 1.0)[-1]["content"] == prompt.user_content("Q2")
    assert msgs[-1]["content"] == "Q2"  # input untouched
    with pytest.raises(ApiError, match="user message"):
        apply_ratio_to_messages([{"role": "system", "content": "S"}], 0.5)


@pytest.mark.parametrize(
    "bad", ["..", "../x", "a/b", "/abs", "a\\b", "s3://b/k", "", ".hidden", "a" * 200, "a b", "x..y"]
)
def test_adapter_id_rejects_paths(bad):
    with pytest.raises(ApiError) as e:
        validate_adapter_id(bad)
    assert e.value.status == 400


def test_split_model():
    assert split_model("m:a-1", "m") == "a-1" and split_model("m", "m") is None
    with pytest.raises(ApiError) as e:
        split_model("other", "m")
    assert e.value.status == 404
    with pytest.raises(ApiError) as e:
        split_model("m:../x", "m")
    assert e.value.status == 400


def _fake_adapter(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    return d


ROOT = Path(__file__).resolve().parents[1]
# the evaluate stage's own results.json files kept as benchmarks (other eval_* files are summaries)
BENCH_RESULTS = [
    p for p in sorted((ROOT / "benchmarks" / "results").glob("eval_*.json")) if "datasets" in json.loads(p.read_text())
]
assert len(BENCH_RESULTS) >= 2, BENCH_RESULTS


def _card(ratios=(1.0, 0.8, 0.5), evaluated: dict | None = None) -> card.AdapterCard:
    c = card.AdapterCard(
        "m",
        list(ratios),
        {gamma.key(r): 10 for r in ratios},
        card.prompt_spec(),
        {"dataset": "d", "data_sha256": "0" * 64, "config": {}},
    )
    if evaluated:
        c = c.with_evaluation(
            {
                name: card.DatasetEval("r.json", {gamma.key(g): card.RatioEval(t) for g, t in table.items()})
                for name, table in evaluated.items()
            }
        )
    return c


@pytest.mark.parametrize("path", BENCH_RESULTS, ids=lambda p: p.name)
def test_table_from_the_projects_own_results_json(path):
    """The bug: the project's evaluate results.json used to give {} (budget routing then had no table)."""
    results = json.loads(path.read_text())
    table = routing.table_from_eval_results(results)
    rows = [r for r in results["datasets"]["gsm8k"]["conditions"] if r["method"] == "tokenskip"]
    assert table and set(table) == {gamma.canonical(r["ratio"]) for r in rows} == set(results["ratios"])
    for r in rows:
        assert table[gamma.canonical(r["ratio"])] == r.get("mean_cot_tokens", r["mean_tokens"])
    # and a budget request routes on it
    budget = table[0.5] + 0.01
    fits = [g for g in table if table[g] <= budget]
    assert route(None, budget, list(table), table).ratio == max(fits)
    with pytest.raises(ValueError, match="was not evaluated"):
        routing.table_from_eval_results(results, "math500")


def test_resolver_reads_the_card_not_the_manifest(tmp_path):
    a = _fake_adapter(tmp_path / "train" / "adapter")
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({"config": {"ratios": [0.5, 1.0, 0.7]}}))
    cfg = ServeAppConfig.from_dict(
        {"model": "m", "default_ratios": [1.0, 0.6], "adapters": [{"name": "a", "path": str(a)}]}
    )
    info = AdapterResolver(cfg).resolve("a")
    assert info.ratios == [1.0, 0.6] and info.expected_cot_tokens == {}  # no card: the app default, no digging
    card.write_card(a, _card((1.0, 0.7, 0.5)))
    info = AdapterResolver(cfg).resolve("a")
    assert info.ratios == [1.0, 0.7, 0.5] and info.expected_cot_tokens == {}
    card.add_evaluation(a, _card(evaluated={"gsm8k": {1.0: 200, 0.5: 90}, "math500": {1.0: 600}}).evaluation)
    info = AdapterResolver(cfg).resolve("a")
    assert info.expected_cot_tokens == {1.0: 200.0, 0.5: 90.0}  # the first dataset evaluated
    assert route(None, 150, info.ratios, info.expected_cot_tokens).ratio == 0.7  # 0.7 x 200 = 140 fits
    cfg_m = ServeAppConfig.from_dict(
        {"model": "m", "adapters": [{"name": "a", "path": str(a), "eval_dataset": "math500"}]}
    )
    assert AdapterResolver(cfg_m).resolve("a").expected_cot_tokens == {1.0: 600.0}
    cfg_x = ServeAppConfig.from_dict(
        {"model": "m", "adapters": [{"name": "a", "path": str(a), "eval_dataset": "aime"}]}
    )
    with pytest.raises(ApiError) as e:
        AdapterResolver(cfg_x).resolve("a")
    assert e.value.status == 500 and "aime" in e.value.message
    # a broken card is the server's error, and the message does not leak paths
    (a / "tokenskip.json").write_text(json.dumps({"card_version": 99}))
    with pytest.raises(ApiError) as e:
        AdapterResolver(cfg).resolve("a")
    assert e.value.status == 500 and "invalid adapter card" in e.value.message and str(tmp_path) not in e.value.message


def test_resolver_table_root_uri_and_404(tmp_path):
    _fake_adapter(tmp_path / "root" / "x")
    _fake_adapter(tmp_path / "elsewhere")
    card.write_card(tmp_path / "elsewhere", _card((1.0, 0.9, 0.5), {"gsm8k": {1.0: 999}}))
    results = {
        "datasets": {
            "gsm8k": {
                "conditions": [
                    {"method": "original", "ratio": None, "mean_tokens": 300},
                    {"method": "tokenskip", "ratio": 1.0, "mean_cot_tokens": 250, "mean_tokens": 260},
                    {"method": "tokenskip", "ratio": 0.5, "mean_tokens": 120},
                    {"method": "truncation", "ratio": 0.5, "mean_tokens": 150},
                ]
            }
        }
    }
    (tmp_path / "res.json").write_text(json.dumps(results))
    cfg = ServeAppConfig.from_dict(
        {
            "model": "m",
            "adapter_root": str(tmp_path / "root"),
            "adapters": [
                {
                    "name": "y",
                    "path": str(tmp_path / "elsewhere"),
                    "ratios": [1.0, 0.5],
                    "eval_results": str(tmp_path / "res.json"),
                }
            ],
        }
    )
    res = AdapterResolver(cfg)
    assert res.known() == ["y", "x"]
    x = res.resolve("x")
    assert x.local_dir == str(tmp_path / "root" / "x") and x.ratios == cfg.default_ratios
    y = res.resolve("y")  # config ratios over the card's; eval_results over the card's evaluation
    assert y.ratios == [1.0, 0.5] and y.expected_cot_tokens == {1.0: 250.0, 0.5: 120.0}
    cfg_t = ServeAppConfig.from_dict(
        {
            "model": "m",
            "adapters": [
                {
                    "name": "y",
                    "path": str(tmp_path / "elsewhere"),
                    "eval_results": str(tmp_path / "res.json"),
                    "expected_cot_tokens": {"1.0": 10},
                }
            ],
        }
    )
    y = AdapterResolver(cfg_t).resolve("y")  # the explicit table wins; the card's γ apply
    assert y.ratios == [1.0, 0.9, 0.5] and y.expected_cot_tokens == {1.0: 10.0}
    for bad in ("missing.json", "bad.json"):
        # a shape evaluate never writes
        (tmp_path / "bad.json").write_text(json.dumps([{"ratio": 1.0, "mean_tokens": 5}]))
        cfg_b = ServeAppConfig.from_dict(
            {
                "model": "m",
                "adapters": [{"name": "y", "path": str(tmp_path / "elsewhere"), "eval_results": str(tmp_path / bad)}],
            }
        )
        with pytest.raises(ApiError) as e:
            AdapterResolver(cfg_b).resolve("y")
        assert e.value.status == 500 and "eval_results" in e.value.message, bad
    with pytest.raises(ApiError) as e:
        res.resolve("zzz")
    assert e.value.status == 404
    # object-store path (pyarrow.fs; file:// stands in for s3:// here): the card travels with the adapter
    card.write_card(tmp_path / "root" / "x", _card((1.0, 0.6), {"gsm8k": {1.0: 80, 0.6: 50}}))
    cfg2 = ServeAppConfig.from_dict(
        {"model": "m", "adapter_root": f"file://{tmp_path / 'root'}", "adapter_cache_dir": str(tmp_path / "cache")}
    )
    got = AdapterResolver(cfg2).resolve("x")
    assert Path(got.local_dir, "adapter_config.json").is_file() and str(tmp_path / "cache") in got.local_dir
    assert card.read_card(got.local_dir) == card.read_card(tmp_path / "root" / "x")
    assert got.ratios == [1.0, 0.6] and got.expected_cot_tokens == {1.0: 80.0, 0.6: 50.0}
    with pytest.raises(ApiError) as e:
        AdapterResolver(cfg2).resolve("nope")
    assert e.value.status == 404


def test_parse_ratio_table_keys_through_gamma():
    assert routing.parse_ratio_table({"1": 5, 0.70000001: 3}) == {1.0: 5.0, 0.7: 3.0}
    for bad in ({"1.5": 3}, {"x": 3}, {"0.5": "many"}, {"0.5": float("nan")}, {"0.5": True}):
        with pytest.raises(ValueError):
            routing.parse_ratio_table(bad)
    with pytest.raises(ConfigError, match="adapters"):
        ServeAppConfig.from_dict(
            {"model": "m", "adapters": [{"name": "a", "path": "/p", "expected_cot_tokens": {"2": 1}}]}
        )


def test_parse_request_validation():
    from serving.app import parse_request

    ok = parse_request(
        {
            "model": "m:a",
            "messages": [{"role": "user", "content": "q"}],
            "compression_ratio": 0.5,
            "stop": "x",
            "max_completion_tokens": 5,
        },
        "chat",
        "m",
    )
    assert ok["adapter"] == "a" and ok["stop"] == ["x"] and ok["max_tokens"] == 5 and ok["compression_ratio"] == 0.5
    for body in (
        {"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 3},
        {"model": "m", "messages": [{"role": "user", "content": "q"}], "max_tokens": 1.5},
        {"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": [{"type": "function"}]},
        {"model": "m", "messages": [{"role": "user", "content": "q"}], "compression_ratio": 2},
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    ):
        with pytest.raises(ApiError) as e:
            parse_request(body, "chat", "m")
        assert e.value.status == 400, body


def test_config_validation_and_shipped_yaml():
    with pytest.raises(ConfigError, match="':'"):
        ServeAppConfig.from_dict({"model": "m", "model_id": "a:b"})
    with pytest.raises(ConfigError):
        ServeAppConfig.from_dict({"model": "m", "adapters": [{"name": "../x", "path": "/p"}]})
    with pytest.raises(ConfigError, match="ingress_deployment.max_queued_requests"):
        ServeAppConfig.from_dict({"model": "m", "ingress_deployment": {"max_queued_requests": 10}})
    assert ServeAppConfig.from_dict({"model": "m", "ingress_deployment": {"max_queued_requests": -1}})
    with pytest.raises(ConfigError, match="duplicate"):
        ServeAppConfig.from_dict({"model": "m", "adapters": [{"name": "a", "path": "/p"}, {"name": "a", "path": "/q"}]})
    from serving.run import load_serve_config

    root = Path(__file__).resolve().parents[1] / "serving"
    for name in ("serve_config.yaml", "serve_config.gpu.yaml"):
        conf = load_serve_config(str(root / name), ["default_max_tokens=64"])
        app = conf["applications"][0]
        assert app["import_path"] == "serving.app:build_app"
        cfg = ServeAppConfig.from_dict(app["args"])
        assert cfg.default_max_tokens == 64 and cfg.model_deployment["autoscaling_config"]["max_replicas"] >= 1
    # the Serve schema itself accepts the file (what `serve deploy` validates)
    import yaml
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load((root / "serve_config.yaml").read_text()))
