"""Non-finite gradients: with a GradScaler the step is skipped and the Active state is
untouched; without one, NaN sums are held and inf sums keep their sign."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from reliability_helpers import (
    OPTIMIZERS,
    assert_same_snapshot,
    assert_same_state,
    build,
    state_snapshot,
)
from torch import nn

from hf_activelr.optim.rule import decode_gain


# --- (a) with a GradScaler: the step is skipped, the Active state is untouched -------------


def _amp_batch(step: int, bad: bool = False):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True).tanh()
    if bad:
        x[3, 1] = 1e5  # beyond float16's range: inf under autocast, as in a real overflow
    return x, y


def _amp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _amp_train(name: str, bad_after: int | None, steps: int = 7):
    """``steps`` good steps of an autocast(float16) model under a real GradScaler; with
    ``bad_after``, an overflowing batch comes after that many steps. Returns
    (model, optimizer, scaler, state snapshots around the bad batch)."""
    model = _amp_model()
    opt = build(name, list(model.parameters()), period=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    around = {}
    for step in range(1, steps + 1):
        if bad_after is not None and step == bad_after + 1:
            around["before"] = state_snapshot(opt)
            around["params"] = [p.detach().clone() for p in model.parameters()]
            around["scale"] = scaler.get_scale()
            x, y = _amp_batch(10_000, bad=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            grads = [p.grad for p in model.parameters()]
            around["grads_nonfinite"] = any(not torch.isfinite(g).all() for g in grads)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            around["after"] = state_snapshot(opt)
            around["params_after"] = [p.detach().clone() for p in model.parameters()]
            around["scale_after"] = scaler.get_scale()
        x, y = _amp_batch(step)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        clock = opt.param_groups[0]["active_step"]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert opt.param_groups[0]["active_step"] == clock + 1, "a good step was skipped"
    return model, opt, scaler, around


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_skips_overflow_and_keeps_active_state(name):
    model, opt, _, around = _amp_train(name, bad_after=3)
    assert around["grads_nonfinite"], "the bad batch did not overflow"
    assert around["scale_after"] == around["scale"] / 2  # the scaler saw the inf
    # Skipped: gains, running sums, clocks, base state and parameters are untouched.
    before, after = around["before"], around["after"]
    assert_same_snapshot(after, before)
    assert [g["active_step"] for g in after["param_groups"]] == [3]
    assert all(torch.isfinite(state["grad_sum"]).all() for state in after["state"].values())
    assert any(torch.count_nonzero(state["grad_sum"]) for state in after["state"].values())
    for p, q in zip(around["params"], around["params_after"]):
        assert torch.equal(p, q)
    # ... and the run goes on as if the bad batch had never come.
    ref_model, ref_opt, _, _ = _amp_train(name, bad_after=None)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for key in ("gain", "grad_sum"):
            assert torch.equal(opt.state[p][key], ref_opt.state[q][key]), key
    assert opt.param_groups[0]["active_step"] == ref_opt.param_groups[0]["active_step"] == 7
    stats = opt.gain_stats()[0]
    assert stats["nonfinite"] == 0 and math.isfinite(stats["max"])
    assert stats["grew"] + stats["shrank"] > 0


@pytest.fixture
def single_process_group():
    """A one-rank gloo group (what ShardedGradScaler all-reduces over), torn down after."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["ActiveAdamW-foreach", "ActiveAdamW-single", "ActiveSGD-single",
                                  "ActiveLR(Adam)"])
def test_float16_params_with_grad_scaler_skip_inf_step(name, single_process_group):
    """float16 parameters and gradients: torch.amp.GradScaler refuses to unscale float16
    gradients, so this uses torch's ShardedGradScaler (the FSDP scaler, which accepts them),
    over a one-rank group. A loss spike overflows the scaled float16 gradients to inf."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 4).half()), nn.Parameter(torch.randn(4).half())]
    # eps=1e-8 is below float16's smallest number: Adam's denominator would round to 0 where
    # the second moment underflows (torch.optim.AdamW alike), so a float16-sized eps.
    opt = build(name, params, period=2, eps=1e-4)
    scaler = ShardedGradScaler(device="cpu", init_scale=2.0**8)

    def loss_fn(step, spike=1.0):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(3, 5, generator=gen)
        out = x @ params[0].float() + params[1].float()
        return spike * (out - 1).pow(2).mean()

    for step in range(1, 4):  # mid-period after step 3, with nonzero running sums
        scaler.scale(loss_fn(step)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.param_groups[0]["active_step"] == 3
    for p in params:
        assert p.dtype == torch.float16
        assert opt.state[p]["gain"].dtype == torch.float32
        assert torch.count_nonzero(opt.state[p]["grad_sum"]) > 0
    before = state_snapshot(opt)
    start = [p.detach().clone() for p in params]
    scale = scaler.get_scale()

    scaler.scale(loss_fn(99, spike=1e4)).backward()
    assert any(torch.isinf(p.grad).any() for p in params)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()

    assert scaler.get_scale() < scale
    assert_same_state(opt, before)
    for p, q in zip(params, start):
        assert torch.equal(p, q)
    for step in range(4, 8):  # and it goes on cleanly
        scaler.scale(loss_fn(step)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.param_groups[0]["active_step"] == 7
    for p in params:
        assert torch.isfinite(p).all()
        assert torch.isfinite(opt.state[p]["gain"]).all()
        assert torch.isfinite(opt.state[p]["grad_sum"]).all()


# --- (b) without a scaler: NaN sums are held, inf sums keep their sign ----------------------

NAN_OPTIMIZERS = ["ActiveAdamW-foreach", "ActiveAdamW-single", "ActiveSGD-foreach",
                  "ActiveSGD-single", "ActiveLR(SGD)"]
STEADY = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])


def _nonfinite_run(name, zero_sum, bad, periods=4, period=3):
    """Steady gradients (signs STEADY); ``bad(step, grad)`` may edit the gradient in place.
    Returns the optimizer, the parameter and per-boundary (decoded gain, packed, sums, stats)."""
    p = nn.Parameter(torch.zeros(6))
    opt = build(name, [p], period=period, zero_sum=zero_sum)
    seen = []
    for step in range(1, periods * period + 1):
        grad = STEADY.clone()
        bad(step, grad)
        p.grad = grad
        opt.step()
        if step % period == 0:
            state = opt.state[p]
            seen.append((decode_gain(state["gain"]).clone(), state["gain"].clone(),
                         state["grad_sum"].clone(), opt.gain_stats()[0]))
    return opt, p, seen


def _inject(step, grad):
    """In the third period (steps 7-9): element 0 gets +inf and -inf (NaN sum), element 1 a
    NaN, element 2 +inf (same sign as its sums), element 5 +inf (against its sums)."""
    if step == 7:
        grad[0] = math.inf
        grad[2] = math.inf
    if step == 8:
        grad[0] = -math.inf
        grad[1] = math.nan
        grad[5] = math.inf


@pytest.mark.parametrize("name", NAN_OPTIMIZERS)
def test_nan_and_inf_gradients_hold_policy(name):
    opt, p, seen = _nonfinite_run(name, "hold", _inject)
    (g1, _, _, s1), (g2, _, _, _), (g3, packed3, sums3, s3), (g4, packed4, sums4, s4) = seen
    assert torch.equal(g1, torch.ones(6)) and s1["nonfinite"] == 0
    assert torch.equal(g2, torch.full((6,), 1.5))
    # Third boundary: the two NaN sums are held (gain and sign), the sums restart at 0.
    assert torch.equal(g3, torch.tensor([1.5, 1.5, 2.0, 2.0, 2.0, 0.75]))
    assert torch.equal(torch.sign(packed3), torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0]))
    assert torch.equal(sums3, torch.zeros(6))
    assert s3["nonfinite"] == 4  # two NaN sums and two infinite ones
    assert math.isfinite(s3["max"]) and math.isfinite(s3["mean"])
    # Fourth boundary: everything adapts normally again (element 5 flips back).
    assert torch.equal(g4, torch.tensor([2.0, 2.0, 2.5, 2.5, 2.5, 0.375]))
    assert torch.equal(torch.sign(packed4), torch.sign(STEADY))
    assert torch.equal(sums4, torch.zeros(6))
    assert s4["nonfinite"] == 0
    assert torch.isfinite(opt.state[p]["gain"]).all()


@pytest.mark.parametrize("name", NAN_OPTIMIZERS)
@pytest.mark.parametrize("zero_sum", ["hold", "flip"])
def test_nan_sum_counts_as_zero_sum(name, zero_sum):
    """A NaN period sum adapts the gain exactly as a zero sum would, under either policy."""
    def nan_grad(step, grad):
        if step == 8:
            grad[1] = math.nan

    def zero_period(step, grad):
        if step in (7, 8, 9):
            grad[1] = 0.0

    opt, p, seen = _nonfinite_run(name, zero_sum, nan_grad, periods=5)
    ref, q, ref_seen = _nonfinite_run(name, zero_sum, zero_period, periods=5)
    for (gain, packed, sums, stats), (ref_gain, ref_packed, ref_sums, ref_stats) in zip(
            seen, ref_seen):
        assert torch.equal(gain, ref_gain)
        assert torch.equal(packed, ref_packed)
        assert torch.equal(sums, ref_sums)
        assert torch.isfinite(gain).all()
    assert [s["nonfinite"] for _, _, _, s in seen] == [0, 0, 1, 0, 0]
    assert [s["nonfinite"] for _, _, _, s in ref_seen] == [0, 0, 0, 0, 0]
    if zero_sum == "flip":
        assert torch.equal(opt.state[p]["prev_sign"], ref.state[q]["prev_sign"])
