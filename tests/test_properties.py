"""Property-based (hypothesis): valid input never raises, gains match a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_helpers import (
    build,
)
from torch import nn

from hf_activelr import (
    ActiveAdamW,
    ActiveLR,
    ActiveSGD,
)
from hf_activelr.optim.rule import decode_gain


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F32 = np.float32
F32_TINY = np.finfo(np.float32).tiny


@st.composite
def _setups(draw):
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        shapes = draw(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
                               min_size=1, max_size=2))
        groups.append({
            "shapes": shapes,
            "dtypes": [draw(st.sampled_from(DTYPES)) for _ in shapes],
            "lr_high": draw(st.floats(0.0, 3.0)),
            "lr_low": draw(st.floats(1e-6, 1.0)),
            "period": draw(st.integers(1, 5)),
            "zero_sum": draw(st.sampled_from(["hold", "flip"])),
        })
    return {
        "groups": groups,
        "optimizer": draw(st.sampled_from(["ActiveSGD", "ActiveAdamW-foreach",
                                           "ActiveAdamW-single", "ActiveLR(SGD)"])),
        "steps": draw(st.integers(1, 16)),
        "seed": draw(st.integers(0, 2**16)),
        "none_rate": draw(st.sampled_from([0.0, 0.0, 0.25])),
    }


def _plain_adapt(gain, prev, total, group):
    """One element at a boundary, in float32 like the library's state: (gain, prev sign)."""
    sign = (total > 0) - (total < 0)
    if group["zero_sum"] == "hold":
        if prev is not None and sign != 0:
            gain = gain + F32(group["lr_high"]) if sign == prev else gain * F32(group["lr_low"])
        if sign != 0:
            prev = sign
    else:
        if prev is not None:
            gain = gain + F32(group["lr_high"]) if prev * sign > 0 else gain * F32(group["lr_low"])
        prev = sign
    return max(F32(gain), F32_TINY), prev


def _build_from_setup(setup, params_by_group):
    groups = [
        {"params": params, **{k: spec[k] for k in ("lr_high", "lr_low", "period", "zero_sum")}}
        for spec, params in zip(setup["groups"], params_by_group)
    ]
    first = {k: setup["groups"][0][k] for k in ("lr_high", "lr_low", "period", "zero_sum")}
    name = setup["optimizer"]
    if name == "ActiveSGD":
        return ActiveSGD(groups, lr=0.01, momentum=0.5, **first)
    if name.startswith("ActiveAdamW"):
        return ActiveAdamW(groups, lr=1e-3, foreach=name.endswith("foreach"), **first)
    return ActiveLR(torch.optim.SGD(groups, lr=0.01), **first)


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(setup=_setups())
def test_gains_match_a_plain_loop(setup):
    gen = torch.Generator().manual_seed(setup["seed"])
    params_by_group = [
        [nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
         for shape, dtype in zip(spec["shapes"], spec["dtypes"])]
        for spec in setup["groups"]
    ]
    opt = _build_from_setup(setup, params_by_group)
    # The plain loop: per element a float32 gain, a Python-int previous sign, an exact sum.
    plain = [[None] * len(params) for params in params_by_group]
    clocks = [0] * len(params_by_group)
    for _ in range(setup["steps"]):
        for g, (spec, params) in enumerate(zip(setup["groups"], params_by_group)):
            for j, p in enumerate(params):
                if torch.rand((), generator=gen).item() < setup["none_rate"]:
                    p.grad = None
                    continue
                # Multiples of 0.5 in [-1.5, 1.5]: exact in every dtype, sums exact, zeros often.
                grad = (torch.randint(-3, 4, p.shape, generator=gen) * 0.5).to(p.dtype)
                p.grad = grad
                if plain[g][j] is None:
                    plain[g][j] = {"gain": [F32(1.0)] * p.numel(), "prev": [None] * p.numel(),
                                   "sum": [0.0] * p.numel()}
                state = plain[g][j]
                values = grad.double().flatten().tolist()
                state["sum"] = [s + v for s, v in zip(state["sum"], values)]
        opt.step()
        for g, spec in enumerate(setup["groups"]):
            clocks[g] += 1
            if clocks[g] % spec["period"] == 0:
                for state in plain[g]:
                    if state is None:
                        continue
                    for i, total in enumerate(state["sum"]):
                        state["gain"][i], state["prev"][i] = _plain_adapt(
                            state["gain"][i], state["prev"][i], total, spec)
                    state["sum"] = [0.0] * len(state["sum"])
    for g, (spec, params) in enumerate(zip(setup["groups"], params_by_group)):
        assert opt.param_groups[g]["active_step"] == setup["steps"]
        for j, p in enumerate(params):
            state = opt.state.get(p, {})
            if plain[g][j] is None:
                assert "gain" not in state
                continue
            got = decode_gain(state["gain"])
            assert got.dtype == torch.float32 and got.shape == p.shape
            expected = torch.tensor(np.array(plain[g][j]["gain"], dtype=np.float32)).reshape(
                p.shape)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
            expected_sum = torch.tensor(plain[g][j]["sum"], dtype=torch.float32).reshape(p.shape)
            assert torch.equal(state["grad_sum"], expected_sum)
        stats = opt.gain_stats()[g]
        plain_gains = [x for state in plain[g] if state is not None for x in state["gain"]]
        if plain_gains:
            assert stats["min"] == pytest.approx(float(min(plain_gains)), rel=1e-6)
            assert stats["max"] == pytest.approx(float(max(plain_gains)), rel=1e-6)
            assert stats["nonfinite"] == 0


_negative = st.floats(max_value=-1e-300, allow_infinity=True)
# Beyond GAIN_LIMITS (config.py): lr_high above 1e6, lr_low below 1e-6.
_bad_lr_high = st.one_of(_negative, st.just(math.nan), st.just(math.inf),
                         st.floats(min_value=1e6, exclude_min=True))
_bad_lr_low = st.one_of(st.floats(max_value=1e-6, exclude_max=True),
                        st.floats(min_value=1.0, exclude_min=True), st.just(math.nan))
_bad_period = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.booleans())


@st.composite
def _bad_settings(draw):
    good = {"lr_high": 0.5, "lr_low": 0.5, "period": 2}
    key = draw(st.sampled_from(["lr_high", "lr_low", "period"]))
    value = draw({"lr_high": _bad_lr_high, "lr_low": _bad_lr_low, "period": _bad_period}[key])
    return key, {**good, key: value}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(bad=_bad_settings(),
       name=st.sampled_from(["ActiveSGD-single", "ActiveAdamW-foreach", "ActiveLR(SGD)"]),
       where=st.sampled_from(["constructor", "add_param_group"]))
def test_invalid_settings_raise(bad, name, where):
    key, kwargs = bad
    if where == "constructor":
        with pytest.raises((ValueError, TypeError), match=key):
            build(name, [nn.Parameter(torch.zeros(3))], **kwargs)
        return
    p = nn.Parameter(torch.zeros(3))
    opt = build(name, [p], lr_high=0.5, lr_low=0.5, period=2)
    with pytest.raises((ValueError, TypeError), match=key):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], key: kwargs[key]})
    assert len(opt.param_groups) == 1  # not kept
    p.grad = torch.ones(3)
    opt.step()  # and the optimizer still works
    assert opt.param_groups[0]["active_step"] == 1
