"""Exactness of the Active optimizers.

a. With the gain fixed at 1 (``lr_high=0, lr_low=1``) every variant is its base optimizer.
b. With moving gains every variant matches the plain re-statement in ``reference.py``
   (parameters and decoded gains), both zero-sum policies, with exactly-zero period sums.
c. The multi-tensor and single-tensor paths agree; low-precision parameters work.
d. The ``ActiveLR`` wrapper around ``torch.optim.AdamW`` is ``ActiveAdamW``.
e. A parameter whose gradient is ``None`` skips the base update; boundaries stay on the
   group's clock.
"""

from __future__ import annotations

import itertools
import math

import adabelief_pytorch
import adabound
import pytest
import torch

from hf_activelr import (
    ActiveAdaBelief,
    ActiveAdaBound,
    ActiveAdamW,
    ActiveLR,
    ActiveRAdam,
    ActiveSGD,
)
from hf_activelr.optim.presets import preset_kwargs
from hf_activelr.optim.rule import decode_gain

try:  # tests/ may or may not be a package
    from .reference import Reference
except ImportError:  # pragma: no cover - depends on how pytest imports the tests
    from reference import Reference

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)
EXACT = dict(rtol=0.0, atol=0.0)

# Three param groups of small tensors: 2-D and 3-D tensors get Gaussian gradients (with a
# per-element bias, so some signs persist) and masked rows; 1-D tensors get gradients that are
# multiples of 0.5, so period sums are often exactly zero.
SHAPES = [[(5, 3), (7,)], [(2, 3, 4)], [(4,), (3, 2)]]

# name: (class, constructor settings, per-group overrides)
VARIANTS = {
    "sgd": (
        ActiveSGD,
        dict(lr=0.01, momentum=0.9, weight_decay=0.01),
        [
            {},
            dict(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=0.0),
            dict(lr=0.005, nesterov=True),
        ],
    ),
    "adamw": (
        ActiveAdamW,
        dict(lr=0.01, weight_decay=0.05),
        [{}, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, amsgrad=True), dict(weight_decay=0.0)],
    ),
    "radam": (
        ActiveRAdam,
        dict(lr=0.01, weight_decay=0.02),
        [
            {},
            dict(betas=(0.8, 0.99), decoupled_weight_decay=True),
            dict(lr=0.02, weight_decay=0.0),
        ],
    ),
    "adabelief": (
        ActiveAdaBelief,
        dict(lr=0.01, weight_decay=0.02, eps=1e-12),
        [
            {},
            dict(weight_decouple=False, amsgrad=True, rectify=False),
            dict(betas=(0.8, 0.99), fixed_decay=True, degenerated_to_sgd=False, amsgrad=True),
        ],
    ),
    "adabound": (
        ActiveAdaBound,
        dict(lr=0.01, final_lr=0.05, gamma=0.01),
        [{}, dict(amsbound=True, weight_decay=0.01), dict(lr=0.005, betas=(0.8, 0.99))],
    ),
}


# --- helpers -------------------------------------------------------------------------------


def make_params(shapes=SHAPES, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=F64).to(dtype))
         for shape in group]
        for group in shapes
    ]


def clone_params(nested, dtype=None):
    return [
        [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in group]
        for group in nested
    ]


def make_grads(steps, periods, shapes=SHAPES, seed=1, none=None):
    """``grads[t - 1][i][j]``: gradient of parameter j of group i at step t (float64).

    Row 0 of every 2-D+ tensor is zero for whole periods of its group (every third period),
    so its period sum is exactly zero; ``none(t, i, j)`` True makes that gradient None.
    """
    gen = torch.Generator().manual_seed(seed)
    bias = [
        [torch.randn(s, generator=gen, dtype=F64) * (torch.rand(s, generator=gen) < 0.5)
         for s in group]
        for group in shapes
    ]
    out = []
    for t in range(1, steps + 1):
        step = []
        for i, group in enumerate(shapes):
            row = []
            for j, shape in enumerate(group):
                if len(shape) == 1:
                    g = torch.randint(-2, 3, shape, generator=gen).to(F64) * 0.5
                else:
                    g = torch.randn(shape, generator=gen, dtype=F64) + 1.5 * bias[i][j]
                    if ((t - 1) // periods[i]) % 3 == 0:
                        g[0] = 0.0
                    if t % 5 == 0:
                        g[..., -1] = 0.0  # isolated zeros inside a period too
                if none is not None and none(t, i, j):
                    g = None
                row.append(g)
            step.append(row)
        out.append(step)
    return out


def set_grads(nested_params, nested_grads):
    """Each optimizer gets its own copies (reference optimizers modify p.grad in place)."""
    for params, grads in zip(nested_params, nested_grads):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.detach().clone().to(p.dtype)


def flat(nested):
    return [p for group in nested for p in group]


def groups_of(nested_params, overrides):
    return [{"params": params, **ov} for params, ov in zip(nested_params, overrides)]


def assert_params_close(actual_nested, expected_nested, msg="", **tol):
    for i, (actual, expected) in enumerate(zip(actual_nested, expected_nested)):
        for j, (a, e) in enumerate(zip(actual, expected)):
            torch.testing.assert_close(
                a.detach(), e.detach().to(a.dtype), **tol,
                msg=lambda m, i=i, j=j: f"{msg} group {i} param {j}: {m}",
            )


def assert_gains_match(opt, nested_params, reference, msg="", **tol):
    for i, (params, ref_gains) in enumerate(zip(nested_params, reference.gains())):
        for j, (p, ref_gain) in enumerate(zip(params, ref_gains)):
            state = opt.state.get(p, {})
            if ref_gain is None:
                assert "gain" not in state, f"{msg} group {i} param {j}: unexpected state"
                continue
            torch.testing.assert_close(
                decode_gain(state["gain"]).to(ref_gain.dtype) * opt.param_groups[i]["gain_init"],
                ref_gain, **tol,
                msg=lambda m, i=i, j=j: f"{msg} gains, group {i} param {j}: {m}",
            )


def gain_count(opt, value=1.0):
    """How many elements have a gain different from ``value`` (to check gains did move)."""
    return sum(
        int((decode_gain(s["gain"]) != value).sum()) for s in opt.state.values() if "gain" in s
    )


# --- a. gain fixed at 1: each variant is its base optimizer --------------------------------

FIXED = dict(lr_high=0.0, lr_low=1.0, period=2)


def _gains(opt):
    """Every decoded gain of ``opt``, flat, in state order."""
    return torch.cat([decode_gain(s["gain"]).reshape(-1) for s in opt.state.values()])


def _run_against_base(active, base, active_params, base_params, steps=200, lr_drop_at=120):
    grads = make_grads(steps, periods=[2, 2, 2], seed=11)
    for t, step_grads in enumerate(grads, start=1):
        if t == lr_drop_at:  # as a scheduler would (AdaBound scales final_lr with it)
            for opt in (active, base):
                for group in opt.param_groups:
                    group["lr"] *= 0.5
        set_grads(active_params, step_grads)
        set_grads(base_params, step_grads)
        active.step()
        base.step()
        if t % 50 == 0 or t == steps:
            assert_params_close(active_params, base_params, f"step {t}", **TIGHT)
    for state in active.state.values():
        assert torch.all(decode_gain(state["gain"]) == 1.0)


SGD_GROUPS = [
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=0.1),
    dict(lr=0.1, momentum=0.0, weight_decay=0.0),
]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    "settings, groups",
    [
        (dict(lr=0.01), SGD_GROUPS),
        (dict(lr=0.03, momentum=0.8, weight_decay=0.05), [{}, dict(dampening=0.5), {}]),
    ],
    ids=["per-group", "shared"],
)
def test_sgd_equals_torch_sgd(foreach, settings, groups):
    ps = make_params()
    qs = clone_params(ps)
    active = ActiveSGD(groups_of(ps, groups), **settings, **FIXED, foreach=foreach)
    base = torch.optim.SGD(groups_of(qs, groups), **settings)
    _run_against_base(active, base, ps, qs)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_equals_torch_adamw(foreach, amsgrad):
    groups = [
        dict(lr=0.01, weight_decay=0.05),
        dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, amsgrad=not amsgrad),
        dict(lr=0.005),
    ]
    ps = make_params()
    qs = clone_params(ps)
    active = ActiveAdamW(groups_of(ps, groups), amsgrad=amsgrad, **FIXED, foreach=foreach)
    base = torch.optim.AdamW(groups_of(qs, groups), amsgrad=amsgrad)
    _run_against_base(active, base, ps, qs)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("decoupled", [False, True])
def test_radam_equals_torch_radam(foreach, decoupled):
    groups = [
        dict(lr=0.01, weight_decay=0.05),
        dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6, decoupled_weight_decay=not decoupled,
             weight_decay=0.1),
        dict(lr=0.005, weight_decay=0.0),
    ]
    ps = make_params()
    qs = clone_params(ps)
    active = ActiveRAdam(
        groups_of(ps, groups), decoupled_weight_decay=decoupled, **FIXED, foreach=foreach
    )
    base = torch.optim.RAdam(groups_of(qs, groups), decoupled_weight_decay=decoupled)
    _run_against_base(active, base, ps, qs)


# adabelief_pytorch reads weight_decouple, fixed_decay, rectify and degenerated_to_sgd once
# for the optimizer (not per group); amsgrad, lr, betas, eps and weight_decay are per group.
ADABELIEF_FLAGS = [
    dict(),  # defaults: decoupled, rectified
    dict(weight_decouple=True, fixed_decay=True, rectify=False, amsgrad=True),
    dict(weight_decouple=False, rectify=True, amsgrad=True, degenerated_to_sgd=False),
    dict(weight_decouple=False, rectify=False, amsgrad=False),
    dict(weight_decouple=True, fixed_decay=False, rectify=True, amsgrad=True,
         degenerated_to_sgd=False),
    dict(weight_decouple=True, fixed_decay=True, rectify=True, degenerated_to_sgd=True),
]


def _flag_id(flags):
    return "-".join(f"{k}={v}" for k, v in flags.items()) or "defaults"


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("flags", ADABELIEF_FLAGS, ids=_flag_id)
def test_adabelief_equals_reference_package(foreach, flags):
    groups = [
        dict(lr=0.01, weight_decay=0.05),
        dict(lr=0.03, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1,
             amsgrad=not flags.get("amsgrad", False)),
        dict(lr=0.005, weight_decay=0.0),
    ]
    ps = make_params()
    qs = clone_params(ps)
    active = ActiveAdaBelief(groups_of(ps, groups), **flags, **FIXED, foreach=foreach)
    base = adabelief_pytorch.AdaBelief(groups_of(qs, groups), **flags, print_change_log=False)
    _run_against_base(active, base, ps, qs)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("amsbound", [False, True])
def test_adabound_equals_reference_package(foreach, amsbound):
    groups = [
        dict(lr=0.01, weight_decay=0.05),
        dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6, final_lr=0.05, gamma=0.01,
             amsbound=not amsbound),
        dict(lr=0.005, weight_decay=0.0),
    ]
    ps = make_params()
    qs = clone_params(ps)
    active = ActiveAdaBound(groups_of(ps, groups), amsbound=amsbound, **FIXED, foreach=foreach)
    base = adabound.AdaBound(groups_of(qs, groups), amsbound=amsbound)
    _run_against_base(active, base, ps, qs)


# --- b. moving gains: every variant against the plain re-statement --------------------------


def _active_overrides(period, lr_high, lr_low):
    """Group 0: the shared settings; group 1: gain bounds that bind; group 2: its own clock
    and its own lr_high / lr_low."""
    return [
        {},
        dict(gain_min=lr_low**3, gain_max=1.0 + 2.5 * lr_high),
        dict(period=period + 2, lr_high=lr_high / 2, lr_low=math.sqrt(lr_low)),
    ]


def _run_against_reference(
    variant, *, period, lr_high, lr_low, zero_sum, foreach, steps, none=None, check_every=3,
    params_tol=TIGHT, gain_increase="additive", gain_init=1.0, gains_tol=EXACT,
    grad_sum_dtype=None, significance=None, gain_dtype=None, pooled=None,
):
    cls, settings, base_groups = VARIANTS[variant]
    active_groups = _active_overrides(period, lr_high, lr_low)
    overrides = [{**b, **a} for b, a in zip(base_groups, active_groups)]
    active_settings = dict(lr_high=lr_high, lr_low=lr_low, period=period, zero_sum=zero_sum,
                           gain_increase=gain_increase, gain_init=gain_init,
                           grad_sum_dtype=grad_sum_dtype, significance=significance,
                           gain_dtype=gain_dtype, pooled=pooled)
    ps = make_params(seed=3)
    ref_groups = [{"params": [p.detach() for p in params], **ov}
                  for params, ov in zip(ps, overrides)]
    reference = Reference(variant, ref_groups, **settings, **active_settings)
    opt = cls(groups_of(ps, overrides), **settings, **active_settings, foreach=foreach)
    periods = [g.get("period", period) for g in overrides]
    grads = make_grads(steps, periods, seed=5, none=none)
    for t, step_grads in enumerate(grads, start=1):
        set_grads(ps, step_grads)
        opt.step()
        reference.step(step_grads)
        if t % check_every == 0 or t == steps:
            msg = f"{variant} step {t}"
            assert_gains_match(opt, ps, reference, msg, **gains_tol)
            assert_params_close(ps, reference.params(), msg, **params_tol)
    for group in opt.param_groups:
        assert group["active_step"] == steps
    return opt, reference


LR_PAIRS = [(2.0, 0.5), (0.05, 0.95)]


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("period", [1, 3, 7])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_against_reference(variant, period, zero_sum):
    for (lr_high, lr_low), foreach in itertools.product(LR_PAIRS, [True, False]):
        opt, _ = _run_against_reference(
            variant, period=period, lr_high=lr_high, lr_low=lr_low, zero_sum=zero_sum,
            foreach=foreach, steps=max(40, 12 * period + 8), params_tol=TIGHT,
        )
        # The test is only meaningful if gains moved both ways.
        gains = _gains(opt)
        assert (gains > 1).any() and (gains < 1).any()


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_multiplicative_increase_against_reference(variant, zero_sum):
    """The two-sided preset's rule (gain *= 1 + lr_high on agreement), with binding bounds."""
    for period, foreach in itertools.product([1, 3], [True, False]):
        opt, _ = _run_against_reference(
            variant, period=period, lr_high=0.5, lr_low=0.5, zero_sum=zero_sum,
            foreach=foreach, steps=12 * period + 8, gain_increase="multiplicative",
        )
        gains = _gains(opt)
        assert (gains > 1.5).any() and (gains < 1).any()


@pytest.mark.parametrize("gain_increase", ["additive", "multiplicative"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gain_init_against_reference(variant, gain_increase):
    """Gains that start below 1 (the two-sided preset's 0.01): the update uses gain_init times
    the stored gain, and the increase and the bounds apply to the real gain."""
    for foreach in (True, False):
        opt, _ = _run_against_reference(
            variant, period=2, lr_high=0.5, lr_low=0.5, zero_sum="hold", foreach=foreach,
            steps=40, gain_increase=gain_increase, gain_init=0.3,
            gains_tol=dict(rtol=1e-13, atol=0.0),
        )
        stats = opt.gain_stats()
        assert max(g["max"] for g in stats) > 0.3 > min(g["min"] for g in stats)


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_significance_against_reference(variant, zero_sum):
    """The significant preset's test: a sum counts only where |s| > z * sqrt(sum g^2). With
    z = 1 on the test's gradients some sums count and some do not, at every period (a period
    of 1 can never pass z = 1: see check_significance_reachable)."""
    for period, foreach in itertools.product([2, 3, 7], [True, False]):
        opt, reference = _run_against_reference(
            variant, period=period, lr_high=0.5, lr_low=1 / 1.5, zero_sum=zero_sum,
            foreach=foreach, steps=12 * period + 8, gain_increase="multiplicative",
            significance=1.0,
        )
        gains = _gains(opt)
        assert (gains > 1).any() and (gains < 1).any()
        assert all(s["grad_sq_sum"].shape == s["gain"].shape for s in opt.state.values())
        # The test bites: without it the same run ends with other gains.
        plain, _ = _run_against_reference(
            variant, period=period, lr_high=0.5, lr_low=1 / 1.5, zero_sum=zero_sum,
            foreach=foreach, steps=12 * period + 8, gain_increase="multiplicative",
        )
        assert not all(torch.equal(opt.state[p]["gain"], plain.state[q]["gain"])
                       for p, q in zip(_all_params(opt), _all_params(plain)))


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pooled_against_reference(variant, zero_sum):
    """The tensor-wide test (``pooled``), with and without the per-element one, on both
    eager paths and with gains that start below 1: a tensor's factor times each element's,
    clamped once; elements without a sign take their sum's raw sign when the factor moves
    them."""
    for period, foreach, significance in itertools.product([3, 7], [True, False],
                                                           [None, 1.0]):
        run = dict(period=period, lr_high=0.5, lr_low=1 / 1.5, zero_sum=zero_sum,
                   foreach=foreach, steps=12 * period + 8, gain_increase="multiplicative",
                   significance=significance, gain_init=0.3,
                   gains_tol=dict(rtol=1e-13, atol=0.0))
        opt, _ = _run_against_reference(variant, pooled=0.5, **run)
        # The factor bites: without it the same run ends with other gains.
        plain, _ = _run_against_reference(variant, **run)
        assert not all(torch.equal(opt.state[p]["gain"], plain.state[q]["gain"])
                       for p, q in zip(_all_params(opt), _all_params(plain)))


def _all_params(opt):
    return [p for group in opt.param_groups for p in group["params"] if p in opt.state]


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_grad_sum_against_reference(variant, zero_sum):
    """Sums stored in bfloat16: the reference rounds its float64 sum to bfloat16 after every
    addition, and gains and parameters still match it exactly over many boundaries."""
    for period, foreach in itertools.product([1, 3, 7], [True, False]):
        opt, _ = _run_against_reference(
            variant, period=period, lr_high=0.05, lr_low=0.95, zero_sum=zero_sum,
            foreach=foreach, steps=12 * period + 8, grad_sum_dtype="bfloat16",
        )
        assert all(s["grad_sum"].dtype == torch.bfloat16 for s in opt.state.values())
        gains = _gains(opt)
        assert (gains > 1).any() and (gains < 1).any()


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lean_state_against_reference(variant, zero_sum):
    """The lean state (bfloat16 gains and sums): the reference computes each changed gain in
    float32 and rounds it to bfloat16, as documented; gains match it exactly and parameters
    to float64 precision over many boundaries, with binding bounds, gain_init != 1, with and
    without the significance test, on both eager paths."""
    settings = dict(lr_high=0.5, lr_low=1 / 1.5, gain_increase="multiplicative",
                    grad_sum_dtype="bfloat16", gain_dtype="bfloat16", zero_sum=zero_sum)
    for period, foreach, significance, gain_init in itertools.product(
        [2, 7], [True, False], [None, 1.0], [1.0, 0.3]
    ):
        opt, _ = _run_against_reference(
            variant, period=period, foreach=foreach, steps=12 * period + 8,
            significance=significance, gain_init=gain_init, **settings,
        )
        for state in opt.state.values():
            assert state["gain"].dtype == state["grad_sum"].dtype == torch.bfloat16
        gains = _gains(opt)
        assert (gains > 1).any() and (gains < 1).any()
        # rounding happened: some gains are off the float32 lattice 1.5**k
        assert (gains.float() != 1.5 ** torch.round(torch.log(gains.float()) / math.log(1.5))).any()


def test_bfloat16_grad_sum_loses_small_gradients_as_stated():
    """The documented price: once the sum is about 512 times a gradient, bfloat16 drops it
    (a float32 sum keeps it), so the two storages can disagree on a nearly cancelling sum."""
    p = torch.nn.Parameter(torch.zeros(1))
    sums = {}
    for dtype in (None, "bfloat16"):
        opt = ActiveSGD([p], lr=0.0, lr_high=0.05, lr_low=0.95, period=10_000,
                        grad_sum_dtype=dtype)
        for grad in [512.0] + [-1.0] * 300:
            p.grad = torch.tensor([grad])
            opt.step()
        sums[dtype] = opt.state[p]["grad_sum"].item()
    assert sums[None] == 212.0
    assert sums["bfloat16"] == 512.0


def test_multiplicative_increase_by_hand():
    """Signs +, +, +, - over four boundaries: 0.1 (gain_init), 0.15, 0.225, 0.1125."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=F64))
    opt = ActiveAdamW([p], lr=0.01, **{**preset_kwargs("two_sided"), "period": 1})
    gains = []
    for sign in (1.0, 1.0, 1.0, -1.0):
        p.grad = torch.full((2,), sign, dtype=F64)
        opt.step()
        gains.append(opt.gain_stats()[0]["max"])
    assert gains == pytest.approx([0.1, 0.15, 0.225, 0.1125], rel=1e-6)
    torch.testing.assert_close(decode_gain(opt.state[p]["gain"]), torch.full((2,), 1.125,
                                                                           dtype=F64))


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
def test_zero_sums_follow_the_policy(zero_sum):
    """A row with zero gradients for whole periods: "hold" keeps its gain, "flip" shrinks it."""
    p = torch.nn.Parameter(torch.zeros(3, 2, dtype=F64))
    opt = ActiveAdamW([p], lr=0.01, lr_high=2.0, lr_low=0.5, period=2, zero_sum=zero_sum)
    for t in range(1, 13):
        g = torch.ones(3, 2, dtype=F64)
        g[1] = 0.0  # row 1: always zero sum
        if t > 4:
            g[2] = 0.0  # row 2: positive sums, then zero sums
        p.grad = g
        opt.step()
    gain = decode_gain(opt.state[p]["gain"])
    # 6 boundaries (steps 2, 4, ..., 12); row 0 agrees at 5 of them: 1 + 5 * 2
    assert torch.all(gain[0] == 11.0)
    if zero_sum == "hold":
        assert torch.all(gain[1] == 1.0)
        assert torch.all(gain[2] == 3.0)  # grew at step 4, held after
    else:
        assert torch.all(gain[1] == 0.5**5)
        assert torch.all(gain[2] == 3.0 * 0.5**4)


# --- c. foreach vs single tensor; low precision ----------------------------------------------


def _run_paths(variant, dtype, steps=40, period=3):
    cls, settings, base_groups = VARIANTS[variant]
    overrides = [{**b, **a} for b, a in zip(base_groups, _active_overrides(period, 2.0, 0.5))]
    grads = make_grads(steps, [g.get("period", period) for g in overrides], seed=9)
    runs = []
    for foreach in (True, False):
        ps = make_params(dtype=dtype, seed=4)
        opt = cls(groups_of(ps, overrides), **settings, lr_high=2.0, lr_low=0.5, period=period,
                  foreach=foreach)
        for step_grads in grads:
            set_grads(ps, step_grads)
            opt.step()
        runs.append((opt, ps))
    return runs


@pytest.mark.parametrize(
    "dtype, tol",
    [(F64, dict(rtol=1e-12, atol=1e-12)), (torch.float32, dict(rtol=1e-4, atol=1e-5))],
    ids=["float64", "float32"],
)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_foreach_matches_single_tensor(variant, dtype, tol):
    (opt_a, ps_a), (opt_b, ps_b) = _run_paths(variant, dtype)
    assert_params_close(ps_a, ps_b, "foreach vs single", **tol)
    for p, q in zip(flat(ps_a), flat(ps_b)):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        # The sums see the same gradients in the same order: gains agree exactly.
        torch.testing.assert_close(sa["gain"], sb["gain"], **EXACT)
        torch.testing.assert_close(sa["grad_sum"], sb["grad_sum"], **EXACT)
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], **tol)
    assert gain_count(opt_a) > 0


BASE_FACTORIES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=0.01),
    "adabelief": lambda ps: adabelief_pytorch.AdaBelief(
        ps, lr=0.01, amsgrad=True, print_change_log=False
    ),
    "adabound": lambda ps: adabound.AdaBound(ps, lr=0.01, amsbound=True),
}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_low_precision_params(variant, dtype, foreach):
    cls, settings, base_groups = VARIANTS[variant]
    if dtype == torch.float16 and variant != "sgd":
        # eps=1e-8 is 0 in float16: torch.optim.AdamW itself gives 0/0 = nan on a zero
        # gradient there. Use an eps whose reciprocal float16 holds (see also
        # test_float16_zero_gradients_stay_finite).
        settings = {**settings, "eps": 1e-4}
        base_groups = [{**group, "eps": 1e-4} for group in base_groups]
    ps = make_params(dtype=dtype, seed=6)
    initial = [p.detach().clone() for p in flat(ps)]
    opt = cls(groups_of(ps, base_groups), **settings, lr_high=2.0, lr_low=0.5, period=2,
              foreach=foreach)
    for step_grads in make_grads(30, [2, 2, 2], seed=7):
        set_grads(ps, step_grads)
        opt.step()
    assert gain_count(opt) > 0
    # The base optimizer's own state dtypes, from one step of it on the same kind of tensors.
    qs = [torch.nn.Parameter(p.detach().clone()) for p in initial]
    for q in qs:
        q.grad = torch.ones_like(q)
    base = BASE_FACTORIES[variant](qs)
    base.step()
    for p, q, p0 in zip(flat(ps), qs, initial):
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), p0)
        state = opt.state[p]
        assert state["gain"].dtype == torch.float32
        assert state["grad_sum"].dtype == torch.float32
        assert torch.isfinite(state["gain"]).all() and torch.isfinite(state["grad_sum"]).all()
        for key, value in base.state[q].items():
            if torch.is_tensor(value) and value.dim() > 0 and key in state:
                assert state[key].dtype == value.dtype, key
                assert torch.isfinite(state[key]).all(), key


FP16_BASES = {
    "adamw": (ActiveAdamW, lambda ps, fe: torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=fe)),
    "radam": (ActiveRAdam, lambda ps, fe: torch.optim.RAdam(ps, lr=1e-2, eps=1e-6, foreach=fe)),
    "adabound": (ActiveAdaBound, lambda ps, fe: adabound.AdaBound(ps, lr=1e-2, eps=1e-6)),
}
# Regression: the foreach path once multiplied m by the reciprocal of the Adam denominator,
# which is inf in float16 where sqrt(v_hat) + eps < 2^-16 (v = 0, eps = 1e-6): nan / inf
# where torch's foreach AdamW/RAdam divide and give 0.


@pytest.mark.parametrize(
    "variant, foreach",
    [
        ("adamw", True),
        ("adamw", False),
        ("radam", True),
        ("radam", False),
        ("adabound", True),
        ("adabound", False),
    ],
)
def test_float16_zero_gradients_stay_finite(variant, foreach):
    """float16 parameters, some of whose gradients are exactly zero (unused embedding rows),
    with an eps float16 can hold (1e-6): the base optimizer leaves them in place, and so must
    the Active variant (gain fixed at 1). Compared with torch's foreach implementation (its
    single-tensor RAdam overflows here: sqrt(bc2) / (sqrt(v) + eps) is a float16 tensor)."""
    cls, make_base = FP16_BASES[variant]
    gen = torch.Generator().manual_seed(0)
    # Near 0.1 the float16 spacing (6e-5) is well below the steps (about lr = 1e-2).
    p = torch.nn.Parameter(torch.full((8,), 0.1, dtype=torch.float16))
    q = torch.nn.Parameter(torch.full((8,), 0.1, dtype=torch.float16))
    active = cls([p], lr=1e-2, eps=1e-6, lr_high=0.0, lr_low=1.0, period=2, foreach=foreach)
    base = make_base([q], True)
    for _ in range(10):
        g = (torch.randn(8, generator=gen) * 0.3).half()
        g[:2] = 0.0
        p.grad, q.grad = g.clone(), g.clone()
        active.step()
        base.step()
    assert torch.isfinite(q).all()
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-2, atol=1e-3)


# --- d. the wrapper ----------------------------------------------------------------------------


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
def test_wrapper_around_adamw_is_active_adamw(zero_sum):
    groups = [dict(lr=0.01), dict(lr=0.02, weight_decay=0.1, amsgrad=True), dict(lr=0.005)]
    ps = make_params()
    qs = clone_params(ps)
    active = dict(lr_high=2, lr_low=0.5, period=3, zero_sum=zero_sum)
    wrapped = ActiveLR(torch.optim.AdamW(groups_of(ps, groups), weight_decay=0.05), **active)
    builtin = ActiveAdamW(groups_of(qs, groups), weight_decay=0.05, **active)
    steps = 100
    for t, step_grads in enumerate(make_grads(steps, [3, 3, 3], seed=13), start=1):
        set_grads(ps, step_grads)
        set_grads(qs, step_grads)
        wrapped.step()
        builtin.step()
        if t % 10 == 0:
            assert_params_close(ps, qs, f"step {t}", rtol=1e-9, atol=1e-9)
            for p, q in zip(flat(ps), flat(qs)):
                torch.testing.assert_close(
                    decode_gain(wrapped.state[p]["gain"]), decode_gain(builtin.state[q]["gain"]),
                    **EXACT,
                )
    assert gain_count(builtin) > 0


def test_wrapper_matches_reference():
    """The wrapper around torch SGD (momentum, L2 decay) against the plain re-statement."""
    settings = dict(lr=0.01, momentum=0.9, weight_decay=0.01)
    ps = make_params(seed=3)
    reference = Reference(
        "sgd", [{"params": [p.detach() for p in group]} for group in ps],
        **settings, lr_high=0.5, lr_low=0.7, period=2, zero_sum="flip",
    )
    opt = ActiveLR(
        torch.optim.SGD([{"params": g} for g in ps], **settings),
        lr_high=0.5, lr_low=0.7, period=2, zero_sum="flip",
    )
    for t, step_grads in enumerate(make_grads(40, [2, 2, 2], seed=5), start=1):
        set_grads(ps, step_grads)
        opt.step()
        reference.step(step_grads)
    assert_gains_match(opt, ps, reference, **EXACT)
    assert_params_close(ps, reference.params(), **TIGHT)


# --- e. gradients that are None ------------------------------------------------------------------


def _none_pattern(t, i, j):
    """Group 0 param 0: no gradient in steps 3, 4 and in the whole of steps 9-16; group 1:
    none before step 5 (state starts late, mid-period); group 2 param 1: every other step."""
    if (i, j) == (0, 0):
        return t in (3, 4) or 9 <= t <= 16
    if i == 1:
        return t < 5
    if (i, j) == (2, 1):
        return t % 2 == 0
    return False


@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_none_gradients(variant, zero_sum):
    steps = 40
    for foreach in (True, False):
        opt, _ = _run_against_reference(
            variant, period=3, lr_high=2.0, lr_low=0.5, zero_sum=zero_sum, foreach=foreach,
            steps=steps, none=_none_pattern, check_every=1, params_tol=TIGHT,
        )
        # The base state counts only the steps that had a gradient.
        expected_steps = {
            (i, j): sum(not _none_pattern(t, i, j) for t in range(1, steps + 1))
            for i, group in enumerate(SHAPES) for j in range(len(group))
        }
        for i, group in enumerate(opt.param_groups):
            for j, p in enumerate(group["params"]):
                if variant != "sgd":  # SGD keeps no step count
                    assert int(opt.state[p]["step"]) == expected_steps[i, j]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls, settings", [
    (ActiveAdamW, dict(weight_decay=0.05)),
    (ActiveSGD, dict(momentum=0.9, weight_decay=0.01)),
])
def test_gain_init_is_a_learning_rate_multiplier(cls, settings, foreach):
    """``gain_init=c`` at learning rate ``lr`` computes what ``gain_init=1`` computes at
    ``c * lr`` with the bounds divided by ``c`` (the whole update, decay included, scales with
    ``lr * gain``; the rule reads gradients only). So a start below 1 is a change of learning
    rate, not part of the rule: docs/algorithm.md, "The start is a learning-rate multiplier",
    and the protocol's start-scale control. Float64, the default rule (significance test,
    x1.5 / /1.5), 30 boundaries, bounds that bind."""
    torch.manual_seed(0)
    start, lr = 10**-0.5, 0.02
    shapes = [(6, 5), (5,)]
    first = [torch.randn(s, dtype=F64, requires_grad=True) for s in shapes]
    second = [p.detach().clone().requires_grad_(True) for p in first]
    rule = dict(lr_high=0.5, lr_low=1 / 1.5, gain_increase="multiplicative", period=3,
                significance=1.0, foreach=foreach)
    low_start = cls(first, lr=lr, gain_init=start, gain_min=0.1, gain_max=3.0, **rule,
                    **settings)
    from_one = cls(second, lr=lr * start, gain_init=1.0, gain_min=0.1 / start,
                   gain_max=3.0 / start, **rule, **settings)
    bias = [torch.randn(s, dtype=F64) for s in shapes]  # some signs persist
    for _ in range(90):
        noise = [torch.randn(s, dtype=F64) for s in shapes]
        for params in (first, second):
            for p, b, n in zip(params, bias, noise):
                p.grad = b + n + 0.5 * p.detach()
        low_start.step()
        from_one.step()
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the gains, stored relative to gain_init: the same relative gains, step by step
    torch.testing.assert_close(_gains(low_start), _gains(from_one), rtol=1e-12, atol=0.0)
    moved = _gains(from_one)
    assert (moved > 1).any() and (moved < 1).any()
    assert math.isclose(float(moved.max()), 3.0 / start)  # a bound binds
