"""The fused path (the single-tensor step compiled by torch.compile) equals the single-tensor
path it is compiled from, for every variant, with a scheduler moving lr every step, through
period boundaries, for float32 and bfloat16 parameters."""

import pytest
import torch

import hf_activelr as hal
from hf_activelr.optim import _fused

CASES = [
    (hal.ActiveSGD, dict(lr_high=0.5, lr_low=0.5, momentum=0.9, weight_decay=0.1, nesterov=True)),
    (hal.ActiveAdamW, dict(amsgrad=True)),
    (hal.ActiveAdamW, dict()),
    (hal.ActiveAdamW, {**hal.preset_kwargs("two_sided"), "period": 3}),
    # The default preset's significance test (z = 1 so that 3-step sums can count).
    (hal.ActiveAdamW, {**hal.preset_kwargs("significant"), "period": 3, "significance": 1.0}),
    (hal.ActiveRAdam, dict(weight_decay=0.1, decoupled_weight_decay=True)),
    (hal.ActiveAdaBelief, dict(weight_decay=0.1)),
    (hal.ActiveAdaBelief, dict(rectify=False, amsgrad=True)),
    (hal.ActiveAdaBound, dict(lr_high=0.5, lr_low=0.5, weight_decay=0.1, amsbound=True)),
    (hal.ActiveSGD, dict(lr_high=0.5, lr_low=0.5, momentum=0.9, grad_sum_dtype="bfloat16")),
    (hal.ActiveAdamW, dict(grad_sum_dtype="bfloat16")),
    # The lean state (bfloat16 gains and sums), with the default preset's rule: gain_init
    # 0.3 and bounds that bind.
    (hal.ActiveAdamW, {**hal.preset_kwargs("significant"), "period": 3, "significance": 1.0,
                       "gain_min": 0.2, "gain_max": 1.0, "grad_sum_dtype": "bfloat16",
                       "gain_dtype": "bfloat16"}),
    (hal.ActiveSGD, dict(lr_high=0.5, lr_low=0.5, momentum=0.9, gain_increase="multiplicative",
                         grad_sum_dtype="bfloat16", gain_dtype="bfloat16")),
]
SHAPES = [(5, 3), (7,), (2, 3, 4)]


def _run(cls, kwargs, fused, dtype, steps=24, skip_some=False):
    """``skip_some``: the second parameter has no gradient every other step (the fused path
    then runs one call per tensor instead of chunks)."""
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in SHAPES]
    optimizer = cls(params, **{"period": 3, **kwargs}, fused=fused,
                    foreach=None if fused else False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    generator = torch.Generator().manual_seed(2)
    for step in range(steps):
        for index, param in enumerate(params):
            grad = torch.randn(param.shape, generator=generator).to(dtype)
            param.grad = None if skip_some and index == 1 and step % 2 else grad
        optimizer.step()
        scheduler.step()
    gains = [hal.optim.rule.decode_gain(optimizer.state[p]["gain"]) for p in params]
    return [p.detach().float() for p in params], gains


@pytest.mark.slow
@pytest.mark.parametrize("cls,kwargs", CASES, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("dtype,skip_some", [(torch.float32, False), (torch.bfloat16, False),
                                             (torch.float32, True)])
def test_fused_equals_single_tensor(cls, kwargs, dtype, skip_some):
    fused_params, fused_gains = _run(cls, kwargs, True, dtype, skip_some=skip_some)
    plain_params, plain_gains = _run(cls, kwargs, False, dtype, skip_some=skip_some)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2,
                                                                               atol=2e-2)
    for fused, plain in zip(fused_params, plain_params):
        torch.testing.assert_close(fused, plain, **tolerance)
    for fused, plain in zip(fused_gains, plain_gains):
        assert (fused != 1).any()  # boundaries were crossed and gains moved
        torch.testing.assert_close(fused, plain, rtol=0, atol=0)  # same gradients, same signs


@pytest.mark.slow
def test_fused_does_not_recompile_per_step_or_shape():
    """One compilation serves all shapes and steps: running more steps adds no graphs."""
    import torch._dynamo.utils as dynamo_utils

    _run(hal.ActiveAdamW, {}, True, torch.float32, steps=3)
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    _run(hal.ActiveAdamW, {}, True, torch.float32, steps=12)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == before


def test_recompile_limit_uses_the_name_this_torch_has(monkeypatch):
    """A torch whose torch.compile takes no ``recompile_limit`` gets the global limit raised,
    under the name that exists (torch 2.4 and 2.6: only ``cache_size_limit``), never lowered."""
    import types

    import torch._dynamo

    from hf_activelr.optim import _fused

    def delta(param, grad):
        return -grad

    monkeypatch.setattr(_fused, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile",
                        lambda fn, dynamic=None, fullgraph=False, options=None: fn)
    old = types.SimpleNamespace(cache_size_limit=8)
    monkeypatch.setattr(torch._dynamo, "config", old)
    _fused._compiled_for(delta)
    assert old.cache_size_limit == _fused._RECOMPILE_LIMIT
    assert not hasattr(old, "recompile_limit")
    new = types.SimpleNamespace(recompile_limit=8, cache_size_limit=8)
    monkeypatch.setattr(torch._dynamo, "config", new)
    _fused._compiled_for(delta, suffix="_other")
    assert new.recompile_limit == _fused._RECOMPILE_LIMIT
    high = types.SimpleNamespace(recompile_limit=1000)
    monkeypatch.setattr(torch._dynamo, "config", high)
    _fused._compiled_for(delta, suffix="_third")
    assert high.recompile_limit == 1000


def test_recompile_limit_is_per_function_where_torch_compile_takes_one(monkeypatch):
    """Where torch.compile takes ``recompile_limit``, the compiled step gets its own and the
    global config is not touched."""
    import types

    import torch._dynamo

    from hf_activelr.optim import _fused

    def delta(param, grad):
        return -grad

    calls = []

    def compile_with_limit(fn, *, dynamic=None, fullgraph=False, recompile_limit=None,
                           options=None):
        calls.append((fn.__name__, fullgraph, recompile_limit))
        return fn

    monkeypatch.setattr(_fused, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", compile_with_limit)
    config = types.SimpleNamespace(recompile_limit=8)
    monkeypatch.setattr(torch._dynamo, "config", config)
    _fused._compiled_for(delta)
    _fused._compiled_for(delta)  # cached: compiled once
    assert calls == [("active_delta", True, _fused._RECOMPILE_LIMIT)]
    assert config.recompile_limit == 8


@pytest.mark.slow
def test_import_leaves_dynamo_alone():
    """``import hf_activelr`` neither imports torch._dynamo nor changes its config, and does
    not compile; after a fused step the global limit is unchanged where torch.compile takes a
    limit of its own, else raised."""
    import inspect
    import subprocess
    import sys

    from hf_activelr.optim import _fused

    read_limit = (
        "import torch._dynamo.config as config\n"
        "name = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'\n"
    )

    def run(script):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return [int(word) for word in result.stdout.split()]

    (default,) = run(read_limit + "print(getattr(config, name))")
    after_import, after_step = run(
        "import sys, torch, hf_activelr, hf_activelr.optim._fused as fused\n"
        "assert 'torch._dynamo' not in sys.modules, 'imported torch._dynamo'\n"
        "assert fused._COMPILED == {}\n"
        + read_limit +
        "print(getattr(config, name))\n"
        "p = torch.nn.Parameter(torch.ones(3))\n"
        "opt = hf_activelr.ActiveAdamW([p], lr=1e-3, period=2, fused=True)\n"
        "p.grad = torch.ones(3)\n"
        "opt.step()\n"
        "assert len(fused._COMPILED) == 1\n"
        "print(getattr(config, name))\n"
    )
    assert after_import == default
    own_limit = "recompile_limit" in inspect.signature(torch.compile).parameters
    assert after_step == (default if own_limit else max(default, _fused._RECOMPILE_LIMIT))


# --- the default path, and the fall back when compilation fails ---------------------------


def _train(factory, steps=12, seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = factory(params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) + 0.3
        optimizer.step()
    gains = [hal.optim.rule.decode_gain(optimizer.state[p]["gain"]) for p in params]
    return optimizer, [p.detach() for p in params], gains


SIGNIFICANT = {**hal.preset_kwargs("significant"), "period": 5, "significance": 1.0}


def _assert_same_run(a, b):
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y)


@pytest.mark.slow
def test_default_path_compiles_from_the_size_where_it_wins(monkeypatch):
    from hf_activelr.optim import paths

    small = _train(lambda ps: hal.ActiveAdamW(ps, lr=1e-2, **SIGNIFICANT))
    assert small[0]._use_path(small[0].param_groups[0]) == "foreach"
    monkeypatch.setattr(paths, "AUTO_FUSED_MIN_ELEMENTS", 10)
    large = _train(lambda ps: hal.ActiveAdamW(ps, lr=1e-2, **SIGNIFICANT))
    assert large[0]._use_path(large[0].param_groups[0]) == "fused"
    assert any(key[1] == "_chunk" for key in _fused._COMPILED)
    _assert_same_run(large, small)


def _failing_compiler(monkeypatch, fail_at_call: int):
    """``_compiled_for`` whose functions run the plain code but raise at call ``fail_at_call``
    (counted over every compiled call), as a compiler error would."""
    calls = []

    def compiled_for(delta_fn, impl=_fused._fused_step_impl, suffix="", dynamic=True,
                     options=None):
        def run(*args, **kwargs):
            calls.append(suffix)
            if len(calls) == fail_at_call:
                raise RuntimeError("forced compiler failure: no C++ compiler\nsecond line")
            return impl(*args, **kwargs)
        return run

    monkeypatch.setattr(_fused, "_compiled_for", compiled_for)
    return calls


@pytest.mark.parametrize("fail_at_call", [1, 2], ids=["first-call", "midway"])
def test_a_failed_compilation_falls_back_to_foreach_for_good(monkeypatch, fail_at_call):
    """The fused path failing (no compiler, a compiler error...) warns once, naming the cause;
    the step completes (the tensors the kernels did not reach by the eager code they compile)
    and the optimizer goes on with the foreach path: the run equals a foreach run."""
    import warnings

    monkeypatch.setattr(_fused, "CHUNK", 1)  # one call per tensor: "midway" is within a step
    calls = _failing_compiler(monkeypatch, fail_at_call)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = _train(lambda ps: hal.ActiveAdamW(ps, lr=1e-2, fused=True, **SIGNIFICANT))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "forced compiler failure: no C++ compiler" in messages[0]
    assert "foreach path from now on" in messages[0] and "second line" not in messages[0]
    assert len(calls) == fail_at_call  # nothing compiled is called after the failure
    assert fused[0]._use_path(fused[0].param_groups[0]) == "foreach"
    plain = _train(lambda ps: hal.ActiveAdamW(ps, lr=1e-2, foreach=True, **SIGNIFICANT))
    _assert_same_run(fused, plain)


def test_a_failed_compiled_boundary_falls_back_too(monkeypatch):
    """A failure at the first compiled boundary (the step compiled fine) falls back the same
    way: that boundary completes eagerly."""
    import warnings

    steps_ok = []
    original = _fused._compiled_for

    def compiled_for(delta_fn, impl=_fused._fused_step_impl, suffix="", dynamic=True,
                     options=None):
        if suffix == "_boundary":
            def fail(*args, **kwargs):
                raise RuntimeError("forced boundary failure")
            return fail
        steps_ok.append(suffix)
        return lambda *args, **kwargs: impl(*args, **kwargs)

    monkeypatch.setattr(_fused, "_compiled_for", compiled_for)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = _train(lambda ps: hal.ActiveAdamW(ps, lr=1e-2, fused=True, **SIGNIFICANT))
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "forced boundary failure" in messages[0]
    assert steps_ok  # the steps before the boundary ran "compiled"
    monkeypatch.setattr(_fused, "_compiled_for", original)
    plain = _train(lambda ps: hal.ActiveAdamW(ps, lr=1e-2, foreach=True, **SIGNIFICANT))
    _assert_same_run(fused, plain)
