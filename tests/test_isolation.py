"""Issue 20: state one test leaves behind must not change what a later test (a doctest above
all) sees. The leak check itself (tests/conftest.py), and the Ray worker output that used to
land in a doctest's output."""

from __future__ import annotations

import doctest
import logging
import os
import sys
import time

import pytest
from conftest import ray_streams_into_sys_stdout, state_leaks, state_snapshot

from serving import routing


def test_leak_check_sees_patched_attribute_env_logging_and_second_copy(monkeypatch, tmp_path):
    before = state_snapshot()
    orig_route, handler = routing.route, logging.StreamHandler(sys.stdout)
    try:
        routing.route = lambda *a, **k: None
        os.environ["TOKENSKIP_LEAK_CHECK_PROBE"] = "1"
        logging.getLogger().addHandler(handler)
        import importlib.util

        spec = importlib.util.spec_from_file_location("routing_second_copy", routing.__file__)
        copy = importlib.util.module_from_spec(spec)
        sys.modules["routing_second_copy"] = copy
        spec.loader.exec_module(copy)
        leaks = "\n".join(state_leaks(before, state_snapshot()))
    finally:
        routing.route = orig_route
        os.environ.pop("TOKENSKIP_LEAK_CHECK_PROBE", None)
        logging.getLogger().removeHandler(handler)
        sys.modules.pop("routing_second_copy", None)
    assert "serving.routing.route" in leaks and "TOKENSKIP_LEAK_CHECK_PROBE" in leaks
    assert "root logger changed" in leaks and "routing_second_copy" in leaks
    assert state_leaks(before, state_snapshot()) == []  # everything restored: nothing to report
    # monkeypatch undoes its changes before the check runs, so it is never reported
    monkeypatch.setattr(routing, "route", lambda *a, **k: None)
    monkeypatch.setenv("TOKENSKIP_LEAK_CHECK_PROBE", "2")


@pytest.mark.integration
def test_worker_output_reaches_fd1_never_a_running_doctest(ray_local, capfd):
    """A Ray task printing while doctests run: before the fix (Ray's printer writes to the
    sys.stdout of the moment) a share of the examples failed with worker lines in "Got:"."""
    assert not ray_streams_into_sys_stdout()

    @ray_local.remote(num_cpus=0)
    def chatter(seconds: float) -> int:
        n, end = 0, time.time() + seconds
        while time.time() < end:
            print(f"tokenskip-chatter line {n}", flush=True)
            n += 1
            time.sleep(0.002)
        return n

    ref = chatter.remote(6.0)
    deadline = time.time() + 60
    while "tokenskip-chatter" not in capfd.readouterr().out:  # the stream is flowing
        assert time.time() < deadline, "no worker output reached the driver in 60 s"
        time.sleep(0.1)
    failed = attempted = 0
    while time.time() < deadline and not ray_local.wait([ref], timeout=0)[0]:
        res = doctest.testmod(routing, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
        failed, attempted = failed + res.failed, attempted + res.attempted
    assert ray_local.get(ref) > 100 and attempted > 100
    assert failed == 0, capfd.readouterr().out[-3000:]
