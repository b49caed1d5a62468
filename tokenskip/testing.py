"""Tiny randomly initialised models built from the real embedded tokenizers (seconds, no
download), for fast tests: a Llama-style causal LM with head dim 64 (vLLM's CPU backend
rejects head size 16) and a BERT token classifier; free local ports for test servers, and a
wait for a server to answer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from tokenskip import assets

# Ray's default worker ports are 10002-19999; the kernel hands out ephemeral ports (bind to
# port 0, outgoing connections) from ip_local_port_range, 32768-60999 on Linux. A port taken from
# that range and handed to a server that binds it seconds later can meanwhile be taken by any of
# the Ray processes starting in between (CI once read an HTTP/2 gRPC greeting from the "free" port
# a Serve test had chosen). Ports between the two ranges are bound only by whoever asks for them.
_RAY_WORKER_PORTS = (10002, 19999)
_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now, chosen outside the kernel's
    ephemeral range and Ray's worker-port range so that no process started later takes them by
    chance; never the same port twice in one process."""
    import random
    import socket

    eph_lo, eph_hi = _ephemeral_range()
    lo = _RAY_WORKER_PORTS[1] + 1
    hi = eph_lo - 1 if eph_lo > lo + 1000 else 65535
    candidates = [p for p in range(lo, hi + 1) if not (eph_lo <= p <= eph_hi) and p not in _HANDED_OUT]
    random.SystemRandom().shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        _HANDED_OUT.add(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports on 127.0.0.1 in {lo}-{hi} outside the ephemeral range {eph_lo}-{eph_hi}")


def wait_http(
    url: str,
    proc=None,
    timeout: float = 300.0,
    ready: Callable[[bytes], bool] | None = None,
    output: Callable[[], str] | None = None,
    interval: float = 1.0,
) -> None:
    """Poll ``url`` until it answers 200 and ``ready(body)`` holds (default: any 200 answer).

    A server still starting refuses, resets, answers 5xx or sends a half response: all of those
    mean "not yet". Raises ``RuntimeError`` (with the tail of ``output()``) if ``proc`` exits or
    ``timeout`` seconds pass.
    """
    import http.client
    import time
    import urllib.request

    def fail(why: str) -> None:
        tail = output() if output else ""
        raise RuntimeError(f"{url}: {why}" + (f"\n{tail[-5000:]}" if tail else ""))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200 and (ready is None or ready(r.read())):
                    return
        except (OSError, ValueError, http.client.HTTPException):
            pass
        if proc is not None and proc.poll() is not None:
            fail(f"the server exited with {proc.returncode}")
        time.sleep(interval)
    fail(f"no ready answer in {timeout:.0f} s")


def lists_models(body: bytes) -> bool:
    """``ready`` for :func:`wait_http` on ``/v1/models``: at least one model listed."""
    import json

    return bool(json.loads(body).get("data"))


def build_tiny_llama(out_dir: str | os.PathLike, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer Llama with the SmolLM2 tokenizer and chat template; head dim 64."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    def build(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(assets.ensure_smollm2())
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
            max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            tie_word_embeddings=True,
        )
        LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return assets.build_once(Path(out_dir), build)


def build_tiny_bert_classifier(out_dir: str | os.PathLike, hidden: int = 64, layers: int = 2, seed: int = 0,
                               from_minilm: bool = False) -> Path:
    """A BERT token classifier (2 labels) with the MiniLM WordPiece tokenizer.

    ``from_minilm=True`` uses the real MiniLM encoder weights with a fresh (seeded)
    2-label head instead of a tiny random encoder.
    """
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer, BertConfig, BertForTokenClassification

    def build(tmp: Path) -> None:
        src = assets.minilm_path()
        tok = AutoTokenizer.from_pretrained(src)
        torch.manual_seed(seed)
        if from_minilm:
            model = AutoModelForTokenClassification.from_pretrained(src, num_labels=2)
        else:
            cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                             intermediate_size=hidden * 2, max_position_embeddings=512, num_labels=2)
            model = BertForTokenClassification(cfg)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return assets.build_once(Path(out_dir), build)


def build_tiny_adapter(base_dir: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0, r: int = 8) -> Path:
    """A random (non-zero) PEFT LoRA adapter on all linear layers of ``base_dir``.

    LoRA B is initialised to zero by PEFT; it is filled with noise here so the adapter
    visibly changes outputs (tests can tell which adapter answered).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def build(tmp: Path) -> None:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.5)
        peft_model.save_pretrained(str(tmp))

    return assets.build_once(Path(out_dir), build, marker="adapter_config.json")
