"""The optimizers: the ActiveLR rule, its options, its presets, the Active variants, the
wrapper for any torch optimizer, and the cross-rank consistency check. Imports torch only.

- :mod:`.config`: :class:`ActiveConfig` (the options) and the ``key=value`` parser;
- :mod:`.rule`: the rule (state, period boundary, gains), shared by every variant;
- :mod:`.base` and one module per variant: the class validates and gathers, a pure ``*_delta``
  function computes the base update (single-tensor, foreach and fused paths side by side);
- :mod:`.wrapper`: :class:`ActiveLR` around any constructed torch optimizer;
- :mod:`.presets`: named settings (the paper's, the default ``significant``);
- :mod:`.loading`: a state dict loaded all or nothing (one validation, a roll back);
- :mod:`.paths`: which path a step takes, and the compiled path's fall back;
- :mod:`.stats`: gain statistics, the one reader of gains for figures;
- :mod:`.distributed`: are the states the same on every rank?
"""

from ._mixin import ActiveMixin, unwrap_active
from .adabelief import ActiveAdaBelief
from .adabound import ActiveAdaBound
from .adamw import ActiveAdamW
from .base import ActiveOptimizer
from .config import ActiveConfig
from .distributed import check_consistent, consistency_report
from .radam import ActiveRAdam
from .sgd import ActiveSGD
from .wrapper import ActiveLR

__all__ = [
    "ActiveAdaBelief",
    "ActiveAdaBound",
    "ActiveAdamW",
    "ActiveConfig",
    "ActiveLR",
    "ActiveMixin",
    "ActiveOptimizer",
    "ActiveRAdam",
    "ActiveSGD",
    "check_consistent",
    "consistency_report",
    "unwrap_active",
]
