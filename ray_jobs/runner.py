"""The one runner behind every entrypoint: ``tokenskip pipeline``, ``tokenskip build-sft``,
the single-stage commands and their ``python -m ray_jobs.<name>`` twins under ``ray job submit``.

For any list of stages from :data:`pipelines.stages.STAGES` it

* parses the common arguments (``--config``, ``--force``, ``-v/--verbose``, overrides);
* loads the config (a stage YAML, or a ``kind: pipeline`` YAML and the stage's section);
* runs the stages' ``prepare`` steps, then starts (or joins, under ``ray job submit``) Ray
  once, before the first stage that needs it, and shuts it down at the end if it started it;
* per stage: a start line naming the stage's log file, progress, and a one-line summary
  (:mod:`ray_jobs.console`), with the stage's output (engine, Ray, library logs) in
  ``<run_dir>/logs/<stage>.log``;
* maps errors the same way everywhere: a config error or a stage's input error prints one
  line ``tokenskip <command>: <message>`` (plus the stage's log path) and exits 2; anything
  else prints ``... stage <name> failed: <type>: <message>`` with the log path (the
  traceback is in the log) and exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pipelines import progress
from pipelines.stages import STAGES, Stage, stage_config
from ray_jobs.console import Console, ConsoleWarnings, capture, unwatch_ray_output, verbose_from_env, watch_ray_output

log = logging.getLogger("tokenskip.runner")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class StageFailed(Exception):
    """A stage (or loading its config) failed; ``code`` is the exit status, the message one line."""

    def __init__(self, message: str, code: int = EXIT_USAGE, log_path: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.log_path = log_path


# ----------------------------------------------------------------------------- arguments / config


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(doc or "").strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: key.sub=value (YAML values), e.g. generate.data.limit=32",
    )
    p.add_argument("--config", "-c", required=True, help="YAML config (a stage config or a pipeline config)")
    p.add_argument("--force", action="store_true", help="re-run even if the stage's manifest exists")
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="engine / Ray / library logs on the console instead of <run_dir>/logs/ (env: TOKENSKIP_VERBOSE=1)",
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p


def doc_body(module_doc: str) -> str:
    """A ray_jobs module docstring without its first paragraph (the ``ray job submit`` line)."""
    return module_doc.split("\n", 2)[2] if module_doc.count("\n") >= 2 else module_doc


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def load_pipeline(path: str, overrides: list[str]):
    from tokenskip.config import PipelineConfig, load_config

    return load_config(PipelineConfig, path, overrides)


def load_stage(path: str, overrides: list[str], stage: str) -> tuple[Any, dict]:
    """(stage config, ray.init kwargs) from a stage YAML or a ``kind: pipeline`` YAML.

    With a pipeline YAML the stage's section is used (inputs wired under ``run_dir``, model
    filled in) and overrides may name the section or not: ``limit=4`` and ``prune.limit=4`` alike.
    """
    from tokenskip.config import KINDS, PipelineConfig, load_config, read_yaml

    section = STAGES[stage].section
    if read_yaml(path).get("kind") == "pipeline":
        top = {f.name for f in dataclasses.fields(PipelineConfig)}
        fixed = [o if o.split("=", 1)[0].split(".", 1)[0] in top else f"{section}.{o}" for o in overrides]
        pipe = load_pipeline(path, fixed)
        return stage_config(pipe, stage), dict(pipe.ray)
    cfg = load_config(KINDS[section], path, overrides)
    return cfg, dict(getattr(cfg, "ray", None) or {})


# ----------------------------------------------------------------------------- running


def _uses_ray(st: Stage, cfg: Any) -> bool:
    if isinstance(st.uses_ray, str):
        module, _, name = st.uses_ray.partition(":")
        import importlib

        return bool(getattr(importlib.import_module(module), name)(cfg))
    return bool(st.uses_ray)


def _one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(str(text).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _stage_label(i: int, n: int, name: str) -> str:
    return f"[{i}/{n}] {name}" if n > 1 else name


def run_stages(
    steps: list[tuple[str, Any]],
    console: Console,
    *,
    ray_kwargs: dict | None = None,
    force: bool = False,
    force_stage: str | None = None,
    in_pipeline: bool = False,
) -> tuple[dict, dict]:
    """Run ``steps`` ([(stage name, config)]) in order; returns ({stage: manifest}, {stage: seconds}).

    Raises :class:`StageFailed` with the one-line message, the exit code and the log path."""
    import ray

    from tokenskip import artifacts
    from tokenskip.config import ConfigError

    verbose = console.verbose
    for name, _ in steps:
        if STAGES[name].prepare:
            from pipelines.stages import _resolve

            _resolve(STAGES[name].prepare)()
    started_ray = False
    warn_handler = None if verbose else ConsoleWarnings(console)
    pkg_log = logging.getLogger("tokenskip")
    if warn_handler:
        pkg_log.addHandler(warn_handler)
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    forcing = force
    last_log: str | None = None
    try:
        for i, (name, cfg) in enumerate(steps, 1):
            st = STAGES[name]
            if force_stage and name == force_stage:
                forcing = True
            out = Path(str(cfg.output_dir))
            log_path = None if verbose else str(out.parent / "logs" / f"{name}.log")
            last_log = log_path
            label = _stage_label(i, len(steps), name)
            reuse = artifacts.is_complete(out) and not forcing
            console.begin(
                label,
                st.what + (" [finished before: reusing it]" if reuse else " [forced]" if forcing else ""),
                log_path,
            )
            t0 = time.time()
            with capture(log_path):
                if log_path:
                    log.info("==== stage %s (%s) -> %s", name, st.what, out)
                try:
                    if _uses_ray(st, cfg) and not ray.is_initialized():
                        from pipelines.common import init_ray

                        init_ray(ray_kwargs)
                        started_ray = True
                    if ray.is_initialized():
                        watch_ray_output(console)
                    progress.set_sink(console.update)
                    results[name] = st.function()(cfg, force=forcing)
                except (ConfigError, artifacts.StageError, *st.error_types()) as e:
                    log.exception("stage %s: input error", name)
                    msg = _one_line(e)
                    if in_pipeline and isinstance(e, artifacts.ConfigChanged):
                        msg = (
                            f"stage {name}: {msg} (in a pipeline: --force-stage {name} redoes it and every later stage)"
                        )
                    elif in_pipeline:
                        msg = f"stage {name}: {msg}"
                    console.end(f"failed after {time.time() - t0:.1f} s")
                    raise StageFailed(msg, EXIT_USAGE, log_path) from e
                except Exception as e:
                    log.exception("stage %s failed", name)
                    console.end(f"failed after {time.time() - t0:.1f} s")  # the traceback: in the log
                    raise StageFailed(
                        f"stage {name} failed: {type(e).__name__}: {_one_line(e)}", EXIT_FAILED, log_path
                    ) from e
                finally:
                    progress.set_sink(None)
            timings[name] = round(time.time() - t0, 1)
            try:
                summary = st.summary(results[name])
            except Exception:  # pragma: no cover - a summary must never fail a finished stage
                summary = ""
            how = "reused" if reuse and results[name].get("finished_at") else "done"
            console.end(f"{how} in {timings[name]:.1f} s" + (f": {summary}" if summary else ""))
    finally:
        progress.set_sink(None)
        if warn_handler:
            pkg_log.removeHandler(warn_handler)
        if ray.is_initialized():
            unwatch_ray_output()
        if started_ray:
            with capture(last_log):  # late worker output and Ray's shutdown messages go to the log too
                ray.shutdown()
    return results, timings


def main(
    prog: str,
    argv: list[str] | None,
    build: Callable[[argparse.Namespace], dict],
    *,
    doc: str,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse, build the job with ``build(args)``, run it, print its results; the exit status.

    ``build`` returns {"steps": [(stage, cfg)], "ray": kwargs, "force_stage": ..., "in_pipeline": bool,
    "done": callable(results, timings, console)} and may raise ConfigError."""
    p = parser(prog, doc)
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    verbose = bool(args.verbose) or verbose_from_env()
    setup_logging()
    from tokenskip.artifacts import StageError
    from tokenskip.config import ConfigError

    console = Console(verbose=verbose)
    # What loading the config and the run's set-up print (e.g. a tracking store being created)
    # goes to <run_dir>/logs/run.log as well; on a failure there it is shown with the error.
    early = None if verbose else tempfile.NamedTemporaryFile(prefix="tokenskip-", suffix=".log", delete=False).name
    try:
        try:
            with capture(early):
                job = build(args)
        except BaseException as e:
            if early and Path(early).stat().st_size:
                console.line(Path(early).read_text(errors="replace").rstrip())
            if isinstance(e, (ConfigError, StageError, ValueError)):
                raise StageFailed(_one_line(e), EXIT_USAGE) from None
            raise
        run_log = None
        if early and job["steps"]:
            _, cfg = job["steps"][0]
            run_log = Path(str(cfg.output_dir)).parent / "logs" / "run.log"
            run_log.parent.mkdir(parents=True, exist_ok=True)
            with open(run_log, "a") as fh:
                fh.write(Path(early).read_text(errors="replace"))
        # Between two stages' logs (and after the last), late worker output such as a vLLM
        # engine process's shutdown lines goes to the run log, not the console.
        with capture(run_log):
            results, timings = run_stages(
                job["steps"],
                console,
                ray_kwargs=job.get("ray"),
                force=args.force,
                force_stage=job.get("force_stage"),
                in_pipeline=job.get("in_pipeline", False),
            )
        with capture(run_log):  # the results go to the console; anything else said on the way, to the log
            job["done"](results, timings, console)
        return EXIT_OK
    except StageFailed as e:
        console.line(f"{prog}: {e}")
        if e.log_path:
            console.line(f"  log: {e.log_path}")
        return e.code
    finally:
        console.close()
        if early:
            Path(early).unlink(missing_ok=True)


def single_stage(
    stage: str, prog: str, module_doc: str, argv: list[str] | None, summary: Callable[[Any, dict], Any]
) -> int:
    """``main()`` of a one-stage entrypoint: the stage from a stage or pipeline YAML, its
    ``summary(cfg, manifest)`` printed as JSON."""
    import json

    def build(args: argparse.Namespace) -> dict:
        cfg, ray_kwargs = load_stage(args.config, args.overrides, stage)

        def done(results: dict, timings: dict, console: Console) -> None:
            console.result(json.dumps(summary(cfg, results[stage]), indent=2))

        return {"steps": [(stage, cfg)], "ray": ray_kwargs, "done": done}

    return main(prog, argv, build, doc=doc_body(module_doc))
