"""Wrong or damaged optimizer state is refused before anything is loaded: nothing is lost."""

from __future__ import annotations

import copy

import pytest
import torch
from reliability_helpers import (
    ADAMW,
    TARGETS,
    _params,
    _refused_then_untouched,
    _set_grads,
    _trained,
    assert_same_state,
)
from torch import nn

from hf_activelr import (
    ActiveAdaBelief,
    ActiveAdamW,
    ActiveSGD,
)
from hf_activelr.optim.rule import decode_gain



@pytest.mark.parametrize("source,target,pattern", [
    (lambda ps: ActiveSGD(ps, lr=0.1, momentum=0.9, lr_high=0.5, lr_low=0.5, period=2),
     "ActiveAdamW", r"(momentum_buffer|lacks).*another optimizer"),
    (lambda ps: ActiveAdaBelief(ps, lr=1e-2, period=2), "ActiveAdamW",
     r"(exp_avg_var|lacks).*another optimizer"),
    (lambda ps: ActiveAdaBelief(ps, lr=1e-2, amsgrad=True, period=2), "ActiveAdamW",
     r"(exp_avg_var|lacks).*another optimizer"),
    (ADAMW, "ActiveSGD", r"(exp_avg|lacks).*another optimizer"),
    (lambda ps: torch.optim.AdamW(ps, lr=1e-2), "ActiveSGD", r"(exp_avg|lacks).*another optimizer"),
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



def _group_changed(**changes):
    good = _good_state()
    return {**good, "param_groups": [{**good["param_groups"][0], **changes}]}


BAD_GROUP_VALUES = [
    ("lr_low-2", {"lr_low": 2.0}, r"lr_low must be in \[1e-06, 1.0\], got 2.0"),
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
