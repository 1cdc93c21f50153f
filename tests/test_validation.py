"""Bad input gives a clear error naming the argument; a step never touches the caller's grads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hf_activelr
from hf_activelr import (
    ActiveAdaBelief,
    ActiveAdaBound,
    ActiveAdamW,
    ActiveLR,
    ActiveRAdam,
    ActiveSGD,
)
from hf_activelr.optim.config import OPTION_NAMES as ACTIVE_GROUP_KEYS

VARIANTS = [ActiveSGD, ActiveAdamW, ActiveRAdam, ActiveAdaBelief, ActiveAdaBound]
VARIANT_IDS = [cls.__name__ for cls in VARIANTS]
ALL_IDS = VARIANT_IDS + ["ActiveLR"]

# ActiveSGD and ActiveAdaBound have no published ActiveLR defaults: lr_high/lr_low are required.
_REQUIRED = {
    ActiveSGD: {"lr_high": 0.1, "lr_low": 0.5},
    ActiveAdaBound: {"lr_high": 0.1, "lr_low": 0.5},
}


def _param(*shape, **kwargs):
    return nn.Parameter(torch.randn(*shape, **kwargs))


def build(cls, params=None, **kwargs):
    """An Active optimizer (``cls`` a variant, or ``"ActiveLR"`` around torch SGD)."""
    if params is None:
        params = [_param(4, 3)]
    if cls == "ActiveLR":
        active = {k: kwargs.pop(k) for k in
                  ACTIVE_GROUP_KEYS if k in kwargs}
        active = {"lr_high": 0.1, "lr_low": 0.5, "period": 3, **active}
        return ActiveLR(torch.optim.SGD(params, lr=kwargs.pop("lr", 0.1), **kwargs), **active)
    return cls(params, **{**_REQUIRED.get(cls, {}), "period": 3, **kwargs})


def all_builders():
    return pytest.mark.parametrize("cls", VARIANTS + ["ActiveLR"], ids=ALL_IDS)


# --- the ActiveLR arguments, shared by everything ----------------------------------------

BAD_ACTIVE = [
    # (kwargs, exception, message pattern)
    (dict(lr_high=-0.1), ValueError, "lr_high"),
    (dict(lr_high=-1e-12), ValueError, "lr_high"),
    (dict(lr_high=math.nan), ValueError, "lr_high"),
    (dict(lr_high=math.inf), ValueError, "lr_high"),
    (dict(lr_high="0.1"), TypeError, "lr_high"),
    (dict(lr_high=True), TypeError, "lr_high"),
    (dict(lr_low=0.0), ValueError, "lr_low"),
    (dict(lr_low=-0.5), ValueError, "lr_low"),
    (dict(lr_low=1.0000001), ValueError, "lr_low"),
    (dict(lr_low=2.0), ValueError, "lr_low"),
    (dict(lr_low=math.nan), ValueError, "lr_low"),
    (dict(lr_low=math.inf), ValueError, "lr_low"),
    (dict(lr_low=None), TypeError, "lr_low"),
    (dict(period=0), ValueError, "period"),
    (dict(period=-3), ValueError, "period"),
    (dict(period=2.5), TypeError, "period"),
    (dict(period=3.0), TypeError, "period"),
    (dict(period=math.nan), TypeError, "period"),
    (dict(period=math.inf), TypeError, "period"),
    (dict(period=True), TypeError, "period"),
    (dict(period=False), TypeError, "period"),
    (dict(period="10"), TypeError, "period"),
    (dict(zero_sum="keep"), ValueError, "zero_sum"),
    (dict(zero_sum=None), ValueError, "zero_sum"),
    (dict(zero_sum="HOLD"), ValueError, "zero_sum"),
    (dict(gain_min=0.0), ValueError, "gain_min"),
    (dict(gain_min=-0.1), ValueError, "gain_min"),
    (dict(gain_min=1.5), ValueError, "gain_min"),
    (dict(gain_min=math.nan), ValueError, "gain_min"),
    (dict(gain_max=0.5), ValueError, "gain_max"),
    (dict(gain_max=math.inf), ValueError, "gain_max"),
    (dict(gain_max=math.nan), ValueError, "gain_max"),
    (dict(gain_max="10"), TypeError, "gain_max"),
    (dict(gain_increase="exponential"), ValueError, "gain_increase"),
    (dict(gain_increase=None), ValueError, "gain_increase"),
    (dict(gain_init=0.0), ValueError, "gain_init"),
    (dict(gain_init=-1.0), ValueError, "gain_init"),
    (dict(gain_init=math.nan), ValueError, "gain_init"),
    (dict(gain_init="0.1"), TypeError, "gain_init"),
    (dict(gain_init=0.5, gain_min=0.6), ValueError, "gain_init"),
    (dict(gain_init=5.0, gain_max=2.0), ValueError, "gain_init"),
    (dict(significance=0.0), ValueError, r"significance must be in \(0\.0, 100\.0\]"),
    (dict(significance=-2.0), ValueError, "significance"),
    (dict(significance=math.inf), ValueError, "significance"),
    (dict(significance="2"), TypeError, "significance"),
    (dict(significance=2.0, period=4), ValueError, r"needs period > significance\*\*2 = 4"),
    (dict(grad_sum_dtype="float16"), ValueError, "grad_sum_dtype.*bfloat16"),
    (dict(grad_sum_dtype=torch.float16), ValueError, "grad_sum_dtype"),
    (dict(grad_sum_dtype="bf16"), ValueError, "grad_sum_dtype"),
    (dict(grad_sum_dtype=16), ValueError, "grad_sum_dtype"),
]


@all_builders()
@pytest.mark.parametrize(
    "kwargs,exc,pattern", BAD_ACTIVE,
    ids=[f"{next(iter(k))}={next(iter(k.values()))!r}" for k, _, _ in BAD_ACTIVE],
)
def test_bad_active_arguments(cls, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        build(cls, **kwargs)


@all_builders()
def test_period_missing_mentions_dataloader(cls):
    with pytest.raises(TypeError, match=r"len\(train_dataloader\)") as info:
        build(cls, period=None)
    assert "period" in str(info.value)


@all_builders()
@pytest.mark.parametrize("period", [0, -1, 1.5, True])
def test_bad_period_message_mentions_dataloader(cls, period):
    with pytest.raises((TypeError, ValueError), match=r"period.*len\(train_dataloader\)"):
        build(cls, period=period)


@pytest.mark.parametrize("cls", VARIANTS, ids=VARIANT_IDS)
def test_period_is_required_keyword(cls):
    """Constructing without ``period`` at all names it and the dataloader."""
    with pytest.raises(TypeError, match=r"period.*len\(train_dataloader\)"):
        cls([_param(3)], **_REQUIRED.get(cls, {}))


@pytest.mark.parametrize("cls", [ActiveSGD, ActiveAdaBound], ids=["ActiveSGD", "ActiveAdaBound"])
@pytest.mark.parametrize("missing", ["lr_high", "lr_low"])
def test_lr_high_lr_low_required_without_published_defaults(cls, missing):
    kwargs = {"lr_high": 0.1, "lr_low": 0.5, "period": 3}
    del kwargs[missing]
    with pytest.raises(TypeError, match=missing):
        cls([_param(3)], **kwargs)


@all_builders()
@pytest.mark.parametrize("kwargs", [
    dict(lr_high=0.0, lr_low=1.0, period=1),
    dict(lr_high=5.0, lr_low=1e-6, period=10**6),
    dict(gain_min=1.0, gain_max=1.0),
    dict(gain_min=1e-3, gain_max=100.0, zero_sum="flip"),
    dict(grad_sum_dtype="bfloat16"),
    dict(grad_sum_dtype=None),
])
def test_boundary_values_accepted(cls, kwargs):
    opt = build(cls, **kwargs)
    for key in ("lr_high", "lr_low", "period"):
        if key in kwargs:
            assert opt.param_groups[0][key] == kwargs[key]


# --- base hyperparameters, per variant --------------------------------------------------

NAN, INF = math.nan, math.inf
BAD_BASE = {
    ActiveSGD: [
        (dict(lr=-0.1), ValueError, "lr"),
        (dict(lr=NAN), ValueError, "lr"),
        (dict(lr=INF), ValueError, "lr"),
        (dict(lr="1e-3"), TypeError, "lr"),
        (dict(momentum=-0.9), ValueError, "momentum"),
        (dict(momentum=NAN), ValueError, "momentum"),
        (dict(momentum=INF), ValueError, "momentum"),
        (dict(dampening=NAN), ValueError, "dampening"),
        (dict(dampening=INF), ValueError, "dampening"),
        (dict(weight_decay=-1e-2), ValueError, "weight_decay"),
        (dict(weight_decay=NAN), ValueError, "weight_decay"),
        (dict(weight_decay=INF), ValueError, "weight_decay"),
        (dict(nesterov=1), TypeError, "nesterov"),
        (dict(nesterov=True), ValueError, "nesterov.*momentum"),
        (dict(nesterov=True, momentum=0.0), ValueError, "nesterov.*momentum"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "nesterov.*dampening"),
    ],
    ActiveAdamW: [
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=NAN), ValueError, "lr"),
        (dict(lr=INF), ValueError, "lr"),
        (dict(betas=(0.9,)), TypeError, "betas"),
        (dict(betas=0.9), TypeError, "betas"),
        (dict(betas=(0.9, 0.999, 0.5)), TypeError, "betas"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(-0.1, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]"),
        (dict(betas=(0.9, NAN)), ValueError, r"betas\[1\]"),
        (dict(betas=(INF, 0.999)), ValueError, r"betas\[0\]"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(eps=NAN), ValueError, "eps"),
        (dict(eps=INF), ValueError, "eps"),
        (dict(weight_decay=-0.01), ValueError, "weight_decay"),
        (dict(weight_decay=NAN), ValueError, "weight_decay"),
        (dict(weight_decay=INF), ValueError, "weight_decay"),
        (dict(amsgrad=1), TypeError, "amsgrad"),
        (dict(amsgrad="yes"), TypeError, "amsgrad"),
    ],
    ActiveRAdam: [
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=NAN), ValueError, "lr"),
        (dict(betas=(0.9, 1.5)), ValueError, r"betas\[1\]"),
        (dict(betas=(NAN, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=[0.9]), TypeError, "betas"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(eps=INF), ValueError, "eps"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(weight_decay=NAN), ValueError, "weight_decay"),
        (dict(decoupled_weight_decay=None), TypeError, "decoupled_weight_decay"),
    ],
    ActiveAdaBelief: [
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=INF), ValueError, "lr"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(betas=(NAN, 0.999)), ValueError, r"betas\[0\]"),
        (dict(eps=-1e-16), ValueError, "eps"),
        (dict(eps=NAN), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(weight_decay=INF), ValueError, "weight_decay"),
        (dict(weight_decay=1.5, fixed_decay=True), ValueError, "weight_decay"),
        (dict(amsgrad=0), TypeError, "amsgrad"),
        (dict(weight_decouple="no"), TypeError, "weight_decouple"),
        (dict(fixed_decay=None), TypeError, "fixed_decay"),
        (dict(rectify=1), TypeError, "rectify"),
        (dict(degenerated_to_sgd=0), TypeError, "degenerated_to_sgd"),
        (dict(print_change_log="no"), TypeError, "print_change_log"),
    ],
    ActiveAdaBound: [
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=NAN), ValueError, "lr"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
        (dict(betas=(0.9, INF)), ValueError, r"betas\[1\]"),
        (dict(final_lr=-0.1), ValueError, "final_lr"),
        (dict(final_lr=NAN), ValueError, "final_lr"),
        (dict(final_lr=INF), ValueError, "final_lr"),
        (dict(gamma=0.0), ValueError, "gamma"),
        (dict(gamma=1.0), ValueError, "gamma"),
        (dict(gamma=-1e-3), ValueError, "gamma"),
        (dict(gamma=NAN), ValueError, "gamma"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(eps=NAN), ValueError, "eps"),
        (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
        (dict(weight_decay=INF), ValueError, "weight_decay"),
        (dict(amsbound=1), TypeError, "amsbound"),
    ],
}
BASE_CASES = [(cls, *case) for cls, cases in BAD_BASE.items() for case in cases]


@pytest.mark.parametrize(
    "cls,kwargs,exc,pattern", BASE_CASES,
    ids=[f"{c.__name__}-{k!r}" for c, k, _, _ in BASE_CASES],
)
def test_bad_base_arguments(cls, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        build(cls, **kwargs)


@pytest.mark.parametrize("cls", VARIANTS, ids=VARIANT_IDS)
def test_foreach_fused_flags(cls):
    with pytest.raises(TypeError, match="foreach"):
        build(cls, foreach="yes")
    with pytest.raises(TypeError, match="fused"):
        build(cls, fused=1)
    with pytest.raises(ValueError, match="fused.*foreach|foreach.*fused"):
        build(cls, foreach=True, fused=True)


@pytest.mark.parametrize("cls", VARIANTS, ids=VARIANT_IDS)
def test_good_defaults_construct(cls):
    opt = build(cls)
    group = opt.param_groups[0]
    assert group["period"] == 3
    assert group["zero_sum"] == "hold"


# --- a second param group --------------------------------------------------------------

SECOND_GROUP_BAD = [
    ({"lr": -1.0}, ValueError, "lr"),
    ({"lr": NAN}, ValueError, "lr"),
    ({"weight_decay": -1.0}, ValueError, "weight_decay"),
    ({"lr_high": -1.0}, ValueError, "lr_high"),
    ({"lr_high": NAN}, ValueError, "lr_high"),
    ({"lr_low": 0.0}, ValueError, "lr_low"),
    ({"lr_low": 1.5}, ValueError, "lr_low"),
    ({"period": 0}, ValueError, "period"),
    ({"period": 2.0}, TypeError, "period"),
    ({"period": True}, TypeError, "period"),
    ({"period": None}, TypeError, r"period.*len\(train_dataloader\)"),
    ({"zero_sum": "zero"}, ValueError, "zero_sum"),
    ({"gain_min": 2.0}, ValueError, "gain_min"),
    ({"gain_max": 0.1}, ValueError, "gain_max"),
]


@pytest.mark.parametrize("cls", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("bad,exc,pattern", SECOND_GROUP_BAD,
                         ids=[repr(b) for b, _, _ in SECOND_GROUP_BAD])
def test_second_group_validated_in_constructor(cls, bad, exc, pattern):
    groups = [{"params": [_param(3)]}, {"params": [_param(2)], **bad}]
    with pytest.raises(exc, match=pattern):
        build(cls, params=groups)


@pytest.mark.parametrize("cls", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("bad,exc,pattern", SECOND_GROUP_BAD[:8],
                         ids=[repr(b) for b, _, _ in SECOND_GROUP_BAD[:8]])
def test_add_param_group_validated_and_not_kept(cls, bad, exc, pattern):
    opt = build(cls)
    with pytest.raises(exc, match=pattern):
        opt.add_param_group({"params": [_param(2)], **bad})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("bad,exc,pattern", SECOND_GROUP_BAD[3:],
                         ids=[repr(b) for b, _, _ in SECOND_GROUP_BAD[3:]])
def test_activelr_second_group_validated(bad, exc, pattern):
    """Per-group ActiveLR settings in the wrapped optimizer's groups are checked too."""
    base = torch.optim.SGD([{"params": [_param(3)]}, {"params": [_param(2)], **bad}], lr=0.1)
    with pytest.raises(exc, match=pattern):
        ActiveLR(base, lr_high=0.1, lr_low=0.5, period=3)


@pytest.mark.parametrize("bad,exc,pattern", SECOND_GROUP_BAD[3:8],
                         ids=[repr(b) for b, _, _ in SECOND_GROUP_BAD[3:8]])
def test_activelr_add_param_group_validated_and_not_kept(bad, exc, pattern):
    opt = build("ActiveLR")
    with pytest.raises(exc, match=pattern):
        opt.add_param_group({"params": [_param(2)], **bad})
    # A rejected group must not stay behind in the wrapped optimizer.
    assert len(opt.optimizer.param_groups) == 1
    assert len(opt.param_groups) == 1


@all_builders()
def test_valid_second_group_keeps_its_settings(cls):
    groups = [{"params": [_param(3)]},
              {"params": [_param(2)], "lr_high": 0.3, "lr_low": 0.7, "period": 7}]
    if cls == "ActiveLR":
        opt = ActiveLR(torch.optim.SGD(groups, lr=0.1), lr_high=0.1, lr_low=0.5, period=3)
    else:
        opt = build(cls, params=groups)
    first, second = opt.param_groups
    assert first["period"] == 3
    if cls in (ActiveSGD, ActiveAdaBound, "ActiveLR"):
        assert (first["lr_high"], first["lr_low"]) == (0.1, 0.5)
    assert (second["lr_high"], second["lr_low"], second["period"]) == (0.3, 0.7, 7)


# --- gradients and parameter types -----------------------------------------------------


@all_builders()
def test_sparse_gradients_rejected(cls):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = build(cls, params=emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


@all_builders()
def test_complex_params_rejected(cls):
    with pytest.raises(TypeError, match="complex"):
        build(cls, params=[nn.Parameter(torch.randn(3, dtype=torch.complex64))])


@all_builders()
def test_complex_params_rejected_in_added_group(cls):
    opt = build(cls)
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, dtype=torch.complex64))]})


# --- ActiveLR's optimizer argument -----------------------------------------------------


@pytest.mark.parametrize("not_an_optimizer", [
    None, "adam", torch.optim.Adam, [nn.Parameter(torch.randn(3))], nn.Linear(2, 2),
], ids=["None", "str", "class", "params", "module"])
def test_activelr_of_non_optimizer(not_an_optimizer):
    with pytest.raises(TypeError, match="optimizer"):
        ActiveLR(not_an_optimizer, lr_high=0.1, lr_low=0.5, period=3)


@pytest.mark.parametrize("cls", VARIANTS, ids=VARIANT_IDS)
def test_activelr_of_active_variant(cls):
    with pytest.raises(TypeError, match="already Active"):
        ActiveLR(build(cls), lr_high=0.1, lr_low=0.5, period=3)


def test_activelr_of_activelr():
    with pytest.raises(TypeError, match="already Active"):
        ActiveLR(build("ActiveLR"), lr_high=0.1, lr_low=0.5, period=3)


# --- the caller's gradients are never modified -----------------------------------------

GRAD_CASES = [
    (ActiveSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    (ActiveSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)),
    (ActiveSGD, dict(lr=0.1, momentum=0.0, weight_decay=0.1)),
    (ActiveAdamW, dict(lr=1e-2, weight_decay=0.1)),
    (ActiveAdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    (ActiveRAdam, dict(lr=1e-2, weight_decay=0.1)),
    (ActiveRAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    (ActiveAdaBelief, dict(lr=1e-2, weight_decay=0.1, weight_decouple=False)),
    (ActiveAdaBelief, dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, rectify=False)),
    (ActiveAdaBelief, dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, amsgrad=True)),
    (ActiveAdaBelief, dict(lr=1e-2, weight_decay=0.1)),
    (ActiveAdaBelief, dict(lr=1e-2, weight_decay=0.1, fixed_decay=True)),
    (ActiveAdaBound, dict(lr=1e-2, weight_decay=0.1)),
    (ActiveAdaBound, dict(lr=1e-2, weight_decay=0.1, amsbound=True)),
    ("ActiveLR", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
]


GRAD_RUNS = [
    (cls, kwargs, path) for cls, kwargs in GRAD_CASES
    for path in (("wrapper",) if cls == "ActiveLR" else ("foreach", "single"))
]


@pytest.mark.parametrize(
    "cls,kwargs,path", GRAD_RUNS,
    ids=[f"{c if isinstance(c, str) else c.__name__}-{k}-{path}" for c, k, path in GRAD_RUNS],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_does_not_modify_grad(cls, kwargs, path, dtype):
    torch.manual_seed(0)
    params = [_param(5, 4, dtype=dtype), _param(4, dtype=dtype)]
    if path != "wrapper":
        kwargs = {**kwargs, "foreach": path == "foreach"}
    opt = build(cls, params=params, period=2, **kwargs)
    for _ in range(7):  # across several period boundaries
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)


@all_builders()
def test_grad_sum_dtype_takes_torch_dtype_and_stores_its_name(cls):
    opt = build(cls, grad_sum_dtype=torch.bfloat16)
    assert opt.param_groups[0]["grad_sum_dtype"] == "bfloat16"
    assert opt.state_dict()["param_groups"][0]["grad_sum_dtype"] == "bfloat16"


def test_set_period_refuses_a_period_the_significance_test_cannot_pass():
    """An epoch of 3 steps cannot carry z = 2 (a 3-step sum reaches at most sqrt(3) times its
    noise): the error says so, and no group's period changes."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = ActiveAdamW([param], lr=1e-3, period="epoch", significance=2.0)
    with pytest.raises(ValueError, match=r"significance=2.0 needs period > significance\*\*2"):
        optimizer.set_period(3)
    assert optimizer.param_groups[0]["period"] == "epoch"
    optimizer.set_period(5)
    assert optimizer.param_groups[0]["period"] == 5


# --- ActiveConfig: the one statement of the options ----------------------------------------

def test_active_config_is_the_one_source_of_the_options():
    import dataclasses
    import inspect

    from hf_activelr import ActiveConfig
    from hf_activelr.integrations import registry
    from hf_activelr.optim.config import OPTION_NAMES, OPTION_PARSERS

    assert OPTION_NAMES == tuple(f.name for f in dataclasses.fields(ActiveConfig))
    assert all(ActiveConfig.help()[key] for key in OPTION_NAMES)
    # The classes take the options as keywords (no second list in their signatures) ...
    for cls in (ActiveSGD, ActiveAdamW, ActiveRAdam, ActiveAdaBelief, ActiveAdaBound, ActiveLR):
        parameters = inspect.signature(cls).parameters
        assert not set(OPTION_NAMES) & set(parameters), cls
        assert "config" in parameters
    # ... and optim_args accepts every option with ActiveConfig's parser.
    for name in hf_activelr.available_optimizers():
        accepted = registry.get(name).accepted_options()
        assert {key: accepted[key] for key in OPTION_NAMES} == OPTION_PARSERS


def test_active_config_validates_normalises_and_is_immutable():
    import dataclasses

    from hf_activelr import ActiveConfig

    config = ActiveConfig(lr_high=1, lr_low=0.5, period=10, grad_sum_dtype=torch.bfloat16)
    assert config.lr_high == 1.0 and isinstance(config.lr_high, float)
    assert config.grad_sum_dtype == "bfloat16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr_high = 2.0
    with pytest.raises(ValueError, match=r"lr_low must be in \[1e-06, 1.0\], got 1.5"):
        config.replace(lr_low=1.5)
    with pytest.raises(TypeError, match="missing ActiveLR option 'lr_high'"):
        ActiveConfig(lr_low=0.5, period=10)
    with pytest.raises(TypeError, match=r"unknown ActiveLR option\(s\) \['lr_hihg'\]"):
        ActiveConfig.from_options({"lr_hihg": 1.0}, config.group_values())


def test_a_config_and_keywords_build_the_same_optimizer():
    from hf_activelr import ActiveConfig
    from hf_activelr.optim.presets import preset_config

    params = [nn.Parameter(torch.zeros(3))]
    config = preset_config("significant")
    from_config = ActiveAdamW(params, lr=1e-3, config=config)
    from_keywords = ActiveAdamW(params, lr=1e-3, **hf_activelr.preset_kwargs("significant"))
    assert from_config.param_groups[0] == from_keywords.param_groups[0]
    # keywords win over the config
    assert ActiveAdamW(params, config=config, period=50).param_groups[0]["period"] == 50
    wrapped = ActiveLR(torch.optim.SGD(params, lr=0.1), config=config)
    assert all(wrapped.param_groups[0][k] == v for k, v in config.group_values().items())
    with pytest.raises(TypeError, match="config must be an ActiveConfig, got dict"):
        ActiveAdamW(params, config={"lr_high": 1.0})
    assert isinstance(preset_config("paper", ActiveSGD), ActiveConfig)
    assert preset_config("paper", ActiveRAdam).lr_high == ActiveRAdam.paper_options["lr_high"]


@pytest.mark.parametrize("text,kind,expected", [
    ("0.5", float, 0.5), (".5", None, 0.5), ("1e-3", None, 1e-3), ("1", float, 1.0),
    ("1", None, 1), ("true", None, True), ("False", bool, False), ("none", float, None),
    ("", None, ""), ("tanh", None, "tanh"), ("epoch", "period", "epoch"),
    ("12", "period", 12), ("12", int, 12),
])
def test_one_parser_for_option_values(text, kind, expected):
    from hf_activelr.optim.config import OPTION_PARSERS, parse_value

    if kind == "period":  # the field's own parser, from its metadata: no special case
        kind = OPTION_PARSERS["period"]
    value = parse_value("x", text, kind)
    assert value == expected and type(value) is type(expected)


def test_one_parser_for_option_strings():
    from hf_activelr.optim.config import split_options

    assert split_options("lr_high=0.5, period=100") == {"lr_high": "0.5", "period": "100"}
    assert split_options("") == {} and split_options(None) == {}
    assert split_options("act=") == {"act": ""}
    with pytest.raises(ValueError, match="expected key=value"):
        split_options("lr_high")
    with pytest.raises(ValueError, match="'a' is given twice"):
        split_options("a=1,a=2")
    with pytest.raises(ValueError, match="expected a float"):
        from hf_activelr.optim.config import parse_value

        parse_value("lr_high", "fast", float)
