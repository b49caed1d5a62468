"""Typed configuration of the Serve app (the ``args:`` of ``serving/serve_config.yaml``).

Deployment options (autoscaling_config, ray_actor_options, max_ongoing_requests,
max_queued_requests, placement_group_bundles, ...) pass through to Ray Serve's
``Deployment.options`` unchanged, so they read exactly like Serve's own docs.

>>> cfg = ServeAppConfig.from_dict({"model": "m", "adapters": [{"name": "a", "path": "/x"}]})
>>> cfg.model_id, cfg.adapters[0].ratios
('m', None)
>>> ServeAppConfig.from_dict({"model": "m", "adapter": 1})
Traceback (most recent call last):
...
tokenskip.config.ConfigError: <serve args>: unknown key 'adapter' (valid: ...)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from serving.routing import effort_map, parse_effort_config, parse_ratio_table
from tokenskip import gamma
from tokenskip.config import ConfigError, _build, to_dict


@dataclass
class AdapterSpec:
    """One named adapter. ``path``: local/NFS dir or object-store URI (s3://, gs://, file://)."""

    name: str = ""
    path: str = ""
    ratios: list[float] | None = field(
        default=None, metadata={"help": "valid γ; default: the adapter card's, then default_ratios"}
    )
    expected_cot_tokens: dict | None = field(
        default=None, metadata={"help": "γ -> expected CoT tokens (budget routing)"}
    )
    eval_results: str | None = field(
        default=None,
        metadata={
            "help": "an evaluate stage results.json with tokens per γ (default: the evaluation on the adapter card)"
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={"help": "which evaluated dataset's CoT lengths route budgets (default: the first one evaluated)"},
    )
    reasoning_effort: dict | None = field(
        default=None,
        metadata={"help": "effort -> γ for this adapter (over the app's reasoning_effort and the defaults)"},
    )

    def __post_init__(self) -> None:
        from serving.adapters import validate_adapter_id
        from serving.routing import ApiError

        if not self.name or not self.path:
            raise ConfigError("adapters[]: each adapter needs a name and a path")
        try:
            validate_adapter_id(self.name)
        except ApiError as e:
            raise ConfigError(f"adapters[].name: {e.message}") from None
        if self.ratios is not None:
            self.ratios = gamma.normalize(self.ratios, f"adapters[{self.name}].ratios")
        if self.expected_cot_tokens is not None:
            self.expected_cot_tokens = parse_ratio_table(
                self.expected_cot_tokens, f"adapters[{self.name}].expected_cot_tokens"
            )
        if self.reasoning_effort is not None:
            try:
                self.reasoning_effort = parse_effort_config(
                    self.reasoning_effort, f"adapters[{self.name}].reasoning_effort"
                )
            except ValueError as e:
                raise ConfigError(str(e)) from None


@dataclass
class ServeAppConfig:
    """The whole app: model + engine, adapters, γ defaults, limits, auth, deployments."""

    model: str = field(
        default="smollm2-135m-instruct", metadata={"help": "embedded name, hub id or path of the base model"}
    )
    model_id: str | None = field(
        default=None, metadata={"help": "the id clients use in `model` (default: model's basename)"}
    )
    engine_kwargs: dict = field(
        default_factory=dict, metadata={"help": "vLLM AsyncEngineArgs overrides (tensor_parallel_size, ...)"}
    )
    max_lora_rank: int = 16
    adapters: list[AdapterSpec] = field(default_factory=list)
    adapter_root: str | None = field(default=None, metadata={"help": "dir or URI: `<base>:<name>` loads <root>/<name>"})
    adapter_cache_dir: str | None = field(
        default=None, metadata={"help": "local dir for adapters downloaded from URIs"}
    )
    max_adapters_per_replica: int = field(default=4, metadata={"help": "@serve.multiplexed LRU size"})
    default_ratios: list[float] = field(
        default_factory=lambda: list(gamma.DEFAULT_RATIOS), metadata={"help": "valid γ of an adapter without a card"}
    )
    base_ratios: list[float] = field(default_factory=lambda: [1.0], metadata={"help": "valid γ for the base model"})
    base_expected_cot_tokens: dict | None = None
    reasoning_effort: dict | None = field(
        default=None,
        metadata={
            "help": "effort -> γ for every adapter (minimal/low/medium/high; null removes one); default: high -> "
            "1.0, medium -> the middle trained γ, low -> the smallest; checked against the trained ratios at start"
        },
    )
    base_reasoning_effort: dict | None = field(
        default=None, metadata={"help": "effort -> γ for the base model (checked against base_ratios)"}
    )
    hard_budget: bool = field(
        default=False, metadata={"help": "budgets are hard caps unless a request says budget: soft"}
    )
    hard_budget_answer_tokens: int = field(
        default=24, metadata={"help": "tokens the model may write after a forced answer opening"}
    )
    default_max_tokens: int = 512
    default_temperature: float = field(default=0.0, metadata={"help": "TokenSkip decodes greedily"})
    max_request_bytes: int = field(default=1 << 20, metadata={"help": "bigger bodies get 413"})
    api_keys: list[str] = field(
        default_factory=list, metadata={"help": "if set, `Authorization: Bearer <key>` required"}
    )
    api_key_env: str | None = field(
        default=None,
        metadata={
            "help": "env var with comma-separated API keys (it must "
            "hold at least one key, else the app refuses to start)"
        },
    )
    retry_after_s: int = 1
    docs: bool = field(default=False, metadata={"help": "serve /docs and /openapi.json"})
    ingress_deployment: dict = field(
        default_factory=dict, metadata={"help": "Serve Deployment.options for the ingress"}
    )
    model_deployment: dict = field(default_factory=dict, metadata={"help": "Serve Deployment.options for the model"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model must be set")
        if not self.model_id:
            self.model_id = os.path.basename(str(self.model).rstrip("/")) or str(self.model)
        if ":" in self.model_id:
            raise ConfigError(f"model_id {self.model_id!r} must not contain ':' (it separates base and adapter)")
        for name in ("max_lora_rank", "max_adapters_per_replica", "default_max_tokens", "max_request_bytes",
                     "hard_budget_answer_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        self.default_ratios = gamma.normalize(self.default_ratios, "default_ratios")
        self.base_ratios = gamma.normalize(self.base_ratios, "base_ratios")
        if self.base_expected_cot_tokens is not None:
            self.base_expected_cot_tokens = parse_ratio_table(self.base_expected_cot_tokens, "base_expected_cot_tokens")
        try:
            if self.reasoning_effort is not None:
                self.reasoning_effort = parse_effort_config(self.reasoning_effort, "reasoning_effort")
            if self.base_reasoning_effort is not None:
                self.base_reasoning_effort = parse_effort_config(self.base_reasoning_effort, "base_reasoning_effort")
            effort_map(self.base_ratios, self.base_reasoning_effort, "base_reasoning_effort")
            for a in self.adapters:  # adapters whose ratios the config gives; the others: check_efforts at start
                if a.ratios is not None:
                    self.efforts_for(a.name, a.ratios)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        queued = (self.ingress_deployment or {}).get("max_queued_requests", -1)
        if queued not in (None, -1):
            # A full ingress queue is answered by Serve's HTTP proxy itself (a plain-text 503),
            # before any of this app's code runs; the model deployment's queue limit comes back
            # as an OpenAI-style 503 with Retry-After.
            raise ConfigError(
                "ingress_deployment.max_queued_requests: bound the queue on model_deployment instead "
                "(its overflow is answered with an OpenAI-style 503 + Retry-After; the ingress's "
                "would be a plain-text 503 from Serve's proxy)"
            )
        names = [a.name for a in self.adapters]
        if len(names) != len(set(names)):
            raise ConfigError(f"adapters: duplicate names in {names}")

    @classmethod
    def from_dict(cls, data: dict | None) -> "ServeAppConfig":
        data = dict(data or {})
        data.pop("kind", None)
        return _build(cls, data, "", "<serve args>")

    def to_dict(self) -> dict:
        return to_dict(self)

    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.api_key_env)

    def valid_api_keys(self) -> set[str] | None:
        """The accepted API keys; None = auth off (neither ``api_keys`` nor ``api_key_env``).

        Fails closed: a configured key source that yields no keys (``api_key_env`` naming an
        unset or blank variable, blank ``api_keys``) is a :class:`ConfigError` naming it.
        """
        if not self.auth_enabled():
            return None
        keys = set()
        for i, k in enumerate(self.api_keys):
            if not isinstance(k, str) or not k.strip():
                raise ConfigError(f"api_keys[{i}]: an API key must be a non-empty string")
            keys.add(k.strip())
        if self.api_key_env:
            raw = os.environ.get(self.api_key_env)
            env_keys = {k.strip() for k in (raw or "").split(",") if k.strip()}
            if not env_keys:
                state = "is not set" if raw is None else "holds no key"
                raise ConfigError(
                    f"api_key_env: the environment variable {self.api_key_env} {state}; refusing to start "
                    f"an endpoint without its API keys (set {self.api_key_env}=key1,key2 where the Serve "
                    "replicas run, or remove api_key_env to turn auth off)"
                )
            keys |= env_keys
        return keys

    def adapter(self, name: str) -> AdapterSpec | None:
        return next((a for a in self.adapters if a.name == name), None)

    def efforts_for(self, adapter: str | None, ratios: list[float]) -> dict[str, float]:
        """The effort → γ map of the base model (``adapter`` None) or an adapter with these
        trained ``ratios``: the defaults, the app's ``reasoning_effort`` over them, the adapter's
        own over that. ValueError naming the entry when a mapped γ is not a trained one."""
        if adapter is None:
            return effort_map(ratios, self.base_reasoning_effort, "base_reasoning_effort")
        spec = self.adapter(adapter)
        merged = {**(self.reasoning_effort or {}), **((spec.reasoning_effort or {}) if spec else {})}
        return effort_map(ratios, merged, f"adapter {adapter!r}: reasoning_effort")
