"""Run tracking with MLflow: one MLflow run per pipeline run, a child run per stage.

The ``tracking`` config key (pipeline, ``train`` and ``evaluate`` sections):

* ``{}`` (default): a local store under the run directory, nothing to start:
  ``<run_dir>/mlruns/mlflow.db`` (SQLite; MLflow 3 refuses new plain-file stores) with the
  artifacts in ``<run_dir>/mlruns/artifacts``.  Open it with
  ``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlruns/mlflow.db``.
* ``{uri: http://host:5000}``: a tracking server (any MLflow tracking URI); ``experiment``
  names the experiment (default: the pipeline's ``name``, or ``tokenskip``).
* ``none``: off.
* ``run_id`` is set by the pipeline on each stage's config: the stage logs into the child
  run the pipeline opened for it.  A stage run on its own opens (and closes) its own run.

What is logged: the resolved config as params and ``config.json`` and each stage's
``manifest.json`` as artifacts (pipeline); training loss, learning rate, grad norm and
tokens/s per step (train, rank 0); per-condition / per-γ evaluation metrics with the
table, plots and ``results.json`` as artifacts (evaluate).

Opening a run fails loudly (a wrong ``uri`` is reported before any work starts); a logging
call that fails later (a server gone mid-run) is logged as a warning and the work goes on.
This module never imports ``ray``; ``mlflow`` is imported only when tracking is on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("tokenskip.tracking")

OFF = "none"
STORE_DIR = "mlruns"
DB_FILE = "mlflow.db"
KEYS = ("uri", "experiment", "run_id")
DEFAULT_EXPERIMENT = "tokenskip"
PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_CHARS = 6000  # MLflow's limit for a param value
_PARAMS_PER_BATCH = 100


class TrackingError(ValueError):
    """The tracking store cannot be opened (bad ``tracking.uri``, unreachable server)."""


def check(value: Any, where: str = "tracking") -> dict | str:
    """Validate a ``tracking`` config value; returns it normalised (``'none'`` or a dict).

    >>> check({}), check("none"), check({"uri": "http://127.0.0.1:5000"})
    ({}, 'none', {'uri': 'http://127.0.0.1:5000'})
    >>> check({"url": "x"})
    Traceback (most recent call last):
    ...
    ValueError: tracking: unknown key 'url' (valid: uri, experiment, run_id; or the string 'none')
    """
    if value is None:
        return {}
    if isinstance(value, str):
        if value.strip().lower() in (OFF, "off", "false"):
            return OFF
        raise ValueError(f"{where}: expected a mapping {{uri, experiment}} or 'none', got {value!r}")
    if value is False:
        return OFF
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping {{uri, experiment}} or 'none', got {type(value).__name__}")
    for k, v in value.items():
        if k not in KEYS:
            raise ValueError(f"{where}: unknown key {k!r} (valid: {', '.join(KEYS)}; or the string 'none')")
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{where}.{k}: expected a string, got {v!r}")
    return {k: v for k, v in value.items() if v not in (None, "")}


def local_uri(base_dir: str | Path) -> str:
    """The default store: ``sqlite:///<base_dir>/mlruns/mlflow.db`` (absolute path).

    >>> local_uri("/tmp/run").endswith("/tmp/run/mlruns/mlflow.db")
    True
    """
    return "sqlite:///" + str(Path(base_dir).expanduser().resolve() / STORE_DIR / DB_FILE)


def resolve(value: Any, base_dir: str | Path, experiment: str | None = None) -> dict | None:
    """``{"uri", "experiment", "run_id"?}`` for a tracking config value, or None when off.

    >>> resolve("none", "/tmp/r") is None
    True
    >>> r = resolve({}, "/tmp/r", "quickstart"); r["experiment"], r["uri"].startswith("sqlite:///")
    ('quickstart', True)
    """
    value = check(value)
    if value == OFF:
        return None
    out = {"uri": value.get("uri") or local_uri(base_dir),
           "experiment": value.get("experiment") or experiment or DEFAULT_EXPERIMENT}
    if value.get("run_id"):
        out["run_id"] = value["run_id"]
    return out


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys (``train.lora.r``).

    >>> _flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
    {'a.b': 1, 'a.c': [1, 2], 'd': None}
    """
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= _MAX_PARAM_CHARS else s[: _MAX_PARAM_CHARS - 3] + "..."


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


class Run:
    """One MLflow run (or, when tracking is off, nothing: every method is a no-op)."""

    def __init__(self, client: Any = None, run_id: str | None = None, owned: bool = False, uri: str | None = None):
        self.client, self.run_id, self.owned, self.uri = client, run_id, owned, uri
        self._warned = False

    @property
    def active(self) -> bool:
        return self.client is not None and self.run_id is not None

    def _safe(self, what: str, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a tracking hiccup must not end a training run
            if not self._warned:
                log.warning("MLflow %s failed for run %s at %s (%s: %s); continuing without it",
                            what, self.run_id, self.uri, type(e).__name__, e)
                self._warned = True

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Numeric entries of ``metrics`` (others are skipped) as one batch."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        values = {str(k): _number(v) for k, v in metrics.items()}
        batch = [Metric(k, v, ts, int(step or 0)) for k, v in values.items() if v is not None]
        if batch:
            self._safe("log_metrics", self.client.log_batch, self.run_id, metrics=batch)

    def log_params(self, params: dict) -> None:
        """Nested params flattened to dotted keys; values JSON (strings as they are)."""
        from mlflow.entities import Param

        flat = [Param(k, _param_value(v)) for k, v in _flatten(params).items() if k]
        for i in range(0, len(flat), _PARAMS_PER_BATCH):
            self._safe("log_params", self.client.log_batch, self.run_id, params=flat[i:i + _PARAMS_PER_BATCH])

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._safe("set_tag", self.client.set_tag, self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).is_file():
            self._safe("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        self._safe("log_dict", self.client.log_dict, self.run_id, data, name)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run (only a run this handle opened; a pipeline closes its own)."""
        if self.owned:
            self._safe("set_terminated", self.client.set_terminated, self.run_id, status)
            self.owned = False


NULL = Run()


def _client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as e:  # pragma: no cover - mlflow is a dependency
        raise TrackingError("tracking is on but mlflow is not installed (pip install mlflow); "
                            "or set tracking: none") from e
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    try:
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if uri.startswith("sqlite:///"):  # local store: artifacts beside the database, not in ./mlruns
            artifacts = (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifacts)
        except Exception:
            exp = client.get_experiment_by_name(name)  # created concurrently by another process
            if exp is None:
                raise
            return exp.experiment_id
    except Exception as e:
        raise TrackingError(f"tracking.uri {uri!r}: cannot open the MLflow store ({type(e).__name__}: {e}); "
                            "fix tracking.uri or set tracking: none") from e


def start_run(tracking: dict | None, name: str, parent: Run | None = None, tags: dict | None = None) -> Run:
    """A new MLflow run (a child of ``parent`` when given) for a resolved tracking config."""
    if tracking is None:
        return NULL
    client = _client(tracking["uri"])
    exp = _experiment_id(client, tracking["experiment"], tracking["uri"])
    all_tags = dict(tags or {})
    if parent is not None and parent.active:
        all_tags[PARENT_TAG] = parent.run_id
    try:
        info = client.create_run(exp, run_name=name, tags=all_tags).info
    except Exception as e:
        raise TrackingError(f"tracking.uri {tracking['uri']!r}: cannot create a run ({type(e).__name__}: {e})") from e
    return Run(client, info.run_id, owned=True, uri=tracking["uri"])


def open_run(tracking: dict | None, name: str) -> Run:
    """The run a stage logs into: the pipeline's child run (``run_id``), else a new one."""
    if tracking is None:
        return NULL
    if tracking.get("run_id"):
        return Run(_client(tracking["uri"]), tracking["run_id"], owned=False, uri=tracking["uri"])
    return start_run(tracking, name)


def stage_run(cfg: Any, stage: str) -> Run:
    """Open the run a stage config's ``tracking`` points at (store default: beside
    ``output_dir``, i.e. ``<run_dir>/mlruns`` for a pipeline stage); logs the config as
    params when the run is the stage's own."""
    value = getattr(cfg, "tracking", OFF)
    base = Path(getattr(cfg, "output_dir", None) or ".").expanduser().resolve().parent
    run = open_run(resolve(value, base), stage)
    if run.owned:
        run.log_params(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))
    return run


# --------------------------------------------------------------------------- stage hooks

TRAIN_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "epoch")


def log_train_step(run: Run, metrics: dict) -> None:
    """One optimizer step's metrics (loss, lr, grad norm, tokens/s, ...) at ``metrics['step']``."""
    if run.active:
        run.log_metrics({k: metrics.get(k) for k in TRAIN_METRICS}, step=int(metrics.get("step") or 0))


_EVAL_METRICS = ("accuracy", "mean_tokens", "median_tokens", "hit_limit", "actual_ratio", "latency_s")


def log_evaluation(cfg: Any, results: dict, out_dir: str | Path, files: Iterable[str] = ()) -> None:
    """Per-condition metrics ``<dataset>/<condition>/<metric>``, the TokenSkip γ curve
    ``<dataset>/tokenskip/<metric>`` at step ``round(100 γ)``, and the evaluation's files
    (``results.json``, table, plots) as artifacts."""
    run = stage_run(cfg, "evaluate")
    if not run.active:
        return
    try:
        for ds_name, ds in (results.get("datasets") or {}).items():
            for c in ds.get("conditions") or []:
                run.log_metrics({f"{ds_name}/{c.get('id')}/{k}": c.get(k) for k in _EVAL_METRICS})
                if c.get("method") == "tokenskip" and c.get("ratio") is not None:
                    run.log_metrics({f"{ds_name}/tokenskip/{k}": c.get(k) for k in _EVAL_METRICS},
                                    step=int(round(100 * float(c["ratio"]))))
        out = Path(out_dir)
        for f in ("results.json", *files):
            run.log_artifact(out / f)
    finally:
        run.end()


# --------------------------------------------------------------------------- pipeline


def _with_tracking(cfg: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(cfg) and "tracking" in {f.name for f in dataclasses.fields(cfg)}:
        return dataclasses.replace(cfg, tracking=value)
    return cfg


class PipelineTracking:
    """The pipeline's MLflow run and one child run per stage.

    :meth:`start` opens them and returns the steps with each stage config's ``tracking``
    pointing at its child run; :meth:`finish` logs each stage's manifest and closes them.
    """

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self.tracking = resolve(getattr(pipe, "tracking", OFF), Path(pipe.run_dir), getattr(pipe, "name", None))
        self.parent = NULL
        self.children: dict[str, Run] = {}
        self._steps: list[tuple[str, Any]] = []

    def start(self, steps: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        if self.tracking is None:  # off for the pipeline: off for its stages too
            return [(n, _with_tracking(c, OFF)) for n, c in steps]
        name = getattr(self.pipe, "name", "pipeline")
        self.parent = start_run(self.tracking, name, tags={"tokenskip.kind": "pipeline"})
        config = dataclasses.asdict(self.pipe) if dataclasses.is_dataclass(self.pipe) else dict(self.pipe)
        self.parent.log_params(config)
        self.parent.log_dict(config, "config.json")
        out = []
        for name, cfg in steps:
            child = start_run(self.tracking, name, parent=self.parent, tags={"tokenskip.stage": name})
            self.children[name] = child
            if dataclasses.is_dataclass(cfg):
                child.log_params(dataclasses.asdict(cfg))
                if check(getattr(cfg, "tracking", OFF)) != OFF:
                    cfg = _with_tracking(cfg, {**self.tracking, "run_id": child.run_id})
            out.append((name, cfg))
        self._steps = out
        import atexit

        atexit.register(self._at_exit)  # a pipeline that dies mid-stage still closes its runs
        return out

    def _at_exit(self) -> None:
        if self.parent.owned:
            self.finish(self._steps, error=RuntimeError("the pipeline process exited before finishing"))

    def finish(self, steps: list[tuple[str, Any]], results: dict | None = None, timings: dict | None = None,
               error: BaseException | None = None) -> None:
        if self.tracking is None or not self.parent.owned:
            return
        results, timings = results or {}, timings or {}
        for name, cfg in steps:
            child = self.children.get(name)
            if child is None:
                continue
            manifest = Path(getattr(cfg, "output_dir", None) or "") / "manifest.json"
            if getattr(cfg, "output_dir", None) and manifest.is_file():
                child.log_artifact(manifest)
            elif isinstance(results.get(name), dict):
                child.log_dict(results[name], "manifest.json")
            if name in timings:
                child.log_metrics({"stage_seconds": timings[name]})
            done = name in results or manifest.is_file()
            child.end("FINISHED" if done else ("FAILED" if error is not None else "KILLED"))
        self.parent.log_metrics({f"stage_seconds/{k}": v for k, v in timings.items()})
        summary = Path(self.pipe.run_dir) / "summary.json"
        self.parent.log_artifact(summary)
        self.parent.end("FAILED" if error is not None else "FINISHED")
