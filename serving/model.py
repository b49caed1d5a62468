"""The model replica's body: one vLLM ``AsyncLLM`` (LoRA enabled), adapter loading, γ routing,
prompt rendering and generation. Ray Serve wraps it into the ``TokenSkipModel`` deployment
(:func:`serving.app.model_deployment`, which adds the ``@serve.multiplexed`` adapter LRU).

Engine failures become ApiErrors here, before they cross Ray: a dead engine is a 503 (and
:meth:`TokenSkipModelImpl.check_health` fails, so Serve replaces the replica); a request the
engine refuses is a 400; anything else stays a server error.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator

from ray import serve

from serving import protocol, routing
from serving.adapters import AdapterInfo, AdapterResolver
from serving.config import ServeAppConfig
from serving.routing import ApiError, Route, route
from tokenskip import prompt as tsprompt

log = logging.getLogger("tokenskip.serving")


@dataclass
class _Plan:
    """A validated, rendered request: γ route, prompt ids, response metadata, the first call's
    sampling params, the LoRA, the hard budget's CoT cap (None: soft), the request's max_tokens
    and the expected-CoT table."""

    route: Route
    ids: list[int]
    meta: dict
    params: Any
    lora: Any
    cap: int | None
    max_tokens: int
    table: dict


@dataclass
class _Answer:
    """What follows a hard-budget CoT call: whether the cap fired (the CoT used the budget
    without the answer sentence), the forced text and its ids, and the answer call
    ((prompt, params); None when no room is left)."""

    fired: bool
    forced: str
    forced_ids: list[int]
    call: tuple[Any, Any] | None


@dataclass
class _StreamState:
    """What a streamed completion has produced so far, across its engine calls."""

    n: int = 0
    text: str = ""
    ids: list[int] = field(default_factory=list)
    finish: str | None = None
    last: str = ""


class LoadedAdapter:
    """A LoRA registered with this replica's engine; unregistered when Serve's LRU evicts it."""

    def __init__(self, info: AdapterInfo, lora_request: Any, engine: Any):
        self.info, self.lora_request, self._engine = info, lora_request, engine
        self._loop = asyncio.get_running_loop()

    def __del__(self):
        # Serve's LRU calls this in an executor thread on eviction (and the GC may call it
        # later again): hand the removal to the replica's event loop, never block here.
        loop, engine = getattr(self, "_loop", None), getattr(self, "_engine", None)
        lora_id = self.lora_request.lora_int_id
        self._engine = None
        if loop is None or engine is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(engine.remove_lora(lora_id)))
        except RuntimeError:  # pragma: no cover - loop shutting down
            pass


class TokenSkipModelImpl:
    """Model replica body (wrapped into a Serve deployment by :func:`model_deployment`)."""

    def __init__(self, cfg: dict):
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from tokenskip import engine as tsengine

        self.cfg = ServeAppConfig.from_dict(cfg)
        tsengine.cpu_env_defaults()
        kw = tsengine.engine_kwargs_for(self.cfg.model, {"max_loras": self.cfg.max_adapters_per_replica,
                                                         **self.cfg.engine_kwargs},
                                        enable_lora=True, max_lora_rank=self.cfg.max_lora_rank)
        kw.setdefault("disable_log_stats", True)
        self.engine_kwargs = kw
        # A small CPU model runs in the EngineCore process the engine spawns, on the bound CPUs (no
        # Worker process to start; the replica's own OMP_NUM_THREADS is Ray's num_cpus).
        with tsengine.spawn_env(tsengine.in_process_env(kw)):
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        self.tokenizer = AutoTokenizer.from_pretrained(kw["model"])
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.resolver = AdapterResolver(self.cfg)
        self._lora_ids = itertools.count(1)
        self._loads: collections.Counter[str] = collections.Counter()

    def _engine_error(self, e: BaseException) -> ApiError | None:
        """What an engine exception means for the client: 503 when the engine is dead, 400 for
        a request the engine refused, None for anything else (a server bug)."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(e, EngineDeadError) or getattr(self.engine, "errored", False):
            return ApiError(503, "the model engine is not running; retry later", code="engine_unavailable",
                            retry_after=self.cfg.retry_after_s)
        if isinstance(e, (VLLMClientError, ValueError)):
            return ApiError(400, f"the engine refused the request: {str(e)[:300]}")
        return None

    async def _load_adapter(self, adapter_id: str) -> LoadedAdapter:
        from vllm.lora.request import LoRARequest

        info = await asyncio.get_running_loop().run_in_executor(None, self.resolver.resolve, adapter_id)
        lora = LoRARequest(adapter_id, next(self._lora_ids), info.local_dir)
        try:
            await self.engine.add_lora(lora)
        except Exception as e:
            api = self._engine_error(e)
            if api is not None and api.status == 503:
                raise api from None
            log.warning("adapter %s (%s) cannot be loaded: %s", adapter_id, info.source, e)
            raise ApiError(400, f"adapter {adapter_id!r} cannot be loaded by this model (see the server log)",
                           param="model", code="adapter_invalid") from None
        self._loads[adapter_id] += 1
        log.info("loaded adapter %s from %s (ratios %s)", adapter_id, info.source, info.ratios)
        return LoadedAdapter(info, lora, self.engine)

    def adapter_loads(self) -> dict[str, int]:
        """How often each adapter was loaded into this replica's engine (an LRU eviction
        followed by a reload counts twice)."""
        return dict(self._loads)

    async def check_health(self) -> None:
        await self.engine.check_health()  # raises once the engine died: Serve replaces the replica

    # -- request preparation -------------------------------------------------------
    def _params(self, req: dict, max_tokens: int) -> Any:
        from vllm import SamplingParams

        temperature = req.get("temperature")
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=self.cfg.default_temperature if temperature is None else temperature,
                top_p=1.0 if req.get("top_p") is None else req["top_p"], stop=req.get("stop"), seed=req.get("seed"),
                presence_penalty=req.get("presence_penalty") or 0.0,
                frequency_penalty=req.get("frequency_penalty") or 0.0)
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"invalid sampling parameters: {e}") from None

    async def _prepare(self, req: dict) -> _Plan:
        adapter_id = req.get("adapter")
        loaded = None
        if adapter_id:
            if serve.get_multiplexed_model_id() not in ("", adapter_id):  # pragma: no cover - ingress bug
                raise ApiError(400, "multiplexed model id does not match the request's adapter", param="model")
            loaded = await self.load_adapter(adapter_id)
            ratios, table = loaded.info.ratios, loaded.info.expected_cot_tokens
            efforts = loaded.info.efforts
        else:
            ratios, table = self.cfg.base_ratios, self.cfg.base_expected_cot_tokens or {}
            efforts = self.cfg.efforts_for(None, ratios)
        if req.get("reasoning_effort") is not None and efforts is None:  # logged when the adapter was resolved
            raise ApiError(500, f"adapter {adapter_id!r}: the app's reasoning_effort map does not fit its trained "
                                "ratios (details in the server log)", param="model", code="adapter_invalid")
        rt = route(req.get("compression_ratio"), req.get("max_cot_tokens"), ratios, table,
                   reasoning_effort=req.get("reasoning_effort"), efforts=efforts,
                   budget_param=req.get("budget_param") or "max_cot_tokens")
        cap = protocol.hard_budget(req, self.cfg.hard_budget)
        text, special = protocol.render_text(self.tokenizer, req, rt.ratio)
        # A rendered prompt is tokenized like training did (tokenskip.prompt.encode_prompt);
        # a raw completion prompt as is.
        ids = self.tokenizer(text)["input_ids"] if special else tsprompt.encode_prompt(self.tokenizer, text)
        max_tokens = req.get("max_tokens")
        if max_tokens is None:  # like OpenAI: the default never overflows the context by itself
            max_tokens = max(1, min(self.cfg.default_max_tokens, self.max_model_len - len(ids)))
        protocol.check_context(len(ids), max_tokens, self.max_model_len, req["kind"])
        # a hard budget caps the first call at B (the CoT); max_tokens still bounds the whole completion
        params = self._params(req, max_tokens if cap is None else min(cap, max_tokens))
        tsk = {"compression_ratio": rt.ratio, "source": rt.source, "adapter": adapter_id,
               "expected_cot_tokens": rt.expected_cot_tokens, "budget_fits": rt.budget_fits,
               "valid_ratios": list(ratios)}
        if req.get("reasoning_effort") is not None:
            tsk["reasoning_effort"] = req["reasoning_effort"]
            tsk["reasoning_efforts"] = dict(efforts or {})
        if req.get("max_cot_tokens") is not None:
            tsk["budget"] = {"param": req.get("budget_param") or "max_cot_tokens", "tokens": req["max_cot_tokens"],
                             "mode": "soft" if cap is None else "hard"}
        if req.get("return_prompt"):
            tsk["prompt"] = text
        meta = {"compression_ratio": rt.ratio, "prompt_tokens": len(ids), "tokenskip": tsk}
        return _Plan(rt, ids, meta, params, loaded.lora_request if loaded else None, cap, max_tokens, dict(table))

    def _answer(self, req: dict, plan: _Plan, text: str, gen_ids: list[int], finish: str | None) -> _Answer | None:
        """After the CoT call of a hard-budget request: the forced text and the answer call (None:
        the request is done). The decisions are :mod:`serving.protocol`'s; this only tokenizes."""
        if plan.cap is None or plan.cap >= plan.max_tokens:  # max_tokens, not the budget, bounds this request
            return None
        forced = protocol.answer_step(text, finish, len(gen_ids), plan.cap)
        if forced is None:
            return None
        forced_ids = list(self.tokenizer(forced, add_special_tokens=False)["input_ids"]) if forced else []
        used = len(gen_ids) + len(forced_ids)
        n = protocol.answer_cap(self.cfg.hard_budget_answer_tokens, plan.max_tokens, used,
                                self.max_model_len - len(plan.ids) - used)
        if n <= 0:  # no room left for an answer: the request ends where the CoT stopped
            return _Answer(bool(forced), "", [], None)  # (fired: the CoT hit the budget; nothing forced)
        from vllm.inputs import TokensPrompt

        prompt_in = TokensPrompt(prompt_token_ids=protocol.continuation_ids(plan.ids, gen_ids, forced_ids))
        return _Answer(bool(forced), forced, forced_ids, (prompt_in, self._params(req, n)))

    def _outcome(self, plan: _Plan, text: str, completion_tokens: int, cot_generated: int,
                 answer: _Answer | None) -> dict:
        """The response's ``tokenskip`` object with the outcome, and the reasoning tokens."""
        reasoning = protocol.reasoning_tokens(self.tokenizer, text, min(cot_generated, completion_tokens))
        tsk = dict(plan.meta["tokenskip"])
        tsk.update({"reasoning_tokens": reasoning, "realized_ratio": protocol.realized_ratio(reasoning, plan.table),
                    "expected_cot_tokens_at_1": routing.expected_tokens(plan.table, 1.0)})
        if plan.cap is not None:
            tsk["hard_cap_fired"] = bool(answer and answer.fired)
            tsk["answer_forced"] = bool(answer and answer.forced)
        return {"tokenskip": tsk, "reasoning_tokens": reasoning}

    async def _generate(self, prompt_in: Any, params: Any, request_id: str, lora: Any):
        try:
            async for out in self.engine.generate(prompt_in, params, request_id, lora_request=lora):
                yield out
        except Exception as e:
            api = self._engine_error(e)
            if api is None:
                raise
            log.warning("request %s failed in the engine: %r", request_id, e)
            raise api from None

    # -- generation ----------------------------------------------------------------
    async def complete(self, req: dict) -> dict:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        plan = await self._prepare(req)
        plan.params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for out in self._generate(TokensPrompt(prompt_token_ids=plan.ids), plan.params, req["request_id"],
                                        plan.lora):
            final = out
        c = final.outputs[0]
        text, gen_ids, finish = c.text, list(c.token_ids), c.finish_reason
        n = len(gen_ids)
        answer = self._answer(req, plan, text, gen_ids, finish)
        if answer is not None and answer.call is not None:
            prompt_in, params = answer.call
            params.output_kind = RequestOutputKind.FINAL_ONLY
            last = None
            async for out in self._generate(prompt_in, params, f"{req['request_id']}-answer", plan.lora):
                last = out
            a = last.outputs[0]
            text += answer.forced + a.text
            n += len(answer.forced_ids) + len(a.token_ids)
            finish = a.finish_reason
        return {**plan.meta, **self._outcome(plan, text, n, len(gen_ids), answer), "text": text,
                "completion_tokens": n, "finish_reason": finish}

    async def stream(self, req: dict) -> AsyncGenerator[dict, None]:
        """First item: metadata (errors surface before any SSE byte is sent); then deltas; the
        last delta (with the finish reason) carries the outcome (``tokenskip``, reasoning tokens).
        A hard budget streams the CoT, then the forced opening, then the answer."""
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        plan = await self._prepare(req)
        plan.params.output_kind = RequestOutputKind.DELTA
        yield {"type": "start", **plan.meta}
        st = _StreamState()
        async for d in self._deltas(st, TokensPrompt(prompt_token_ids=plan.ids), plan.params, req["request_id"],
                                    plan.lora):
            yield d
        cot_generated = len(st.ids)
        answer = self._answer(req, plan, st.text, st.ids, st.finish)
        if answer is not None and answer.call is not None:
            if st.last:
                yield {"type": "delta", "text": st.last, "finish_reason": None, "completion_tokens": st.n}
            st.n += len(answer.forced_ids)
            st.text += answer.forced
            st.last = ""
            if answer.forced:
                yield {"type": "delta", "text": answer.forced, "finish_reason": None, "completion_tokens": st.n}
            prompt_in, params = answer.call
            params.output_kind = RequestOutputKind.DELTA
            async for d in self._deltas(st, prompt_in, params, f"{req['request_id']}-answer", plan.lora):
                yield d
        yield {"type": "delta", "text": st.last, "finish_reason": st.finish, "completion_tokens": st.n,
               **self._outcome(plan, st.text, st.n, cot_generated, answer)}

    async def _deltas(self, st: "_StreamState", prompt_in: Any, params: Any, request_id: str, lora: Any):
        """One engine call's delta events; ``st`` accumulates the text, ids and finish reason, and
        holds back the last piece (it goes out with the finish reason, or before a forced answer)."""
        async for out in self._generate(prompt_in, params, request_id, lora):
            c = out.outputs[0]
            st.n += len(c.token_ids)
            st.ids += c.token_ids
            st.text += c.text
            st.finish = c.finish_reason
            if c.text and not st.finish:
                yield {"type": "delta", "text": c.text, "finish_reason": None, "completion_tokens": st.n}
            elif st.finish:
                st.last = c.text
