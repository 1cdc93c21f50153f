"""ActiveAdamW: AdamW (Loshchilov & Hutter) with ActiveLR gains (Wadi et al., 2301.10133)."""

from __future__ import annotations

import math

import torch

from ._validation import check_betas, check_bool, check_real
from .base import ActiveOptimizer, new_step_counter


def adamw_delta(
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *,
    lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt,
):
    """AdamW's update at gain 1 (torch.optim.AdamW), decoupled weight decay included:
    ``delta = -lr * wd * p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:  # amsgrad
        max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))
        second = max_exp_avg_sq
    denom = second.sqrt() / bias_correction2_sqrt + eps
    return exp_avg / denom * (-lr / bias_correction1) - (lr * weight_decay) * param


class ActiveAdamW(ActiveOptimizer):
    """AdamW whose every element's learning rate is ``lr * gain`` (ActiveLR).

    With ``lr_high=0, lr_low=1`` it is ``torch.optim.AdamW``. Defaults ``lr_high=2.0,
    lr_low=0.5`` are the authors' ActiveAdam settings. ``period``: optimizer steps between
    gain updates (the paper: one epoch). State: torch AdamW's keys plus ``gain`` and
    ``grad_sum`` (16 bytes per fp32 parameter; 14 with ``grad_sum_dtype="bfloat16"``; 12, the
    lean state, with ``gain_dtype="bfloat16"`` too). See
    :mod:`hf_activelr.optim.rule`. The Trainer name
    ``active_adamw`` uses the noise-robust preset (``**preset_kwargs("significant")`` here,
    which adds ``grad_sq_sum``: 20 bytes per parameter; see :mod:`hf_activelr.optim.presets`),
    ``active_adamw_paper`` these defaults.
    """

    paper_options = {"lr_high": 2.0, "lr_low": 0.5}
    _base_state_key = "exp_avg"
    _base_state_keys = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
        *, config=None, foreach=None, fused=None, **options,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults, config=config, foreach=foreach, fused=fused,
                         **options)

    def _check_group(self, group):
        check_real("lr", group["lr"], low=0.0)
        check_betas(group["betas"])
        check_real("eps", group["eps"], low=0.0)
        check_real("weight_decay", group["weight_decay"], low=0.0)
        check_bool("amsgrad", group["amsgrad"])

    def _init_base_state(self, param, state, group):
        state["step"] = new_step_counter()
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    _delta = staticmethod(adamw_delta)
    # Floats that change from step to step: tensors in the fused kernel (no recompiles).
    _step_scalars = ("lr", "bias_correction1", "bias_correction2_sqrt")

    def _prepare(self, group, param, state):
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        max_exp_avg_sq = state["max_exp_avg_sq"] if group["amsgrad"] else None
        tensors = (state["exp_avg"], state["exp_avg_sq"], max_exp_avg_sq)
        scalars = dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"],
            bias_correction1=1 - beta1**step,
            bias_correction2_sqrt=math.sqrt(1 - beta2**step),
        )
        return tensors, scalars

    def _foreach_delta(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        second = exp_avg_sqs
        if group["amsgrad"]:
            second = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(second, exp_avg_sqs)
        step_values = [float(s) for s in steps]
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**s) for s in step_values])
        torch._foreach_add_(denom, eps)
        # Divide (not multiply by a reciprocal, which overflows in float16 where denom < 2^-16).
        delta = torch._foreach_div(exp_avgs, denom)
        del denom
        torch._foreach_mul_(delta, [-lr / (1 - beta1**s) for s in step_values])
        if weight_decay != 0:
            torch._foreach_add_(delta, params, alpha=-lr * weight_decay)
        return delta, 1.0
