"""The Serve app: an OpenAI-compatible ingress in front of a vLLM AsyncLLM model deployment.

    serve run serving/serve_config.yaml            # or: serve run serving.app:build_app model=...
    serve deploy serving/serve_config.yaml         # to a running cluster
    tokenskip serve --config serving/serve_config.yaml

* ``OpenAIIngress`` (FastAPI): ``POST /v1/chat/completions``, ``POST /v1/completions``,
  ``GET /v1/models``; SSE streaming; auth, size limits, OpenAI error bodies, metrics.
* ``TokenSkipModel``: one vLLM ``AsyncLLM`` (LoRA enabled) per replica; adapters load on
  first use through ``@serve.multiplexed`` (LRU per replica; Serve routes a request for an
  adapter to replicas that already hold it); γ routing + prompt rendering happen here,
  next to the tokenizer and the adapter's metadata.

Prompt rendering (SPEC §4): with ``compression_ratio`` (or ``max_cot_tokens``) the last user
message is the question and becomes ``prompt.user_content(question, γ)`` — the TokenSkip
instruction, the question, and the marker when γ < 1, as in training — then the tokenizer's
chat template. Without them the messages go through the chat template unchanged. For
``/v1/completions`` a γ-routed prompt is treated the same way (a one-turn chat); a plain one
is raw text. The γ used comes back as top-level ``compression_ratio`` (every stream chunk
carries it too) and in ``tokenskip`` (source, expected CoT tokens, adapter).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from typing import Any, AsyncGenerator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.adapters import AdapterInfo, AdapterResolver, split_model
from serving.config import ServeAppConfig
from serving.routing import ApiError, Route, apply_ratio_to_messages, normalize_messages, route

log = logging.getLogger("tokenskip.serving")


def _gamma_tag(ratio: float | None) -> str:
    from tokenskip.prompt import format_ratio

    return "none" if ratio is None else format_ratio(ratio)


# ----------------------------------------------------------------------------- model


class LoadedAdapter:
    """A LoRA registered with this replica's engine; unregistered when Serve's LRU evicts it."""

    def __init__(self, info: AdapterInfo, lora_request: Any, engine: Any):
        self.info, self.lora_request, self._engine = info, lora_request, engine
        self._loop = asyncio.get_running_loop()

    def __del__(self):
        # Serve's LRU calls this in an executor thread on eviction (and the GC may call it
        # later again): hand the removal to the replica's event loop, never block here.
        loop, engine, lora_id = getattr(self, "_loop", None), getattr(self, "_engine", None), self.lora_request.lora_int_id
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
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
        self.tokenizer = AutoTokenizer.from_pretrained(kw["model"])
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.resolver = AdapterResolver(self.cfg)
        self._lora_ids = itertools.count(1)

    async def _load_adapter(self, adapter_id: str) -> LoadedAdapter:
        from vllm.lora.request import LoRARequest

        info = await asyncio.get_running_loop().run_in_executor(None, self.resolver.resolve, adapter_id)
        lora = LoRARequest(adapter_id, next(self._lora_ids), info.local_dir)
        try:
            await self.engine.add_lora(lora)
        except Exception as e:
            raise ApiError(400, f"adapter {adapter_id!r} cannot be loaded: {e}", param="model", code="adapter_invalid") from None
        log.info("loaded adapter %s from %s (ratios %s)", adapter_id, info.source, info.ratios)
        return LoadedAdapter(info, lora, self.engine)

    async def check_health(self) -> None:
        await self.engine.check_health()

    # -- request preparation -------------------------------------------------------
    async def _prepare(self, req: dict) -> tuple[Route, Any, dict, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from tokenskip import prompt as tsprompt

        adapter_id = req.get("adapter")
        loaded = None
        if adapter_id:
            if serve.get_multiplexed_model_id() not in ("", adapter_id):  # pragma: no cover - ingress bug
                raise ApiError(400, "multiplexed model id does not match the request's adapter", param="model")
            loaded = await self.load_adapter(adapter_id)
            ratios, table = loaded.info.ratios, loaded.info.expected_cot_tokens
        else:
            ratios, table = self.cfg.base_ratios, self.cfg.base_expected_cot_tokens or {}
        rt = route(req.get("compression_ratio"), req.get("max_cot_tokens"), ratios, table)
        if req["kind"] == "chat":
            messages = apply_ratio_to_messages(normalize_messages(req["messages"]), rt.ratio)
            text = tsprompt.render_messages(self.tokenizer, messages)
            special = False  # the chat template already placed the special tokens
        elif rt.ratio is not None:
            text = tsprompt.render_prompt(self.tokenizer, req["prompt"], rt.ratio)
            special = False
        else:
            text, special = req["prompt"], True
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        max_tokens = req.get("max_tokens") or self.cfg.default_max_tokens
        if len(ids) >= self.max_model_len:
            raise ApiError(413, f"prompt is {len(ids)} tokens; this model's context is {self.max_model_len}",
                           param="messages" if req["kind"] == "chat" else "prompt", code="context_length_exceeded")
        if len(ids) + max_tokens > self.max_model_len:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                                f"{self.max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
        temperature = req.get("temperature")
        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=self.cfg.default_temperature if temperature is None else temperature,
                top_p=1.0 if req.get("top_p") is None else req["top_p"], stop=req.get("stop"), seed=req.get("seed"),
                presence_penalty=req.get("presence_penalty") or 0.0, frequency_penalty=req.get("frequency_penalty") or 0.0)
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"invalid sampling parameters: {e}") from None
        meta = {"compression_ratio": rt.ratio, "prompt_tokens": len(ids),
                "tokenskip": {"compression_ratio": rt.ratio, "source": rt.source, "adapter": adapter_id,
                              "expected_cot_tokens": rt.expected_cot_tokens, "budget_fits": rt.budget_fits,
                              "valid_ratios": list(ratios)}}
        if req.get("return_prompt"):
            meta["tokenskip"]["prompt"] = text
        return rt, TokensPrompt(prompt_token_ids=ids), meta, (params, loaded.lora_request if loaded else None)

    # -- generation ----------------------------------------------------------------
    async def complete(self, req: dict) -> dict:
        from vllm.sampling_params import RequestOutputKind

        _, prompt_in, meta, (params, lora) = await self._prepare(req)
        params.output_kind = RequestOutputKind.FINAL_ONLY
        final = None
        async for out in self.engine.generate(prompt_in, params, req["request_id"], lora_request=lora):
            final = out
        c = final.outputs[0]
        return {**meta, "text": c.text, "completion_tokens": len(c.token_ids), "finish_reason": c.finish_reason}

    async def stream(self, req: dict) -> AsyncGenerator[dict, None]:
        """First item: metadata (errors surface before any SSE byte is sent); then deltas."""
        from vllm.sampling_params import RequestOutputKind

        _, prompt_in, meta, (params, lora) = await self._prepare(req)
        params.output_kind = RequestOutputKind.DELTA
        yield {"type": "start", **meta}
        n = 0
        async for out in self.engine.generate(prompt_in, params, req["request_id"], lora_request=lora):
            c = out.outputs[0]
            n += len(c.token_ids)
            if c.text or c.finish_reason:
                yield {"type": "delta", "text": c.text, "finish_reason": c.finish_reason, "completion_tokens": n}

    async def direct_complete_many(self, reqs: list[dict]) -> list[dict]:  # pragma: no cover - benchmark helper
        return await asyncio.gather(*(self.complete(r) for r in reqs))


def model_deployment(max_adapters: int):
    """The model deployment class; ``max_adapters`` sizes the multiplexed LRU (a decorator argument)."""

    @serve.deployment(name="TokenSkipModel", ray_actor_options={"num_cpus": 1}, health_check_period_s=30)
    class TokenSkipModel(TokenSkipModelImpl):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def load_adapter(self, adapter_id: str) -> LoadedAdapter:
            return await self._load_adapter(adapter_id)

    return TokenSkipModel


# ----------------------------------------------------------------------------- ingress

app = FastAPI(title="tokenskip", description="OpenAI-compatible, γ-routed TokenSkip endpoint")


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown routes, wrong methods
    return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


def _error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(int(max(1, e.retry_after or 1)))} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _as_api_error(e: BaseException, retry_after: int) -> ApiError | None:
    """Map what a handle call raised to an ApiError (None = a server bug: 500)."""
    from ray.exceptions import RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = e.cause if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else e
    if isinstance(cause, ApiError):
        return ApiError(*cause.args)
    if isinstance(cause, BackPressureError):
        return ApiError(503, "the server is overloaded; retry later", code="overloaded",
                        retry_after=cause.retry_after_s or retry_after)
    if isinstance(cause, DeploymentUnavailableError):
        return ApiError(503, "the model is not available yet; retry later", code="unavailable", retry_after=retry_after)
    return None


def _num(body: dict, name: str, kind: type, lo: float | None = None, hi: float | None = None) -> Any:
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
    if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}{rng}, got {v!r}", param=name)
    return kind(v)


UNSUPPORTED = ("tools", "tool_choice", "functions", "logit_bias", "response_format", "best_of", "suffix")


def parse_request(body: Any, kind: str, base_id: str) -> dict:
    """Validate an OpenAI request body into the model deployment's request dict (400s)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    adapter = split_model(body.get("model"), base_id)
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise ApiError(400, f"{name} is not supported by this endpoint", param=name)
    if body.get("logprobs") not in (None, False) or body.get("echo"):
        raise ApiError(400, "logprobs / echo are not supported by this endpoint", param="logprobs")
    max_tokens = _num(body, "max_completion_tokens", int, 1) or _num(body, "max_tokens", int, 1)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    req = {
        "kind": kind, "adapter": adapter, "max_tokens": max_tokens,
        "temperature": _num(body, "temperature", float, 0.0, 2.0), "top_p": _num(body, "top_p", float, 1e-6, 1.0),
        "presence_penalty": _num(body, "presence_penalty", float, -2.0, 2.0),
        "frequency_penalty": _num(body, "frequency_penalty", float, -2.0, 2.0),
        "seed": _num(body, "seed", int), "stop": [stop] if isinstance(stop, str) else stop,
        "compression_ratio": body.get("compression_ratio"), "max_cot_tokens": body.get("max_cot_tokens"),
        "return_prompt": bool(body.get("return_prompt", False)), "stream": bool(body.get("stream", False)),
        "include_usage": bool(stream_options.get("include_usage", False)),
        "request_id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
    }
    if kind == "chat":
        req["messages"] = normalize_messages(body.get("messages"))
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str) or not p:
            raise ApiError(400, "prompt must be a non-empty string (one prompt per request)", param="prompt")
        req["prompt"] = p
    # Cheap type checks for the γ fields before any adapter load (route() checks validity).
    if req["compression_ratio"] is not None and req["max_cot_tokens"] is not None:
        raise ApiError(400, "give either compression_ratio or max_cot_tokens, not both", param="compression_ratio")
    _num(body, "compression_ratio", float, 0.0, 1.0)
    if _num(body, "max_cot_tokens", float, 0.0) == 0.0:
        raise ApiError(400, "max_cot_tokens must be positive", param="max_cot_tokens")
    return req


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, model: Any, cfg: dict):
        from ray.serve.metrics import Counter, Histogram

        self.model = model
        self.cfg = ServeAppConfig.from_dict(cfg)
        self.keys = self.cfg.valid_api_keys()
        self.resolver = AdapterResolver(self.cfg)
        tags = ("endpoint", "adapter", "gamma", "status")
        self.m_requests = Counter("tokenskip_requests", description="requests by endpoint, adapter, gamma and status", tag_keys=tags)
        self.m_tokens = Counter("tokenskip_generated_tokens", description="generated tokens",
                                tag_keys=("endpoint", "adapter", "gamma"))
        self.m_latency = Histogram("tokenskip_request_latency_s", description="request latency (s)",
                                   boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120],
                                   tag_keys=("endpoint", "adapter", "gamma"))
        self.m_ttft = Histogram("tokenskip_time_to_first_token_s", description="streaming time to first token (s)",
                                boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10], tag_keys=("endpoint", "adapter"))

    # -- helpers ---------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if token not in self.keys:
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")

    async def _body(self, request: Request) -> Any:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {limit}", code="request_too_large")
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def _count(self, endpoint: str, req: dict | None, gamma: float | None, status: int) -> None:
        adapter = (req or {}).get("adapter") or "base"
        self.m_requests.inc(tags={"endpoint": endpoint, "adapter": adapter, "gamma": _gamma_tag(gamma), "status": str(status)})

    def _handle(self, req: dict):
        h = self.model
        if req["adapter"]:
            h = h.options(multiplexed_model_id=req["adapter"])
        return h

    async def _serve(self, request: Request, kind: str):
        endpoint = "chat" if kind == "chat" else "completions"
        t0, req = time.perf_counter(), None
        try:
            self._auth(request)
            req = parse_request(await self._body(request), kind, self.cfg.model_id)
            if req["stream"]:
                return await self._stream(req, endpoint, t0)
            try:
                out = await self._handle(req).complete.remote(req)
            except Exception as e:
                api = _as_api_error(e, self.cfg.retry_after_s)
                if api is None:
                    raise
                raise api from None
        except ApiError as e:
            self._count(endpoint, req, (req or {}).get("compression_ratio"), e.status)
            return _error_response(e)
        except Exception:
            log.exception("internal error")
            self._count(endpoint, req, None, 500)
            return JSONResponse(ApiError(500, "internal server error").body(), status_code=500)
        gamma = out["compression_ratio"]
        tags = {"endpoint": endpoint, "adapter": req["adapter"] or "base", "gamma": _gamma_tag(gamma)}
        self._count(endpoint, req, gamma, 200)
        self.m_tokens.inc(out["completion_tokens"], tags=tags)
        self.m_latency.observe(time.perf_counter() - t0, tags=tags)
        return JSONResponse(self._full_body(req, out))

    def _full_body(self, req: dict, out: dict) -> dict:
        usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                 "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
        if req["kind"] == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]},
                      "finish_reason": out["finish_reason"], "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out["text"], "finish_reason": out["finish_reason"], "logprobs": None}
            obj = "text_completion"
        return {"id": req["request_id"], "object": obj, "created": int(time.time()), "model": self._model_name(req),
                "choices": [choice], "usage": usage, "compression_ratio": out["compression_ratio"],
                "tokenskip": out["tokenskip"]}

    def _model_name(self, req: dict) -> str:
        return self.cfg.model_id + (f":{req['adapter']}" if req["adapter"] else "")

    async def _stream(self, req: dict, endpoint: str, t0: float):
        gen = self._handle(req).options(stream=True).stream.remote(req)
        try:
            start = await gen.__anext__()
        except Exception as e:
            api = _as_api_error(e, self.cfg.retry_after_s)
            if api is None:
                raise
            raise api from None
        gamma = start["compression_ratio"]
        tags = {"endpoint": endpoint, "adapter": req["adapter"] or "base", "gamma": _gamma_tag(gamma)}
        self._count(endpoint, req, gamma, 200)
        created, model = int(time.time()), self._model_name(req)
        obj = "chat.completion.chunk" if req["kind"] == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False, usage: dict | None = None) -> str:
            if req["kind"] == "chat":
                delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
                choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            else:
                choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
            body = {"id": req["request_id"], "object": obj, "created": created, "model": model, "choices": choices,
                    "compression_ratio": gamma}
            if first:
                body["tokenskip"] = start["tokenskip"]
            if usage is not None:
                body["choices"], body["usage"] = [], usage
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncGenerator[str, None]:
            n, first_at = 0, None
            try:
                yield chunk(None, None, first=True)
                async for item in gen:
                    if first_at is None:
                        first_at = time.perf_counter()
                        self.m_ttft.observe(first_at - t0, tags={"endpoint": endpoint, "adapter": tags["adapter"]})
                    n = item["completion_tokens"]
                    yield chunk(item["text"], item["finish_reason"])
                if req["include_usage"]:
                    yield chunk(None, None, usage={"prompt_tokens": start["prompt_tokens"], "completion_tokens": n,
                                                   "total_tokens": start["prompt_tokens"] + n})
                yield "data: [DONE]\n\n"
            except Exception as e:  # mid-stream failure: the status is sent already; report in-band
                api = _as_api_error(e, self.cfg.retry_after_s) or ApiError(500, "internal server error")
                log.warning("stream %s failed: %s", req["request_id"], e)
                yield f"data: {json.dumps(api.body())}\n\n"
            finally:
                self.m_tokens.inc(n, tags=tags)
                self.m_latency.observe(time.perf_counter() - t0, tags=tags)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- routes ------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, "completion")

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._auth(request)
        except ApiError as e:
            return _error_response(e)
        created = int(time.time())
        data = [{"id": self.cfg.model_id, "object": "model", "created": created, "owned_by": "tokenskip",
                 "compression_ratios": self.cfg.base_ratios}]
        for name in self.resolver.known():
            spec = self.cfg.adapter(name)
            data.append({"id": f"{self.cfg.model_id}:{name}", "object": "model", "created": created,
                         "owned_by": "tokenskip", "parent": self.cfg.model_id,
                         "compression_ratios": (spec.ratios if spec and spec.ratios else None)})
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}


def build_app(args: dict | None = None):
    """Application builder: ``serve run serving.app:build_app`` / ``import_path`` in a Serve config."""
    cfg = ServeAppConfig.from_dict(args)
    plain = cfg.to_dict()
    model = model_deployment(cfg.max_adapters_per_replica)
    if cfg.model_deployment:
        model = model.options(**cfg.model_deployment)
    ingress = OpenAIIngress.options(**cfg.ingress_deployment) if cfg.ingress_deployment else OpenAIIngress
    return ingress.bind(model.bind(plain), plain)
