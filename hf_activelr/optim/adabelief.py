"""ActiveAdaBelief: AdaBelief (Zhuang et al., NeurIPS 2020, arXiv 2010.07468) with ActiveLR
gains (Wadi et al., arXiv 2301.10133)."""

from __future__ import annotations

import math

import torch

from ._validation import check_betas, check_bool, check_real
from .base import ActiveOptimizer, new_step_counter


def adabelief_step_size(step: float, beta1: float, beta2: float, rectify: bool,
                        degenerated_to_sgd: bool):
    """adabelief_pytorch 0.2's step size (before ``lr``) and whether the adaptive
    denominator is used: ``(step_size, adaptive)``; ``step_size is None``: no update."""
    bias_correction1 = 1 - beta1**step
    if not rectify:
        return 1 / bias_correction1, True
    beta2_t = beta2**step
    n_sma_max = 2 / (1 - beta2) - 1
    n_sma = n_sma_max - 2 * step * beta2_t / (1 - beta2_t)
    if n_sma >= 5:
        return math.sqrt(
            (1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma
            * n_sma_max / (n_sma_max - 2)
        ) / bias_correction1, True
    if degenerated_to_sgd:
        return 1 / bias_correction1, False
    return None, False


def adabelief_delta(
    param, grad, exp_avg, exp_avg_var, max_exp_avg_var, *,
    lr, beta1, beta2, eps, weight_decay, weight_decouple, fixed_decay, rectify,
    bias_correction2_sqrt, step_size, adaptive,
):
    """AdaBelief's update at gain 1 (adabelief_pytorch.AdaBelief 0.2), without modifying
    ``grad``: ``s = beta2 * s + (1 - beta2) * (g - m)^2 + eps``; the step divides ``m`` by
    ``sqrt(s)``. A fixed decay (``p *= 1 - wd``) does not involve ``lr``, so no gain scales it."""
    compute_dtype = exp_avg.dtype  # fp16 parameters keep float32 state, as the reference does
    grad = grad.to(compute_dtype)
    decay = None
    if weight_decouple:
        if fixed_decay:
            param.mul_(1.0 - weight_decay)
        elif weight_decay != 0:
            decay = (lr * weight_decay) * param.to(compute_dtype)
    elif weight_decay != 0:
        grad = grad + weight_decay * param.to(compute_dtype)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    residual = grad - exp_avg
    exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1 - beta2).add_(eps)
    if max_exp_avg_var is not None:  # amsgrad
        max_exp_avg_var.copy_(torch.maximum(max_exp_avg_var, exp_avg_var))
    if step_size is None:  # rectified, not yet usable, no SGD fallback: no update
        delta = torch.zeros_like(exp_avg)
    elif not adaptive:  # rectified, not yet usable: SGD with momentum
        delta = exp_avg * (-step_size * lr)
    elif rectify:
        # The reference's rectified step uses exp_avg_var even with amsgrad; step_size
        # already holds sqrt(bias_correction2).
        delta = exp_avg / (exp_avg_var.sqrt() + eps) * (-step_size * lr)
    else:
        second = exp_avg_var if max_exp_avg_var is None else max_exp_avg_var
        denom = second.sqrt() / bias_correction2_sqrt + eps
        delta = exp_avg / denom * (-step_size * lr)
    return delta if decay is None else delta - decay


class ActiveAdaBelief(ActiveOptimizer):
    """AdaBelief whose every element's learning rate is ``lr * gain`` (ActiveLR).

    Arguments and defaults are those of ``adabelief_pytorch.AdaBelief`` 0.2 (which it equals
    with ``lr_high=0, lr_low=1``), plus the ActiveLR ones; ``lr_high=0.05, lr_low=0.95`` are
    the authors' ActiveBelief settings. Unlike the reference, ``p.grad`` is never modified.
    ``print_change_log`` is accepted for drop-in use and prints nothing.
    """

    paper_options = {"lr_high": 0.05, "lr_low": 0.95}
    _base_state_key = "exp_avg"
    _base_state_keys = frozenset({"step", "exp_avg", "exp_avg_var", "max_exp_avg_var"})

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-16, weight_decay=0.0, amsgrad=False,
        weight_decouple=True, fixed_decay=False, rectify=True, degenerated_to_sgd=True,
        print_change_log=False,
        *, config=None, foreach=None, fused=None, **options,
    ):
        check_bool("print_change_log", print_change_log)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            weight_decouple=weight_decouple, fixed_decay=fixed_decay, rectify=rectify,
            degenerated_to_sgd=degenerated_to_sgd,
        )
        super().__init__(params, defaults, config=config, foreach=foreach, fused=fused,
                         **options)

    def _check_group(self, group):
        check_real("lr", group["lr"], low=0.0)
        check_betas(group["betas"])
        check_real("eps", group["eps"], low=0.0)
        check_real("weight_decay", group["weight_decay"], low=0.0)
        for flag in ("amsgrad", "weight_decouple", "fixed_decay", "rectify",
                     "degenerated_to_sgd"):
            check_bool(flag, group[flag])
        if group["fixed_decay"] and group["weight_decouple"]:
            check_real("weight_decay", group["weight_decay"], low=0.0, high=1.0)

    def _init_base_state(self, param, state, group):
        dtype = torch.float32 if param.dtype == torch.float16 else param.dtype
        state["step"] = new_step_counter()
        for key in ("exp_avg", "exp_avg_var") + (("max_exp_avg_var",) if group["amsgrad"] else ()):
            state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)

    _delta = staticmethod(adabelief_delta)
    # Floats that change from step to step: tensors in the fused kernel (no recompiles).
    _step_scalars = ("lr", "bias_correction2_sqrt", "step_size")

    def _prepare(self, group, param, state):
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        step_size, adaptive = adabelief_step_size(
            step, beta1, beta2, group["rectify"], group["degenerated_to_sgd"]
        )
        max_exp_avg_var = state["max_exp_avg_var"] if group["amsgrad"] else None
        scalars = dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], weight_decouple=group["weight_decouple"],
            fixed_decay=group["fixed_decay"], rectify=group["rectify"],
            # Only the unrectified step uses it (an unused float would be baked into the
            # compiled kernel, which then recompiles every step).
            bias_correction2_sqrt=None if group["rectify"] else math.sqrt(1 - beta2**step),
            step_size=step_size, adaptive=adaptive,
        )
        return (state["exp_avg"], state["exp_avg_var"], max_exp_avg_var), scalars

    def _foreach_delta(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_vars = [s["exp_avg_var"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        if exp_avgs[0].dtype != grads[0].dtype:  # fp16 parameters: float32 state and math
            grads = [g.to(exp_avgs[0].dtype) for g in grads]
        if group["weight_decouple"]:
            if group["fixed_decay"]:
                torch._foreach_mul_(params, 1.0 - weight_decay)
        elif weight_decay != 0:
            grads = torch._foreach_add(grads, [p.to(grads[0].dtype) for p in params],
                                       alpha=weight_decay)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        delta = torch._foreach_sub(grads, exp_avgs)  # the residual, then the update in place
        torch._foreach_mul_(exp_avg_vars, beta2)
        torch._foreach_addcmul_(exp_avg_vars, delta, delta, 1 - beta2)
        torch._foreach_add_(exp_avg_vars, eps)
        second = exp_avg_vars
        if group["amsgrad"]:
            second = [s["max_exp_avg_var"] for s in states]
            torch._foreach_maximum_(second, exp_avg_vars)
        if group["rectify"]:  # the rectified step ignores amsgrad's max, as the reference does
            second = exp_avg_vars
        sizes = [
            adabelief_step_size(float(s), beta1, beta2, group["rectify"],
                                group["degenerated_to_sgd"])
            for s in steps
        ]
        adaptive = [i for i, (size, is_adaptive) in enumerate(sizes) if is_adaptive]
        if adaptive:
            denom = torch._foreach_sqrt([second[i] for i in adaptive])
            if not group["rectify"]:
                torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** float(steps[i]))
                                            for i in adaptive])
            torch._foreach_add_(denom, eps)
            ratios = torch._foreach_div([exp_avgs[i] for i in adaptive], denom)
            torch._foreach_copy_([delta[i] for i in adaptive], ratios)
            del denom, ratios
        for i, (size, is_adaptive) in enumerate(sizes):
            if size is None:
                delta[i].zero_()
            elif not is_adaptive:
                delta[i].copy_(exp_avgs[i])
        torch._foreach_mul_(delta, [0.0 if size is None else -size * lr for size, _ in sizes])
        if group["weight_decouple"] and not group["fixed_decay"] and weight_decay != 0:
            torch._foreach_add_(delta, [p.to(delta[0].dtype) for p in params],
                                alpha=-lr * weight_decay)
        return delta, 1.0
