"""The Active variants: one class per base optimizer, all built on :class:`ActiveOptimizer`."""

from .adabelief import ActiveAdaBelief
from .adabound import ActiveAdaBound
from .adamw import ActiveAdamW
from .base import ActiveOptimizer
from .radam import ActiveRAdam
from .sgd import ActiveSGD

__all__ = [
    "ActiveAdaBelief",
    "ActiveAdaBound",
    "ActiveAdamW",
    "ActiveOptimizer",
    "ActiveRAdam",
    "ActiveSGD",
]
