"""ActiveAdaBound / ActiveAMSBound: AdaBound (Luo et al., ICLR 2019, arXiv 1902.09843) with
ActiveLR gains (Wadi et al., arXiv 2301.10133)."""

from __future__ import annotations

import math

import torch

from ._validation import check_betas, check_bool, check_real
from .base import ActiveOptimizer, new_step_counter


def adabound_bounds(group: dict, step: float) -> tuple[float, float]:
    """The step-size bounds at ``step``; ``final_lr`` follows ``lr`` when a scheduler moves it."""
    final_lr = group["final_lr"] * group["lr"] / group["base_lr"]
    lower = final_lr * (1 - 1 / (group["gamma"] * step + 1))
    upper = final_lr * (1 + 1 / (group["gamma"] * step))
    return lower, upper


def adabound_delta(
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *,
    beta1, beta2, eps, weight_decay, step_size, lower, upper,
):
    """AdaBound's update at gain 1 (adabound.AdaBound 0.0.5): the Adam step size
    ``step_size / (sqrt(v) + eps)`` clipped into ``[lower, upper]``, times ``m``."""
    if weight_decay != 0:
        grad = grad + weight_decay * param
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:  # AMSBound
        max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))
        second = max_exp_avg_sq
    clipped = (step_size / (second.sqrt() + eps)).clamp(lower, upper)
    return -(clipped * exp_avg)


class ActiveAdaBound(ActiveOptimizer):
    """AdaBound (``amsbound=True``: AMSBound) whose every element's step is scaled by its gain.

    With ``lr_high=0, lr_low=1`` it is ``adabound.AdaBound``; the gain multiplies the clipped
    step. The paper gives no ActiveLR defaults for AdaBound, so ``lr_high`` and ``lr_low`` are
    required. ``final_lr`` is scaled by ``lr / base_lr`` when a scheduler changes ``lr``
    (``base_lr``: the group's ``lr`` when it was added, kept in the state dict).
    """

    _base_state_key = "exp_avg"
    _base_state_keys = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8,
        weight_decay=0.0, amsbound=False,
        *, config=None, foreach=None, fused=None, **options,
    ):
        defaults = dict(
            lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps,
            weight_decay=weight_decay, amsbound=amsbound,
        )
        super().__init__(params, defaults, config=config, foreach=foreach, fused=fused,
                         **options)

    def _check_group(self, group):
        check_real("lr", group["lr"], low=0.0, low_open=True)
        check_betas(group["betas"])
        check_real("final_lr", group["final_lr"], low=0.0)
        check_real("gamma", group["gamma"], low=0.0, high=1.0, low_open=True, high_open=True)
        check_real("eps", group["eps"], low=0.0)
        check_real("weight_decay", group["weight_decay"], low=0.0)
        check_bool("amsbound", group["amsbound"])

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("base_lr", self.param_groups[-1]["lr"])

    def _init_base_state(self, param, state, group):
        state["step"] = new_step_counter()
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsbound"] else ())
        for key in keys:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)

    _delta = staticmethod(adabound_delta)
    # Floats that change from step to step: tensors in the fused kernel (no recompiles).
    # (a float clamp bound would even be baked into the compiled kernel)
    _step_scalars = ("step_size", "lower", "upper")

    def _scalars(self, group, step):
        beta1, beta2 = group["betas"]
        lower, upper = adabound_bounds(group, step)
        return dict(
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step_size=group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step),
            lower=lower, upper=upper,
        )

    def _prepare(self, group, param, state):
        state["step"] += 1
        max_exp_avg_sq = state["max_exp_avg_sq"] if group["amsbound"] else None
        scalars = self._scalars(group, float(state["step"]))
        return (state["exp_avg"], state["exp_avg_sq"], max_exp_avg_sq), scalars

    def _foreach_delta(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        second = exp_avg_sqs
        if group["amsbound"]:
            second = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(second, exp_avg_sqs)
        scalars = [self._scalars(group, float(s)) for s in steps]
        delta = torch._foreach_sqrt(second)
        torch._foreach_add_(delta, group["eps"])
        torch._foreach_reciprocal_(delta)
        torch._foreach_mul_(delta, [s["step_size"] for s in scalars])
        torch._foreach_clamp_min_(delta, [s["lower"] for s in scalars])
        torch._foreach_clamp_max_(delta, [s["upper"] for s in scalars])
        torch._foreach_mul_(delta, exp_avgs)
        return delta, -1.0
