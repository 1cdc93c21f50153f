"""Helpers shared by the reliability tests (test_nonfinite, test_gain_range, test_kill_resume,
test_load_refusal, test_properties, test_consistency)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hf_utils import subprocess_env
from torch import nn

from hf_activelr import (
    ActiveAdamW,
    ActiveLR,
    ActiveSGD,
)

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "scripts"
REPO = TESTS.parent


# --- shared helpers ------------------------------------------------------------------------


def build(name: str, params, eps=1e-8, **kwargs):
    """A small Active optimizer by name; ``kwargs`` override the ActiveLR settings."""
    active = {"lr_high": 0.5, "lr_low": 0.5, "period": 3, **kwargs}
    if name == "ActiveAdamW-foreach":
        return ActiveAdamW(params, lr=1e-2, eps=eps, foreach=True, **active)
    if name == "ActiveAdamW-single":
        return ActiveAdamW(params, lr=1e-2, eps=eps, foreach=False, **active)
    if name == "ActiveSGD-foreach":
        return ActiveSGD(params, lr=0.1, momentum=0.9, foreach=True, **active)
    if name == "ActiveSGD-single":
        return ActiveSGD(params, lr=0.1, momentum=0.9, foreach=False, **active)
    if name == "ActiveLR(Adam)":
        return ActiveLR(torch.optim.Adam(params, lr=1e-2, eps=eps), **active)
    if name == "ActiveLR(SGD)":
        return ActiveLR(torch.optim.SGD(params, lr=0.1), **active)
    raise KeyError(name)


OPTIMIZERS = ["ActiveAdamW-foreach", "ActiveAdamW-single", "ActiveSGD-foreach",
              "ActiveSGD-single", "ActiveLR(Adam)"]


def state_snapshot(opt) -> dict:
    """A deep copy of everything the optimizer holds (state dict, groups, clocks)."""
    return copy.deepcopy(opt.state_dict())


def assert_same_state(opt, snapshot: dict) -> None:
    assert_same_snapshot(opt.state_dict(), snapshot)


def assert_same_snapshot(now: dict, snapshot: dict) -> None:
    assert now["param_groups"] == snapshot["param_groups"]
    assert set(now["state"]) == set(snapshot["state"])
    for index, state in snapshot["state"].items():
        assert set(now["state"][index]) == set(state), index
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(now["state"][index][key], value), (index, key)
                assert now["state"][index][key].dtype == value.dtype, (index, key)
            else:
                assert now["state"][index][key] == value, (index, key)



def _env(**extra) -> dict:
    return subprocess_env(**extra)


def _params(shapes=((6, 5), (5,), (3, 2, 2)), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(500 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) + 0.5


def _trained(factory, steps=5, shapes=((6, 5), (5,), (3, 2, 2))):
    params = _params(shapes)
    opt = factory(params)
    for step in range(1, steps + 1):
        _set_grads(params, step)
        opt.step()
    return opt, params


def ADAMW(ps):  # an optimizer factory, like the TARGETS values
    return ActiveAdamW(ps, lr=1e-2, period=2)
TARGETS = {
    "ActiveAdamW": ADAMW,
    "ActiveSGD": lambda ps: ActiveSGD(ps, lr=0.1, momentum=0.9, lr_high=0.5, lr_low=0.5,
                                      period=2),
    "ActiveLR(Adam)": lambda ps: ActiveLR(torch.optim.Adam(ps, lr=1e-2), lr_high=0.5,
                                          lr_low=0.5, period=2),
}


def _refused_then_untouched(factory, bad_state, exc, pattern):
    """``load_state_dict(bad_state)`` raises ``exc`` matching ``pattern``; the optimizer is as
    before and trains on exactly like a twin that never saw the bad state."""
    opt, params = _trained(factory)
    twin, twin_params = _trained(factory)
    before = state_snapshot(opt)
    with pytest.raises(exc, match=pattern):
        opt.load_state_dict(bad_state)
    assert_same_state(opt, before)
    for step in range(6, 10):
        _set_grads(params, step)
        _set_grads(twin_params, step)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["gain"], twin.state[q]["gain"])
        assert torch.equal(opt.state[p]["grad_sum"], twin.state[q]["grad_sum"])


