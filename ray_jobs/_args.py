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
