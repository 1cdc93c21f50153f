"""Argument checks shared by every optimizer: clear errors, nothing silently corrected. The
ActiveLR options themselves are checked by :class:`hf_activelr.optim.config.ActiveConfig`."""

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
ZERO_SUM_POLICIES = ("hold", "flip")  # see hf_activelr.optim.rule
GAIN_INCREASES = ("additive", "multiplicative")  # see hf_activelr.optim.rule
#: Storage dtypes of the running sum besides the default (the gains' dtype): see rule.
GRAD_SUM_DTYPES = ("bfloat16",)
#: Storage dtypes of the gains besides the default (see rule: the lean state).
GAIN_DTYPES = ("bfloat16",)
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
    if math.sqrt(period) <= significance:  # period <= z**2, without overflow
        raise ValueError(
            f"significance={significance} needs period > significance**2 = "
            f"{float(significance)**2:g} (a sum of n gradients is at most sqrt(n) times the "
            f"root of their squares), got period={period}: use a longer period or a smaller "
            "significance"
        )


def _dtype_name(name: str, value, choices: tuple, default: str):
    """``None`` or one of ``choices``; a ``torch.dtype`` is taken as its name, so param groups
    and state dicts hold a plain string."""
    if value is None:
        return None
    text = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
    if text not in choices:
        raise ValueError(f"{name} must be None ({default}) or one of {choices}, got {value!r}")
    return text


def check_grad_sum_dtype(grad_sum_dtype):
    """``None`` (the gains' dtype) or ``"bfloat16"``."""
    return _dtype_name("grad_sum_dtype", grad_sum_dtype, GRAD_SUM_DTYPES,
                       "float32, or float64 for float64 parameters")


def check_gain_dtype(gain_dtype):
    """``None`` (float32, float64 for float64 parameters) or ``"bfloat16"``."""
    return _dtype_name("gain_dtype", gain_dtype, GAIN_DTYPES,
                       "float32, or float64 for float64 parameters")
