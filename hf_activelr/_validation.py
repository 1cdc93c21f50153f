"""Argument checks shared by every optimizer: clear errors, nothing silently corrected."""

from __future__ import annotations

import math
import numbers

import torch

PERIOD_HINT = (
    "`period` is the number of optimizer steps between gain updates; the paper uses one epoch, "
    "so pass e.g. period=len(train_dataloader) (optimizer steps per epoch, i.e. divided by "
    "gradient accumulation), or use hf_activelr.ActiveTrainer, which sets it for you"
)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_real(name: str, value, *, low=None, high=None, low_open=False, high_open=False):
    """Check ``value`` is a finite real number in the given range; return it unchanged."""
    value_to_check = value
    interval = (
        f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
        f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}"
    )
    if not _is_real(value_to_check):
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r}")
    if math.isnan(value_to_check) or math.isinf(value_to_check):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value_to_check}")
    if low is not None and (value_to_check <= low if low_open else value_to_check < low):
        raise ValueError(f"{name} must be in {interval}, got {value_to_check}")
    if high is not None and (value_to_check >= high if high_open else value_to_check > high):
        raise ValueError(f"{name} must be in {interval}, got {value_to_check}")
    return value


def check_betas(betas, count: int = 2):
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise TypeError(f"betas must be a tuple of {count} numbers in [0, 1), got {betas!r}")
    for index, beta in enumerate(betas):
        check_real(f"betas[{index}]", beta, low=0.0, high=1.0, high_open=True)
    return tuple(betas)


def check_bool(name: str, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


EPOCH = "epoch"
ZERO_SUM_POLICIES = ("hold", "flip")  # see hf_activelr.rule
GAIN_INCREASES = ("additive", "multiplicative")  # see hf_activelr.rule
#: Storage dtypes of the running sum besides the default (the gains' dtype): see rule.
GRAD_SUM_DTYPES = ("bfloat16",)
#: The ActiveLR settings every param group carries.
ACTIVE_GROUP_KEYS = (
    "lr_high", "lr_low", "period", "gain_min", "gain_max", "zero_sum", "gain_increase",
    "gain_init", "grad_sum_dtype", "significance",
)


def check_period(period, allow_epoch: bool = True):
    """A positive int, or ``"epoch"``: one epoch of optimizer updates, which the training loop
    (``ActiveTrainer``, or the stock Trainer once hf_activelr is imported) sets at train start."""
    if period is None:
        raise TypeError(f"missing required argument `period`: {PERIOD_HINT}")
    if period == EPOCH and allow_epoch:
        return period
    if isinstance(period, bool) or not isinstance(period, numbers.Integral):
        raise TypeError(
            f"period must be a positive int (or 'epoch' under a Trainer), got {period!r}. "
            f"{PERIOD_HINT}"
        )
    if period < 1:
        raise ValueError(f"period must be a positive int (>= 1), got {period}. {PERIOD_HINT}")
    return int(period)


def check_significance_reachable(significance, period: int) -> None:
    """A sum of ``n`` gradients is at most ``sqrt(n)`` times the root of their summed squares
    (Cauchy-Schwarz), so ``significance=z`` can only be met when ``period > z ** 2``; a smaller
    period would silently freeze every gain."""
    if period <= significance**2:
        raise ValueError(
            f"significance={significance} needs period > significance**2 = "
            f"{significance**2:g} (a sum of n gradients is at most sqrt(n) times the root of "
            f"their squares), got period={period}: use a longer period or a smaller "
            "significance"
        )


def check_grad_sum_dtype(grad_sum_dtype):
    """``None`` (the gains' dtype) or ``"bfloat16"``; ``torch.bfloat16`` is taken as its name,
    so param groups and state dicts hold a plain string."""
    if grad_sum_dtype is None:
        return None
    name = grad_sum_dtype
    if isinstance(grad_sum_dtype, torch.dtype):
        name = str(grad_sum_dtype).removeprefix("torch.")
    if name not in GRAD_SUM_DTYPES:
        raise ValueError(
            f"grad_sum_dtype must be None (the gains' dtype: float32, or float64 for float64 "
            f"parameters) or one of {GRAD_SUM_DTYPES}, got {grad_sum_dtype!r}"
        )
    return name


def check_active_args(
    lr_high, lr_low, period, gain_min=None, gain_max=None, zero_sum="hold",
    gain_increase="additive", gain_init=1.0, grad_sum_dtype=None, significance=None,
):
    """Validate the ActiveLR hyperparameters; returns them as a dict for a param group."""
    check_real("lr_high", lr_high, low=0.0)
    check_real("lr_low", lr_low, low=0.0, high=1.0, low_open=True)
    period = check_period(period)
    if gain_min is not None:
        check_real("gain_min", gain_min, low=0.0, high=1.0, low_open=True)
    if gain_max is not None:
        check_real("gain_max", gain_max, low=1.0)
    if zero_sum not in ZERO_SUM_POLICIES:
        raise ValueError(f"zero_sum must be one of {ZERO_SUM_POLICIES}, got {zero_sum!r}")
    if gain_increase not in GAIN_INCREASES:
        raise ValueError(f"gain_increase must be one of {GAIN_INCREASES}, got {gain_increase!r}")
    check_real("gain_init", gain_init, low=0.0, low_open=True)
    if significance is not None:
        check_real("significance", significance, low=0.0, low_open=True)
        if period != EPOCH:
            check_significance_reachable(significance, period)
    if gain_min is not None and gain_init < gain_min:
        raise ValueError(f"gain_init must be >= gain_min ({gain_min}), got {gain_init}")
    if gain_max is not None and gain_init > gain_max:
        raise ValueError(f"gain_init must be <= gain_max ({gain_max}), got {gain_init}")
    return {
        "lr_high": float(lr_high),
        "lr_low": float(lr_low),
        "period": period,
        "gain_min": None if gain_min is None else float(gain_min),
        "gain_max": None if gain_max is None else float(gain_max),
        "zero_sum": zero_sum,
        "gain_increase": gain_increase,
        "gain_init": float(gain_init),
        "grad_sum_dtype": check_grad_sum_dtype(grad_sum_dtype),
        "significance": None if significance is None else float(significance),
    }
