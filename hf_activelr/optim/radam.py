"""ActiveRAdam: RAdam (Liu et al., 2019) with ActiveLR gains (Wadi et al., arXiv 2301.10133)."""

from __future__ import annotations

import math

import torch

from ._validation import check_betas, check_bool, check_real
from .base import ActiveOptimizer, new_step_counter


def radam_rectification(step: float, beta2: float):
    """RAdam's variance rectification term r_t, or None while rho_t <= 5 (plain momentum)."""
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    if rho_t <= 5.0:
        return None
    return math.sqrt(
        (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    )


def radam_delta(
    param, grad, exp_avg, exp_avg_sq, *,
    lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
    bias_correction1, bias_correction2_sqrt, rect,
):
    """RAdam's update at gain 1 (torch.optim.RAdam): ``-lr * m_hat * r_t * sqrt(bc2) /
    (sqrt(v) + eps)`` once rectified, ``-lr * m_hat`` before; weight decay as L2 or decoupled."""
    decay = None
    if weight_decay != 0:
        if decoupled_weight_decay:
            decay = (lr * weight_decay) * param
        else:
            grad = grad + weight_decay * param
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    delta = exp_avg * (-lr / bias_correction1)
    if rect is not None:
        delta = delta * (bias_correction2_sqrt * rect) / (exp_avg_sq.sqrt() + eps)
    return delta if decay is None else delta - decay


class ActiveRAdam(ActiveOptimizer):
    """RAdam whose every element's learning rate is ``lr * gain`` (ActiveLR).

    With ``lr_high=0, lr_low=1`` it is ``torch.optim.RAdam``. Defaults ``lr_high=0.05,
    lr_low=0.95`` are the authors' ActiveRAdam settings. See :mod:`hf_activelr.optim.rule`.
    """

    paper_options = {"lr_high": 0.05, "lr_low": 0.95}
    _base_state_key = "exp_avg"
    _base_state_keys = frozenset({"step", "exp_avg", "exp_avg_sq"})

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
        decoupled_weight_decay=False,
        *, config=None, foreach=None, fused=None, **options,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, config=config, foreach=foreach, fused=fused,
                         **options)

    def _check_group(self, group):
        check_real("lr", group["lr"], low=0.0)
        check_betas(group["betas"])
        check_real("eps", group["eps"], low=0.0)
        check_real("weight_decay", group["weight_decay"], low=0.0)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])

    def _init_base_state(self, param, state, group):
        state["step"] = new_step_counter()
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    _delta = staticmethod(radam_delta)
    # Floats that change from step to step: tensors in the fused kernel (no recompiles).
    _step_scalars = ("lr", "bias_correction1", "bias_correction2_sqrt", "rect")

    def _prepare(self, group, param, state):
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        scalars = dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            bias_correction1=1 - beta1**step,
            bias_correction2_sqrt=math.sqrt(1 - beta2**step),
            rect=radam_rectification(step, beta2),
        )
        return (state["exp_avg"], state["exp_avg_sq"]), scalars

    def _foreach_delta(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        if weight_decay != 0 and not group["decoupled_weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        step_values = [float(s) for s in steps]
        rects = [radam_rectification(s, beta2) for s in step_values]
        # Per element: delta = m * c / (sqrt(v) + eps) with c = -lr / bc1 * r_t * sqrt(bc2) once
        # rectified, delta = m * c with c = -lr / bc1 before. Divide: a reciprocal overflows
        # in float16.
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        delta = torch._foreach_div(exp_avgs, denom)
        del denom
        factors = []
        for i, (step, rect) in enumerate(zip(step_values, rects)):
            scale = -lr / (1 - beta1**step)
            if rect is None:  # not rectified yet: plain momentum step
                delta[i].copy_(exp_avgs[i])
                factors.append(scale)
            else:
                factors.append(scale * rect * math.sqrt(1 - beta2**step))
        torch._foreach_mul_(delta, factors)
        if weight_decay != 0 and group["decoupled_weight_decay"]:
            torch._foreach_add_(delta, params, alpha=-lr * weight_decay)
        return delta, 1.0
