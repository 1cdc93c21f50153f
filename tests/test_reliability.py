"""Reliability: non-finite gradients (with and without a GradScaler), the gain range over very
long runs, a training process killed and resumed from its checkpoint, wrong or damaged
optimizer state, property-based checks of the gains against a plain loop, and the
cross-rank consistency check with two real processes.

Runs on CPU in about two minutes (2 cores); the subprocess tests start Python with
transformers a few times.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from hf_activelr import (
    ActiveAdaBelief,
    ActiveAdamW,
    ActiveLR,
    ActiveSGD,
    check_consistent,
    consistency_report,
)
from hf_activelr.optim.rule import decode_gain, end_period, init_state

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "scripts"
REPO = TESTS.parent
TINY32 = torch.finfo(torch.float32).tiny
TINY64 = torch.finfo(torch.float64).tiny


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


# === 1. non-finite gradients ================================================================

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


# === 2. the gain range over very long runs (the rule directly) =============================

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
            "significance": None}


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


# === 3. a training process killed and resumed =================================================


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", WANDB_DISABLED="true",
        PYTHONWARNINGS="ignore",
    )
    env.pop("ACCELERATE_DYNAMO_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _train_command(output_dir, *extra):
    return [
        sys.executable, "-m", "hf_activelr.run", str(SCRIPTS / "reliability_train.py"),
        "--output_dir", str(output_dir), "--optim", "active_adamw",
        "--optim_args", "fused=false,period=3,significance=1", "--save_steps", "4", "--max_steps", "12",
        "--seed", "0", "--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", *extra,
    ]


def _start(command, log: Path, cwd: Path, **env):
    handle = open(log, "w")  # noqa: SIM115 - closed by _finish, after the process ends
    return subprocess.Popen(command, cwd=str(cwd), env=_env(**env), stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True), handle


def _finish(proc, handle, log: Path, timeout=240):
    try:
        proc.wait(timeout=timeout)
    finally:
        handle.close()
    if proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{log.read_text()[-6000:]}")


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    full_dump, resumed_dump, ready = (tmp_path / "full.pt", tmp_path / "resumed.pt",
                                      tmp_path / "ready")
    crash_dir = tmp_path / "crash"
    # The uninterrupted run and the run to be killed, side by side.
    full, full_log = _start(_train_command(tmp_path / "full"), tmp_path / "full.log", tmp_path,
                            RELIABILITY_DUMP=str(full_dump))
    victim, victim_log = _start(
        _train_command(crash_dir), tmp_path / "crash.log", tmp_path,
        RELIABILITY_DUMP=str(tmp_path / "never.pt"), RELIABILITY_HANG_AT="9",
        RELIABILITY_READY=str(ready))
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            if victim.poll() is not None:
                raise AssertionError("the run to be killed ended early:\n"
                                     + (tmp_path / "crash.log").read_text()[-6000:])
            assert time.monotonic() < deadline, "the run never reached step 9"
            time.sleep(0.2)
        # Step 9 (a period boundary) ran in memory only; checkpoint-8 is on disk.
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        victim_log.close()
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "never.pt").exists()
    last = get_last_checkpoint(str(crash_dir))
    assert last is not None and Path(last).name == "checkpoint-8"
    assert not (crash_dir / "checkpoint-12").exists()
    saved = torch.load(Path(last) / "optimizer.pt", weights_only=True)
    assert all(g["active_step"] == 8 for g in saved["param_groups"])  # mid-period (period 3)
    assert any(torch.count_nonzero(s["grad_sum"]) for s in saved["state"].values())

    resumed, resumed_log = _start(_train_command(crash_dir, "--resume_from_checkpoint", last),
                                  tmp_path / "resumed.log", tmp_path,
                                  RELIABILITY_DUMP=str(resumed_dump))
    _finish(full, full_log, tmp_path / "full.log")
    _finish(resumed, resumed_log, tmp_path / "resumed.log")

    expected = torch.load(full_dump, weights_only=True)
    got = torch.load(resumed_dump, weights_only=True)
    assert got["global_step"] == expected["global_step"] == 12
    assert got["active_step"] == expected["active_step"] == [12, 12]
    assert got["optimizer_class"] == "ActiveAdamW" and got["period"] == [3, 3]
    assert set(got["params"]) == set(expected["params"])
    for name, value in expected["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=0, msg=name)
    assert set(got["state"]) == set(expected["state"])
    for name, state in expected["state"].items():
        assert set(got["state"][name]) == set(state), name
        for key, value in state.items():
            torch.testing.assert_close(got["state"][name][key], value, rtol=0, atol=0,
                                       msg=f"{name}.{key}")
    gains = torch.cat([decode_gain(s["gain"]).flatten() for s in expected["state"].values()])
    assert (gains > 1).any() and (gains < 1).any()  # the gains moved: the check is not vacuous


# === 4. wrong or damaged optimizer state =====================================================


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


@pytest.mark.parametrize("source,target,pattern", [
    (lambda ps: ActiveSGD(ps, lr=0.1, momentum=0.9, lr_high=0.5, lr_low=0.5, period=2),
     "ActiveAdamW", r"momentum_buffer.*another optimizer"),
    (lambda ps: ActiveAdaBelief(ps, lr=1e-2, period=2), "ActiveAdamW",
     r"exp_avg_var.*another optimizer"),
    (lambda ps: ActiveAdaBelief(ps, lr=1e-2, amsgrad=True, period=2), "ActiveAdamW",
     r"exp_avg_var.*another optimizer"),
    (ADAMW, "ActiveSGD", r"exp_avg.*another optimizer"),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2), "ActiveSGD", r"exp_avg.*another optimizer"),
], ids=["ActiveSGD->ActiveAdamW", "ActiveAdaBelief->ActiveAdamW",
        "ActiveAdaBelief-amsgrad->ActiveAdamW", "ActiveAdamW->ActiveSGD", "AdamW->ActiveSGD"])
def test_state_of_another_variant_is_refused(source, target, pattern):
    other, _ = _trained(source)
    _refused_then_untouched(TARGETS[target], other.state_dict(), ValueError, pattern)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("shapes,pattern", [
    (((5, 6), (5,), (3, 2, 2)), r"shape \(5, 6\).*\(6, 5\).*another model"),
    (((6, 5), (5,), (12,)), r"shape \(12,\).*\(3, 2, 2\).*another model"),
    (((6, 5), (5,)), r"param groups of sizes \[2\].*another model"),
    (((6, 5), (5,), (3, 2, 2), (1,)), r"param groups of sizes \[4\].*another model"),
], ids=["transposed", "flattened", "fewer-params", "more-params"])
def test_state_of_another_model_is_refused(target, shapes, pattern):
    other, _ = _trained(TARGETS[target], shapes=shapes)
    _refused_then_untouched(TARGETS[target], other.state_dict(), ValueError, pattern)


def _good_state():
    opt, _ = _trained(ADAMW)
    return opt.state_dict()


def _garbage_cases():
    good = _good_state()
    groups = good["param_groups"]
    first = good["state"][0]
    return [
        ("None", None, r"not an optimizer state dict.*NoneType"),
        ("list", [good["state"], groups], r"not an optimizer state dict.*list"),
        ("tensor", torch.zeros(3), r"not an optimizer state dict.*Tensor"),
        ("empty", {}, r"not an optimizer state dict"),
        ("no-param-groups", {"state": good["state"]}, r"not an optimizer state dict.*'state'"),
        ("model-state-dict", {"weight": torch.zeros(2)}, r"not an optimizer state dict.*weight"),
        ("state-is-list", {"state": [], "param_groups": groups}, r"state_dict\['state'\]"),
        ("state-entries-not-dicts", {"state": {0: 1.0}, "param_groups": groups},
         r"state_dict\['state'\]"),
        ("groups-is-str", {"state": {}, "param_groups": "groups"},
         r"state_dict\['param_groups'\]"),
        ("group-without-params", {"state": {}, "param_groups": [{"lr": 1e-2}]},
         r"state_dict\['param_groups'\].*'params'"),
        ("two-groups", {"state": {}, "param_groups": groups * 2}, r"2 param groups"),
        ("gain-not-a-tensor", {"state": {0: {**first, "gain": [1.0] * 30}},
                               "param_groups": groups}, r"state\['gain'\].*list"),
        ("gain-0d", {"state": {0: {**first, "gain": torch.tensor(1.0)}}, "param_groups": groups},
         r"state\['gain'\].*shape \(\).*\(6, 5\)"),
        ("gain-int", {"state": {0: {**first, "gain": first["gain"].long()}},
                      "param_groups": groups}, r"state\['gain'\].*int64"),
        ("grad_sum-wrong-shape", {"state": {0: {**first, "grad_sum": torch.zeros(5)}},
                                  "param_groups": groups}, r"grad_sum.*\(5,\).*\(6, 5\)"),
        ("exp_avg-wrong-shape", {"state": {0: {**first, "exp_avg": torch.zeros(30)}},
                                 "param_groups": groups}, r"exp_avg.*\(30,\).*\(6, 5\)"),
        ("foreign-key", {"state": {0: {**first, "momentum_buffer": torch.zeros(6, 5)}},
                         "param_groups": groups}, r"momentum_buffer"),
    ]


GARBAGE = _garbage_cases()


@pytest.mark.parametrize("bad,pattern", [(b, p) for _, b, p in GARBAGE],
                         ids=[name for name, _, _ in GARBAGE])
def test_garbage_state_dict_raises_value_error_and_keeps_state(bad, pattern):
    _refused_then_untouched(ADAMW, bad, ValueError, pattern)


@pytest.mark.parametrize("bad,pattern", [(b, p) for n, b, p in GARBAGE if "exp_avg" not in n
                                         and "foreign" not in n],
                         ids=[n for n, _, _ in GARBAGE if "exp_avg" not in n
                              and "foreign" not in n])
def test_garbage_state_dict_refused_by_the_wrapper(bad, pattern):
    wrapper = TARGETS["ActiveLR(Adam)"]
    _refused_then_untouched(wrapper, bad, ValueError, pattern.replace("ActiveAdamW", ""))


@pytest.mark.parametrize("cut", ["empty", "10-bytes", "half", "all-but-one-byte"])
def test_truncated_optimizer_file_fails_to_load(tmp_path, cut):
    """A checkpoint's optimizer.pt cut short (a crash while saving): torch.load raises, so no
    half state can reach load_state_dict; the complete file loads."""
    opt, _ = _trained(ADAMW)
    path = tmp_path / "optimizer.pt"
    torch.save(opt.state_dict(), path)
    data = path.read_bytes()
    keep = {"empty": 0, "10-bytes": 10, "half": len(data) // 2,
            "all-but-one-byte": len(data) - 1}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises((RuntimeError, EOFError, OSError, ValueError)):  # zip reader, unpickler
        torch.load(path, weights_only=True)
    path.write_bytes(data)
    fresh, _ = _trained(ADAMW, steps=2)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.param_groups[0]["active_step"] == 5
    assert_same_state(fresh, opt.state_dict())


def test_file_holding_something_else_is_refused(tmp_path):
    """A loadable file that is not an optimizer state (a model's state dict, a tensor)."""
    model_file, tensor_file = tmp_path / "model.pt", tmp_path / "tensor.pt"
    torch.save(nn.Linear(3, 2).state_dict(), model_file)
    torch.save(torch.zeros(3), tensor_file)
    for path, pattern in ((model_file, r"not an optimizer state dict.*bias.*weight"),
                          (tensor_file, r"not an optimizer state dict.*Tensor")):
        _refused_then_untouched(ADAMW, torch.load(path, weights_only=True), ValueError, pattern)


def test_plain_adamw_state_into_flip_policy_with_two_groups():
    """A plain torch AdamW state (no gains, no signs) into ActiveAdamW(zero_sum="flip") with
    per-group periods: every group's clock restarts, gains start at 1 and only the second
    boundary after the load changes them (the plain state carries no previous sign)."""
    params = _params()
    plain = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    for step in range(1, 4):
        _set_grads(params, step)
        plain.step()
    saved = copy.deepcopy(plain.state_dict())
    fresh = [nn.Parameter(p.detach().clone()) for p in params]
    active = ActiveAdamW([{"params": fresh[:2]}, {"params": fresh[2:], "period": 3}], lr=1e-2,
                         period=2, zero_sum="flip", lr_high=0.5, lr_low=0.5)
    active.load_state_dict(saved)
    assert [g["period"] for g in active.param_groups] == [2, 3]
    assert [g["active_step"] for g in active.param_groups] == [0, 0]
    assert [g["zero_sum"] for g in active.param_groups] == ["flip", "flip"]
    for step in range(4, 4 + 12):
        _set_grads(fresh, step)
        active.step()
        t = step - 3
        for group in active.param_groups:
            for p in group["params"]:
                gain = decode_gain(active.state[p]["gain"])
                assert active.state[p]["prev_sign"].dtype == torch.int8
                if t < 2 * group["period"]:
                    assert torch.equal(gain, torch.ones_like(p)), (t, group["period"])
    for group in active.param_groups:
        gains = torch.cat([decode_gain(active.state[p]["gain"]).flatten()
                           for p in group["params"]])
        assert (gains != 1).any()
        assert torch.isfinite(gains).all()
    assert float(active.state[fresh[0]]["step"]) == 15


# === 5. property-based: valid input never raises, gains match a plain loop ===================

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
            "lr_low": draw(st.floats(0.0, 1.0, exclude_min=True)),
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
_bad_lr_high = st.one_of(_negative, st.just(math.nan), st.just(math.inf))
_bad_lr_low = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                        st.just(math.nan))
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


# === 6. the cross-rank consistency check, two processes =====================================


def test_consistency_single_process_is_trivially_consistent():
    params = _params()
    opt = ADAMW(params)
    _set_grads(params, 1)
    opt.step()
    report = check_consistent(opt)
    assert report["consistent"] and report["world_size"] == 1
    assert report["groups"][0][0][0] == 1.0  # the group clock
    with pytest.raises(TypeError, match="no ActiveLR state"):
        consistency_report(torch.optim.SGD(params, lr=0.1))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "reliability_dist.py"), str(out)], cwd=str(out),
        env=_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert "worker_error" not in rank, rank["worker_error"]
    return ranks


@pytest.mark.parametrize("scenario", ["same", "wrapper_same"])
def test_two_ranks_same_gradients_are_consistent(two_rank_results, scenario):
    for rank in two_rank_results:
        report = rank[scenario]["report"]
        assert report["raised"] is None
        assert report["report"]["consistent"] is True
        assert report["report"]["world_size"] == 2
        (group,) = report["report"]["groups"]
        assert group[0] == group[1]
        assert group[0][0] == 5.0  # clock: five steps
        assert group[0][4] > 0  # mid-period: running sums are part of the comparison
        assert rank[scenario]["check"]["raised"] is None


@pytest.mark.parametrize("scenario,bad_groups", [
    ("extra_step", "[0]"), ("different_grads", "[1]"), ("wrapper_different", "[0]"),
    ("negated_grads", "[0]"),
])
def test_two_ranks_diverged_state_is_reported(two_rank_results, scenario, bad_groups):
    for rank in two_rank_results:
        assert rank[scenario]["report"]["report"]["consistent"] is False
        check = rank[scenario]["check"]
        assert check["raised"] == "RuntimeError"
        assert f"param group(s) {bad_groups}" in check["message"]
        assert "optimizer.step()" in check["message"]
    # The extra step shows in the clocks; different gradients in gains / running sums.
    if scenario == "extra_step":
        (group,) = two_rank_results[0][scenario]["report"]["report"]["groups"]
        assert [row[0] for row in group] == [4.0, 5.0]
    if scenario == "different_grads":
        groups = two_rank_results[0][scenario]["report"]["report"]["groups"]
        assert groups[0][0] == groups[0][1]  # group 0 saw the same gradients
        assert groups[1][0] != groups[1][1]


def _group_changed(**changes):
    good = _good_state()
    return {**good, "param_groups": [{**good["param_groups"][0], **changes}]}


BAD_GROUP_VALUES = [
    ("lr_low-2", {"lr_low": 2.0}, r"lr_low must be in \(0.0, 1.0\], got 2.0"),
    ("lr_high-negative", {"lr_high": -1.0}, r"lr_high"),
    ("period-0", {"period": 0}, r"period must be a positive int"),
    ("zero_sum-unknown", {"zero_sum": "sometimes"}, r"zero_sum must be one of"),
    ("gain_min-above-1", {"gain_min": 5.0}, r"gain_min"),
    ("significance-unreachable", {"significance": 3.0}, r"significance=3.0 needs period > "),
    ("lr-negative", {"lr": -1.0}, r"lr must be"),
    ("betas-out-of-range", {"betas": (1.5, 0.999)}, r"betas\[0\]"),
]


@pytest.mark.parametrize("changes,pattern", [(c, p) for _, c, p in BAD_GROUP_VALUES],
                         ids=[name for name, _, _ in BAD_GROUP_VALUES])
def test_bad_group_value_is_refused_before_anything_is_loaded(changes, pattern):
    """A saved group whose values are out of range (hand-edited, or another version's) is
    refused before the state or the groups are replaced: nothing is lost."""
    _refused_then_untouched(ADAMW, _group_changed(**changes), ValueError, pattern)


@pytest.mark.parametrize("changes,pattern", [(c, p) for n, c, p in BAD_GROUP_VALUES
                                             if n not in ("lr-negative", "betas-out-of-range")],
                         ids=[n for n, _, _ in BAD_GROUP_VALUES
                              if n not in ("lr-negative", "betas-out-of-range")])
def test_bad_group_value_is_refused_by_the_wrapper_before_anything_is_loaded(changes, pattern):
    wrapper = TARGETS["ActiveLR(Adam)"]
    opt, _ = _trained(wrapper)
    saved = opt.state_dict()
    bad = {**saved, "param_groups": [{**saved["param_groups"][0], **changes}]}
    _refused_then_untouched(wrapper, bad, ValueError, pattern)
