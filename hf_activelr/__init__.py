"""hf-activelr: ActiveLR optimizers for PyTorch and the Hugging Face Trainer.

ActiveLR (Wadi, Fredette, Senecal, "Read the Signs: Towards Invariance to Gradient Descent's
Hyperparameter Initialization", arXiv 2301.10133) gives every parameter element its own
learning-rate gain and adapts it once a period from the sign of the gradient summed over
the period: the same sign as last period, the gain grows by ``lr_high``; a flipped sign,
it is multiplied by ``lr_low``. Presets (:mod:`hf_activelr.optim.presets`): the paper's rule,
the noise-robust ``significant`` rule (the default of ``active_adamw``: a sign counts only when
the period's sum stands out of its noise) chosen by the quality protocol, and the earlier
``two_sided`` rule.

The layers (docs/layout.md):

- :mod:`hf_activelr.optim`: the optimizers, the rule, the presets, :class:`ActiveConfig`;
  imports torch only;
- :mod:`hf_activelr.integrations`: Hugging Face: the name registry, the Trainer patch and
  :class:`ActiveTrainer`, model cards;
- :mod:`hf_activelr.experiments`: the sweeps, the quality protocol, the offline tasks.

``import hf_activelr`` registers the Trainer names (``TrainingArguments(optim="active_adamw")``)
without importing transformers: the transformers modules involved are patched when they are
imported (:func:`hf_activelr.integrations.transformers_patch.install_on_import`).
``ActiveTrainer`` and ``ActivePeriodCallback`` import transformers on first access.
"""

from .integrations.registry import available_optimizers, register
from .optim import (
    ActiveAdaBelief,
    ActiveAdaBound,
    ActiveAdamW,
    ActiveConfig,
    ActiveLR,
    ActiveOptimizer,
    ActiveRAdam,
    ActiveSGD,
    check_consistent,
    consistency_report,
)
from .optim.presets import DEFAULT_PRESET, PRESETS, preset_kwargs

__version__ = "0.1.0"

# Names that need transformers: imported on first access (PEP 562).
_TRANSFORMERS_NAMES = {"ActiveTrainer", "ActivePeriodCallback"}


def __getattr__(name: str):
    if name in _TRANSFORMERS_NAMES:
        from .integrations import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_activelr' has no attribute {name!r}")


def _install_transformers_integration() -> None:
    """``import hf_activelr`` makes ``TrainingArguments(optim="active_adamw")`` valid."""
    from .integrations import transformers_patch

    transformers_patch.install_on_import()


_install_transformers_integration()

__all__ = [
    "ActiveAdaBelief",
    "ActiveAdaBound",
    "ActiveAdamW",
    "ActiveConfig",
    "ActiveLR",
    "ActiveOptimizer",
    "ActivePeriodCallback",
    "ActiveTrainer",
    "ActiveRAdam",
    "ActiveSGD",
    "DEFAULT_PRESET",
    "PRESETS",
    "__version__",
    "available_optimizers",
    "check_consistent",
    "consistency_report",
    "preset_kwargs",
    "register",
]
