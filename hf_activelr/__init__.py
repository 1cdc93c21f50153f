"""hf-activelr: ActiveLR optimizers for PyTorch and the Hugging Face Trainer.

ActiveLR (Wadi, Fredette, Senecal, "Read the Signs: Towards Invariance to Gradient Descent's
Hyperparameter Initialization", arXiv 2301.10133) gives every parameter element its own
learning-rate gain and adapts it once a period from the sign of the gradient summed over
the period: the same sign as last period, the gain grows by ``lr_high``; a flipped sign,
it is multiplied by ``lr_low``. Presets (:mod:`hf_activelr.presets`): the paper's rule, the
noise-robust ``significant`` rule (the default of ``active_adamw``: a sign counts only when the
period's sum stands out of its noise) chosen by the quality protocol, and the earlier
``two_sided`` rule.
"""

from .distributed import check_consistent, consistency_report
from .optim import (
    ActiveAdaBelief,
    ActiveAdaBound,
    ActiveAdamW,
    ActiveOptimizer,
    ActiveRAdam,
    ActiveSGD,
)
from .presets import DEFAULT_PRESET, PRESETS, preset_kwargs
from .registry import available_optimizers, register
from .wrapper import ActiveLR

__version__ = "0.1.0"


def _install_transformers_integration() -> None:
    """``import hf_activelr`` makes ``TrainingArguments(optim="active_adamw")`` valid."""
    import warnings

    from .integrations import transformers_patch

    try:
        transformers_patch.install()
    except transformers_patch.IntegrationError as error:
        warnings.warn(str(error), stacklevel=3)


_install_transformers_integration()

from .trainer import ActivePeriodCallback, ActiveTrainer  # noqa: E402

__all__ = [
    "ActiveAdaBelief",
    "ActiveAdaBound",
    "ActiveAdamW",
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
