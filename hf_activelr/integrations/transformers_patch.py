"""The one place that touches transformers internals: its optimizer-name enum, its optimizer
handler table and its default callbacks. Tested for the supported range (pyproject pins it);
``install()`` raises a clear error when an upgrade moves any of them.

After ``install()`` (run by ``import hf_activelr``), every registered name is a valid
``TrainingArguments(optim=...)`` and ``--optim`` choice, and the *stock* ``Trainer`` builds it.
"""

from __future__ import annotations

import torch

from .. import registry
from .._validation import EPOCH

SUPPORTED = "transformers>=5.0,<6"
_INSTALLED = False


class IntegrationError(RuntimeError):
    """transformers changed in a way this integration does not support."""


def _internals():
    try:
        import transformers
        from transformers import trainer as trainer_module
        from transformers import trainer_optimizer
        from transformers.training_args import OptimizerNames
    except ImportError as error:  # transformers missing or reorganised
        raise IntegrationError(
            f"hf_activelr's Trainer integration needs {SUPPORTED}: {error}"
        ) from error
    missing = [
        name for name, present in (
            ("transformers.trainer_optimizer._OPTIMIZER_HANDLERS",
             isinstance(getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None), dict)),
            ("transformers.trainer_optimizer.OptimizerContext",
             hasattr(trainer_optimizer, "OptimizerContext")),
            ("transformers.trainer.DEFAULT_CALLBACKS",
             isinstance(getattr(trainer_module, "DEFAULT_CALLBACKS", None), list)),
            ("OptimizerNames._value2member_map_",
             isinstance(getattr(OptimizerNames, "_value2member_map_", None), dict)),
        ) if not present
    ]
    if missing:
        raise IntegrationError(
            f"transformers {transformers.__version__} lacks {', '.join(missing)}, which "
            f"hf_activelr's Trainer integration uses (supported: {SUPPORTED}). Pin transformers "
            "to the supported range or upgrade hf-activelr; the optimizers themselves still "
            "work when passed to Trainer(optimizers=(optimizer, None))."
        )
    return trainer_module, trainer_optimizer, OptimizerNames


def _add_enum_member(enum_cls, value: str) -> None:
    """Add ``value`` to a ``str`` Enum, as if it had been declared (argparse choices included)."""
    if value in enum_cls._value2member_map_:
        return
    member = str.__new__(enum_cls, value)
    member._name_ = value.upper()
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[member._name_] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(member._name_)
    type.__setattr__(enum_cls, member._name_, member)


def fused_available(device) -> bool:
    """Whether the Trainer names default to the compiled (fused) step on ``device``: on CUDA
    with Triton. Not on CPU: there the compiled kernels' OpenMP threads compete with torch's
    own and slowed a small GPT-2's whole training step by ~10% (measured), and each run pays
    the compilation; ``optim_args="fused=true"`` opts in (large models gain, see benchmarks)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def optimizer_kwargs(args, options: dict[str, str]) -> tuple[type, dict]:
    """The class and keyword arguments for ``args.optim`` (a registered name), built from the
    usual TrainingArguments and ``optim_args``: learning_rate, adam_beta1/2, adam_epsilon;
    weight decay comes per group from the Trainer's decay / no-decay grouping."""
    import inspect

    entry = registry.get(args.optim)
    accepted = inspect.signature(entry.optimizer_cls).parameters
    kwargs = {"lr": args.learning_rate}
    if "betas" in accepted:
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
    if "eps" in accepted:
        kwargs["eps"] = args.adam_epsilon
    kwargs.update(entry.defaults)
    kwargs.update(registry.parse_options(entry, options))
    if "period" in accepted:
        # No period given: one epoch of optimizer updates, set at train start (the paper's).
        kwargs.setdefault("period", EPOCH)
    if kwargs.get("fused") is None and kwargs.get("foreach") is None and "fused" in accepted:
        kwargs["fused"] = fused_available(args.device)
    return entry.optimizer_cls, kwargs


def _handler(context):
    return optimizer_kwargs(context.args, context.optim_args)


def _on_register(entry) -> None:
    _, trainer_optimizer, OptimizerNames = _internals()
    _add_enum_member(OptimizerNames, entry.name)
    trainer_optimizer._OPTIMIZER_HANDLERS[OptimizerNames(entry.name)] = _handler


def install() -> None:
    """Make every registered name a Trainer optimizer and add the epoch-period callback."""
    global _INSTALLED
    trainer_module, _, _ = _internals()
    for name in registry.available_optimizers():
        _on_register(registry.get(name))
    if not _INSTALLED:
        from ..trainer import ActivePeriodCallback

        if ActivePeriodCallback not in trainer_module.DEFAULT_CALLBACKS:
            trainer_module.DEFAULT_CALLBACKS.append(ActivePeriodCallback)
        registry._LISTENERS.append(_on_register)
        _INSTALLED = True
