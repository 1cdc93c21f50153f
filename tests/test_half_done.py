"""Nothing half-done: a refused load or step changes nothing, extreme values are named at
construction, built-in Trainer names cannot be taken over, a refused wrap leaves the wrapped
optimizer as it was, and secrets stay off every printed or written command."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reliability_helpers import (
    TARGETS,
    _params,
    _refused_then_untouched,
    _set_grads,
    _trained,
    assert_same_state,
    state_snapshot,
)
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

# --- 1. a refused load breaks nothing ------------------------------------------------------

OTHER_OPTIMIZERS = {
    "torch RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "torch Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "torch SGD": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "active_radam": lambda ps: ActiveRAdam(ps, lr=1e-2, period=2),
    "active_sgd": lambda ps: ActiveSGD(ps, lr=0.1, lr_high=0.5, lr_low=0.5, period=2),
    "active_adabelief": lambda ps: ActiveAdaBelief(ps, lr=1e-2, period=2),
    "active_adabound": lambda ps: ActiveAdaBound(ps, lr=1e-2, lr_high=0.5, lr_low=0.5,
                                                 period=2),
}


@pytest.mark.parametrize("source", list(OTHER_OPTIMIZERS))
def test_another_optimizers_state_is_refused_and_changes_nothing(source):
    other, _ = _trained(OTHER_OPTIMIZERS[source])
    _refused_then_untouched(TARGETS["ActiveAdamW"], other.state_dict(), ValueError,
                            "another optimizer|lacks")


def test_the_wrapper_refuses_a_wrapper_state_of_another_base():
    other, _ = _trained(lambda ps: ActiveLR(torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                                            lr_high=0.5, lr_low=0.5, period=2))
    _refused_then_untouched(TARGETS["ActiveLR(Adam)"], other.state_dict(), ValueError,
                            r"lacks \['exp_avg', 'exp_avg_sq', 'step'\]")


def _damaged(change):
    state = copy.deepcopy(_trained(TARGETS["ActiveAdamW"])[0].state_dict())
    change(state)
    return state


@pytest.mark.parametrize("change,pattern", [
    (lambda s: s["state"][0].pop("exp_avg_sq"), r"lacks \['exp_avg_sq'\]"),
    (lambda s: s["state"][0].pop("step"), r"lacks \['step'\]"),
    (lambda s: s["state"][0].pop("grad_sum"), r"has 'gain' but not 'grad_sum'"),
    (lambda s: s["state"][0].pop("gain"), r"has 'grad_sum' but not 'gain'"),
    (lambda s: s["state"][0].update(step=torch.tensor(-5.0)), r"step.*expected a count"),
    (lambda s: s["state"][0].update(step=torch.tensor(math.nan)), r"step.*expected a count"),
    (lambda s: s["state"][0].update(exp_avg=[1.0, 2.0]), r"exp_avg.*is list"),
    (lambda s: s["state"][0].update(exp_avg=torch.zeros(6, 5, dtype=torch.int64)),
     r"exp_avg.*floating-point"),
    (lambda s: s["param_groups"][0].update(fused=True, foreach=True), r"exclusive"),
    (lambda s: s["param_groups"][0].update(foreach="yes"), r"foreach must be True or False"),
    (lambda s: s["param_groups"][0].update(active_step="x"), r"active_step is str"),
    (lambda s: s["param_groups"][0].update(active_step=2.5), r"active_step is float"),
    (lambda s: s["param_groups"][0].update(active_step=-1), r"active_step is int"),
    (lambda s: s["param_groups"][0].update(amsgrad=True), r"lacks \['max_exp_avg_sq'\]"),
    (lambda s: s["param_groups"][0].update(gain_changes=[1]), r"gain_changes is list"),
    (lambda s: s["param_groups"][0].pop("betas"), r"lacks \['betas'\]"),
], ids=["no-exp_avg_sq", "no-step", "no-grad_sum", "no-gain", "step-negative", "step-nan",
        "list", "int-tensor", "fused+foreach", "foreach-str", "clock-str", "clock-float",
        "clock-negative", "amsgrad-without-state", "gain_changes-list", "no-betas"])
@pytest.mark.parametrize("target", ["ActiveAdamW"])
def test_truncated_or_ill_typed_state_is_refused_and_changes_nothing(target, change, pattern):
    _refused_then_untouched(TARGETS[target], _damaged(change), ValueError, pattern)


# --- 3. a refused step changes nothing -----------------------------------------------------

def _two_groups(factory):
    params, embedding = _params(), nn.Parameter(torch.randn(5, 2))
    opt = factory([{"params": params}, {"params": [embedding]}])
    for step in range(1, 4):
        _set_grads(params + [embedding], step)
        opt.step()
    return opt, params, embedding


@pytest.mark.parametrize("factory", [
    lambda groups: ActiveAdamW(groups, lr=1e-2, period=2),
    lambda groups: ActiveAdamW(groups, lr=1e-2, period=2, foreach=False),
    lambda groups: ActiveSGD(groups, lr=0.1, momentum=0.9, lr_high=0.5, lr_low=0.5, period=2),
    lambda groups: ActiveLR(torch.optim.AdamW(groups, lr=1e-2), lr_high=0.5, lr_low=0.5,
                            period=2),
], ids=["ActiveAdamW", "ActiveAdamW-single", "ActiveSGD", "ActiveLR(AdamW)"])
def test_a_sparse_gradient_in_a_later_group_refuses_the_whole_step(factory):
    opt, params, embedding = _two_groups(factory)
    before = state_snapshot(opt)
    values = [p.detach().clone() for p in params + [embedding]]
    _set_grads(params, 9)
    embedding.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 2), (5, 2))
    with pytest.raises(RuntimeError, match=r"sparse gradients \(param group 1.*nothing was"):
        opt.step()
    assert_same_state(opt, before)
    assert all(torch.equal(p, v) for p, v in zip(params + [embedding], values))
    embedding.grad = torch.ones(5, 2)
    opt.step()  # the next valid step runs


def test_an_optimizer_whose_step_needs_a_closure_is_not_wrapped():
    params = _params()
    inner = torch.optim.LBFGS(params)
    keys_before = [sorted(group) for group in inner.param_groups]
    with pytest.raises(TypeError, match="LBFGS: its step needs a closure"):
        ActiveLR(inner, lr_high=0.5, lr_low=0.5, period=2)
    assert [sorted(group) for group in inner.param_groups] == keys_before


# --- 4. extreme values are named at construction, in optim_args, groups and loads ----------

EXTREMES = [
    ({"lr_high": 1e308}, r"lr_high must be in \[0.0, 1000000.0\]"),
    ({"lr_low": 1e-320}, r"lr_low must be in \[1e-06, 1.0\]"),
    ({"gain_init": 1e-320}, r"gain_init must be in \[1e-06, 1000000.0\]"),
    ({"gain_init": 1e300}, r"gain_init must be in \[1e-06, 1000000.0\]"),
    ({"gain_max": 1e300}, r"gain_max must be in \[1.0, 1000000.0\]"),
    ({"gain_min": 1e-300}, r"gain_min must be in \[1e-06, 1.0\]"),
    ({"significance": 1e200}, r"significance must be in \(0.0, 100.0\]"),
    ({"pooled": 1e200, "gain_increase": "multiplicative"}, r"pooled must be in \(0.0, 100.0\]"),
]


@pytest.mark.parametrize("extreme,pattern", EXTREMES)
def test_extreme_values_are_refused_everywhere(extreme, pattern):
    with pytest.raises(ValueError, match=pattern):
        ActiveAdamW(_params(), period=4, **extreme)
    with pytest.raises(ValueError, match=pattern):
        ActiveLR(torch.optim.SGD(_params(), lr=0.1),
                 **{"lr_high": 0.5, "lr_low": 0.5, "period": 4, **extreme})
    opt = ActiveAdamW(_params(), period=4)
    with pytest.raises(ValueError, match=pattern):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], **extreme})
    assert len(opt.param_groups) == 1
    state = copy.deepcopy(_trained(TARGETS["ActiveAdamW"])[0].state_dict())
    state["param_groups"][0].update(extreme)
    _refused_then_untouched(TARGETS["ActiveAdamW"], state, ValueError, pattern)


@pytest.mark.parametrize("extreme,pattern", EXTREMES[:4])
def test_extreme_values_are_refused_in_optim_args(extreme, pattern):
    from types import SimpleNamespace

    from hf_activelr.integrations import transformers_patch

    args = SimpleNamespace(optim="active_adamw", learning_rate=1e-3, adam_beta1=0.9,
                           adam_beta2=0.999, adam_epsilon=1e-8)
    options = {key: str(value) for key, value in extreme.items()}  # as optim_args holds them
    cls, kwargs = transformers_patch.optimizer_kwargs(args, options)
    with pytest.raises(ValueError, match=pattern):
        cls(_params(), **kwargs)


# --- 5. transformers' own names cannot be taken over ---------------------------------------

@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"])
def test_a_transformers_name_cannot_be_registered(name):
    from hf_activelr.integrations import registry

    with pytest.raises(ValueError, match=f"{name!r} is transformers' own"):
        hf_activelr.register(name, ActiveSGD, lr_high=0.5, lr_low=0.5)
    assert name not in registry.available_optimizers()


def test_no_built_in_name_is_a_transformers_name():
    from hf_activelr.integrations import registry

    assert not set(registry.available_optimizers()) & registry.transformers_names()


# --- 6. wraps ------------------------------------------------------------------------------

def test_a_refused_wrap_leaves_the_wrapped_optimizer_as_it_was():
    inner = torch.optim.SGD([nn.Parameter(torch.randn(3, dtype=torch.complex64))], lr=0.1)
    keys_before = [sorted(group) for group in inner.param_groups]
    with pytest.raises(TypeError, match="complex"):
        ActiveLR(inner, lr_high=0.5, lr_low=0.5, period=2)
    assert [sorted(group) for group in inner.param_groups] == keys_before


def test_a_wrapped_optimizer_is_not_wrapped_again():
    inner = torch.optim.SGD(_params(), lr=0.1)
    first = ActiveLR(inner, lr_high=0.5, lr_low=0.5, period=5)
    with pytest.raises(ValueError, match="already wrapped by an ActiveLR"):
        ActiveLR(inner, lr_high=0.5, lr_low=0.5, period=7)
    assert first.param_groups[0]["period"] == 5


# --- 7. secrets ----------------------------------------------------------------------------

SECRET = "s3cr3tValue"


@pytest.mark.parametrize("argv,expected", [
    (["python", "t.py", f"WANDB_API_KEY={SECRET}", "--seed", "0"],
     "python t.py WANDB_API_KEY=<redacted> --seed 0"),
    (["python", "t.py", "--api_tokens", SECRET], "python t.py --api_tokens <redacted>"),
    (["python", "t.py", "--dataset", f"https://user:{SECRET}@host/data.json"],
     "python t.py --dataset https://<redacted>@host/data.json"),
    (["python", "t.py", f"--optim_args=period=5,api_key={SECRET}"],
     "python t.py --optim_args=period=5,api_key=<redacted>"),
    (["python", "t.py", f"--hub_token={SECRET},{SECRET}"], "python t.py --hub_token=<redacted>"),
    (["python", "t.py", "--passwd", SECRET, "--my_auth", SECRET, "--db_credential", SECRET],
     "python t.py --passwd <redacted> --my_auth <redacted> --db_credential <redacted>"),
    (["python", "t.py", "--max_new_tokens", "20", "--pad_token", "x", "--num_tokens", "3"],
     "python t.py --max_new_tokens 20 --pad_token x --num_tokens 3"),
])
def test_secrets_are_redacted_by_name_pair_and_url(argv, expected):
    from hf_activelr.integrations.model_card import redact_command

    assert redact_command(argv) == expected
    assert redact_command(redact_command(argv)) == expected


def test_compare_never_prints_or_raises_a_token(tmp_path, capsys):
    from hf_activelr.experiments.compare import compare

    script = tmp_path / "fails.py"
    script.write_text("import sys; sys.exit(3)\n")
    with pytest.raises(RuntimeError) as raised:
        compare(script, ["adamw_torch"], tmp_path / "out", ["--hub_token", SECRET])
    printed = capsys.readouterr()
    assert "status 3" in str(raised.value)
    for text in (str(raised.value), repr(raised.value), printed.out, printed.err):
        assert SECRET not in text
    assert raised.value.__cause__ is None and raised.value.__context__ is None


# --- 9. training_args.bin loads without importing hf_activelr first -----------------------

@pytest.mark.slow
def test_training_args_saved_with_an_active_name_unpickle_in_a_fresh_process(tmp_path):
    from transformers import TrainingArguments

    path = tmp_path / "training_args.bin"
    torch.save(TrainingArguments(str(tmp_path), optim="active_adamw", report_to="none"), path)
    code = (f"import sys, torch; args = torch.load({str(path)!r}, weights_only=False); "
            "print(args.optim.value, 'hf_activelr' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["active_adamw", "True"]


# --- the property: any corruption is refused whole, or loads and trains --------------------

FACTORIES = {
    "ActiveAdamW": TARGETS["ActiveAdamW"],
    "ActiveAdamW-amsgrad-single": lambda ps: ActiveAdamW(ps, lr=1e-2, period=2, amsgrad=True,
                                                         foreach=False),
    "ActiveSGD": TARGETS["ActiveSGD"],
    "ActiveRAdam": lambda ps: ActiveRAdam(ps, lr=1e-2, period=2),
    "ActiveAdaBelief": lambda ps: ActiveAdaBelief(ps, lr=1e-2, period=2),
    "ActiveLR(Adam)": TARGETS["ActiveLR(Adam)"],
}
BAD_VALUES = [None, "x", [1.0], 2.5, -1, math.nan, math.inf, 1e308, 0, True,
              torch.tensor(-3.0), torch.zeros(7), torch.zeros(6, 5, dtype=torch.int32)]
GROUP_KEYS = ["lr_high", "lr_low", "period", "gain_init", "gain_min", "gain_max",
              "significance", "zero_sum", "gain_increase", "active_step", "foreach", "fused",
              "amsgrad", "lr", "betas", "momentum", "gain_changes", "pooled", "gain_dtype"]


@st.composite
def _corruptions(draw):
    kind = draw(st.sampled_from(["drop-state-key", "bad-state-value", "bad-group-value",
                                 "drop-group-key", "other-optimizer", "extra-state-key"]))
    return {"kind": kind, "index": draw(st.integers(0, 2)),
            "key_pick": draw(st.integers(0, 30)), "value": draw(st.sampled_from(BAD_VALUES)),
            "group_key": draw(st.sampled_from(GROUP_KEYS)),
            "other": draw(st.sampled_from(sorted(OTHER_OPTIMIZERS) + sorted(FACTORIES)))}


def _corrupt(state: dict, corruption: dict) -> dict:
    state = copy.deepcopy(state)
    kind, index = corruption["kind"], corruption["index"]
    per_param = state["state"].get(index, {})
    keys = sorted(per_param)
    if kind == "drop-state-key" and keys:
        per_param.pop(keys[corruption["key_pick"] % len(keys)])
    elif kind == "bad-state-value" and keys:
        per_param[keys[corruption["key_pick"] % len(keys)]] = copy.deepcopy(corruption["value"])
    elif kind == "extra-state-key":
        per_param["sum"] = torch.zeros(1)
    elif kind == "bad-group-value":
        state["param_groups"][0][corruption["group_key"]] = copy.deepcopy(corruption["value"])
    elif kind == "drop-group-key":
        state["param_groups"][0].pop(corruption["group_key"], None)
    return state


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(FACTORIES)), corruption=_corruptions())
def test_any_corrupted_load_is_exact_or_refused_whole(name, corruption):
    """Either the load is taken and the optimizer trains on, or it raises ValueError and the
    state dict and parameters are bitwise as before, and the next step matches a twin's."""
    factory = FACTORIES[name]
    if corruption["kind"] == "other-optimizer":
        other = FACTORIES.get(corruption["other"]) or OTHER_OPTIMIZERS[corruption["other"]]
        incoming = _trained(other)[0].state_dict()
    else:
        incoming = _corrupt(_trained(factory)[0].state_dict(), corruption)
    opt, params = _trained(factory)
    twin, twin_params = _trained(factory)
    before = state_snapshot(opt)
    try:
        opt.load_state_dict(incoming)
    except ValueError:
        event(f"refused: {corruption['kind']}")
        assert_same_state(opt, before)
        for step in (6, 7, 8):
            _set_grads(params, step)
            _set_grads(twin_params, step)
            opt.step()
            twin.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
        return
    event(f"taken: {corruption['kind']}")
    loaded = opt.state_dict()["state"]
    for index, state in incoming["state"].items():  # exact: every value as saved
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(loaded[index][key].to(value.dtype), value), (index, key)
    for step in (6, 7, 8):  # and it trains on
        _set_grads(params, step)
        opt.step()


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e-40])
def test_a_state_with_damaged_gains_is_refused(value):
    def damage(state):
        state["state"][0]["gain"] = state["state"][0]["gain"].clone()
        state["state"][0]["gain"][0, 0] = value
    _refused_then_untouched(TARGETS["ActiveAdamW"], _damaged(damage), ValueError,
                            "non-finite or subnormal gains")


@pytest.mark.parametrize("change", [
    lambda s: s["param_groups"][0].update(params=["a", "b", "c"]),
    lambda s: s["state"].update({99: {"step": torch.tensor(1.0)}}),
], ids=["ids-renamed", "unlisted-state"])
def test_state_the_groups_do_not_list_is_refused(change):
    """torch's load drops such state without a word (the moments would restart)."""
    _refused_then_untouched(TARGETS["ActiveAdamW"], _damaged(change), ValueError,
                            "do not match")


def test_compare_reuses_a_run_only_with_the_same_command_and_settings(tmp_path, capsys,
                                                                      monkeypatch):
    """A stored results.json is reused only when it came from the same command, the same
    settings behind the optimizer name and the same version (a changed preset reruns)."""
    from hf_activelr.experiments import compare as compare_module

    script = tmp_path / "counts.py"
    script.write_text(
        "import json, pathlib, sys\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--output_dir') + 1])\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "runs = out / 'runs.txt'\n"
        "n = int(runs.read_text()) + 1 if runs.exists() else 1\n"
        "runs.write_text(str(n))\n"
        "(out / 'results.json').write_text(json.dumps({'metrics': {'eval_loss': float(n)}}))\n")
    out = tmp_path / "out"
    first = compare_module.run_one(script, "active_adamw", out, ["--seed", "0"])
    again = compare_module.run_one(script, "active_adamw", out, ["--seed", "0"])
    assert first == again == {"metrics": {"eval_loss": 1.0}}
    other_args = compare_module.run_one(script, "active_adamw", out, ["--seed", "1"])
    assert other_args["metrics"]["eval_loss"] == 2.0
    real = compare_module.run_key
    monkeypatch.setattr(compare_module, "run_key",
                        lambda optim, shown: {**real(optim, shown), "settings": {"gain_init": 0.3}})
    changed = compare_module.run_one(script, "active_adamw", out, ["--seed", "1"])
    assert changed["metrics"]["eval_loss"] == 3.0
    assert "running again" in capsys.readouterr().out
