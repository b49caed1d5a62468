"""Reasoning controls clients already know (issue 16, the endpoint): ``reasoning_effort``,
``thinking_token_budget`` / ``max_thinking_tokens``, a hard budget with a forced answer, and
``usage.completion_tokens_details.reasoning_tokens``.

The first part is pure (no Ray, no engine): request parsing, the effort → γ map and its
config validation, budget routing, the forcing decisions, and the model deployment's two-call
flow driven by a scripted fake engine. The second part (``integration``) talks to the real
Serve app of tests/test_serving.py with the official ``openai`` SDK; it shares that module's
app (one vLLM engine start per session):

    flock /tmp/coord/heavy.lock make test PYTEST_ARGS="tests/test_reasoning_controls.py -q -k sdk"
"""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

import pytest

from serving import protocol, routing
from serving.adapters import AdapterResolver, check_efforts
from serving.config import ServeAppConfig
from serving.routing import ApiError, default_effort_map, effort_map, route
from tokenskip import card as tscard
from tokenskip import gamma
from tokenskip.config import ConfigError
from tokenskip.prompt import ANSWER_OPENING, split_answer

MSG = [{"role": "user", "content": "q"}]
QUICKSTART_RATIOS = (1.0, 0.7, 0.5)  # configs/quickstart.yaml's trained ratios


def chat(**extra):
    return {"model": "m", "messages": MSG, **extra}


def bad(body, param=None, needle=None):
    with pytest.raises(ApiError) as e:
        protocol.parse_request(body, "chat", "m")
    assert e.value.status == 400, e.value
    if param is not None:
        assert e.value.param == param, e.value.body()
    if needle is not None:
        assert needle in e.value.message, e.value.message
    return e.value


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("field", routing.BUDGET_FIELDS)
def test_every_budget_name_is_the_same_control(field):
    req = protocol.parse_request(chat(**{field: 230}), "chat", "m")
    assert req["max_cot_tokens"] == 230.0 and req["budget_param"] == field and req["budget_mode"] is None
    bad(chat(**{field: 0}), param=field)
    bad(chat(**{field: "many"}), param=field)
    bad(chat(**{field: float("inf")}), param=field)


@pytest.mark.parametrize("a,b", list(itertools.combinations(routing.CONTROLS, 2)))
def test_two_controls_at_once_are_400(a, b):
    values = {"compression_ratio": 0.5, "reasoning_effort": "low"}
    e = bad(chat(**{a: values.get(a, 100), b: values.get(b, 100)}), param=a, needle="not both")
    assert b in e.message


def test_reasoning_effort_parsing_and_budget_mode():
    req = protocol.parse_request(chat(reasoning_effort="low"), "chat", "m")
    assert req["reasoning_effort"] == "low" and req["max_cot_tokens"] is None
    bad(chat(reasoning_effort=3), param="reasoning_effort")
    bad(chat(reasoning_effort=["low"]), param="reasoning_effort")
    hard = protocol.parse_request(chat(max_thinking_tokens=40, budget="hard"), "chat", "m")
    assert hard["budget_mode"] == "hard" and protocol.hard_budget(hard, False) == 40
    bad(chat(budget="hard"), param="budget", needle="needs a token budget")
    bad(chat(budget="hard", compression_ratio=0.5), param="budget")
    bad(chat(budget="hard", reasoning_effort="low"), param="budget")
    bad(chat(budget="strict", max_cot_tokens=10), param="budget")
    bad(chat(budget="hard", thinking_token_budget=0.5), param="thinking_token_budget", needle=">= 1 token")


def test_hard_budget_per_request_or_per_app():
    def req(**kw):
        return protocol.parse_request(chat(**kw), "chat", "m")

    assert protocol.hard_budget(req(max_cot_tokens=64.7), app_default=False) is None
    assert protocol.hard_budget(req(max_cot_tokens=64.7), app_default=True) == 64
    assert protocol.hard_budget(req(max_cot_tokens=64, budget="soft"), app_default=True) is None
    assert protocol.hard_budget(req(max_cot_tokens=64, budget="hard"), app_default=False) == 64
    assert protocol.hard_budget(req(compression_ratio=0.5), app_default=True) is None  # no budget: nothing to cap
    with pytest.raises(ApiError) as e:  # an app-wide hard default meets a fractional budget under 1 token
        protocol.hard_budget(req(max_thinking_tokens=0.5), app_default=True)
    assert e.value.param == "max_thinking_tokens"


# ----------------------------------------------------------------------------- effort -> γ


def test_default_effort_map_for_the_quickstart_adapter():
    assert default_effort_map(QUICKSTART_RATIOS) == {"high": 1.0, "medium": 0.7, "low": 0.5}
    assert default_effort_map(gamma.DEFAULT_RATIOS) == {"high": 1.0, "medium": 0.8, "low": 0.5}
    assert default_effort_map([0.9, 0.5]) == {"high": 0.9, "medium": 0.9, "low": 0.5}  # no γ = 1 trained


@pytest.mark.parametrize("effort", ["none", "minimal", "xhigh", "max", "LOW", "", "medium-ish"])
def test_efforts_the_adapter_cannot_honour_are_400_naming_the_supported_ones(effort):
    with pytest.raises(ApiError) as e:
        route(None, None, QUICKSTART_RATIOS, reasoning_effort=effort)
    err = e.value
    assert err.status == 400 and err.param == "reasoning_effort" and err.code == "unsupported_reasoning_effort"
    assert "supported values: low, medium, high" in err.message


def test_route_by_effort_uses_the_map_and_the_expected_lengths():
    table = {1.0: 200.0, 0.7: 140.0}
    for effort, g in (("high", 1.0), ("medium", 0.7), ("low", 0.5)):
        r = route(None, None, QUICKSTART_RATIOS, table, reasoning_effort=effort)
        assert (r.ratio, r.source) == (g, "effort")
    assert route(None, None, QUICKSTART_RATIOS, table, reasoning_effort="low").expected_cot_tokens == 100.0
    efforts = effort_map(QUICKSTART_RATIOS, {"minimal": 0.5, "high": 0.7})
    assert route(None, None, QUICKSTART_RATIOS, reasoning_effort="minimal", efforts=efforts).ratio == 0.5
    assert route(None, None, QUICKSTART_RATIOS, reasoning_effort="high", efforts=efforts).ratio == 0.7
    with pytest.raises(ApiError, match="not both"):
        route(0.5, None, QUICKSTART_RATIOS, reasoning_effort="low")


def test_budget_names_route_like_max_cot_tokens_and_errors_name_the_field():
    table = {1.0: 300.0, 0.8: 220.0, 0.5: 140.0}
    for budget in (10, 140, 219, 220, 299, 300, 1e6):
        expect = route(None, budget, [1.0, 0.8, 0.5], table)
        for name in routing.BUDGET_FIELDS:
            assert route(None, budget, [1.0, 0.8, 0.5], table, budget_param=name) == expect
    with pytest.raises(ApiError) as e:
        route(None, 100, [1.0, 0.5], {}, budget_param="thinking_token_budget")
    assert e.value.param == "thinking_token_budget" and "thinking_token_budget needs expected" in e.value.message


def test_effort_config_is_validated_when_the_app_is_built(tmp_path):
    with pytest.raises(ConfigError, match="unknown effort 'none'"):
        ServeAppConfig.from_dict({"model": "m", "reasoning_effort": {"none": 0.5}})
    with pytest.raises(ConfigError, match=r"base_reasoning_effort.low: γ=0.5 is not a trained ratio"):
        ServeAppConfig.from_dict({"model": "m", "base_reasoning_effort": {"low": 0.5}})
    with pytest.raises(ConfigError, match=r"adapter 'a': reasoning_effort.medium: γ=0.6 .*trained: 1.0, 0.8, 0.5"):
        ServeAppConfig.from_dict({"model": "m", "adapters": [
            {"name": "a", "path": "/x", "ratios": [1.0, 0.8, 0.5], "reasoning_effort": {"medium": 0.6}}]})
    with pytest.raises(ConfigError, match="compression ratio must be in"):
        ServeAppConfig.from_dict({"model": "m", "reasoning_effort": {"low": 1.5}})
    ok = ServeAppConfig.from_dict({"model": "m", "base_ratios": [1.0, 0.5], "base_reasoning_effort": {"minimal": 0.5}})
    assert ok.efforts_for(None, ok.base_ratios) == {"high": 1.0, "medium": 1.0, "low": 0.5, "minimal": 0.5}

    # ratios from the adapter card: checked at deploy (build_app -> check_efforts), fail closed
    adapter = tmp_path / "qs"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    rows = {gamma.key(r): 1 for r in QUICKSTART_RATIOS}
    tscard.write_card(adapter, tscard.AdapterCard("m", list(QUICKSTART_RATIOS), rows, tscard.prompt_spec(),
                                                  {"dataset": "d", "data_sha256": "0" * 64, "config": {}}))
    good = ServeAppConfig.from_dict({"model": "m", "reasoning_effort": {"minimal": 0.5},
                                     "adapters": [{"name": "qs", "path": str(adapter)}]})
    check_efforts(good)
    info = AdapterResolver(good).resolve("qs")
    assert info.efforts == {"high": 1.0, "medium": 0.7, "low": 0.5, "minimal": 0.5} and info.efforts_error is None
    wrong = {"model": "m", "reasoning_effort": {"medium": 0.8}, "adapters": [{"name": "qs", "path": str(adapter)}]}
    with pytest.raises(ConfigError, match=r"adapter 'qs': reasoning_effort.medium: γ=0.8 .*trained: 1.0, 0.7, 0.5"):
        check_efforts(ServeAppConfig.from_dict(wrong))
    from serving.app import build_app

    with pytest.raises(ConfigError, match="γ=0.8 is not a trained ratio"):
        build_app(wrong)
    missing = {"model": "m", "adapters": [{"name": "gone", "path": str(tmp_path / "nope"),
                                           "reasoning_effort": {"low": 0.5}}]}
    with pytest.raises(ConfigError, match=r"adapters\[gone\]: cannot read its trained ratios"):
        check_efforts(ServeAppConfig.from_dict(missing))


# ----------------------------------------------------------------------------- forcing decisions


def test_forced_suffix_lays_out_the_answer_sentence_like_the_training_target():
    for cot in ("2+3=5", "2+3=5 ", "2+3=5\n", "2+3=5\n\n", ""):
        out = cot + protocol.forced_suffix(cot)
        assert out.endswith(ANSWER_OPENING)
        assert split_answer(out + "5}$") == (cot.rstrip(), ANSWER_OPENING + "5}$")
        assert "\n\n\n" not in out


@pytest.mark.parametrize(
    "text,finish,n,cap,expect",
    [
        ("2+3=5, so 5.", "stop", 7, 40, None),  # stopped by itself: nothing to force
        ("2+3=5 and then", "length", 40, 40, "forced"),  # the budget cut the CoT: force
        ("2+3=5 and then", "length", 30, 40, None),  # cut by something else (context), not the budget
        ("2+3=5\n\nThe final answer is: $\\boxed{", "length", 40, 40, ""),  # answer begun: finish it
        ("2+3=5\n\nThe final answer is: $\\boxed{\\frac{1}{", "length", 40, 40, ""),
        ("2+3=5\n\nThe final answer is:", "length", 40, 40, ""),
        ("2+3=5\n\nThe final answer is: $\\boxed{5}$ because", "length", 40, 40, None),  # answer complete
        ("2+3=5\n#### 5", "length", 40, 40, None),
    ],
)
def test_answer_step(text, finish, n, cap, expect):
    got = protocol.answer_step(text, finish, n, cap)
    if expect == "forced":
        assert got == protocol.forced_suffix(text) and got.endswith(ANSWER_OPENING)
    else:
        assert got == expect


def test_answer_cap_and_continuation_ids():
    assert protocol.answer_cap(24, 512, 40 + 12, 400) == 24
    assert protocol.answer_cap(24, 60, 52, 400) == 8  # what max_tokens leaves
    assert protocol.answer_cap(24, 512, 52, 3) == 3  # what the context leaves
    assert protocol.answer_cap(24, 50, 52, 400) == 0
    assert protocol.continuation_ids([1, 2], [3], [4, 5]) == [1, 2, 3, 4, 5]


class CharTokenizer:
    """One token per character (id = code point): token counts are visible in the text."""

    chat_template = None
    eos_token = ""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_reasoning_tokens_count_the_cot_before_the_answer_sentence():
    tok = CharTokenizer()
    assert protocol.reasoning_tokens(tok, "abc\n\nThe final answer is: $\\boxed{5}$") == 3
    assert protocol.reasoning_tokens(tok, "abcdef") == 6  # no answer sentence: all CoT
    assert protocol.reasoning_tokens(tok, "abcdef", cot_generated=4) == 4  # never more than was generated
    assert protocol.reasoning_tokens(tok, "The final answer is: 5") == 0
    assert protocol.realized_ratio(30, {1.0: 120.0}) == 0.25 and protocol.realized_ratio(30, None) is None


def test_usage_and_final_chunk_carry_reasoning_tokens():
    req = protocol.parse_request(chat(), "chat", "m")
    out = {"compression_ratio": 0.5, "prompt_tokens": 3, "text": "hi", "completion_tokens": 9, "finish_reason": "stop",
           "reasoning_tokens": 4, "tokenskip": {"source": "explicit", "reasoning_tokens": 4}}
    body = protocol.completion_body(req, out, "m", created=1)
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12,
                             "completion_tokens_details": {"reasoning_tokens": 4}}
    final = protocol.stream_chunk(req, "m", 1, 0.5, "x", "stop", final={"hard_cap_fired": True})
    assert final["tokenskip"] == {"hard_cap_fired": True} and final["choices"][0]["delta"] == {"content": "x"}


# ----------------------------------------------------------------------------- the two-call flow (fake engine)

COT = "Natalia sold 48 clips in April. In May she sold 48 / 2 = 24 clips. 48 + 24 = 72."
ANSWER = "72}$"


class ScriptedEngine:
    """A vLLM AsyncLLM stand-in over the character tokenizer: from a prompt that ends with the
    forced opening it writes ``ANSWER``, from any other prompt ``COT`` + the answer sentence;
    honours ``max_tokens`` and ``output_kind`` (FINAL_ONLY / DELTA) like the engine."""

    def __init__(self):
        self.calls = []

    async def generate(self, prompt_in, params, request_id, lora_request=None):
        from vllm.sampling_params import RequestOutputKind

        ids = prompt_in["prompt_token_ids"]
        prompt = "".join(map(chr, ids))
        self.calls.append((request_id, prompt, params.max_tokens))
        script = ANSWER if prompt.endswith(ANSWER_OPENING) else f"{COT}\n\nThe final answer is: $\\boxed{{72}}$"
        out = script[: params.max_tokens]
        finish = "length" if len(script) > params.max_tokens else "stop"
        if params.output_kind == RequestOutputKind.FINAL_ONLY:
            yield _out(out, finish)
            return
        for i, ch in enumerate(out):
            await asyncio.sleep(0)
            yield _out(ch, finish if i == len(out) - 1 else None)


def _out(text, finish):
    return SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=[ord(c) for c in text],
                                                    finish_reason=finish)])


def _model(**cfg):
    from serving.model import TokenSkipModelImpl

    m = TokenSkipModelImpl.__new__(TokenSkipModelImpl)
    m.cfg = ServeAppConfig.from_dict({"model": "m", "base_ratios": [1.0, 0.7, 0.5],
                                      "base_expected_cot_tokens": {"1.0": 100}, **cfg})
    m.tokenizer, m.engine, m.max_model_len = CharTokenizer(), ScriptedEngine(), 4096
    return m


def _run(model, body, stream=False):
    req = protocol.parse_request(body, "chat", "m")

    async def go():
        if not stream:
            return await model.complete(req)
        items = [item async for item in model.stream(req)]
        return items

    return asyncio.run(go())


def _stream_text(items):
    return "".join(i["text"] for i in items if i["type"] == "delta")


@pytest.mark.parametrize("budget", [1, 5, 20, 50])
def test_hard_budget_forces_the_answer_and_never_exceeds_the_budget(budget):
    model = _model()
    body = chat(max_thinking_tokens=budget, budget="hard", max_tokens=300)
    out = _run(model, body)
    cot_len = len(COT)  # the scripted CoT (one token per character) is longer than every budget here
    assert out["text"] == COT[:budget] + protocol.forced_suffix(COT[:budget]) + ANSWER
    tsk = out["tokenskip"]
    assert tsk["hard_cap_fired"] is True and tsk["answer_forced"] is True and budget < cot_len
    assert out["reasoning_tokens"] == tsk["reasoning_tokens"] <= budget
    assert out["completion_tokens"] == len(out["text"]) and out["finish_reason"] == "stop"
    assert tsk["budget"] == {"param": "max_thinking_tokens", "tokens": float(budget), "mode": "hard"}
    assert tsk["realized_ratio"] == round(tsk["reasoning_tokens"] / 100, 4)
    (_, _, cap1), (rid2, prompt2, cap2) = model.engine.calls
    assert cap1 == budget and rid2.endswith("-answer") and cap2 == 24 and prompt2.endswith(ANSWER_OPENING)
    # streaming: the CoT, then the forced opening, then the answer; the outcome on the last delta
    items = _run(_model(), body, stream=True)
    assert items[0]["type"] == "start" and _stream_text(items) == out["text"]
    assert [i["finish_reason"] for i in items[1:-1]] == [None] * (len(items) - 2)
    last = items[-1]
    assert last["finish_reason"] == "stop" and last["tokenskip"]["hard_cap_fired"] is True
    assert last["reasoning_tokens"] == out["reasoning_tokens"] and last["completion_tokens"] == len(out["text"])


def test_hard_budget_that_fits_does_not_fire_and_soft_budget_never_forces():
    fits = _run(_model(), chat(max_cot_tokens=500, budget="hard", max_tokens=300))
    assert fits["text"].startswith(COT) and fits["tokenskip"]["hard_cap_fired"] is False
    assert fits["reasoning_tokens"] == len(COT) and fits["tokenskip"]["realized_ratio"] == round(len(COT) / 100, 4)
    soft = _run(_model(), chat(max_cot_tokens=20, max_tokens=300))
    assert soft["text"] == fits["text"] and "hard_cap_fired" not in soft["tokenskip"]
    app_hard = _model(hard_budget=True, hard_budget_answer_tokens=2)
    out = _run(app_hard, chat(thinking_token_budget=20, max_tokens=300))  # the app makes budgets hard
    assert out["tokenskip"]["hard_cap_fired"] is True and out["text"].endswith(ANSWER_OPENING + ANSWER[:2])
    assert out["finish_reason"] == "length"  # the answer cap (2 tokens) cut the answer
    opted_out = _run(_model(hard_budget=True), chat(thinking_token_budget=20, budget="soft", max_tokens=300))
    assert opted_out["text"] == fits["text"]


def test_max_tokens_still_bounds_the_whole_completion():
    forced = protocol.forced_suffix(COT[:20])
    out = _run(_model(), chat(max_cot_tokens=20, budget="hard", max_tokens=20 + len(forced) + 2))
    assert out["text"] == COT[:20] + forced + ANSWER[:2] and out["finish_reason"] == "length"
    assert out["completion_tokens"] == 20 + len(forced) + 2 and out["reasoning_tokens"] <= 20
    no_room = _run(_model(), chat(max_cot_tokens=20, budget="hard", max_tokens=30))  # the opening would not fit
    assert no_room["text"] == COT[:20] and no_room["finish_reason"] == "length"
    assert no_room["tokenskip"]["hard_cap_fired"] is True and no_room["tokenskip"]["answer_forced"] is False
    small = _run(_model(), chat(max_cot_tokens=20, budget="hard", max_tokens=10))  # max_tokens < budget: no forcing
    assert small["text"] == COT[:10] and small["tokenskip"]["hard_cap_fired"] is False
    assert small["reasoning_tokens"] == 10


def test_effort_requests_on_the_model_deployment():
    model = _model(base_reasoning_effort={"minimal": 0.5})
    out = _run(model, chat(reasoning_effort="medium", return_prompt=True))
    assert out["compression_ratio"] == 0.7 and out["tokenskip"]["source"] == "effort"
    assert out["tokenskip"]["reasoning_efforts"] == {"high": 1.0, "medium": 0.7, "low": 0.5, "minimal": 0.5}
    assert "\nq<|eot_id|>0.7<|eot_id|>" in out["tokenskip"]["prompt"]
    assert _run(model, chat(reasoning_effort="minimal"))["compression_ratio"] == 0.5
    with pytest.raises(ApiError, match="supported values: minimal, low, medium, high"):
        _run(model, chat(reasoning_effort="none"))


# ----------------------------------------------------------------------------- the real app, the openai SDK

try:  # the app of tests/test_serving.py (module-scoped there; its teardown waits for this module)
    from test_serving import BASE, QUESTION, _chat, _extra, _metrics, _raw, client, served  # noqa: F401
except pytest.skip.Exception:  # openai not installed: the SDK tests are skipped below
    BASE = None

sdk = pytest.mark.skipif(BASE is None, reason="the openai SDK is not installed")
A = f"{BASE}:a"  # ratios 1.0/0.8/0.5, expected CoT 300/220/140, reasoning_effort {minimal: 0.5} in the app config
B = f"{BASE}:adapter-b"  # ratios 1.0/0.9/0.6 from its card, γ=1 expected CoT 200


def _tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@sdk
@pytest.mark.integration
def test_sdk_reasoning_effort_maps_to_trained_gammas(client):
    expect = {A: {"high": 1.0, "medium": 0.8, "low": 0.5, "minimal": 0.5}, B: {"high": 1.0, "medium": 0.9, "low": 0.6},
              BASE: {"high": 1.0, "medium": 1.0, "low": 1.0}}
    for model, efforts in expect.items():
        for effort, g in efforts.items():
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=4, temperature=0.0, reasoning_effort=effort)
            tsk = _extra(r, "tokenskip")
            assert _extra(r, "compression_ratio") == g and tsk["source"] == "effort", (model, effort, tsk)
            assert tsk["reasoning_efforts"] == efforts and tsk["reasoning_effort"] == effort
    r = client.completions.create(model=A, prompt=QUESTION, max_tokens=4, extra_body={"reasoning_effort": "low"})
    assert _extra(r, "compression_ratio") == 0.5


@sdk
@pytest.mark.integration
@pytest.mark.parametrize(
    "model,effort,supported",
    [(B, "none", "low, medium, high"), (B, "minimal", "low, medium, high"), (A, "xhigh", "minimal, low, medium, high"),
     (A, "max", "minimal")],
)
def test_sdk_unsupported_effort_is_400_naming_the_supported_values(client, model, effort, supported):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
                                       reasoning_effort=effort)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == "reasoning_effort" and supported in err["message"], err


@sdk
@pytest.mark.integration
def test_sdk_thinking_budgets_route_like_max_cot_tokens(client):
    for field in routing.BUDGET_FIELDS:
        r = _chat(client, A, max_tokens=4, **{field: 230})  # table 1.0->300, 0.8->220, 0.5->140
        tsk = _extra(r, "tokenskip")
        assert _extra(r, "compression_ratio") == 0.8 and tsk["source"] == "budget", field
        assert tsk["budget"] == {"param": field, "tokens": 230.0, "mode": "soft"}
        r = _chat(client, A, max_tokens=4, **{field: 10})
        assert _extra(r, "compression_ratio") == 0.5 and _extra(r, "tokenskip")["budget_fits"] is False
        r = _chat(client, B, max_tokens=4, **{field: 190})  # only γ=1 -> 200 known: γ·200
        assert _extra(r, "compression_ratio") == 0.9


@sdk
@pytest.mark.integration
@pytest.mark.parametrize(
    "extra",
    [
        {"reasoning_effort": "low", "compression_ratio": 0.5},
        {"thinking_token_budget": 100, "max_cot_tokens": 100},
        {"max_thinking_tokens": 100, "reasoning_effort": "high"},
        {"thinking_token_budget": 100, "max_thinking_tokens": 100},
        {"budget": "hard", "compression_ratio": 0.5},
        {"budget": "always", "max_cot_tokens": 100},
    ],
)
def test_sdk_conflicting_or_invalid_controls_are_400(client, extra):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, A, max_tokens=4, **extra)
    assert e.value.status_code == 400 and e.value.body["param"] in extra, e.value.body


@sdk
@pytest.mark.integration
def test_sdk_usage_reports_reasoning_tokens_and_realized_ratio(client, tiny_llama):
    tok = _tokenizer(tiny_llama)
    r = _chat(client, A, max_tokens=24, compression_ratio=0.8)
    text, usage = r.choices[0].message.content, r.usage
    cot, _ = split_answer(text)
    n = len(tok(cot, add_special_tokens=False)["input_ids"]) if cot else 0
    assert usage.completion_tokens_details.reasoning_tokens == min(n, usage.completion_tokens)
    tsk = _extra(r, "tokenskip")
    assert tsk["expected_cot_tokens_at_1"] == 300 and tsk["realized_ratio"] == round(tsk["reasoning_tokens"] / 300, 4)
    stream = client.chat.completions.create(
        model=A, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"compression_ratio": 0.8})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    streamed = chunks[-1].usage.completion_tokens_details.reasoning_tokens
    assert streamed == usage.completion_tokens_details.reasoning_tokens
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and _extra(final[0], "tokenskip")["reasoning_tokens"] == tsk["reasoning_tokens"]
    plain = client.completions.create(model=BASE, prompt=QUESTION, max_tokens=6, temperature=0.0)
    assert plain.usage.completion_tokens_details.reasoning_tokens <= plain.usage.completion_tokens


@sdk
@pytest.mark.integration
def test_sdk_hard_budget_reasoning_tokens_never_exceed_the_budget(client, served, ray_local):
    """The tiny random adapters never write the answer sentence by themselves: every budget below
    their output length makes the cap fire, and the forced opening + a short answer follow."""
    for budget, field in ((1, "max_cot_tokens"), (6, "thinking_token_budget"), (17, "max_thinking_tokens")):
        kw = dict(model=A, messages=[{"role": "user", "content": QUESTION}], max_tokens=96, temperature=0.0,
                  extra_body={field: budget, "budget": "hard"})
        r = client.chat.completions.create(**kw)
        text, tsk = r.choices[0].message.content, _extra(r, "tokenskip")
        assert r.usage.completion_tokens_details.reasoning_tokens == tsk["reasoning_tokens"] <= budget, (budget, tsk)
        assert tsk["budget"] == {"param": field, "tokens": float(budget), "mode": "hard"}
        assert tsk["hard_cap_fired"] is True and tsk["answer_forced"] is True and ANSWER_OPENING in text
        assert r.usage.completion_tokens <= budget + 24 + 16  # CoT + forced opening + the 24-token answer cap
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens <= budget
        final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert _extra(final[0], "tokenskip")["hard_cap_fired"] is True
    comp = client.completions.create(model=B, prompt=QUESTION, max_tokens=64, temperature=0.0,
                                     extra_body={"thinking_token_budget": 5, "budget": "hard"})
    assert comp.usage.completion_tokens_details.reasoning_tokens <= 5 and ANSWER_OPENING in comp.choices[0].text
    soft = _chat(client, A, max_tokens=48, max_cot_tokens=6)  # a soft budget only routes γ
    assert "hard_cap_fired" not in _extra(soft, "tokenskip") and ANSWER_OPENING not in soft.choices[0].message.content
    text = _metrics(ray_local, ["tokenskip_hard_budget_requests", 'fired="true"'])
    assert "tokenskip_hard_budget_requests" in text and 'fired="true"' in text, text[-2000:]

