"""A plain, independent re-statement of ActiveLR, written from docs/algorithm.md (not a test).

Nothing here imports ``hf_activelr``. Everything is float64 and deliberately naive:

- the base optimizers are written out as their textbook formulas, with the learning rate
  replaced by the per-element tensor ``lr * gain`` (docs/algorithm.md, step 2; for AdaBound the
  gain multiplies the clipped step);
- the period boundary is a Python loop over the elements of each parameter, with the
  previous sign kept as a Python value (``None`` while absent).

Per element: gain ``g = 1``, running sum ``s = 0``, previous sign absent. At each step
``s += grad`` (the raw gradient), the base step runs with learning rate ``lr * g``; at
``clock % period == 0`` (the group's clock, which ticks on every step) the gain adapts:

- ``zero_sum="hold"``: only when the previous sign and the current sign are both nonzero:
  agree -> ``g += lr_high``, differ -> ``g *= lr_low``; the sign of ``s`` is remembered when
  nonzero (a zero sum keeps the older sign);
- ``zero_sum="flip"`` (the authors' reference): once a previous sign exists, ``prev * s <= 0``
  (a zero counts as a flip) -> ``g *= lr_low``, otherwise ``g += lr_high``; the remembered
  sign is ``sign(s)``, zero included.

Gains are clamped to ``[gain_min, gain_max]`` where given; then ``s = 0``. With
``grad_sum_dtype="bfloat16"`` the sum is rounded to bfloat16 after every addition.

With ``gain_dtype="bfloat16"`` (the lean state) the element keeps its gain relative to
``gain_init``, ``r`` (the step uses ``gain_init * r``), and a boundary that changes it computes
in float32 what the float64 rule computes, then rounds to bfloat16:
``r = bf16(clamp(f32(r) * f32(factor), f32(low), f32(high)))`` with ``factor`` ``1 + lr_high``
or ``lr_low`` and the bounds ``gain_min / gain_init`` and ``gain_max / gain_init`` (a held
gain is left as it is).

With ``significance=z`` the element also sums its squared gradients ``q`` over the period,
and at a boundary its sum counts as zero (no sign) unless ``|s| > z * sqrt(q)``; then
``q = 0``.

With ``pooled=z`` each parameter, at a boundary, also takes one factor for all its elements:
``A`` elements counted a sign that agrees with their previous one, ``F`` one that is opposite
(a zero or not significant sum is neither, under both policies); the factor is ``1 +
lr_high`` where ``A - F > z * sqrt(A + F)``, ``lr_low`` where ``F - A > z * sqrt(A + F)``,
else 1. An element's new gain is its gain times its own factor (``1 + lr_high``, ``lr_low``
or 1, by the rule above) times the parameter's, then clamped once. Under ``"hold"`` an
element without a remembered sign whose gain the parameter's factor changes remembers the
raw sign of its sum (``+`` for a zero sum).

Like torch's optimizers, a parameter's state (base and ActiveLR) is created when it first
receives a gradient; a parameter whose gradient is ``None`` takes no base step and adds
nothing to its sum, but its gain still adapts at its group's boundaries once it has state.
"""

from __future__ import annotations

import math

import torch

# The base optimizers' own defaults (torch.optim.SGD / AdamW / RAdam, adabelief_pytorch 0.2,
# adabound 0.0.5), plus the ActiveLR settings that have a default.
BASE_DEFAULTS = {
    "sgd": dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False),
    "radam": dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False
    ),
    "adabelief": dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False,
        weight_decouple=True, fixed_decay=False, rectify=True, degenerated_to_sgd=True,
    ),
    "adabound": dict(
        lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8, weight_decay=0.0,
        amsbound=False,
    ),
}
ACTIVE_DEFAULTS = dict(
    gain_min=None, gain_max=None, zero_sum="hold", gain_increase="additive", gain_init=1.0,
    grad_sum_dtype=None, significance=None, gain_dtype=None, pooled=None,
)


# --- the base updates, learning rate ``lr_t = lr * gain`` per element ----------------------
# Each takes the parameter, the raw gradient, the parameter's base state (a dict, updated in
# place), the group, and the per-element gain tensor; it returns the new parameter.


def sgd_step(p, grad, state, group, gain):
    lr_t = group["lr"] * gain
    d = grad + group["weight_decay"] * p
    momentum = group["momentum"]
    if momentum != 0:
        if "buf" not in state:
            state["buf"] = d.clone()
        else:
            state["buf"] = momentum * state["buf"] + (1 - group["dampening"]) * d
        d = d + momentum * state["buf"] if group["nesterov"] else state["buf"]
    return p - lr_t * d


def _moments(grad, state, beta1, beta2):
    if "m" not in state:
        state["m"] = torch.zeros_like(grad)
        state["v"] = torch.zeros_like(grad)
        state["vmax"] = torch.zeros_like(grad)
        state["t"] = 0
    state["t"] += 1
    state["m"] = beta1 * state["m"] + (1 - beta1) * grad
    state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
    state["vmax"] = torch.maximum(state["vmax"], state["v"])
    return state["t"]


def adamw_step(p, grad, state, group, gain):
    lr_t = group["lr"] * gain
    beta1, beta2 = group["betas"]
    t = _moments(grad, state, beta1, beta2)
    p = p * (1 - lr_t * group["weight_decay"])
    v = state["vmax"] if group["amsgrad"] else state["v"]
    denom = v.sqrt() / math.sqrt(1 - beta2**t) + group["eps"]
    return p - lr_t / (1 - beta1**t) * state["m"] / denom


def radam_step(p, grad, state, group, gain):
    lr_t = group["lr"] * gain
    beta1, beta2 = group["betas"]
    wd = group["weight_decay"]
    if group["decoupled_weight_decay"]:
        p = p * (1 - lr_t * wd)
    else:
        grad = grad + wd * p
    t = _moments(grad, state, beta1, beta2)
    m_hat = state["m"] / (1 - beta1**t)
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
    if rho_t <= 5:
        return p - lr_t * m_hat
    rect = math.sqrt(
        (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    )
    adaptive = math.sqrt(1 - beta2**t) / (state["v"].sqrt() + group["eps"])
    return p - lr_t * m_hat * rect * adaptive


def adabelief_step(p, grad, state, group, gain):
    lr_t = group["lr"] * gain
    beta1, beta2 = group["betas"]
    eps, wd = group["eps"], group["weight_decay"]
    if group["weight_decouple"]:
        if group["fixed_decay"]:
            p = p * (1 - wd)  # does not involve lr: the gain does not scale it
        else:
            p = p * (1 - lr_t * wd)
    else:
        grad = grad + wd * p
    if "m" not in state:
        state["m"] = torch.zeros_like(grad)
        state["s"] = torch.zeros_like(grad)
        state["smax"] = torch.zeros_like(grad)
        state["t"] = 0
    state["t"] += 1
    t = state["t"]
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    state["m"] = beta1 * state["m"] + (1 - beta1) * grad
    state["s"] = beta2 * state["s"] + (1 - beta2) * (grad - state["m"]) ** 2 + eps
    state["smax"] = torch.maximum(state["smax"], state["s"])
    m, s = state["m"], state["s"]
    if not group["rectify"]:
        second = state["smax"] if group["amsgrad"] else s
        return p - lr_t / bc1 * m / (second.sqrt() / math.sqrt(bc2) + eps)
    n_sma_max = 2 / (1 - beta2) - 1
    n_sma = n_sma_max - 2 * t * beta2**t / bc2
    if n_sma >= 5:
        # adabelief_pytorch's rectified step divides by sqrt(s) + eps (no max, no bc2).
        r = math.sqrt(
            bc2 * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma
            * n_sma_max / (n_sma_max - 2)
        )
        return p - lr_t * r / bc1 * m / (s.sqrt() + eps)
    if group["degenerated_to_sgd"]:
        return p - lr_t / bc1 * m
    return p


def adabound_step(p, grad, state, group, gain):
    beta1, beta2 = group["betas"]
    grad = grad + group["weight_decay"] * p
    t = _moments(grad, state, beta1, beta2)
    lr = group["lr"]
    final_lr = group["final_lr"] * lr / group["base_lr"]
    lower = final_lr * (1 - 1 / (group["gamma"] * t + 1))
    upper = final_lr * (1 + 1 / (group["gamma"] * t))
    v = state["vmax"] if group["amsbound"] else state["v"]
    step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) / (v.sqrt() + group["eps"])
    clipped = step_size.clamp(lower, upper)
    return p - gain * clipped * state["m"]  # the gain multiplies the clipped step


BASE_STEPS = {
    "sgd": sgd_step,
    "adamw": adamw_step,
    "radam": radam_step,
    "adabelief": adabelief_step,
    "adabound": adabound_step,
}


# --- the ActiveLR rule, one element at a time ---------------------------------------------


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _grown(gain: float, group: dict) -> float:
    if group["gain_increase"] == "multiplicative":
        return gain * (1 + group["lr_high"])
    return gain + group["lr_high"]


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _rounded_gain(relative: float, grown: bool, group: dict) -> float:
    """The lean state's new relative gain (module docstring): float32, then bfloat16."""
    if group["gain_increase"] != "multiplicative":
        raise ValueError("bfloat16 gains take the multiplicative increase only")
    factor = 1 + group["lr_high"] if grown else group["lr_low"]
    low = torch.finfo(torch.float32).tiny
    if group["gain_min"] is not None:
        low = max(group["gain_min"] / group["gain_init"], low)
    high = math.inf if group["gain_max"] is None else group["gain_max"] / group["gain_init"]
    new = (_f32(relative) * _f32(factor)).clamp(_f32(low), _f32(high))
    return float(new.to(torch.bfloat16))


def adapt_element(gain: float, prev, total: float, group: dict, squares: float = 0.0,
                  factor: float = 1.0):
    """One element at a boundary: returns ``(new gain, new previous sign)``. With
    ``gain_dtype="bfloat16"`` the gain given and returned is the relative one. ``factor``: its
    parameter's factor under ``pooled`` (1 without)."""
    sign = counted_sign(total, squares, group)
    changed = grown = False
    if group["zero_sum"] == "hold":
        if prev is not None and sign != 0:  # prev is never 0 under "hold"
            changed, grown = True, sign == prev
        if sign != 0:
            prev = sign
        elif prev is None and factor != 1.0:
            raw = _sign(total)
            prev = raw if raw != 0 else 1  # the factor moves it: it needs a sign
    elif group["zero_sum"] == "flip":
        if prev is not None:
            changed, grown = True, prev * sign > 0
        prev = sign
    else:
        raise ValueError(group["zero_sum"])
    if changed and group["gain_dtype"] == "bfloat16":
        return _rounded_gain(gain, grown, group), prev
    if changed:
        gain = _grown(gain, group) if grown else gain * group["lr_low"]
    if factor != 1.0:
        gain = gain * factor
    if changed or factor != 1.0:  # the bounds apply once, to the combined change
        if group["gain_min"] is not None:
            gain = max(gain, group["gain_min"])
        if group["gain_max"] is not None:
            gain = min(gain, group["gain_max"])
    return gain, prev


def pooled_factor(decisions: list, group: dict) -> float:
    """The parameter's factor under ``pooled``, from its elements' ``(counted sign, previous
    sign)`` pairs (module docstring)."""
    agreed = sum(1 for sign, prev in decisions if sign != 0 and prev and sign == prev)
    flipped = sum(1 for sign, prev in decisions if sign != 0 and prev and sign == -prev)
    margin = group["pooled"] * math.sqrt(agreed + flipped)
    if agreed + flipped and agreed - flipped > margin:
        return 1 + group["lr_high"]
    if agreed + flipped and flipped - agreed > margin:
        return group["lr_low"]
    return 1.0


def counted_sign(total: float, square: float, group: dict) -> int:
    """The sign a period's sum counts with (0: zero, or not significant)."""
    if group["significance"] is not None and not abs(total) > group["significance"] * math.sqrt(
        square
    ):
        return 0
    return _sign(total)


class Reference:
    """ActiveLR over ``variant`` ("sgd", "adamw", "radam", "adabelief", "adabound").

    ``groups``: list of dicts with ``params`` (tensors, copied) and optional per-group
    overrides; ``settings``: the optimizer-wide hyperparameters (like constructor kwargs).
    """

    def __init__(self, variant: str, groups: list[dict], **settings):
        self.variant = variant
        self.groups = []
        for spec in groups:
            group = {**BASE_DEFAULTS[variant], **ACTIVE_DEFAULTS, **settings, **spec}
            group["params"] = [p.detach().to(torch.float64).clone() for p in spec["params"]]
            group["base_lr"] = group["lr"]  # AdaBound: final_lr follows lr / base_lr
            group["clock"] = 0
            group["states"] = [None] * len(group["params"])
            self.groups.append(group)

    def step(self, grads: list[list]) -> None:
        """``grads[i][j]``: the gradient of parameter j of group i, or None."""
        base_step = BASE_STEPS[self.variant]
        for group, group_grads in zip(self.groups, grads):
            for j, grad in enumerate(group_grads):
                if grad is None:
                    continue
                grad = grad.detach().to(torch.float64)
                p = group["params"][j]
                if group["states"][j] is None:
                    group["states"][j] = {
                        # the lean state keeps the relative gain (module docstring)
                        "gain": torch.full_like(p, 1.0 if _lean(group) else group["gain_init"]),
                        "sum": torch.zeros_like(p),
                        "squares": torch.zeros_like(p),
                        "prev": [None] * p.numel(),
                        "base": {},
                    }
                state = group["states"][j]
                state["sum"] = state["sum"] + grad
                state["squares"] = state["squares"] + grad * grad
                if group["grad_sum_dtype"] == "bfloat16":  # the sums are stored in bfloat16
                    state["sum"] = state["sum"].to(torch.bfloat16).to(torch.float64)
                    state["squares"] = state["squares"].to(torch.bfloat16).to(torch.float64)
                group["params"][j] = base_step(p, grad, state["base"], group,
                                               _absolute(state["gain"], group))
            group["clock"] += 1
            if group["clock"] % group["period"] == 0:
                for state in group["states"]:
                    if state is not None:
                        self._end_period(state, group)

    @staticmethod
    def _end_period(state: dict, group: dict) -> None:
        gains = state["gain"].reshape(-1).tolist()
        sums = state["sum"].reshape(-1).tolist()
        squares = state["squares"].reshape(-1).tolist()
        factor = 1.0 if group["pooled"] is None else pooled_factor(
            [(counted_sign(total, square, group), state["prev"][i])
             for i, (total, square) in enumerate(zip(sums, squares))], group)
        for i, (gain, total, square) in enumerate(zip(gains, sums, squares)):
            gains[i], state["prev"][i] = adapt_element(gain, state["prev"][i], total, group,
                                                       square, factor)
        state["gain"] = torch.tensor(gains, dtype=torch.float64).reshape(state["gain"].shape)
        state["sum"] = torch.zeros_like(state["sum"])
        state["squares"] = torch.zeros_like(state["squares"])

    # -- reading ----------------------------------------------------------------------------

    def params(self) -> list[list[torch.Tensor]]:
        return [list(group["params"]) for group in self.groups]

    def gains(self) -> list[list]:
        """Per group, per parameter: the gain tensor, or None before the parameter's state."""
        return [
            [None if s is None else _absolute(s["gain"], group) for s in group["states"]]
            for group in self.groups
        ]


def _lean(group: dict) -> bool:
    return group["gain_dtype"] == "bfloat16"


def _absolute(gain: torch.Tensor, group: dict) -> torch.Tensor:
    """The gain the step uses (the lean state keeps it relative to gain_init)."""
    return group["gain_init"] * gain if _lean(group) else gain
