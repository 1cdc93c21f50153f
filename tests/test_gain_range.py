"""The gain range over very long runs (the rule directly): 1e5 boundaries, bounds honoured."""

from __future__ import annotations

import math

import pytest
import torch

from hf_activelr.optim.rule import decode_gain, end_period, init_state

pytestmark = pytest.mark.slow  # 1e5 boundaries of the rule: about a minute


# Per element, the sign of the period sum at boundary n (1-based), a cycle of 4 boundaries:
# steady +, steady -, alternating from +, alternating from -, always zero, ++-- (mixed).
_PATTERNS = [
    torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 1.0]),   # n % 4 == 1
    torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 1.0]),   # n % 4 == 2
    torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, -1.0]),  # n % 4 == 3
    torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, -1.0]),  # n % 4 == 0
]


def _group(lr_high, lr_low, zero_sum, gain_min=None, gain_max=None):
    return {"lr_high": lr_high, "lr_low": lr_low, "zero_sum": zero_sum, "gain_min": gain_min,
            "gain_max": gain_max, "gain_increase": "additive", "gain_init": 1.0,
            "significance": None, "pooled": None}


def _states(zero_sum, dtypes=(torch.float32, torch.float64)):
    states = []
    for dtype in dtypes:
        state = {}
        init_state(torch.zeros(6, dtype=dtype), state, zero_sum)
        states.append(state)
    return states


def _run_boundaries(states, group, boundaries, start=1, patterns=_PATTERNS):
    """``boundaries`` period ends; returns per state the running minimum of |packed gain| from
    the first boundary on (every later value, not only the last) and the last counts."""
    mins = [torch.full_like(s["gain"], math.inf) for s in states]
    counts = None
    for n in range(start, start + boundaries):
        pattern = patterns[n % len(patterns)]
        for state in states:
            state["grad_sum"].copy_(pattern)
        counts = end_period(states, group)
        for state, low in zip(states, mins):
            torch.minimum(low, state["gain"].abs(), out=low)
    return mins, counts


@pytest.mark.parametrize("zero_sum,lr_high,lr_low", [("hold", 0.5, 0.5), ("flip", 2.0, 0.1)])
def test_gain_range_over_1e5_boundaries(zero_sum, lr_high, lr_low):
    n = 100_000
    states = _states(zero_sum)
    group = _group(lr_high, lr_low, zero_sum)
    mins, counts = _run_boundaries(states, group, n)
    assert counts["elements"] == 12 and counts["nonfinite"] == 0
    for state, low in zip(states, mins):
        dtype = state["gain"].dtype
        tiny = torch.finfo(dtype).tiny
        gain = decode_gain(state["gain"])
        assert torch.isfinite(gain).all() and torch.isfinite(state["gain"]).all()
        # Additive growth under a steady sign: 1 + lr_high * (n - 1), exactly (dyadic values).
        expected = torch.tensor(1 + lr_high * (n - 1), dtype=dtype)
        torch.testing.assert_close(gain[:2], expected.expand(2), rtol=0, atol=0)
        if zero_sum == "hold":  # the sign bit holds the last sign
            assert torch.equal(torch.sign(state["gain"][:2]), torch.tensor([1.0, -1.0],
                                                                           dtype=dtype))
        # Multiplicative decay under oscillation: floored at the smallest normal number,
        # never 0 (which would read as gain 1) and never subnormal, at any boundary.
        assert torch.equal(gain[2:4], torch.full((2,), tiny, dtype=dtype))
        signed = [0, 1, 2, 3, 5] if zero_sum == "hold" else [0, 1, 2, 3, 4, 5]
        assert (low[signed] >= tiny).all(), low
        # An always-zero sum: held at 1 ("hold"), or shrunk to the floor ("flip").
        assert gain[4] == (1.0 if zero_sum == "hold" else tiny)
        # Mixed ++--: bounded, settles on the cycle between the two fixed points.
        g_agree = lr_high / (1 - lr_low)
        assert min(abs(gain[5].item() - g_agree), abs(gain[5].item() - g_agree * lr_low)) < 1e-6
    # Recovery: a steady sign makes the floored gains grow back, additively.
    k = 20
    steady = [torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0])]
    _run_boundaries(states, group, k, start=n + 1, patterns=steady)
    for state in states:
        gain = decode_gain(state["gain"])
        assert (gain[2:5] >= lr_high * (k - 2)).all(), gain
        assert (gain[2:5] <= 1 + lr_high * k).all(), gain
        torch.testing.assert_close(
            gain[:2], torch.full((2,), 1 + lr_high * (n + k - 1), dtype=gain.dtype),
            rtol=0, atol=0)


def test_gain_growth_with_inexact_lr_high_stays_close():
    """lr_high = 0.05 is not a float32 number: 10^4 additions stay within float tolerance."""
    n = 10_000
    states = _states("hold", dtypes=(torch.float32, torch.float64))
    _run_boundaries(states, _group(0.05, 0.5, "hold"), n)
    g32, g64 = (decode_gain(s["gain"]) for s in states)
    assert g32.dtype == torch.float32 and g64.dtype == torch.float64
    torch.testing.assert_close(g32[:2].double(), torch.full((2,), 1 + 0.05 * (n - 1),
                                                            dtype=torch.float64), rtol=2e-4, atol=0)
    torch.testing.assert_close(g64[:2], torch.full((2,), 1 + 0.05 * (n - 1),
                                                   dtype=torch.float64), rtol=1e-10, atol=0)


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("gain_min,gain_max", [(1e-3, 7.25), (1e-45, 3.0), (1.0, 1.0),
                                               (0.5, None), (None, 100.0)])
def test_gain_min_gain_max_honoured_over_long_runs(zero_sum, gain_min, gain_max):
    states = _states(zero_sum)
    group = _group(0.5, 0.5, zero_sum, gain_min=gain_min, gain_max=gain_max)
    mins, _ = _run_boundaries(states, group, 2_000)
    for state, low in zip(states, mins):
        dtype = state["gain"].dtype
        tiny = torch.finfo(dtype).tiny
        floor = torch.tensor(tiny if gain_min is None else max(gain_min, tiny), dtype=dtype)
        ceiling = 1 + 0.5 * 1999 if gain_max is None else gain_max
        gain = decode_gain(state["gain"])
        assert torch.isfinite(gain).all()
        assert (gain >= floor).all() and (gain <= ceiling).all(), gain
        assert gain[0] == gain[1] == torch.tensor(ceiling, dtype=dtype)  # steady: at the cap
        assert (gain[2:4] == floor).all()  # oscillating: at the floor
        signed = [0, 1, 2, 3, 5] if zero_sum == "hold" else [0, 1, 2, 3, 4, 5]
        assert (low[signed] >= floor).all()
        if zero_sum == "hold":
            assert state["gain"][1] < 0  # the clamped gain keeps its sign bit
            assert gain[4] == 1.0
    # From the floor, a steady sign grows the gains back (up to the cap).
    _run_boundaries(states, group, 10, start=10_001,
                    patterns=[torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0])])
    for state in states:
        gain = decode_gain(state["gain"])
        assert (gain[2:4] >= min(ceiling, 0.5 * 9)).all(), gain
        if gain_max is not None:
            assert (gain <= gain_max).all()
