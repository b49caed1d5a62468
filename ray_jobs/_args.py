"""Argument parsing shared by the thin ``ray_jobs`` entrypoints and ``tokenskip`` CLI."""

from __future__ import annotations

import argparse
import logging
import sys


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides: key.sub=value (YAML values), e.g. generate.data.limit=32")
    p.add_argument("--config", "-c", required=True, help="YAML config (a stage config or a pipeline config)")
    p.add_argument("--force", action="store_true", help="re-run even if the stage's manifest exists")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def load_stage(path: str, overrides: list[str], stage: str):
    """(stage config, ray.init kwargs) from a stage YAML or a ``kind: pipeline`` YAML.

    With a pipeline YAML the stage's section is used (run_dir paths and model filled in)
    and overrides may name the section or not: ``limit=4`` and ``prune.limit=4`` alike.
    """
    import dataclasses

    from tokenskip.config import KINDS, PipelineConfig, load_config, read_yaml, stage_config

    if read_yaml(path).get("kind") == "pipeline":
        top = {f.name for f in dataclasses.fields(PipelineConfig)}
        fixed = [o if o.split("=", 1)[0].split(".", 1)[0] in top else f"{stage}.{o}" for o in overrides]
        pipe = load_config(PipelineConfig, path, fixed)
        cfg = stage_config(pipe, stage)
        if hasattr(cfg, "ray") and not cfg.ray:
            cfg.ray = dict(pipe.ray)
        return cfg, pipe.ray
    cfg = load_config(KINDS[stage], path, overrides)
    return cfg, dict(getattr(cfg, "ray", None) or {})


def stage_main(stage: str, module_doc: str, argv: list[str] | None, run, summary, *,
               errors: tuple[type[BaseException], ...] = (), prepare=None, init_ray: bool = True) -> int:
    """The ``main()`` of a one-stage entrypoint: parse, load the stage config (stage or
    pipeline YAML), ``prepare()``, start/join Ray, ``run(cfg, force=...)`` and print
    ``summary(cfg, manifest)`` as JSON. Config errors and the stage's own input errors
    (``errors``) print one line naming the problem and exit 2, with no traceback."""
    import json

    prog = f"tokenskip {stage}"
    args = parser(prog, module_doc.split("\n", 2)[2]).parse_args(argv)
    setup_logging()
    from tokenskip.artifacts import StageError
    from tokenskip.config import ConfigError

    try:
        cfg, ray_kwargs = load_stage(args.config, args.overrides, stage)
        if prepare is not None:
            prepare()
        if init_ray:
            from pipelines.common import init_ray as _init_ray

            _init_ray(ray_kwargs)
        manifest = run(cfg, force=args.force)
    except (ConfigError, StageError, *errors) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary(cfg, manifest), indent=2))
    return 0
