"""What a person sees while a run goes: one progress line per stage, engine logs in files.

* :class:`Console` prints the stage lines (start, progress, done, failed) and the final
  summary. On a terminal the progress line is a live bar redrawn in place; elsewhere
  (``ray job logs``, CI, a pipe) it is a plain line every ``TOKENSKIP_PROGRESS_EVERY``
  seconds (default 30) while the stage makes progress.
* :func:`capture` points the process's stdout and stderr (file descriptors 1 and 2, so
  vLLM's engine process, DeepSpeed's op build, C++ logs and Ray's forwarded worker output
  are caught too) at ``<run_dir>/logs/<stage>.log``; the console keeps its own copy of the
  original descriptors.
* Progress records from Ray workers arrive as marked lines in the forwarded worker output
  (:mod:`pipelines.progress`); :func:`watch_ray_output` picks them out.

``-v/--verbose`` or ``TOKENSKIP_VERBOSE=1`` (for ``ray job submit``) leaves the descriptors
alone: every log goes to the console as before, and the stage lines are printed as well.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from pipelines import progress

VERBOSE_ENV = "TOKENSKIP_VERBOSE"
EVERY_ENV = "TOKENSKIP_PROGRESS_EVERY"


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _own_copy(stream: IO[str], fd: int) -> tuple[IO[str], bool]:
    """A console stream that survives redirecting ``fd``: a duplicate of the descriptor when
    ``stream`` writes to it (the normal case), else ``stream`` itself (e.g. pytest's capsys)."""
    try:
        if stream.fileno() == fd:
            stream.flush()
            return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace"), True
    except (AttributeError, OSError, ValueError):
        pass
    return stream, False


def _duration(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


class Console:
    """Stage lines on the console; thread-safe (progress arrives from Ray's log thread)."""

    def __init__(
        self,
        out: IO[str] | None = None,
        err: IO[str] | None = None,
        *,
        tty: bool | None = None,
        every_s: float | None = None,
        verbose: bool = False,
    ) -> None:
        out = out if out is not None else sys.stdout
        err = err if err is not None else sys.stderr
        self.out, self._own_out = _own_copy(out, 1)
        self.err, self._own_err = _own_copy(err, 2)
        if tty is None:
            try:
                tty = self.err.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = bool(tty)
        self.verbose = verbose
        self.every_s = float(every_s if every_s is not None else os.environ.get(EVERY_ENV) or 30.0)
        self._lock = threading.RLock()
        self._label: str | None = None
        self._t0 = 0.0
        self._rec: dict | None = None
        self._first: tuple[float, float] | None = None  # (time, done) of the first record
        self._last_print = 0.0
        self._live = False  # a live bar is on screen (TTY)
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # ---------------------------------------------------------------- plain lines

    def _clear_live(self) -> None:
        if self._live:
            self.err.write("\r\x1b[2K")
            self._live = False

    def line(self, text: str = "", *, stream: str = "err") -> None:
        with self._lock:
            self._clear_live()
            s = self.err if stream == "err" else self.out
            s.write(text + "\n")
            s.flush()

    def result(self, text: str) -> None:
        """Results (tables, JSON) go to stdout."""
        self.line(text, stream="out")

    def warn(self, text: str) -> None:
        self.line(f"warning: {text}")

    # ---------------------------------------------------------------- stages

    def begin(self, label: str, what: str, log_path: str | None) -> None:
        where = f" (log: {log_path})" if log_path else ""
        self.line(f"{label}: {what}{where}")
        with self._lock:
            self._label, self._t0, self._rec, self._first, self._last_print = (
                label,
                time.time(),
                None,
                None,
                time.time(),
            )
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, name="tokenskip-console", daemon=True)
        self._ticker.start()

    def update(self, rec: dict) -> None:
        with self._lock:
            if self._label is None:
                return
            now = time.time()
            if (
                self._first is None
                or rec.get("unit") != (self._rec or {}).get("unit")
                or rec.get("done", 0) < self._first[1]
            ):
                self._first = (now, float(rec.get("done") or 0))
            self._rec = rec
            if self.tty:
                self._draw()

    def end(self, text: str) -> None:
        self._halt()
        with self._lock:
            label, self._label = self._label, None
        self.line(f"{label} {text}" if label else text)

    def _halt(self) -> None:
        self._stop.set()
        t = self._ticker
        if t is not None and t is not threading.current_thread():
            t.join(timeout=2)
        self._ticker = None

    def status(self) -> str:
        """``generate: 32/64 rows (50%), 1.3 rows/s, ETA 25s, 40s elapsed``."""
        now = time.time()
        bits = []
        rec = self._rec
        if rec:
            done, total, unit = rec.get("done") or 0, rec.get("total"), rec.get("unit") or ""
            bits.append(
                f"{done}/{total} {unit}" + (f" ({100 * done / total:.0f}%)" if total else "")
                if total
                else f"{done} {unit}"
            )
            if "loss" in rec:
                bits.append(f"loss {rec['loss']:.4f}" if isinstance(rec["loss"], float) else f"loss {rec['loss']}")
            if isinstance(rec.get("tokens_per_s"), (int, float)):
                bits.append(f"{_num(rec['tokens_per_s'])} tok/s")
            t1, d1 = self._first or (now, done)
            rate = (done - d1) / (now - t1) if now > t1 and done > d1 else None
            if rate:
                bits.append(f"{_num(rate)} {unit}/s" if unit else f"{_num(rate)}/s")
                if total and total > done:
                    bits.append(f"ETA {_duration((total - done) / rate)}")
        bits.append(f"{_duration(now - self._t0)} elapsed")
        return ", ".join(bits)

    def _draw(self) -> None:
        text = f"{self._label}: {self.status()}"
        try:
            width = os.get_terminal_size(self.err.fileno()).columns
        except (AttributeError, OSError, ValueError):
            width = 0
        width = width if width >= 40 else 120  # a pseudo-terminal may report no size
        rec = self._rec or {}
        if rec.get("total"):
            frac = min(1.0, float(rec.get("done") or 0) / float(rec["total"]))
            bar = "█" * int(frac * 20) + "░" * (20 - int(frac * 20))
            text = f"{self._label} {bar} {self.status()}"
        self.err.write("\r\x1b[2K" + text[: max(10, width - 1)])
        self.err.flush()
        self._live = True

    def _tick(self) -> None:
        step = 0.5 if self.tty else min(self.every_s, 5.0)
        while not self._stop.wait(step):
            with self._lock:
                if self._label is None:
                    return
                if self.tty:
                    self._draw()
                elif time.time() - self._last_print >= self.every_s:
                    self._last_print = time.time()
                    self.err.write(f"{self._label}: {self.status()}\n")
                    self.err.flush()

    def close(self) -> None:
        self._halt()
        with self._lock:
            self._clear_live()
            for s, own in ((self.out, self._own_out), (self.err, self._own_err)):
                try:
                    s.flush()
                    if own:
                        s.close()
                except (OSError, ValueError):
                    pass
            self._own_out = self._own_err = False


class ConsoleWarnings(logging.Handler):
    """Warnings of tokenskip's own loggers reach the console even while logs go to a file."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.name == "tokenskip.runner":
            return  # a failure is reported once, by the runner
        try:
            self.console.warn(record.getMessage())
        except Exception:  # pragma: no cover
            self.handleError(record)


@contextmanager
def capture(log_path: str | os.PathLike | None) -> Iterator[None]:
    """Send fd 1 and 2 (and so Python's sys.stdout/err, child processes and C++ logs) to
    ``log_path`` (appended) for the duration; None: leave them alone (verbose)."""
    if log_path is None:
        yield
        return
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            s.flush()
        except (AttributeError, OSError, ValueError):
            pass
    saved = (os.dup(1), os.dup(2))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                s.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (*saved, fd):
            os.close(f)


def watch_ray_output(console: Console) -> None:
    """Feed progress records in Ray's forwarded worker output to ``console`` (idempotent)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - Ray internals moved: no worker progress, logs unaffected
        return

    def handler(data: dict) -> None:
        try:
            for line in data.get("lines") or ():
                rec = progress.parse(line)
                if rec is not None:
                    console.update(rec)
        except Exception:  # pragma: no cover - never break Ray's log forwarding
            pass

    dispatcher.remove_handler("tokenskip_progress")
    dispatcher.add_handler("tokenskip_progress", handler)


def unwatch_ray_output() -> None:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler("tokenskip_progress")
    except ImportError:  # pragma: no cover
        pass
