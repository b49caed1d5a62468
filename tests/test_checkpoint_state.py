"""Checkpoint state is loaded with ``torch.load(weights_only=True)`` (#15.11): tensors and
plain data come back, a pickle that would run code on load is refused."""

from __future__ import annotations

import pytest

_RAN: list[str] = []


def _payload_ran(tag: str) -> str:
    _RAN.append(tag)
    return tag


class _Evil:
    def __reduce__(self):
        return (_payload_ran, ("code ran on load",))


def _runner():
    import torch

    from pipelines.train import _Runner

    r = object.__new__(_Runner)
    r.deepspeed = False
    r.peft_model = torch.nn.Linear(3, 2)
    for p in r.peft_model.parameters():
        p.requires_grad_(True)
    r.optimizer = torch.optim.AdamW(r.peft_model.parameters(), lr=1e-3)
    r.scheduler = torch.optim.lr_scheduler.LambdaLR(r.optimizer, lambda s: 1.0 - s / 10)
    return r


def test_ddp_state_round_trips_with_weights_only(tmp_path):
    import torch

    a = _runner()
    loss = a.peft_model(torch.ones(1, 3)).sum()
    loss.backward()
    a.optimizer.step()
    a.scheduler.step()
    a.save_state(tmp_path, rank=0)
    b = _runner()
    b.load_state(tmp_path)
    for (n, x), (_, y) in zip(a.peft_model.named_parameters(), b.peft_model.named_parameters()):
        assert torch.equal(x, y), n
    assert b.scheduler.last_epoch == 1 and b.optimizer.state_dict()["state"][0]["step"] == 1


def test_checkpoint_with_code_is_refused(tmp_path):
    import pickle

    import torch

    torch.save({"model": {}, "optimizer": _Evil(), "scheduler": {}}, tmp_path / "trainer_state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _runner().load_state(tmp_path)
    assert _RAN == []
