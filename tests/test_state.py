"""State, checkpoints, param-group settings, gain statistics, schedulers, closures and the
period clock of the Active optimizers."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import hf_activelr.optim.rule
from hf_activelr import (
    ActiveAdaBelief,
    ActiveAdaBound,
    ActiveAdamW,
    ActiveLR,
    ActiveRAdam,
    ActiveSGD,
)
from hf_activelr.optim.rule import decode_gain

VARIANTS = [ActiveSGD, ActiveAdamW, ActiveRAdam, ActiveAdaBelief, ActiveAdaBound]
ALL = VARIANTS + ["ActiveLR"]
ALL_IDS = [c if isinstance(c, str) else c.__name__ for c in ALL]
all_optimizers = pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)


# --- helpers -----------------------------------------------------------------------------


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (3, 2, 2)]
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float32).to(dtype))
            for s in shapes]


def clone_params(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, t):
    """Deterministic gradients for step ``t``: a fixed per-element drift (some gains grow),
    noise (some flip) and a term that depends on the parameter (the trajectory matters)."""
    gen = torch.Generator().manual_seed(1000 + t)
    for p in params:
        drift = torch.linspace(-1.0, 1.0, p.numel(), dtype=torch.float64).reshape(p.shape)
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        grad = drift + 0.8 * noise + 0.3 * torch.sin(3 * p.detach().double() + t)
        p.grad = grad.to(p.dtype)


def gains(opt, params):
    return [decode_gain(opt.state[p]["gain"]) for p in params]


# Each config: (id, factory(params, *, period, zero_sum, foreach)).
def _variant(cls, **kwargs):
    def factory(params, *, period, zero_sum="hold", foreach=True, **extra):
        return cls(params, period=period, zero_sum=zero_sum, foreach=foreach,
                   **{**kwargs, **extra})
    return factory


def _wrapped_adam(params, *, period, zero_sum="hold", foreach=True, **extra):
    active = {"lr_high": 0.5, "lr_low": 0.5, **extra}
    return ActiveLR(torch.optim.Adam(params, lr=1e-2, foreach=foreach),
                    period=period, zero_sum=zero_sum, **active)


CONFIGS = [
    ("ActiveSGD", _variant(ActiveSGD, lr=0.05, momentum=0.9, weight_decay=0.01,
                           lr_high=0.5, lr_low=0.5)),
    ("ActiveSGD-nesterov", _variant(ActiveSGD, lr=0.05, momentum=0.9, nesterov=True,
                                    lr_high=0.5, lr_low=0.5)),
    ("ActiveAdamW", _variant(ActiveAdamW, lr=1e-2, weight_decay=0.1)),
    ("ActiveAdamW-amsgrad", _variant(ActiveAdamW, lr=1e-2, amsgrad=True, lr_high=0.5)),
    ("ActiveRAdam", _variant(ActiveRAdam, lr=1e-2, weight_decay=0.1,
                             decoupled_weight_decay=True, lr_high=0.5, lr_low=0.5)),
    ("ActiveAdaBelief", _variant(ActiveAdaBelief, lr=1e-2, weight_decay=0.1,
                                 lr_high=0.5, lr_low=0.5)),
    ("ActiveAdaBelief-l2-amsgrad", _variant(ActiveAdaBelief, lr=1e-2, weight_decay=0.1,
                                            weight_decouple=False, amsgrad=True,
                                            lr_high=0.5, lr_low=0.5)),
    ("ActiveAdaBound", _variant(ActiveAdaBound, lr=1e-2, final_lr=0.1, weight_decay=1e-3,
                                lr_high=0.5, lr_low=0.5)),
    ("ActiveAMSBound", _variant(ActiveAdaBound, lr=1e-2, amsbound=True,
                                lr_high=0.5, lr_low=0.5)),
    ("ActiveLR(Adam)", _wrapped_adam),
    # The significance test keeps the period's squared gradients too (grad_sq_sum).
    ("ActiveAdamW-significant", _variant(ActiveAdamW, lr=1e-2, lr_high=0.5, lr_low=1 / 1.5,
                                         gain_increase="multiplicative", significance=1.0)),
    ("ActiveSGD-significant", _variant(ActiveSGD, lr=0.05, momentum=0.9, lr_high=0.5,
                                       lr_low=0.5, significance=0.5)),
    ("ActiveLR(Adam)-significant", lambda params, **kw: _wrapped_adam(
        params, significance=1.0, **kw)),
]
configs = pytest.mark.parametrize("factory", [f for _, f in CONFIGS],
                                  ids=[name for name, _ in CONFIGS])


def build(cls, params, **kwargs):
    """Active optimizer with small defaults; ``cls == "ActiveLR"`` wraps torch SGD."""
    kwargs = {"lr_high": 0.25, "lr_low": 0.5, "period": 3, **kwargs}
    if cls == "ActiveLR":
        active = {k: kwargs.pop(k) for k in list(kwargs)
                  if k in ("lr_high", "lr_low", "period", "gain_min", "gain_max", "zero_sum")}
        return ActiveLR(torch.optim.SGD(params, **{"lr": 0.1, **kwargs}), **active)
    return cls(params, **kwargs)


def roundtrip(state_dict, via):
    if via == "dict":
        return state_dict
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only=True by default: the state must be plain data


# --- checkpoint and resume ---------------------------------------------------------------

TOTAL, SAVE_AT, PERIOD = 20, 7, 5


@configs
@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("via", ["dict", "bytes"])
@pytest.mark.parametrize("grad_sum_dtype", [None, "bfloat16"], ids=["sum-fp32", "sum-bf16"])
def test_resume_is_bit_exact(factory, zero_sum, foreach, via, grad_sum_dtype):
    kwargs = dict(period=PERIOD, zero_sum=zero_sum, foreach=foreach)
    start = make_params()

    ref_params = clone_params(start)
    ref = factory(ref_params, **kwargs, grad_sum_dtype=grad_sum_dtype)
    for t in range(1, TOTAL + 1):
        set_grads(ref_params, t)
        ref.step()

    params = clone_params(start)
    opt = factory(params, **kwargs, grad_sum_dtype=grad_sum_dtype)
    for t in range(1, SAVE_AT + 1):  # the save point falls inside a period
        set_grads(params, t)
        opt.step()
    saved = roundtrip(opt.state_dict(), via)
    del opt
    sum_dtype = torch.float32 if grad_sum_dtype is None else torch.bfloat16
    assert {s["grad_sum"].dtype for s in saved["state"].values()} == {sum_dtype}

    params = clone_params(params)
    opt = factory(params, **kwargs)  # the saved groups carry grad_sum_dtype
    opt.load_state_dict(saved)
    assert {g["grad_sum_dtype"] for g in opt.param_groups} == {grad_sum_dtype}
    for t in range(SAVE_AT + 1, TOTAL + 1):
        set_grads(params, t)
        opt.step()

    for p, q in zip(params, ref_params):
        assert opt.state[p]["grad_sum"].dtype == sum_dtype
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["gain"], ref.state[q]["gain"])
        assert torch.equal(opt.state[p]["grad_sum"], ref.state[q]["grad_sum"])
        if zero_sum == "flip":
            assert torch.equal(opt.state[p]["prev_sign"], ref.state[q]["prev_sign"])
    # The run moved the gains both ways, so the check is not vacuous.
    all_gains = torch.cat([g.flatten() for g in gains(ref, ref_params)])
    assert (all_gains > 1).any() and (all_gains < 1).any()
    assert opt.param_groups[0]["active_step"] == TOTAL
    assert opt.gain_stats() == ref.gain_stats()


@configs
@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("via", ["dict", "bytes"])
def test_bf16_state_stays_float32_after_load(factory, zero_sum, via):
    start = make_params(torch.bfloat16)
    kwargs = dict(period=3, zero_sum=zero_sum)

    ref_params = clone_params(start)
    ref = factory(ref_params, **kwargs)
    for t in range(1, 13):
        set_grads(ref_params, t)
        ref.step()

    params = clone_params(start)
    opt = factory(params, **kwargs)
    for t in range(1, 8):
        set_grads(params, t)
        opt.step()
    saved = roundtrip(opt.state_dict(), via)
    params = clone_params(params)
    opt = factory(params, **kwargs)
    opt.load_state_dict(saved)
    state_dict_gains = list(saved["state"].values())
    for p, saved_state in zip(params, state_dict_gains):
        state = opt.state[p]
        assert state["gain"].dtype == torch.float32
        assert state["grad_sum"].dtype == torch.float32
        assert torch.equal(state["gain"], saved_state["gain"])
        assert torch.equal(state["grad_sum"], saved_state["grad_sum"])
        if zero_sum == "flip":
            assert state["prev_sign"].dtype == torch.int8
    for t in range(8, 13):
        set_grads(params, t)
        opt.step()
    for p, q in zip(params, ref_params):
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["gain"].dtype == torch.float32
        assert opt.state[p]["grad_sum"].dtype == torch.float32
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["gain"], ref.state[q]["gain"])


def test_load_does_not_share_gain_tensors_with_the_state_dict():
    params = make_params()
    opt = ActiveAdamW(params, period=2)
    for t in range(1, 4):
        set_grads(params, t)
        opt.step()
    saved = opt.state_dict()
    before = {i: s["gain"].clone() for i, s in saved["state"].items()}
    fresh = ActiveAdamW(clone_params(params), period=2)
    fresh.load_state_dict(saved)
    for t in range(4, 8):
        set_grads(fresh.param_groups[0]["params"], t)
        fresh.step()
    for i, s in saved["state"].items():
        assert torch.equal(s["gain"], before[i])


# --- settings live in the param groups ---------------------------------------------------


@all_optimizers
def test_settings_in_param_groups_and_state_dict(cls):
    params = make_params()
    opt = build(cls, params, lr_high=0.3, lr_low=0.6, period=4)
    for group in opt.param_groups + opt.state_dict()["param_groups"]:
        assert group["lr_high"] == 0.3
        assert group["lr_low"] == 0.6
        assert group["period"] == 4
        assert group["zero_sum"] == "hold"


@all_optimizers
def test_state_holds_gain_tensor(cls):
    params = make_params()
    opt = build(cls, params)
    set_grads(params, 1)
    opt.step()
    for p in params:
        assert isinstance(opt.state[p]["gain"], torch.Tensor)
        assert opt.state[p]["gain"].shape == p.shape
    for state in opt.state_dict()["state"].values():
        assert isinstance(state["gain"], torch.Tensor)
        assert "grad_sum" in state


@all_optimizers
def test_per_group_settings_are_honoured(cls):
    p1 = nn.Parameter(torch.zeros(4))
    p2 = nn.Parameter(torch.zeros(3))
    groups = [{"params": [p1]}, {"params": [p2], "period": 2, "lr_high": 0.5}]
    if cls == "ActiveLR":
        opt = ActiveLR(torch.optim.SGD(groups, lr=0.1), lr_high=0.25, lr_low=0.5, period=5)
    else:
        opt = build(cls, groups, lr_high=0.25, lr_low=0.5, period=5)
    assert [g["period"] for g in opt.state_dict()["param_groups"]] == [5, 2]
    for t in range(1, 13):
        p1.grad = torch.ones(4)
        p2.grad = torch.ones(3)
        opt.step()
        expected1 = 1 + 0.25 * max(0, t // 5 - 1)  # first change at step 10
        expected2 = 1 + 0.5 * max(0, t // 2 - 1)  # first change at step 4, then every 2
        assert torch.equal(decode_gain(opt.state[p1]["gain"]), torch.full((4,), expected1)), t
        assert torch.equal(decode_gain(opt.state[p2]["gain"]), torch.full((3,), expected2)), t
        stats = opt.gain_stats()
        assert [s["step"] for s in stats] == [t, t]
        assert [s["period"] for s in stats] == [5, 2]


# --- loading a plain optimizer's state ---------------------------------------------------


def test_load_plain_adamw_state_dict():
    torch.manual_seed(0)
    plain_params = make_params()
    plain = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1)
    for t in range(1, 6):
        set_grads(plain_params, t)
        plain.step()
    # torch's load_state_dict shares same-dtype tensors with the dict: copy, as the plain
    # optimizer keeps stepping below.
    saved = copy.deepcopy(plain.state_dict())

    params = clone_params(plain_params)
    active = ActiveAdamW(params, lr=1e-2, weight_decay=0.1, lr_high=0.0, lr_low=1.0, period=3)
    active.load_state_dict(saved)
    for p, q in zip(params, plain_params):
        assert torch.equal(active.state[p]["exp_avg"], plain.state[q]["exp_avg"])
        assert torch.equal(active.state[p]["exp_avg_sq"], plain.state[q]["exp_avg_sq"])
    group = active.param_groups[0]
    assert (group["lr_high"], group["lr_low"], group["period"]) == (0.0, 1.0, 3)
    assert group["active_step"] == 0
    stats = active.gain_stats()[0]
    assert stats["min"] == stats["max"] == 1.0 and stats["step"] == 0

    for t in range(6, 13):
        set_grads(params, t)
        active.step()
        set_grads(plain_params, t)
        plain.step()
        for p, q in zip(params, plain_params):
            assert torch.equal(decode_gain(active.state[p]["gain"]), torch.ones_like(p))
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert float(active.state[params[0]]["step"]) == 12


def test_load_plain_adamw_state_dict_then_gains_move():
    plain_params = make_params()
    plain = torch.optim.AdamW(plain_params, lr=1e-2)
    for t in range(1, 4):
        set_grads(plain_params, t)
        plain.step()
    params = clone_params(plain_params)
    active = ActiveAdamW(params, lr=1e-2, period=2)
    active.load_state_dict(copy.deepcopy(plain.state_dict()))
    for t in range(4, 4 + 4):
        set_grads(params, t)
        active.step()
    stats = active.gain_stats()[0]
    assert stats["step"] == 4
    assert stats["grew"] + stats["shrank"] > 0  # boundary at active step 4 changed gains


# --- gain_stats --------------------------------------------------------------------------

STATS_KEYS = {"nonfinite", "min", "median", "mean", "max", "grew", "shrank", "elements", "step", "period"}


def _direct_summary(before, after):
    flat = torch.cat([g.flatten() for g in after]).float()
    old = torch.cat([g.flatten() for g in before]).float()
    n = flat.numel()
    return {
        "min": flat.min().item(), "median": flat.median().item(),
        "mean": flat.double().mean().item(), "max": flat.max().item(),
        "grew": (flat > old).sum().item() / n, "shrank": (flat < old).sum().item() / n,
        "elements": n,
    }


@all_optimizers
def test_gain_stats_values(cls):
    params = make_params()
    groups = [{"params": params[:2]}, {"params": params[2:], "period": 2}]
    opt = build(cls, groups, lr_high=0.25, lr_low=0.5, period=3)
    stats = opt.gain_stats()
    assert len(stats) == 2
    for s in stats:
        assert set(s) == STATS_KEYS
        assert s["min"] == s["median"] == s["mean"] == s["max"] == 1.0
        assert s["grew"] == s["shrank"] == 0
        assert s["step"] == 0
    assert [s["period"] for s in stats] == [3, 2]

    for t in range(1, 19):
        before = [gains(opt, g["params"]) if t > 1 else [torch.ones_like(p) for p in g["params"]]
                  for g in opt.param_groups]
        set_grads(params, t)
        opt.step()
        stats = opt.gain_stats()
        for group, s, old in zip(opt.param_groups, stats, before):
            assert set(s) == STATS_KEYS
            assert s["step"] == t
            period = group["period"]
            if t < 2 * period:
                assert s["min"] == s["max"] == 1.0
                assert s["grew"] == s["shrank"] == 0
            if t % period == 0:
                direct = _direct_summary(old, gains(opt, group["params"]))
                for key, value in direct.items():
                    # the median from the histogram: its bin's middle (stats.HIST_BINS)
                    rel = 2**-8 if key == "median" else 1e-12
                    assert s[key] == pytest.approx(value, rel=rel, abs=0), (t, key)
                if t >= 2 * period:
                    assert s["grew"] + s["shrank"] > 0
    final = opt.gain_stats()
    assert any(s["max"] > 1 for s in final) and any(s["min"] < 1 for s in final)


@all_optimizers
def test_gain_stats_is_cached_between_boundaries(cls, monkeypatch):
    calls = []
    original = hf_activelr.optim.stats.gain_summary

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_activelr.optim.stats, "gain_summary", counting)
    params = make_params()
    opt = build(cls, params, period=3)
    for t in range(1, 4):  # up to the first boundary
        set_grads(params, t)
        opt.step()
    first = opt.gain_stats()
    n = len(calls)
    assert n >= 1
    assert opt.gain_stats() == first
    assert len(calls) == n  # cached: no recomputation
    for t in range(4, 6):  # no boundary
        set_grads(params, t)
        opt.step()
        again = opt.gain_stats()
        assert len(calls) == n
        assert again[0]["step"] == t
        assert {k: v for k, v in again[0].items() if k != "step"} == {
            k: v for k, v in first[0].items() if k != "step"}
    set_grads(params, 6)
    opt.step()  # boundary: gains change, figures are recomputed
    after = opt.gain_stats()
    assert len(calls) > n
    assert after[0]["grew"] + after[0]["shrank"] > 0


@all_optimizers
def test_gain_stats_after_load_state_dict(cls):
    params = make_params()
    opt = build(cls, params, period=2)
    for t in range(1, 7):
        set_grads(params, t)
        opt.step()
    expected = opt.gain_stats()
    fresh = build(cls, clone_params(params), period=2)
    fresh.gain_stats()  # fill the cache before loading
    fresh.load_state_dict(opt.state_dict())
    assert fresh.gain_stats() == expected


@all_optimizers
def test_gain_stats_covers_an_added_group(cls):
    params = make_params()
    opt = build(cls, params[:2])
    opt.gain_stats()
    opt.add_param_group({"params": params[2:], "period": 4})
    stats = opt.gain_stats()
    assert len(stats) == len(opt.param_groups) == 2
    assert stats[1]["period"] == 4


@all_optimizers
def test_gain_stats_elements_counted_once_gains_exist(cls):
    params = make_params()
    opt = build(cls, params, period=5)
    opt.gain_stats()  # before the first step: no gains yet
    set_grads(params, 1)
    opt.step()
    assert opt.gain_stats()[0]["elements"] == sum(p.numel() for p in params)


# --- LR schedulers -------------------------------------------------------------------------

try:
    import adabelief_pytorch
except ImportError:  # pragma: no cover - a dev dependency
    adabelief_pytorch = None
try:
    import adabound
except ImportError:  # pragma: no cover - a dev dependency
    adabound = None

NEUTRAL = dict(lr_high=0.0, lr_low=1.0, period=5)
SCHEDULED = [
    ("SGD-nesterov",
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
     lambda ps, fe: ActiveSGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                              foreach=fe, **NEUTRAL)),
    ("SGD-dampening",
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.1),
     lambda ps, fe: ActiveSGD(ps, lr=0.05, momentum=0.9, dampening=0.1, foreach=fe,
                              **NEUTRAL)),
    ("AdamW",
     lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
     lambda ps, fe: ActiveAdamW(ps, lr=1e-2, weight_decay=0.1, foreach=fe, **NEUTRAL)),
    ("AdamW-amsgrad",
     lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
     lambda ps, fe: ActiveAdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=fe,
                                **NEUTRAL)),
    ("RAdam",
     lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1),
     lambda ps, fe: ActiveRAdam(ps, lr=1e-2, weight_decay=0.1, foreach=fe, **NEUTRAL)),
    ("RAdam-decoupled",
     lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
     lambda ps, fe: ActiveRAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                                foreach=fe, **NEUTRAL)),
    ("AdaBelief",
     lambda ps: adabelief_pytorch.AdaBelief(ps, lr=1e-2, weight_decay=0.1,
                                            print_change_log=False),
     lambda ps, fe: ActiveAdaBelief(ps, lr=1e-2, weight_decay=0.1, foreach=fe, **NEUTRAL)),
    ("AdaBound",
     lambda ps: adabound.AdaBound(ps, lr=1e-2, final_lr=0.1, weight_decay=1e-3),
     lambda ps, fe: ActiveAdaBound(ps, lr=1e-2, final_lr=0.1, weight_decay=1e-3, foreach=fe,
                                   **NEUTRAL)),
]


def _lambda_lr(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.2 * t))


def _one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=50)


def _needs(name):
    missing = {"AdaBelief": adabelief_pytorch is None, "AdaBound": adabound is None}
    return pytest.mark.skipif(missing.get(name, False), reason=f"reference {name} not installed")


@pytest.mark.parametrize("make_base,make_active", [
    pytest.param(b, a, id=name, marks=_needs(name)) for name, b, a in SCHEDULED
])
@pytest.mark.parametrize("make_scheduler", [_lambda_lr, _one_cycle],
                         ids=["LambdaLR", "OneCycleLR"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_scheduler_drives_active_like_base(make_base, make_active, make_scheduler, foreach):
    start = make_params(torch.float64)
    base_params, active_params = clone_params(start), clone_params(start)
    base, active = make_base(base_params), make_active(active_params, foreach)
    base_sched, active_sched = make_scheduler(base), make_scheduler(active)
    for t in range(1, 51):
        set_grads(base_params, t)
        set_grads(active_params, t)
        base.step()
        active.step()
        base_sched.step()
        active_sched.step()
        assert active.param_groups[0]["lr"] == base.param_groups[0]["lr"]
    assert active.param_groups[0]["active_step"] == 50
    for p, q in zip(active_params, base_params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert all(not torch.equal(p, s) for p, s in zip(active_params, start))


def test_activelr_sgd_follows_lambda_lr():
    start = make_params(torch.float64)
    base_params, active_params = clone_params(start), clone_params(start)
    base = torch.optim.SGD(base_params, lr=0.1, momentum=0.9)
    active = ActiveLR(torch.optim.SGD(active_params, lr=0.1, momentum=0.9), **NEUTRAL)

    def lam(t):
        return 0.5 ** (t // 10)

    base_sched = torch.optim.lr_scheduler.LambdaLR(base, lam)
    active_sched = torch.optim.lr_scheduler.LambdaLR(active, lam)
    for t in range(1, 51):
        set_grads(base_params, t)
        set_grads(active_params, t)
        base.step()
        active.step()
        base_sched.step()
        active_sched.step()
        assert active.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lam(t), rel=1e-15)
        assert active.param_groups[0]["lr"] == active.optimizer.param_groups[0]["lr"]
        assert active_sched.get_last_lr() == base_sched.get_last_lr()
    for p, q in zip(active_params, base_params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_activelr_lr_follows_scheduler_with_moving_gains():
    params = make_params()
    active = ActiveLR(torch.optim.SGD(params, lr=0.1), lr_high=0.5, lr_low=0.5, period=2)
    sched = torch.optim.lr_scheduler.LambdaLR(active, lambda t: 1.0 / (1 + t))
    for t in range(1, 11):
        set_grads(params, t)
        active.step()
        sched.step()
        assert active.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / (1 + t))
    assert active.gain_stats()[0]["grew"] + active.gain_stats()[0]["shrank"] > 0


# --- closures -------------------------------------------------------------------------------


@all_optimizers
def test_step_with_closure_returns_loss(cls):
    params = make_params()
    opt = build(cls, params)
    targets = [torch.ones_like(p) for p in params]
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = sum(((p - q) ** 2).sum() for p, q in zip(params, targets))
        loss.backward()
        return loss

    with torch.no_grad():  # step enables grad for the closure itself
        before = [p.detach().clone() for p in params]
        expected = sum(((p - q) ** 2).sum() for p, q in zip(params, targets))
        loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(loss.detach(), expected)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    set_grads(params, 2)
    assert opt.step() is None


# --- the period clock -------------------------------------------------------------------------


def _expected_gains(t, period, zero_sum, lr_high, lr_low):
    """Gains of three elements: gradient always +1, always 0, sign alternating per period."""
    changes = max(0, t // period - 1)  # boundaries at 2p, 3p, ... change gains
    steady = 1 + lr_high * changes
    zero = 1.0 if zero_sum == "hold" else lr_low**changes
    alternating = lr_low**changes
    return torch.tensor([steady, zero, alternating])


@all_optimizers
@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
@pytest.mark.parametrize("period", [1, 3])
def test_gain_changes_only_at_boundaries_from_two_periods(cls, zero_sum, period):
    lr_high, lr_low = 0.25, 0.5
    p = nn.Parameter(torch.zeros(3))
    opt = build(cls, [p], lr_high=lr_high, lr_low=lr_low, period=period, zero_sum=zero_sum)
    for t in range(1, 6 * period + 1):
        sign = 1.0 if ((t - 1) // period) % 2 == 0 else -1.0
        p.grad = torch.tensor([1.0, 0.0, sign])
        opt.step()
        got = decode_gain(opt.state[p]["gain"])
        expected = _expected_gains(t, period, zero_sum, lr_high, lr_low)
        assert torch.equal(got, expected), (t, got, expected)
        if t < 2 * period:
            assert torch.equal(got, torch.ones(3))


@pytest.mark.parametrize("cls", VARIANTS, ids=[c.__name__ for c in VARIANTS])
def test_period_clock_is_the_groups(cls):
    """A parameter without a gradient at the boundary step still gets its gain updated."""
    p1, p2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = build(cls, [p1, p2], lr_high=0.25, lr_low=0.5, period=2)
    for t in range(1, 5):
        p1.grad = torch.ones(2)
        p2.grad = torch.ones(2) if t % 2 == 1 else None  # never a grad at a boundary
        opt.step()
    assert torch.equal(decode_gain(opt.state[p1]["gain"]), torch.full((2,), 1.25))
    assert torch.equal(decode_gain(opt.state[p2]["gain"]), torch.full((2,), 1.25))


@all_optimizers
def test_flip_halves_zero_sum_each_period(cls):
    p = nn.Parameter(torch.zeros(1))
    opt = build(cls, [p], lr_high=0.25, lr_low=0.5, period=2, zero_sum="flip")
    seen = []
    for t in range(1, 11):
        p.grad = torch.zeros(1)
        opt.step()
        seen.append(decode_gain(opt.state[p]["gain"]).item())
    assert seen == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125, 0.0625]


def test_state_saved_before_gain_increase_and_gain_init_resumes_with_its_rule():
    """Groups saved before ``gain_increase`` / ``gain_init`` existed ran the paper's additive
    rule from gain 1: loading them into a two-sided optimizer keeps that rule, not the preset's."""
    params = make_params()
    original = ActiveAdamW(params, lr=0.01, period=2)
    for t in range(1, 8):
        set_grads(params, t)
        original.step()
    saved = copy.deepcopy(original.state_dict())
    for group in saved["param_groups"]:
        del group["gain_increase"], group["gain_init"]
    resumed_params = clone_params(params)
    resumed = ActiveAdamW(resumed_params, lr=0.01,
                          **hf_activelr.preset_kwargs("two_sided"))
    resumed.load_state_dict(saved)
    assert all((g["gain_increase"], g["gain_init"]) == ("additive", 1.0)
               for g in resumed.param_groups)
    for t in range(8, 16):
        set_grads(params, t)
        set_grads(resumed_params, t)
        original.step()
        resumed.step()
    for p, q in zip(params, resumed_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for a, b in zip(gains(original, params), gains(resumed, resumed_params)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_saved_before_grad_sum_dtype_keeps_float32_sums():
    params = make_params()
    original = ActiveAdamW(params, lr=0.01, period=3)
    for t in range(1, 5):
        set_grads(params, t)
        original.step()
    saved = copy.deepcopy(original.state_dict())
    for group in saved["param_groups"]:
        del group["grad_sum_dtype"]
    resumed_params = clone_params(params)
    resumed = ActiveAdamW(resumed_params, lr=0.01, period=3, grad_sum_dtype="bfloat16")
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["grad_sum_dtype"] is None
    for p, q in zip(params, resumed_params):
        assert torch.equal(resumed.state[q]["grad_sum"], original.state[p]["grad_sum"])


def test_sums_follow_the_groups_storage_on_load():
    """A state whose sums are stored otherwise than its group says (a group edited by hand)
    converts on load: float32 -> bfloat16 keeps every sign, bfloat16 -> float32 is exact."""
    params = make_params()
    original = ActiveAdamW(params, lr=0.01, period=100)
    for t in range(1, 5):
        set_grads(params, t)
        original.step()
    saved = copy.deepcopy(original.state_dict())
    for group in saved["param_groups"]:
        group["grad_sum_dtype"] = "bfloat16"
    resumed_params = clone_params(params)
    resumed = ActiveAdamW(resumed_params, lr=0.01, period=100)
    resumed.load_state_dict(saved)
    for p, q in zip(params, resumed_params):
        fp32_sum, bf16_sum = original.state[p]["grad_sum"], resumed.state[q]["grad_sum"]
        assert bf16_sum.dtype == torch.bfloat16
        assert torch.equal(torch.sign(bf16_sum.float()), torch.sign(fp32_sum))
        torch.testing.assert_close(bf16_sum.float(), fp32_sum, rtol=2**-8, atol=0)


def test_gain_multipliers_follow_every_change_of_the_gains():
    """The eager paths' shortcut (no multiply while every gain reads 1; abs once all are set)
    notices boundaries, loads and in-place edits through the tensor's version counter."""
    multipliers = hf_activelr.optim.rule.GainMultipliers()
    gain = torch.zeros(4)
    assert multipliers([gain]) == [None] and multipliers.reads_one(gain)
    gain[1] = -0.5  # one set, three unset: the full decoding
    torch.testing.assert_close(multipliers([gain])[0], torch.tensor([1.0, 0.5, 1.0, 1.0]))
    gain.copy_(torch.tensor([2.0, -0.5, 0.25, -1.0]))  # all set: magnitudes
    torch.testing.assert_close(multipliers([gain])[0], torch.tensor([2.0, 0.5, 0.25, 1.0]))
    assert not multipliers.reads_one(gain)
    gain.view(-1).zero_()  # through a view: the version counter is shared
    assert multipliers([gain]) == [None]


@pytest.mark.parametrize("cls", ALL, ids=ALL_IDS)
def test_foreach_path_equals_single_tensor_path_across_gain_kinds(cls):
    """First period (no gain set), mixed (zero sums keep some unset), then all set."""
    runs = []
    for foreach in (True, False):
        params = make_params(torch.float64)
        opt = build(cls, params, period=3, foreach=foreach, lr_high=0.5, lr_low=0.5)
        for t in range(1, 13):
            set_grads(params, t)
            if t <= 6:
                params[0].grad[0] = 0.0  # this row's sums are zero: its gains stay unset
            opt.step()
        runs.append((params, opt))
    (ps, a), (qs, b) = runs
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gains(a, [p])[0], gains(b, [q])[0], rtol=0, atol=0)


# --- every saved state tensor keeps the dtype its variant keeps ---------------------------

DTYPE_CONFIGS = [(name, f) for name, f in CONFIGS if "significant" not in name]


@pytest.mark.parametrize("factory", [f for _, f in DTYPE_CONFIGS],
                         ids=[name for name, _ in DTYPE_CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("via", ["dict", "bytes"])
def test_load_keeps_every_state_tensors_dtype(factory, dtype, via):
    """torch casts a loaded state's floating tensors to the parameter's dtype; a variant that
    keeps float32 moments for float16 parameters (ActiveAdaBelief) got them back as float16,
    and its next step wrote inf. Every tensor keeps the dtype and value it was saved with."""
    params = make_params(dtype)
    opt = factory(params, period=3)
    for t in range(4):
        set_grads(params, t)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    twin_params = clone_params(params)
    twin = factory(twin_params, period=3)
    twin.load_state_dict(roundtrip(copy.deepcopy(saved), via))
    for index, state in saved["state"].items():
        loaded = twin.state_dict()["state"][index]
        for key, value in state.items():
            if torch.is_tensor(value):
                assert loaded[key].dtype == value.dtype, (index, key)
                assert torch.equal(loaded[key], value), (index, key)
    for t in range(4, 8):
        set_grads(params, t)
        set_grads(twin_params, t)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.isfinite(q).all()
        assert torch.equal(p, q)


# --- copies and pickles ------------------------------------------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("factory", [f for n, f in CONFIGS if n in (
    "ActiveAdamW", "ActiveLR(Adam)", "ActiveLR(Adam)-significant")],
    ids=["ActiveAdamW", "ActiveLR(Adam)", "ActiveLR(Adam)-significant"])
def test_optimizer_can_be_deep_copied_and_pickled(factory, how):
    """``copy.deepcopy`` and pickle give an independent optimizer over copied parameters (as
    for torch's own optimizers) that trains on exactly like the original."""
    import pickle

    params = make_params()
    opt = factory(params, period=3)
    for t in range(4):
        set_grads(params, t)
        opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    assert all(p is not q for p, q in zip(params, twin_params))
    if isinstance(twin, ActiveLR):
        assert twin.param_groups is twin.optimizer.param_groups
    for t in range(4, 10):
        set_grads(params, t)
        set_grads(twin_params, t)
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["gain"], twin.state[q]["gain"])
