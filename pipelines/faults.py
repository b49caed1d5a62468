"""Fault injection: a documented switch for resilience checks, off unless its variables are set.

``TOKENSKIP_FAULT_KILL_AT_STEP=N`` with ``TOKENSKIP_FAULT_MARKER=/some/file``: during
training, the last rank SIGKILLs itself once, right after optimizer step N, and writes the
marker first, so the restarted worker group (``train.max_failures`` > 0) runs on instead of
dying again. This is how tests/test_train_ray.py checks that Ray Train resumes from the
last checkpoint; the same works by hand on a cluster (``ray job submit`` with both variables
in the runtime env). The driver reads the variables (:func:`from_env`) and passes them to
the workers in the loop config, so a worker's own environment does not matter.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

KILL_AT_STEP_ENV = "TOKENSKIP_FAULT_KILL_AT_STEP"
MARKER_ENV = "TOKENSKIP_FAULT_MARKER"


def from_env() -> dict | None:
    """The configured fault, or None (the normal case)."""
    at, marker = os.environ.get(KILL_AT_STEP_ENV), os.environ.get(MARKER_ENV)
    if not at or not marker:
        return None
    return {"kill_at_step": int(at), "marker": marker}


def maybe_kill(fault: dict | None, step: int, rank: int, world: int, delay_s: float = 5.0) -> None:
    """Kill this worker if ``fault`` says so for ``step`` and this is the last rank.

    It first waits ``delay_s``: Ray Train's controller collects reports by polling (every
    2 s), and a checkpoint reported just before a crash is lost with the dead worker's queue
    (the run then correctly resumes from the checkpoint before it). The wait makes "the last
    checkpoint" well defined for a test."""
    if not fault or step != fault.get("kill_at_step") or rank != world - 1:
        return
    marker = fault.get("marker")
    if not marker or os.path.exists(marker):
        return
    Path(marker).write_text(f"killed pid {os.getpid()} at step {step}\n")
    time.sleep(delay_s)
    os.kill(os.getpid(), signal.SIGKILL)
