"""The lean state (``gain_dtype="bfloat16"`` with ``grad_sum_dtype="bfloat16"``): its size,
what it refuses, that no gain freezes, and that it checkpoints and converts without loss.
Exactness against the reference that rounds the same way: tests/test_exactness.py
(``test_lean_state_against_reference``) and the compiled paths: tests/test_fused.py,
tests/test_boundary.py."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import hf_activelr as hal
from hf_activelr.optim.config import BF16_RELATIVE_STEP
from hf_activelr.optim.rule import decode_gain

LEAN = dict(gain_dtype="bfloat16", grad_sum_dtype="bfloat16")
SIGNIFICANT = {**hal.preset_kwargs("significant"), "period": 3, "significance": 1.0}


def make_params(dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
            for shape in ((6, 5), (5,), (3, 2, 2))]


def clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, t):
    """A per-element drift (some gains grow) and noise (some flip)."""
    generator = torch.Generator().manual_seed(1000 + t)
    for p in params:
        drift = torch.linspace(-1.0, 1.0, p.numel()).reshape(p.shape)
        p.grad = (drift + 0.8 * torch.randn(p.shape, generator=generator)).to(p.dtype)


def state_bytes_per_element(optimizer) -> float:
    """Bytes of per-element state (tensors shaped like their parameter) per element."""
    total = elements = 0
    for param, state in optimizer.state.items():
        elements += param.numel()
        total += sum(v.numel() * v.element_size() for v in state.values()
                     if torch.is_tensor(v) and v.shape == param.shape)
    return total / elements


@pytest.mark.parametrize("significance,expected,default_bytes", [(None, 12, 16), (1.0, 14, 20)])
def test_active_adamw_keeps_12_bytes_per_fp32_parameter(significance, expected, default_bytes):
    """AdamW's two float32 moments (8 bytes) + a bfloat16 gain and sum (4); the significance
    test adds a bfloat16 sum of squares (2). The default state keeps 16 (20 with the test)."""
    params = make_params()
    options = {**SIGNIFICANT, "significance": significance}
    lean = hal.ActiveAdamW(params, lr=1e-2, **options, **LEAN)
    default = hal.ActiveAdamW(clone(params), lr=1e-2, **options)
    for optimizer in (lean, default):
        for p in (group["params"] for group in optimizer.param_groups):
            set_grads(p, 1)
        optimizer.step()
    assert state_bytes_per_element(lean) == expected
    assert state_bytes_per_element(default) == default_bytes


@pytest.mark.parametrize("options,match", [
    (dict(gain_increase="additive"), r"gain_dtype='bfloat16' needs gain_increase="
                                     r"'multiplicative', got 'additive'"),
    (dict(lr_high=2**-8), r"lr_high must be >= 2\*\*-7 \(0.0078125\), got 0.00390625"),
    (dict(lr_low=0.995), r"lr_low must be <= 1 - 2\*\*-7 \(0.9921875\), got 0.995"),
    (dict(gain_dtype="float16"), r"gain_dtype must be None \(float32, or float64 for float64 "
                                 r"parameters\) or one of \('bfloat16',\), got 'float16'"),
    (dict(gain_dtype=torch.float16), r"gain_dtype must be None"),
])
def test_settings_a_bfloat16_gain_cannot_hold_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        hal.ActiveAdamW(make_params(), lr=1e-2, **{**SIGNIFICANT, **LEAN, **options})


def test_torch_dtype_is_taken_as_its_name():
    optimizer = hal.ActiveAdamW(make_params(), lr=1e-2, **SIGNIFICANT,
                                gain_dtype=torch.bfloat16)
    assert optimizer.param_groups[0]["gain_dtype"] == "bfloat16"


@pytest.mark.parametrize("lr_high,lr_low", [(BF16_RELATIVE_STEP, 1 - BF16_RELATIVE_STEP),
                                            (0.5, 1 / 1.5)])
def test_no_bfloat16_gain_freezes_at_the_smallest_allowed_steps(lr_high, lr_low):
    """With the smallest allowed factors, every boundary still moves every gain, across many
    binades of bfloat16: a gain whose sign persists grows each time, one that flips shrinks
    each time (the reason for the 2**-7 limits)."""
    grow, shrink = nn.Parameter(torch.zeros(64)), nn.Parameter(torch.zeros(64))
    optimizer = hal.ActiveSGD([grow, shrink], lr=0.0, lr_high=lr_high, lr_low=lr_low,
                              gain_increase="multiplicative", period=1, **LEAN)
    previous = None
    steps = 1200 if lr_high < 0.1 else 60  # the floor (2**-126) is not reached
    for t in range(1, steps):
        grow.grad = torch.ones(64)
        shrink.grad = torch.full((64,), (-1.0) ** t)
        optimizer.step()
        now = (decode_gain(optimizer.state[grow]["gain"]).float(),
               decode_gain(optimizer.state[shrink]["gain"]).float())
        if previous is not None and t > 2:
            assert (now[0] > previous[0]).all(), t
            assert (now[1] < previous[1]).all(), t
        previous = now
    assert previous[0].min() > 2**8 and previous[1].max() < 2**-8  # 16 binades crossed


def test_bounds_hold_to_bfloat16_rounding():
    params = make_params()
    # gains from 10 ** -0.5, so that both bounds are reached in 40 steps
    optimizer = hal.ActiveAdamW(params, lr=1e-2, **{**SIGNIFICANT, "gain_init": 10**-0.5,
                                                     "gain_min": 0.1, "gain_max": 1.0}, **LEAN)
    for t in range(1, 40):
        set_grads(params, t)
        optimizer.step()
    stats = optimizer.gain_stats()[0]
    gains = torch.cat([decode_gain(s["gain"]).double().flatten() * 10**-0.5
                       for s in optimizer.state.values()])
    assert gains.min() == pytest.approx(0.1, rel=2**-8) and gains.max() == pytest.approx(
        1.0, rel=2**-8)
    assert stats["min"] == pytest.approx(gains.min().item(), rel=1e-7)
    assert stats["max"] == pytest.approx(gains.max().item(), rel=1e-7)


def _wrapped_adam(params, **options):
    return hal.ActiveLR(torch.optim.Adam(params, lr=1e-2), **options)


FACTORIES = {
    "ActiveAdamW": lambda params, **o: hal.ActiveAdamW(params, lr=1e-2, **o),
    "ActiveSGD": lambda params, **o: hal.ActiveSGD(params, lr=0.05, momentum=0.9, **o),
    "ActiveLR(Adam)": _wrapped_adam,
}


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("via", ["dict", "bytes"])
def test_lean_state_resumes_bit_exact(name, dtype, via):
    factory = FACTORIES[name]
    options = {**SIGNIFICANT, **LEAN}
    if name != "ActiveLR(Adam)":
        options["foreach"] = True
    start = make_params(dtype)
    ref_params = clone(start)
    reference = factory(ref_params, **options)
    for t in range(1, 21):
        set_grads(ref_params, t)
        reference.step()

    params = clone(start)
    optimizer = factory(params, **options)
    for t in range(1, 8):  # inside a period
        set_grads(params, t)
        optimizer.step()
    saved = optimizer.state_dict()
    if via == "bytes":
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
    params = clone(params)
    optimizer = factory(params, **{**options, "gain_dtype": None})  # the saved groups win
    optimizer.load_state_dict(saved)
    assert {g["gain_dtype"] for g in optimizer.param_groups} == {"bfloat16"}
    for t in range(8, 21):
        set_grads(params, t)
        optimizer.step()
    for p, q in zip(params, ref_params):
        assert optimizer.state[p]["gain"].dtype == torch.bfloat16
        assert optimizer.state[p]["grad_sum"].dtype == torch.bfloat16
        assert torch.equal(p, q)
        for key in ("gain", "grad_sum", "grad_sq_sum"):
            assert torch.equal(optimizer.state[p][key], reference.state[q][key]), key
    assert (decode_gain(torch.cat([s["gain"].flatten() for s in optimizer.state.values()]))
            != 1).any()


def test_gains_follow_the_groups_storage_on_load():
    """A group whose gain_dtype was edited converts the saved gains on load: float32 ->
    bfloat16 rounds each to nearest and keeps its sign (the previous period's sign) and the
    unset zeros; bfloat16 -> float32 is exact."""
    params = make_params()
    original = hal.ActiveAdamW(params, lr=1e-2, **SIGNIFICANT)
    for t in range(1, 8):
        set_grads(params, t)
        original.step()
    saved = copy.deepcopy(original.state_dict())
    for group in saved["param_groups"]:
        group.update(gain_dtype="bfloat16")
    lean_params = clone(params)
    lean = hal.ActiveAdamW(lean_params, lr=1e-2, **SIGNIFICANT)
    lean.load_state_dict(saved)
    for p, q in zip(params, lean_params):
        fp32_gain, bf16_gain = original.state[p]["gain"], lean.state[q]["gain"]
        assert bf16_gain.dtype == torch.bfloat16
        assert torch.equal(bf16_gain, fp32_gain.to(torch.bfloat16))
        assert torch.equal(torch.sign(bf16_gain.float()), torch.sign(fp32_gain))
    back = copy.deepcopy(lean.state_dict())
    for group in back["param_groups"]:
        group.update(gain_dtype=None)
    wide = hal.ActiveAdamW(clone(lean_params), lr=1e-2, **SIGNIFICANT)
    wide.load_state_dict(back)
    for q, r in zip(lean_params, wide.param_groups[0]["params"]):
        assert wide.state[r]["gain"].dtype == torch.float32
        assert torch.equal(wide.state[r]["gain"], lean.state[q]["gain"].float())


def test_state_saved_before_gain_dtype_keeps_float32_gains():
    params = make_params()
    original = hal.ActiveAdamW(params, lr=1e-2, **SIGNIFICANT)
    for t in range(1, 5):
        set_grads(params, t)
        original.step()
    saved = copy.deepcopy(original.state_dict())
    for group in saved["param_groups"]:
        del group["gain_dtype"]
    resumed_params = clone(params)
    resumed = hal.ActiveAdamW(resumed_params, lr=1e-2, **SIGNIFICANT, gain_dtype="bfloat16")
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["gain_dtype"] is None
    for p, q in zip(params, resumed_params):
        assert torch.equal(resumed.state[q]["gain"], original.state[p]["gain"])


def test_a_refused_lean_group_on_load_loses_nothing():
    """A saved group asking for bfloat16 gains with the additive increase is refused before
    anything is replaced."""
    params = make_params()
    optimizer = hal.ActiveAdamW(params, lr=1e-2, **SIGNIFICANT, **LEAN)
    for t in range(1, 5):
        set_grads(params, t)
        optimizer.step()
    before = copy.deepcopy(optimizer.state_dict())
    bad = copy.deepcopy(before)
    bad["param_groups"][0]["gain_increase"] = "additive"
    with pytest.raises(ValueError, match="param group 0 of the state dict is refused: "
                                         "gain_dtype='bfloat16' needs gain_increase"):
        optimizer.load_state_dict(bad)
    after = optimizer.state_dict()
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), key
    assert after["param_groups"] == before["param_groups"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "lean", "pooled"])
def test_boundary_benchmark_runs(mode, capsys):
    """benchmarks/boundary_cost.py (README's boundary figures) on a tiny model."""
    import importlib.util
    import pathlib
    import sys

    directory = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(directory))
    try:
        spec = importlib.util.spec_from_file_location("boundary_cost",
                                                      directory / "boundary_cost.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(["--layers", "1", "--vocab", "64", "--width", "32", "--repeats", "1"]
                    + {"fp32": [], "lean": ["--lean"], "pooled": ["--pooled", "2"]}[mode])
    finally:
        sys.path.remove(str(directory))
    printed = capsys.readouterr().out
    assert "| boundary, compiled, with statistics |" in printed
    assert ("bfloat16 gains" if mode == "lean" else "float32 gains") in printed
    assert ("pooled=2" in printed) == (mode == "pooled")
