"""Named ActiveLR settings: the paper's rule, and a two-sided rule chosen by LR sweeps.

    ActiveAdamW(model.parameters(), lr=1e-3, period=10, **preset_kwargs("two_sided"))
    TrainingArguments(optim="active_adamw", optim_args="preset=paper")

- ``"paper"``: Wadi et al. (arXiv 2301.10133) unchanged: additive increase ``gain += lr_high``
  where the period sum keeps its sign, ``gain *= lr_low`` where it flips, no bounds, one epoch
  per period. Values per variant as in the authors' code (AdamW 2.0 / 0.5; RAdam, AdaBelief
  0.05 / 0.95; SGD and AdaBound, which have no published values, 0.05 / 0.95).
- ``"two_sided"``: see :data:`TWO_SIDED` and README ("Two-sided ActiveLR"): a multiplicative
  increase, so that random signs (a too-large learning rate) shrink the gain instead of
  growing it, gains bounded to two decades either side of 1, and a short period.

The Trainer name ``active_adamw`` uses :data:`DEFAULT_PRESET`; ``active_adamw_paper`` the
paper's. The optimizer classes keep the paper's argument defaults (explicit arguments always
win over a preset).
"""

from __future__ import annotations

import inspect

from ._validation import EPOCH

#: The two-sided rule (see module docstring). Under random signs ``log(gain)`` drifts by
#: ``(log(1 + lr_high) + log(lr_low)) / 2 < 0`` per period, so a learning rate too large to
#: make progress is scaled down; consistent signs (a learning rate too small) grow the gain
#: geometrically, up to ``gain_max``.
TWO_SIDED = {
    "lr_high": 0.5, "lr_low": 0.5, "gain_increase": "multiplicative", "gain_init": 0.1,
    "gain_min": 0.001, "gain_max": 100.0, "period": 10,
}

#: The paper's rule where a class has no published values (SGD, AdaBound, the wrapper): the
#: authors' conservative RAdam / AdaBelief settings.
PAPER_FALLBACK = {"lr_high": 0.05, "lr_low": 0.95}

#: The noise-robust rule (see module docstring and docs/algorithm.md): a period's sign counts
#: only where the sum stands out of its own noise, ``|s| > 2 * sqrt(sum(grad ** 2))``; other
#: elements hold their gain. Increase and decrease are mirror images (``x1.5`` and ``/1.5``),
#: so signs that agree or flip at random leave ``log(gain)`` without drift; gains start at 1
#: and stay within one decade of it; a period of 10 steps, so short runs adapt too.
SIGNIFICANT = {
    "lr_high": 0.5, "lr_low": 1 / 1.5, "gain_increase": "multiplicative", "gain_init": 1.0,
    "gain_min": 0.1, "gain_max": 10.0, "period": 10, "significance": 2.0,
}

PRESETS = ("paper", "two_sided", "significant")
DEFAULT_PRESET = "two_sided"


def preset_kwargs(name: str, optimizer_cls=None) -> dict:
    """The ActiveLR keyword arguments of preset ``name`` for ``optimizer_cls`` (an Active
    class; the paper's values depend on it, AdamW's when None). ``period`` is included:
    ``"epoch"`` for the paper (set by the Trainer; give a number in a custom loop)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    if name == "two_sided":
        return dict(TWO_SIDED)
    if name == "significant":
        return dict(SIGNIFICANT)
    if optimizer_cls is None:
        from .optim import ActiveAdamW as optimizer_cls
    # The classes' own defaults are the authors' values (ActiveAdamW 2.0 / 0.5, ...).
    parameters = inspect.signature(optimizer_cls).parameters
    values = {
        key: parameters[key].default
        if key in parameters and parameters[key].default is not inspect.Parameter.empty
        else fallback
        for key, fallback in PAPER_FALLBACK.items()
    }
    return {**values, "gain_increase": "additive", "gain_init": 1.0, "gain_min": None,
            "gain_max": None, "period": EPOCH, "significance": None}
