"""LR schedules against their closed forms, at chosen steps, through torch's LambdaLR."""
import math

import pytest
import torch

from megatrain.config import build_config
from megatrain.train.schedules import lr_multiplier


def lrs(train, steps):
    cfg = build_config({"train": train}).train
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg))
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_then_constant():
    got = lrs({"lr": 1.0, "schedule": "constant", "warmup_steps": 4, "max_steps": 10}, 10)
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and got[4:] == [1.0] * 6


def test_step():
    got = lrs({"lr": 0.8, "schedule": "step", "step_size": 3, "gamma": 0.5, "max_steps": 10}, 10)
    assert got == pytest.approx([0.8 * 0.5 ** (s // 3) for s in range(10)])


def test_exponential_with_warmup():
    got = lrs({"lr": 1.0, "schedule": "exponential", "gamma": 0.9, "warmup_steps": 2, "max_steps": 10}, 10)
    assert got[:2] == pytest.approx([0.5, 1.0])
    assert got[2:] == pytest.approx([0.9 ** s for s in range(8)])


def test_cosine_closed_form():
    lr, lo, warm, total = 1.0, 0.1, 5, 25
    got = lrs({"lr": lr, "min_lr": lo, "schedule": "cosine", "warmup_steps": warm, "max_steps": total}, total + 3)
    for step in (5, 10, 15, 24, 25, 27):
        s = min((step - warm) / (total - warm), 1.0)
        assert got[step] == pytest.approx(lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * s)))
    assert got[15] == pytest.approx((lr + lo) / 2)
