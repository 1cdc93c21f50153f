"""Named ActiveLR settings (ActiveConfig values): the paper's rule and two rules beyond it,
chosen by measurement.

    ActiveAdamW(model.parameters(), lr=1e-3, config=preset_config("significant"))
    TrainingArguments(optim="active_adamw", optim_args="preset=paper")

- ``"paper"``: Wadi et al. (arXiv 2301.10133) unchanged: additive increase ``gain += lr_high``
  where the period sum keeps its sign, ``gain *= lr_low`` where it flips, no bounds, one epoch
  per period. Values per variant as in the authors' code (AdamW 2.0 / 0.5; RAdam, AdaBelief
  0.05 / 0.95; SGD and AdaBound, which have no published values, 0.05 / 0.95).
- ``"significant"`` (the default of ``active_adamw``): see :data:`SIGNIFICANT`,
  docs/algorithm.md and README ("Quality"): a sign counts only where the period's sum stands
  out of its own noise, mirrored increase and decrease (no drift under noise), gains from 1
  within [0.03, 30], a 10-step period.
- ``"two_sided"`` (the previous default, kept for comparison): see :data:`TWO_SIDED`: a
  multiplicative increase with ``x1.5 / x0.5``, so random signs shrink the gain, gains from
  0.1 within [0.001, 100], a 10-step period. Its downward drift under noise makes most gains
  collapse toward the floor in runs of more than a few hundred steps.

The Trainer name ``active_adamw`` uses :data:`DEFAULT_PRESET`; ``active_adamw_paper`` the
paper's. The optimizer classes keep the paper's argument defaults (explicit arguments always
win over a preset).
"""

from __future__ import annotations

from ._validation import EPOCH
from .config import ActiveConfig

#: The two-sided rule (see module docstring). Under random signs ``log(gain)`` drifts by
#: ``(log(1 + lr_high) + log(lr_low)) / 2 < 0`` per period, so a learning rate too large to
#: make progress is scaled down; consistent signs (a learning rate too small) grow the gain
#: geometrically, up to ``gain_max``.
TWO_SIDED = ActiveConfig(
    lr_high=0.5, lr_low=0.5, gain_increase="multiplicative", gain_init=0.1, gain_min=0.001,
    gain_max=100.0, period=10, significance=None,
)

#: The paper's rule where a class has no published values (SGD, AdaBound, the wrapper): the
#: authors' conservative RAdam / AdaBelief settings.
PAPER_FALLBACK = {"lr_high": 0.05, "lr_low": 0.95}

#: The noise-robust rule, the default of ``active_adamw`` (see docs/algorithm.md and README,
#: "Quality"): a period's sign counts only where the sum stands out of its own noise,
#: ``|s| > 2 * sqrt(sum(grad ** 2))``; other elements hold their gain, so noise neither grows
#: nor shrinks it. Increase and decrease are mirror images (``x1.5`` and ``/1.5``): signs that
#: agree or flip at random leave ``log(gain)`` without drift. Gains start at 1, as in the paper:
#: a start ``c`` is exactly a learning rate ``c * lr`` (docs/algorithm.md, "The start is a
#: learning-rate multiplier"), so at the rate a user tuned for the base this optimizer is the
#: base until evidence moves a gain. (The previous start, ``10 ** -0.5``, moved the whole curve
#: half a decade: better where the rate was too large, worse by as much at the base's best.)
#: Gains range from 0.03 to 30 (1.5 decades either way: a stuck model's consistent gradients
#: cannot grow a gain without limit). A period of 10 steps, so runs shorter than two epochs
#: adapt too.
SIGNIFICANT = ActiveConfig(
    lr_high=0.5, lr_low=1 / 1.5, gain_increase="multiplicative", gain_init=1.0,
    gain_min=0.03, gain_max=30.0, period=10, significance=2.0,
)

PRESETS = ("paper", "two_sided", "significant")
DEFAULT_PRESET = "significant"


def preset_config(name: str, optimizer_cls=None) -> ActiveConfig:
    """Preset ``name`` as an :class:`ActiveConfig` for ``optimizer_cls`` (an Active class; the
    paper's values depend on it, AdamW's when None). ``period`` is ``"epoch"`` for the paper
    (set by the Trainer; give a number in a custom loop)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {name!r}")
    if name == "two_sided":
        return TWO_SIDED
    if name == "significant":
        return SIGNIFICANT
    if optimizer_cls is None:
        from .adamw import ActiveAdamW as optimizer_cls
    # The authors' values where published (ActiveAdamW 2.0 / 0.5, ...), else the fallback.
    published = getattr(optimizer_cls, "paper_options", None) or PAPER_FALLBACK
    return ActiveConfig(**published, gain_increase="additive", gain_init=1.0, gain_min=None,
                        gain_max=None, period=EPOCH, significance=None)


def preset_kwargs(name: str, optimizer_cls=None) -> dict:
    """The keyword arguments of :func:`preset_config` (every ActiveLR option but
    ``zero_sum``, ``grad_sum_dtype`` and ``gain_dtype``, which no preset changes)."""
    values = preset_config(name, optimizer_cls).group_values()
    return {key: value for key, value in values.items()
            if key not in ("zero_sum", "grad_sum_dtype", "gain_dtype")}
