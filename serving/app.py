"""The Serve app: an OpenAI-compatible ingress in front of a vLLM AsyncLLM model deployment.

    serve run serving/serve_config.yaml            # or: serve run serving.app:build_app model=...
    serve deploy serving/serve_config.yaml         # to a running cluster
    tokenskip serve --config serving/serve_config.yaml

* ``OpenAIIngress`` (FastAPI): ``POST /v1/chat/completions``, ``POST /v1/completions``,
  ``GET /v1/models``; auth, body limit, adapter existence, metrics, and the mapping of
  what the model deployment raised to HTTP. The wire format itself (validation, response
  and stream chunks, error bodies) is :mod:`serving.protocol`, testable without Ray.
* ``TokenSkipModel``: one vLLM ``AsyncLLM`` (LoRA enabled) per replica; adapters load on
  first use through ``@serve.multiplexed`` (LRU per replica; Serve routes a request for an
  adapter to replicas that already hold it); γ routing + prompt rendering happen here,
  next to the tokenizer and the adapter's metadata.

Prompt rendering (docs: serving/README.md): with ``compression_ratio`` (or a budget:
``max_cot_tokens`` / ``thinking_token_budget`` / ``max_thinking_tokens``, or
``reasoning_effort`` mapped through the adapter's trained ratios) the last user message is the
question and becomes ``prompt.user_content(question, γ)`` — the TokenSkip instruction, the
question, and the marker when γ < 1, as in training — then the tokenizer's chat template.
Without them the messages go through the chat template unchanged. For ``/v1/completions`` a
γ-routed prompt is treated the same way (a one-turn chat); a plain one is raw text. The γ used
comes back as top-level ``compression_ratio`` (every stream chunk carries it too) and in
``tokenskip`` (source, expected CoT tokens, adapter; the outcome — reasoning tokens, realized
ratio, whether a hard budget's cap fired — non-stream and on the streamed chunk with the finish
reason); ``usage.completion_tokens_details.reasoning_tokens`` counts the CoT. A hard budget
(``"budget": "hard"`` or the app's ``hard_budget``) is two engine calls in the model replica:
the CoT capped at the budget, then — when the cap cut it before the answer sentence — the
forced answer opening and a short answer (:mod:`serving.protocol` decides).

Failures: a client mistake is a 4xx naming its ``param``; an engine that died or a replica
that is gone is a 503 with ``Retry-After`` (the replica's health check then fails and Serve
replaces it); a stream that fails after its first byte ends with an in-band error event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, AsyncGenerator

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from serving import protocol
from serving.adapters import AdapterResolver, adapter_exists, adapter_start_warnings, check_efforts
from serving.config import ServeAppConfig
from serving.model import LoadedAdapter, TokenSkipModelImpl
from serving.protocol import parse_request  # noqa: F401  (the request validator; re-exported)
from serving.routing import ApiError

log = logging.getLogger("tokenskip.serving")

ADAPTER_FOUND_TTL_S = 300.0  # how long the ingress trusts "this adapter exists"
ADAPTER_MISSING_TTL_S = 30.0  # ... and "it does not" (a negative cache: no store call per bad request)
MAX_CACHED = 1024  # bound on cached existence answers and handles


def open_endpoint_warning(host: str | None, auth_enabled: bool) -> str | None:
    """The loud warning for an endpoint that listens beyond loopback without API keys.

    >>> open_endpoint_warning("127.0.0.1", False) is None, open_endpoint_warning("0.0.0.0", True) is None
    (True, True)
    >>> "WITHOUT AUTHENTICATION" in open_endpoint_warning("0.0.0.0", False)
    True
    """
    if auth_enabled or not host or host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return None
    return (f"!!! tokenskip serve: the endpoint listens on {host} (beyond loopback) WITHOUT AUTHENTICATION: anyone "
            "who can reach it can use the model. Set api_keys or api_key_env in the app's args. !!!")


def model_deployment(max_adapters: int):
    """The model deployment class; ``max_adapters`` sizes the multiplexed LRU (a decorator argument)."""

    @serve.deployment(name="TokenSkipModel", ray_actor_options={"num_cpus": 1}, health_check_period_s=30)
    class TokenSkipModel(TokenSkipModelImpl):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def load_adapter(self, adapter_id: str) -> LoadedAdapter:
            return await self._load_adapter(adapter_id)

    return TokenSkipModel


# ----------------------------------------------------------------------------- ingress


class _JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return protocol.dumps(content).encode("ascii")


def _error_response(e: ApiError, retry_after: float = 1) -> JSONResponse:
    return _JSON(protocol.error_body(e), status_code=e.status, headers=protocol.error_headers(e, retry_after) or None)


app = FastAPI(title="tokenskip", description="OpenAI-compatible, γ-routed TokenSkip endpoint",
              docs_url=None, redoc_url=None, openapi_url=None)  # /docs, /openapi.json: only with `docs: true`


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # unknown routes, wrong methods
    return _error_response(ApiError(exc.status_code, str(exc.detail)))


def _as_api_error(e: BaseException, retry_after: float) -> ApiError | None:
    """Map what a handle call raised to an ApiError (None = a server bug: 500)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    cause = e.cause if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else e
    if isinstance(cause, ApiError):
        return ApiError(*cause.args)
    if isinstance(cause, BackPressureError):
        return ApiError(503, "the server is overloaded; retry later", code="overloaded",
                        retry_after=cause.retry_after_s or retry_after)
    if isinstance(cause, DeploymentUnavailableError):
        return ApiError(503, "the model is not available yet; retry later", code="unavailable", retry_after=retry_after)
    if isinstance(cause, RayActorError):  # the model replica died (or is unreachable) under the request
        return ApiError(503, "the model replica stopped; retry later", code="unavailable", retry_after=retry_after)
    return None


def _http_host() -> str | None:
    """The host Serve's HTTP proxies listen on (from the controller), None if unknown."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return client.http_config.host if client is not None else None
    except Exception:  # pragma: no cover - best effort, for the warning only
        return None


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, model: Any, cfg: dict):
        from ray.serve.metrics import Counter, Histogram

        self.model = model
        self.cfg = ServeAppConfig.from_dict(cfg)
        keys = self.cfg.valid_api_keys()  # fails closed: a key source without keys stops the replica here
        self.keys = None if keys is None else [k.encode() for k in sorted(keys)]
        warning = open_endpoint_warning(_http_host(), keys is not None)
        if warning:
            log.warning(warning)
        for line in adapter_start_warnings(self.cfg):  # `serve deploy` / `serve run` say it in the log
            log.warning(line)
        self.resolver = AdapterResolver(self.cfg)
        self._exists: collections.OrderedDict[str, tuple[bool, float]] = collections.OrderedDict()
        self._handles: collections.OrderedDict[tuple[str | None, bool], Any] = collections.OrderedDict()
        self._known_adapters = {a.name for a in self.cfg.adapters}
        self._known_gammas = {*self.cfg.default_ratios, *self.cfg.base_ratios,
                              *(g for a in self.cfg.adapters for g in (a.ratios or ()))}
        tags = ("endpoint", "adapter", "gamma", "status")
        self.m_requests = Counter("tokenskip_requests", description="requests by endpoint, adapter, gamma and status",
                                  tag_keys=tags)
        self.m_tokens = Counter("tokenskip_generated_tokens", description="generated tokens",
                                tag_keys=("endpoint", "adapter", "gamma"))
        self.m_latency = Histogram("tokenskip_request_latency_s", description="request latency (s)",
                                   boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120],
                                   tag_keys=("endpoint", "adapter", "gamma"))
        self.m_ttft = Histogram("tokenskip_time_to_first_token_s", description="streaming time to first token (s)",
                                boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10], tag_keys=("endpoint", "adapter"))
        self.m_hard = Counter("tokenskip_hard_budget_requests",
                              description="hard-budget requests, by whether the cap fired (the CoT reached the budget "
                                          "without the answer sentence, so the answer's opening was forced)",
                              tag_keys=("endpoint", "adapter", "gamma", "fired"))

    # -- helpers ---------------------------------------------------------------
    def _error(self, e: ApiError) -> JSONResponse:
        return _error_response(e, self.cfg.retry_after_s)

    def _tags(self, endpoint: str, req: dict | None, gamma: Any) -> dict[str, str]:
        adapter = "unknown" if req is None else protocol.adapter_label(req.get("adapter"), self._known_adapters)
        return {"endpoint": endpoint, "adapter": adapter, "gamma": protocol.gamma_label(gamma, self._known_gammas)}

    def _count(self, endpoint: str, req: dict | None, gamma: Any, status: int) -> None:
        self.m_requests.inc(tags={**self._tags(endpoint, req, gamma), "status": str(status)})

    def _count_hard_budget(self, tags: dict[str, str], tsk: dict | None) -> None:
        if tsk and "hard_cap_fired" in tsk:  # present only on hard-budget requests
            self.m_hard.inc(tags={**tags, "fired": "true" if tsk["hard_cap_fired"] else "false"})

    def _finished(self, tags: dict[str, str], status: int, tokens: int, t0: float) -> None:
        """Count a request that reached the model: its status, its tokens, its latency. A stream that
        failed or was dropped before its first token has none (Ray's ``Counter.inc`` refuses 0)."""
        self.m_requests.inc(tags={**tags, "status": str(status)})
        if tokens > 0:
            self.m_tokens.inc(tokens, tags=tags)
        self.m_latency.observe(time.perf_counter() - t0, tags=tags)

    def _succeeded(self, gamma: float | None) -> None:
        if gamma is not None:  # a γ the model accepted (route() validated it): a label from now on
            self._known_gammas.add(gamma)

    async def _check_adapter(self, adapter: str) -> None:
        """404 for an adapter under ``adapter_root`` that doesn't exist, decided here, before the
        multiplexed call (whose LRU would evict a loaded adapter to make room for it). Answers
        are cached: found for ADAPTER_FOUND_TTL_S, missing for ADAPTER_MISSING_TTL_S."""
        if self.cfg.adapter(adapter) is not None:  # named in the config: the operator's, not a client's, choice
            return
        now = time.monotonic()
        hit = self._exists.get(adapter)
        if hit is not None and hit[1] > now:
            found = hit[0]
            self._exists.move_to_end(adapter)
        else:
            src = self.resolver.source(adapter)  # 404 when no adapter table entry and no adapter_root
            found = await asyncio.get_running_loop().run_in_executor(None, adapter_exists, src)
            self._exists[adapter] = (found, now + (ADAPTER_FOUND_TTL_S if found else ADAPTER_MISSING_TTL_S))
            while len(self._exists) > MAX_CACHED:
                self._exists.popitem(last=False)
        if not found:
            raise ApiError(404, f"adapter {adapter!r} not found", param="model", code="adapter_not_found")
        if len(self._known_adapters) < MAX_CACHED:
            self._known_adapters.add(adapter)

    def _handle(self, adapter: str | None, stream: bool) -> Any:
        """The model handle for an adapter (multiplexed) and call kind, built once and cached:
        a handle per request would cost the controller a new router each time."""
        key = (adapter, stream)
        h = self._handles.get(key)
        if h is not None:
            self._handles.move_to_end(key)
            return h
        h = self.model
        if adapter:
            h = h.options(multiplexed_model_id=adapter)
        if stream:
            h = h.options(stream=True)
        self._handles[key] = h
        while len(self._handles) > MAX_CACHED:
            self._handles.popitem(last=False)
        return h

    async def _call(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        except Exception as e:
            api = _as_api_error(e, self.cfg.retry_after_s)
            if api is None:
                raise
            raise api from None

    async def _serve(self, request: Request, kind: str):
        endpoint = "chat" if kind == "chat" else "completions"
        t0, req = time.perf_counter(), None
        try:
            protocol.check_api_key(request.headers.get("authorization"), self.keys)
            raw = await protocol.read_body(request.stream(), self.cfg.max_request_bytes,
                                           request.headers.get("content-length"))
            req = protocol.parse_request(protocol.parse_json(raw), kind, self.cfg.model_id)
            if req["adapter"]:
                await self._check_adapter(req["adapter"])
            if req["stream"]:
                return await self._stream(req, endpoint, t0)
            out = await self._call(self._handle(req["adapter"], False).complete.remote(req))
        except ApiError as e:
            self._count(endpoint, req, (req or {}).get("compression_ratio"), e.status)
            return self._error(e)
        except ClientDisconnect:  # the client went away while sending its body
            self._count(endpoint, req, None, 499)
            return Response(status_code=499)
        except Exception:
            log.exception("internal error")
            self._count(endpoint, req, None, 500)
            return self._error(ApiError(500, "internal server error"))
        gamma = out["compression_ratio"]
        self._succeeded(gamma)
        tags = self._tags(endpoint, req, gamma)
        self._finished(tags, 200, out["completion_tokens"], t0)
        self._count_hard_budget(tags, out.get("tokenskip"))
        return _JSON(protocol.completion_body(req, out, protocol.model_name(self.cfg.model_id, req["adapter"])))

    async def _stream(self, req: dict, endpoint: str, t0: float):
        gen = self._handle(req["adapter"], True).stream.remote(req)
        try:
            start = await self._call(gen.__anext__())  # errors before the first byte: a normal error response
        except BaseException:
            gen.cancel()
            raise
        gamma = start["compression_ratio"]
        self._succeeded(gamma)
        tags = self._tags(endpoint, req, gamma)
        created, model = int(time.time()), protocol.model_name(self.cfg.model_id, req["adapter"])

        def chunk(text: str | None, finish: str | None, **kw: Any) -> str:
            return protocol.sse(protocol.stream_chunk(req, model, created, gamma, text, finish, **kw))

        async def events() -> AsyncGenerator[str, None]:
            n, first_at, status, reasoning = 0, None, 499, None  # 499 until it ends: a client that went away
            try:
                yield chunk(None, None, first=start["tokenskip"])
                async for item in gen:
                    if first_at is None:
                        first_at = time.perf_counter()
                        self.m_ttft.observe(first_at - t0, tags={"endpoint": endpoint, "adapter": tags["adapter"]})
                    n = item["completion_tokens"]
                    final = item.get("tokenskip")  # the last delta: the outcome (reasoning tokens, hard cap)
                    if final is not None:
                        reasoning = item.get("reasoning_tokens")
                        self._count_hard_budget(tags, final)
                    yield chunk(item["text"], item["finish_reason"], final=final)
                if req["include_usage"]:
                    yield chunk(None, None, usage=protocol.usage(start["prompt_tokens"], n, reasoning))
                yield protocol.SSE_DONE
                status = 200
            except Exception as e:  # mid-stream failure: the status line is sent already; report in-band
                api = _as_api_error(e, self.cfg.retry_after_s) or ApiError(500, "internal server error")
                status = api.status
                log.warning("stream %s failed after %d tokens: %r", req["request_id"], n, e)
                yield protocol.sse(protocol.error_body(api))
            finally:
                self._finished(tags, status, n, t0)

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
            protocol.check_api_key(request.headers.get("authorization"), self.keys)
        except ApiError as e:
            return self._error(e)
        created = int(time.time())
        data = [{"id": self.cfg.model_id, "object": "model", "created": created, "owned_by": "tokenskip",
                 "compression_ratios": self.cfg.base_ratios}]
        for name in self.resolver.known():
            spec = self.cfg.adapter(name)
            data.append({"id": f"{self.cfg.model_id}:{name}", "object": "model", "created": created,
                         "owned_by": "tokenskip", "parent": self.cfg.model_id,
                         "compression_ratios": (spec.ratios if spec and spec.ratios else None)})
        return _JSON({"object": "list", "data": data})

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self):
        if not self.cfg.docs:
            raise StarletteHTTPException(404, "Not Found")
        return _JSON(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        if not self.cfg.docs:
            raise StarletteHTTPException(404, "Not Found")
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "").rstrip("/") + "/openapi.json",
                                   title="tokenskip")


def build_app(args: dict | None = None):
    """Application builder: ``serve run serving.app:build_app`` / ``import_path`` in a Serve config.

    A configured key source without keys, or a ``reasoning_effort`` map that maps an effort
    to a γ an adapter was not trained for, stops the build here (``ConfigError`` naming the
    variable or the entry), before any replica starts."""
    cfg = ServeAppConfig.from_dict(args)
    cfg.valid_api_keys()
    check_efforts(cfg)  # a reasoning_effort map that an adapter can't honour stops the deploy here
    plain = cfg.to_dict()
    model = model_deployment(cfg.max_adapters_per_replica)
    if cfg.model_deployment:
        model = model.options(**cfg.model_deployment)
    ingress = OpenAIIngress.options(**cfg.ingress_deployment) if cfg.ingress_deployment else OpenAIIngress
    return ingress.bind(model.bind(plain), plain)
