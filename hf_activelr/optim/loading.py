"""Loading a state dict all or nothing: one validation of the whole incoming state before
anything is replaced, and a transaction that puts everything back if the load still fails.

Checked before the load (:func:`validate`), for every Active variant and the wrapper:

- the shape of a state dict (``state``, ``param_groups``), the number and sizes of groups;
- each group as the load would make it (:func:`merged_group`): the ActiveLR options and the
  variant's own values pass the checks a new group passes; the clock is a count; a group
  saved by another optimizer (lacking a setting this one's groups hold) is refused;
- each parameter's state: only keys this optimizer keeps; every key its base state needs
  (e.g. AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad),
  or none of them (a parameter not stepped yet); ``gain`` and ``grad_sum`` together or
  neither (a plain optimizer's state: gains start at ``gain_init``); tensors of the
  parameter's shape where the state holds one per element; step counts finite and >= 0.

What the wrapper's inner optimizer keeps is learnt from a probe: an optimizer of the same class
and group settings, stepped once on a two-element tensor (any optimizer whose constructor
takes ``(params, **defaults)``; others skip that check, and the transaction still holds).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers

import torch

from . import rule
from .config import OPTION_NAMES, ActiveConfig

# Group settings added after the first release, with the values that reproduce the rule a
# state saved without them ran (the paper's additive increase, gains from 1).
PRE_OPTION_DEFAULTS = {"gain_increase": "additive", "gain_init": 1.0, "grad_sum_dtype": None,
                       "significance": None, "gain_dtype": None, "pooled": None}
#: Group keys a load does not take from the current group: a plain group restarts the clock.
CLOCK_KEYS = ("active_step", "gain_changes")
#: What a state entry must be, by the kind its template value has.
PER_ELEMENT, COUNT, OPTIONAL_PER_ELEMENT = "per-element", "count", "optional per-element"


def merged_group(saved: dict, current: dict) -> dict:
    """The group a load makes of ``saved``: its values, the rule an older Active state ran
    where it predates an option, the current group's for the rest."""
    merged = {key: value for key, value in saved.items() if key != "params"}
    if "lr_high" in merged:
        for key, value in PRE_OPTION_DEFAULTS.items():
            merged.setdefault(key, value)
    for key, value in current.items():
        if key not in CLOCK_KEYS:
            merged.setdefault(key, value)
    merged["params"] = current["params"]
    return merged


@contextlib.contextmanager
def all_or_nothing(*optimizers):
    """Anything raised inside leaves ``optimizers`` as they were: their group lists and group
    dicts, their state objects and per-parameter dicts (a load replaces these; it never
    writes into a tensor it did not create)."""
    kept = [(opt, opt.param_groups, [dict(g) for g in opt.param_groups], opt.state,
             {param: dict(state) for param, state in opt.state.items()}) for opt in optimizers]
    try:
        yield
    except BaseException:
        for opt, groups, group_values, state, state_values in kept:
            for group, values in zip(groups, group_values):
                group.clear()
                group.update(values)
            for param in [p for p in state if p not in state_values]:
                del state[param]
            for param, values in state_values.items():
                state[param].clear()
                state[param].update(values)
            opt.__dict__["param_groups"] = groups
            opt.__dict__["state"] = state
        raise


def _described(value) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def _check_count(name: str, where: str, value) -> None:
    """``value`` is a whole number >= 0 (``name``: the optimizer's, for the message)."""
    number = value.item() if torch.is_tensor(value) and value.numel() == 1 else value
    if torch.is_tensor(number) or isinstance(number, bool) or not isinstance(
            number, numbers.Real) or not math.isfinite(number) or number < 0 \
            or number != int(number):
        raise ValueError(f"{name + ': ' if name else ''}{where} is {_described(value)}, "
                         "expected a count (a whole "
                         "number >= 0, a number or a one-element tensor)")


def _check_entry(name: str, where: str, kind: str, value, param) -> None:
    if kind == COUNT:
        _check_count(name, where, value)
        return
    if value is None and kind == OPTIONAL_PER_ELEMENT:
        return
    if not (torch.is_tensor(value) and value.shape == param.shape
            and (value.is_floating_point() or value.is_complex())):
        raise ValueError(f"{name}: {where} is {_described(value)}, expected a floating-point "
                         f"tensor of the parameter's shape {tuple(param.shape)}")


def template_kinds(template: dict) -> dict[str, str]:
    """``{key: kind}`` of a freshly made base state (see :func:`validate`)."""
    kinds = {}
    for key, value in template.items():
        if value is None:
            kinds[key] = OPTIONAL_PER_ELEMENT
        elif torch.is_tensor(value) and value.dim() > 0:
            kinds[key] = PER_ELEMENT
        else:
            kinds[key] = COUNT
    return kinds


def probe(optimizer_cls, group: dict, defaults: dict) -> dict[str, str]:
    """The state an optimizer of ``optimizer_cls`` keeps per parameter under ``group``'s
    settings (those named in ``defaults``), learnt by stepping one on a two-element tensor;
    raises what its constructor or step raises."""
    parameters = inspect.signature(optimizer_cls).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    settings = {key: group[key] for key in defaults
                if key in group and (takes_any or key in parameters)}
    tensor = torch.zeros(2, requires_grad=True)
    optimizer = optimizer_cls([tensor], **settings)
    tensor.grad = torch.ones(2)
    optimizer.step()
    return template_kinds(optimizer.state[tensor])


def probe_state_kinds(optimizer_cls, group: dict, defaults: dict) -> dict[str, str] | None:
    """:func:`probe`, or None where the optimizer cannot be built that way."""
    try:
        return probe(optimizer_cls, group, defaults)
    except Exception:  # noqa: BLE001 - an optimizer that cannot be probed: no key check
        return None


def validate(optimizer, state_dict, *, base_keys=None, base_kinds=None,
             group_checks=(), group_keys=()) -> None:
    """Refuse ``state_dict`` with a ValueError naming what does not fit, before anything is
    loaded. ``base_keys``: the base state keys the optimizer may keep (None: any);
    ``base_kinds(merged_group)``: ``{key: kind}`` its base state needs for a parameter that has
    one (None: not known); ``group_checks``: functions of a merged group that raise TypeError
    or ValueError; ``group_keys``: settings every saved group must hold (a group without one
    was saved by another optimizer)."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            f"not an optimizer state dict (expected keys 'state' and 'param_groups'), got "
            f"{type(state_dict).__name__}" + (f" with keys {sorted(state_dict)[:8]}"
                                               if isinstance(state_dict, dict) else "")
        )
    groups, states = state_dict["param_groups"], state_dict["state"]
    if not isinstance(states, dict) or not all(isinstance(s, dict) for s in states.values()):
        got = type(states).__name__
        if isinstance(states, dict):
            got = f"a dict with {sorted({type(s).__name__ for s in states.values()})} values"
        raise ValueError(
            f"{name}: state_dict['state'] must map parameter ids to dicts of state tensors, "
            f"got {got}: not an optimizer state dict"
        )
    if not isinstance(groups, (list, tuple)) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups
    ):
        raise ValueError(
            f"{name}: state_dict['param_groups'] must be a list of dicts, each with a "
            "'params' list: not an optimizer state dict"
        )
    if len(groups) != len(optimizer.param_groups) or any(
        len(saved["params"]) != len(group["params"])
        for saved, group in zip(groups, optimizer.param_groups)
    ):
        raise ValueError(
            f"{name}: the state dict has {len(groups)} param groups of sizes "
            f"{[len(g['params']) for g in groups]}, this optimizer "
            f"{[len(g['params']) for g in optimizer.param_groups]}: it belongs to another model"
        )
    listed = [saved_id for saved in groups for saved_id in saved["params"]]
    unlisted = [key for key in states if key not in set(listed)]
    if len(set(listed)) != len(listed) or unlisted:
        raise ValueError(
            f"{name}: the state dict's param groups and state do not match (ids listed twice, "
            f"or state for ids no group lists: {unlisted[:5]}): a damaged state dict, whose "
            "per-parameter state would be dropped without a word")
    allowed = None if base_keys is None else set(base_keys) | set(rule.ACTIVE_STATE_KEYS)
    for index, (saved, group) in enumerate(zip(groups, optimizer.param_groups)):
        lacking = sorted(key for key in group_keys if key not in saved)
        if lacking:
            raise ValueError(
                f"{name}: param group {index} of the state dict is refused: it lacks "
                f"{lacking}, which {name}'s groups hold: the state was saved by another "
                "optimizer")
        merged = merged_group(saved, group)
        kinds = _validate_group(name, index, saved, merged, group_checks, base_kinds)
        for saved_id, param in zip(saved["params"], group["params"]):
            state = states.get(saved_id, {})
            if allowed is not None and not set(state) <= allowed:
                raise ValueError(
                    f"{name}: the state of parameter {saved_id} has keys "
                    f"{sorted(set(state) - allowed)} that {name} does not keep (it keeps "
                    f"{sorted(allowed)}): the state was saved by another optimizer"
                )
            _validate_param_state(name, saved_id, state, param, kinds)


def _validate_group(name: str, index: int, saved: dict, merged: dict, group_checks,
                    base_kinds) -> dict | None:
    """The loaded group's values pass the checks a new group passes; returns what
    ``base_kinds`` says the group's parameters keep (it may refuse the values too)."""
    try:
        ActiveConfig.from_options({key: merged[key] for key in OPTION_NAMES})
        for check in group_checks:
            check(merged)
        if "active_step" in saved:
            _check_count("", "active_step", saved["active_step"])
            if torch.is_tensor(saved["active_step"]):
                raise ValueError(f"active_step is {_described(saved['active_step'])}, "
                                 "expected an int")
        changes = saved.get("gain_changes")
        if changes is not None and not isinstance(changes, dict):
            raise ValueError(f"gain_changes is {_described(changes)}, expected a dict")
        return base_kinds(merged) if base_kinds is not None else None
    except (TypeError, ValueError, KeyError) as error:
        if isinstance(error, KeyError):
            error = f"it lacks {error}, which this optimizer's groups hold: saved by another " \
                    "optimizer"
        raise ValueError(f"{name}: param group {index} of the state dict is refused: "
                         f"{error}") from None


def _validate_param_state(name: str, saved_id, state: dict, param, kinds) -> None:
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
            raise ValueError(
                f"{name}: state[{key!r}] of parameter {saved_id} has shape "
                f"{tuple(value.shape)}, the parameter {tuple(param.shape)}: the state belongs "
                "to another model"
            )
    for key in rule.ACTIVE_STATE_KEYS:
        if key not in state:
            continue
        value = state[key]
        if not (
            torch.is_tensor(value) and value.shape == param.shape
            and (key == "prev_sign" or value.is_floating_point())
        ):
            raise ValueError(
                f"{name}: state[{key!r}] of parameter {saved_id} is {_described(value)}, "
                f"expected a {'' if key == 'prev_sign' else 'floating-point '}tensor of the "
                f"parameter's shape {tuple(param.shape)}"
            )
    gain = state.get("gain")
    if gain is not None:
        # A gain is a finite factor at least the smallest normal float (stored with a sign
        # bit, 0 for "no sign yet": rule.decode_gain); NaN or inf would reach the parameters
        # at the next step, a subnormal one freezes its element.
        magnitude = gain.abs()
        tiny = torch.finfo(gain.dtype).tiny
        if not bool(torch.isfinite(magnitude).all()) or bool(
                ((magnitude > 0) & (magnitude < tiny)).any()):
            raise ValueError(f"{name}: state['gain'] of parameter {saved_id} holds non-finite "
                             "or subnormal gains: a damaged state (a gain is finite and at "
                             f"least {tiny:g})")
    if ("gain" in state) != ("grad_sum" in state):
        has, lacks = ("gain", "grad_sum") if "gain" in state else ("grad_sum", "gain")
        raise ValueError(f"{name}: the state of parameter {saved_id} has {has!r} but not "
                         f"{lacks!r}: a truncated state (they are saved together)")
    if kinds is None:
        return
    base = {key: value for key, value in state.items() if key not in rule.ACTIVE_STATE_KEYS}
    required = {key for key, kind in kinds.items() if kind != OPTIONAL_PER_ELEMENT}
    if (base or "gain" in state) and required and not required <= set(base):
        raise ValueError(
            f"{name}: the state of parameter {saved_id} lacks {sorted(required - set(base))} "
            f"(it has {sorted(state)}; {name} keeps {sorted(kinds)} for it): a truncated state, "
            "or one saved by another optimizer or under other settings (e.g. amsgrad)"
        )
    for key, value in base.items():
        if key in kinds:
            _check_entry(name, f"state[{key!r}] of parameter {saved_id}", kinds[key], value,
                         param)
