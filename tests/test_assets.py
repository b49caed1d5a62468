import subprocess
import sys

import pytest

from tokenskip import assets


def test_passthrough_names():
    for name in ("Qwen/Qwen2.5-7B-Instruct", "/models/llama", "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"):
        assert assets.resolve_model(name) == name


def test_embedded_files_present():
    assert (assets.minilm_path() / "config.json").is_file()
    assert assets.dataset_file("math500", "test").name == "test.jsonl"
    with pytest.raises(assets.AssetError, match="no split 'train'"):
        assets.dataset_file("math500", "train")
    with pytest.raises(assets.AssetError, match="unknown embedded dataset"):
        assets.dataset_file("mmlu", "test")


def test_tiktoken_file_placed(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    p = assets.ensure_tiktoken()
    assert p.parent == tmp_path and p.stat().st_size > 1_000_000
    import tiktoken

    assert tiktoken.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]


def test_smollm2_is_real_and_chat_templated(smollm2):
    import json
    from pathlib import Path

    cfg = json.loads((Path(smollm2) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["head_dim"] == 64 and "quantization_config" not in cfg
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(smollm2).chat_template


_BUILD = """
import os, sys, time
from pathlib import Path
from tokenskip import assets

def build(tmp):
    (Path(sys.argv[2]) / f"built-{os.getpid()}").touch()
    time.sleep(1.0)  # long enough for the other processes to find the lock taken
    (tmp / "weights.bin").write_bytes(b"x" * 1000)
    (tmp / "config.json").write_text("{}")

print(assets.build_once(Path(sys.argv[1]), build))
"""


def test_concurrent_builds_are_atomic(tmp_path):
    """Several processes asking at once (what `ensure_smollm2`, the merged-adapter cache and the
    test fixtures go through): one builds, all get the same finished folder, nothing is left over."""
    target, log = tmp_path / "models" / "m-v1", tmp_path / "log"
    log.mkdir()
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD, str(target), str(log)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [str(target)] * 3
    assert len(list(log.iterdir())) == 1  # built once
    assert (target / "weights.bin").stat().st_size == 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["m-v1", "m-v1.lock"]  # no leftover temporaries


def test_failed_build_leaves_nothing_and_is_retried(tmp_path):
    target = tmp_path / "m"

    def broken(tmp):
        (tmp / "config.json").write_text("{}")  # complete-looking, then the build dies
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        assets.build_once(target, broken)
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["m.lock"]
    assert assets.build_once(target, lambda tmp: (tmp / "config.json").write_text("{}")) == target
    assert (target / "config.json").read_text() == "{}"


def test_smollm2_conversion_goes_through_build_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("TOKENSKIP_HOME", str(tmp_path))
    monkeypatch.setattr(assets, "build_once", lambda target, build: calls.append(target) or target)
    out = assets.ensure_smollm2()
    assert calls == [out] and out.parent == tmp_path / "models" and out.name.startswith(assets.SMOLLM2)


def test_free_ports_stay_out_of_ranges_other_processes_draw_from(monkeypatch):
    """Ports handed to test servers must not be ones Ray's processes or the kernel's bind-to-0
    can take between choosing and binding (CI once read a gRPC greeting from a Serve test's port)."""
    import random
    import socket

    from tokenskip import testing

    eph_lo, eph_hi = testing._ephemeral_range()
    ports = testing.free_ports(7) + testing.free_ports(3)
    assert len(set(ports)) == 10
    for p in ports:
        assert not eph_lo <= p <= eph_hi and not 10002 <= p <= 19999, p
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # really free

    # A port someone holds is skipped even when it is the first candidate.
    monkeypatch.setattr(random.SystemRandom, "shuffle", lambda self, xs: None)
    monkeypatch.setattr(testing, "_HANDED_OUT", set())
    with socket.socket() as held:
        held.bind(("127.0.0.1", 20000))
        held.listen()
        got = testing.free_ports(2)
    assert 20000 not in got and got == sorted(got)


def test_wait_http_waits_for_a_ready_answer_and_fails_on_exit_or_timeout():
    """The test servers' wait: not-yet answers (503, an empty model list) keep it polling; a
    ready one returns; a server that exits or never answers fails with its output's tail."""
    import http.server
    import threading

    from tokenskip.testing import free_ports, lists_models, wait_http

    answers = iter([(503, b"{}"), (200, b'{"data": []}'), (200, b'{"data": [{"id": "m"}]}')])
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, body = next(answers, (200, b'{"data": [{"id": "m"}]}'))
            seen.append(status)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    (port,) = free_ports(1)
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=30, ready=lists_models, interval=0.05)
        assert seen[:3] == [503, 200, 200]  # the empty list was not taken as ready
    finally:
        server.shutdown()
        server.server_close()
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(RuntimeError, match=r"exited with 3[\s\S]*boot log"):
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 30, output=lambda: "boot log", interval=0.05)
    with pytest.raises(RuntimeError, match="no ready answer in 1 s"):
        wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=1, interval=0.1)
