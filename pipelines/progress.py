"""Stage progress: the one call a stage makes to say how far it is.

``report(done, total, unit="rows", loss=...)`` goes to the console of the run that started
the stage (``ray_jobs.console``), wherever the stage code runs:

* in the driver (generate's and prune's commit loops, evaluation placed on the driver), the
  runner installed a sink with :func:`set_sink` and the record goes straight to it;
* in a Ray worker (the rank-0 training loop, evaluation placed in a Ray task), the record is
  printed as one marked line on stdout. Ray forwards worker output to the driver
  (``log_to_driver``), where the console picks the marked lines out of the stream
  (:data:`MARK`) and the rest goes on to the stage's log file.

With neither (a library call outside a run, e.g. a test calling ``run_generate``) it does
nothing. Reporting never raises: progress is advisory.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any, Callable

MARK = "[tokenskip-progress] "

_lock = threading.Lock()
_sink: Callable[[dict], None] | None = None


def set_sink(sink: Callable[[dict], None] | None) -> None:
    """Install (or with None remove) the driver-side receiver of progress records."""
    global _sink
    with _lock:
        _sink = sink


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        from ray._private.worker import WORKER_MODE, global_worker

        return global_worker.mode == WORKER_MODE
    except Exception:  # pragma: no cover - Ray internals moved
        return False


def report(done: int | float, total: int | float | None = None, unit: str = "rows", **metrics: Any) -> None:
    """Progress of the running stage: ``done`` of ``total`` ``unit`` (plus e.g. loss, tokens_per_s)."""
    rec: dict[str, Any] = {"done": done, "total": total, "unit": unit}
    rec.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)})
    sink = _sink
    try:
        if sink is not None:
            sink(rec)
        elif _in_ray_worker():
            print(MARK + json.dumps(rec), flush=True)
    except Exception:  # pragma: no cover - never let progress break a stage
        pass


def parse(line: str) -> dict | None:
    """The record in a forwarded worker line, or None for an ordinary line.

    >>> parse('(RayTrainWorker pid=7) [tokenskip-progress] {"done": 3, "total": 10, "unit": "steps"}')
    {'done': 3, 'total': 10, 'unit': 'steps'}
    >>> parse("INFO something else") is None
    True
    """
    i = line.find(MARK)
    if i < 0:
        return None
    try:
        rec = json.loads(line[i + len(MARK) :])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "done" in rec else None
