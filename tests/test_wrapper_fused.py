"""The ActiveLR wrapper's compiled path (``fused=True``: its gradient sums, copy of the
parameters and scaling of the wrapped step compiled) equals its eager path (``fused=False``:
``torch._foreach_*``), through period boundaries, with some parameters without a gradient in
some steps; a failed compilation falls back to the eager path with one warning.

Tolerances: float32 runs are compared bitwise. Both paths compute the same operations in the
same order (``s += g``, ``q += g * g``, ``p = ((p - start) * gain) * gain_init + start``), each
rounded to float32, and Inductor's C++ is built with ``-ffp-contract=off`` (no fused
multiply-adds), so on CPU nothing differs. bfloat16 parameters differ by bfloat16 roundings:
the eager path rounds each ``_foreach`` result to bfloat16, the kernel keeps its
intermediates in float32 and rounds once; the gains (from float32 sums of the same bfloat16
gradients) are bitwise equal there too.
"""

import pickle
import warnings

import pytest
import torch

import hf_activelr as hal
from hf_activelr.optim import _fused, paths
from hf_activelr.optim.rule import decode_gain

SHAPES = [(5, 3), (7,), (2, 3, 4), (6,), (3, 1, 2)]
BASES = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "AdamW-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
}
OPTIONS = {
    "paper": dict(lr_high=0.5, lr_low=0.5),
    # z = 1 so that 3-step sums can count; gains start at 0.5: every tensor is scaled from
    # the first step.
    "significance-gain_init": dict(lr_high=0.5, lr_low=0.5, significance=1.0, gain_init=0.5),
}


def _gradient_or_none(index: int, step: int):
    """Which parameters have no gradient: the second every other step, the fourth until
    step 5 (its state starts late), so the set of tensors changes from step to step."""
    return (index == 1 and step % 2 == 1) or (index == 3 and step < 5)


def _run(base_name, options, fused, dtype=torch.float32, steps=24, params=None,
         optimizer=None, seed=2):
    """``steps`` steps (period 3, a scheduler moving lr); returns params, gains, optimizer."""
    if params is None:
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in SHAPES]
    if optimizer is None:
        optimizer = hal.ActiveLR(BASES[base_name](params), period=3, fused=fused, **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for index, param in enumerate(params):
            # A drift (+0.3) so that some signs persist and gains grow as others shrink.
            grad = (torch.randn(param.shape, generator=generator) + 0.3).to(dtype)
            param.grad = None if _gradient_or_none(index, step) else grad
        optimizer.step()
        scheduler.step()
    gains = [decode_gain(optimizer.state[p]["gain"]) for p in params]
    return params, gains, optimizer


def _assert_same_run(compiled, eager, dtype=torch.float32):
    tolerance = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(compiled[0], eager[0]):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), **tolerance)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same sums, same signs


@pytest.mark.slow
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("base_name", BASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_equals_eager(base_name, options, dtype):
    compiled = _run(base_name, options, True, dtype)
    eager = _run(base_name, options, False, dtype)
    assert compiled[2]._use_path() == "fused" and eager[2]._use_path() == "foreach"
    assert any(key[0] is _fused._lr_wrapper_after for key in _fused._COMPILED)
    for gains in compiled[1]:
        assert (gains != 1).any()  # boundaries were crossed and the gains moved
    # The gains moved the parameters: the wrapped optimizer alone ends elsewhere.
    torch.manual_seed(1)
    plain_params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in SHAPES]
    plain = _run(base_name, dict(lr_high=0.0, lr_low=1.0), False, dtype, params=plain_params)
    assert not torch.equal(plain[0][0], compiled[0][0])
    _assert_same_run(compiled, eager, dtype)


@pytest.mark.slow
def test_compiled_path_does_not_recompile_per_step_or_set_of_tensors():
    """One set of graphs serves every step, whichever tensors have a gradient."""
    import torch._dynamo.utils as dynamo_utils

    _run("AdamW", OPTIONS["paper"], True, steps=9)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    _run("AdamW", OPTIONS["paper"], True, steps=30, seed=5)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == before


@pytest.mark.slow
def test_state_dict_round_trip_on_the_compiled_path():
    """A compiled run saved and loaded into a fresh wrapper goes on exactly as the
    uninterrupted run; the state dict holds no buffers of the compiled path."""
    import copy

    first = _run("AdamW-fused", OPTIONS["significance-gain_init"], True, steps=10)
    saved = copy.deepcopy(first[2].state_dict())
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "gain", "grad_sum",
                                      "grad_sq_sum"}
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first[0]]
    resumed = hal.ActiveLR(BASES["AdamW-fused"](resumed_params), period=3, fused=True,
                           **OPTIONS["significance-gain_init"])
    resumed.load_state_dict(saved)
    go_on = _run("AdamW-fused", {}, True, steps=8, params=first[0], optimizer=first[2], seed=7)
    loaded = _run("AdamW-fused", {}, True, steps=8, params=resumed_params, optimizer=resumed,
                  seed=7)
    _assert_same_run(loaded, go_on)
    assert loaded[2].param_groups[0]["active_step"] == 18


# --- the path choice, the copy skipped, the fall back (no compilation: fast) ---------------


def _plain_compiler(monkeypatch, fail_at_call=None):
    """``_compiled_for`` whose functions run the plain code (fast, and exact), raising at call
    ``fail_at_call`` (counted over every compiled call), as a compiler error would."""
    calls = []

    def compiled_for(delta_fn, impl=_fused._fused_step_impl, suffix="", dynamic=True,
                     options=None):
        def run(*args, **kwargs):
            calls.append(impl.__name__ + suffix)
            if len(calls) == fail_at_call:
                raise RuntimeError("forced compiler failure: no C++ compiler\nsecond line")
            return impl(*args, **kwargs)
        return run

    monkeypatch.setattr(_fused, "_compiled_for", compiled_for)
    return calls


def test_default_path_compiles_from_the_size_where_it_wins(monkeypatch):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    small = hal.ActiveLR(torch.optim.SGD(params, lr=0.1), lr_high=0.5, lr_low=0.5, period=3)
    assert small._use_path() == "foreach"
    monkeypatch.setattr(paths, "AUTO_FUSED_MIN_ELEMENTS", 10)
    large = hal.ActiveLR(torch.optim.SGD(params, lr=0.1), lr_high=0.5, lr_low=0.5, period=3)
    assert large._use_path() == "fused"
    forced = hal.ActiveLR(torch.optim.SGD(params, lr=0.1), lr_high=0.5, lr_low=0.5, period=3,
                          fused=False)
    assert forced._use_path() == "foreach"


def test_fused_option_is_checked_and_survives_pickling():
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError, match="fused must be True or False"):
        hal.ActiveLR(torch.optim.SGD(params, lr=0.1), lr_high=0.5, lr_low=0.5, period=3,
                     fused="yes")
    optimizer = hal.ActiveLR(torch.optim.SGD(params, lr=0.1), lr_high=0.5, lr_low=0.5,
                             period=3, fused=False)
    assert pickle.loads(pickle.dumps(optimizer))._use_path() == "foreach"


def test_copy_skipped_while_every_gain_reads_one(monkeypatch):
    """Before the first boundary (gain_init 1) the wrapped step stands as it is: no copy, no
    scaling, only the sums."""
    calls = _plain_compiler(monkeypatch)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    active = hal.ActiveLR(torch.optim.AdamW(params, lr=1e-2), lr_high=0.5, lr_low=0.5,
                          period=100, fused=True)
    plain = torch.optim.AdamW(twins, lr=1e-2)
    sums = [torch.zeros(shape) for shape in SHAPES]
    for _ in range(3):
        for param, twin, total in zip(params, twins, sums):
            param.grad = torch.randn(param.shape)
            twin.grad = param.grad.clone()
            total += param.grad
        active.step()
        plain.step()
    assert calls and set(calls) == {"_lr_wrapper_before"}  # sums only: no "_copy", no after
    assert active._runtime.starts is None  # no buffer was even made
    for param, twin, total in zip(params, twins, sums):
        assert torch.equal(param, twin)
        assert torch.equal(active.state[param]["grad_sum"], total)


# Calls per step with _fused.CHUNK = 1 and gain_init 0.5 (every tensor is scaled): one
# "before" call per tensor with a gradient, then one "after" call per tensor.
FAIL_POINTS = {"first-before": 1, "midway-before": 3, "first-after": 5, "midway-after": 6,
               "second-step": 11}


@pytest.mark.parametrize("fail_at_call", FAIL_POINTS.values(), ids=FAIL_POINTS.keys())
def test_a_failed_compilation_falls_back_to_eager_for_good(monkeypatch, fail_at_call):
    """The compiled path failing (no compiler, a compiler error...) warns once, naming the
    cause; the step completes (the tensors the kernels did not reach by the eager code) and
    the wrapper goes on eagerly: the run equals an eager run."""
    monkeypatch.setattr(_fused, "CHUNK", 1)  # one call per tensor: "midway" is within a phase
    calls = _plain_compiler(monkeypatch, fail_at_call)
    options = OPTIONS["significance-gain_init"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _run("AdamW", options, True, steps=12)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert messages[0].startswith("ActiveLR: the compiled (fused) step failed")
    assert "forced compiler failure: no C++ compiler" in messages[0]
    assert "second line" not in messages[0]
    assert len(calls) == fail_at_call  # nothing compiled is called after the failure
    assert compiled[2]._use_path() == "foreach"
    _assert_same_run(compiled, _run("AdamW", options, False, steps=12))


def test_plain_kernels_equal_the_eager_path(monkeypatch):
    """The kernels' code run eagerly (what is compiled) equals the eager path bitwise, for
    every option set: the compiled tests above compare the compilation on top of this."""
    _plain_compiler(monkeypatch)
    for options in OPTIONS.values():
        for base_name in BASES:
            _assert_same_run(_run(base_name, options, True, steps=12),
                             _run(base_name, options, False, steps=12))


@pytest.mark.slow
def test_a_failure_after_compiled_steps_falls_back_midway(monkeypatch):
    """Real compiled kernels for some steps, then the "after" kernel fails midway through a
    step: the run still equals the eager one, after one warning."""
    monkeypatch.setattr(_fused, "CHUNK", 2)
    original = _fused._compiled_for
    after_calls = []

    def compiled_for(delta_fn, impl=_fused._fused_step_impl, suffix="", dynamic=True,
                     options=None):
        compiled = original(delta_fn, impl, suffix, dynamic, options)
        if impl is not _fused._lr_wrapper_after:
            return compiled

        def run(*args, **kwargs):
            after_calls.append(1)
            if len(after_calls) == 8:  # the second call of the fourth step
                raise RuntimeError("forced failure after compiled steps")
            return compiled(*args, **kwargs)
        return run

    monkeypatch.setattr(_fused, "_compiled_for", compiled_for)
    options = OPTIONS["significance-gain_init"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _run("SGD-momentum", options, True, steps=12)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "forced failure after compiled steps" in messages[0]
    assert len(after_calls) == 8
    _assert_same_run(compiled, _run("SGD-momentum", options, False, steps=12))
