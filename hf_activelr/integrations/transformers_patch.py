"""The one place that touches transformers internals: its optimizer-name enum, its optimizer
handler table and its default callbacks. Tested for the supported range (pyproject pins it);
a moved or retyped internal is a clear error (a warning at import time).

``import hf_activelr`` calls :func:`install_on_import`: the three transformers modules involved
are patched as soon as they are imported (at once if they already are), so that every
registered name is a valid ``TrainingArguments(optim=...)`` and ``--optim`` choice and the
*stock* ``Trainer`` builds it, while ``import hf_activelr`` itself does not import
transformers (about 5 s with peft and accelerate; see README "Layout"). :func:`install`
imports them and patches at once.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

from ..optim.config import EPOCH
from . import registry

SUPPORTED = "transformers>=5.0,<6"
_INSTALLED = False
_TRAINING_ARGS = "transformers.training_args"
_TRAINER_OPTIMIZER = "transformers.trainer_optimizer"
_TRAINER = "transformers.trainer"


class IntegrationError(RuntimeError):
    """transformers changed in a way this integration does not support."""


def _internals():
    try:
        from transformers import trainer as trainer_module
        from transformers import trainer_optimizer
        from transformers.training_args import OptimizerNames
    except ImportError as error:  # transformers missing or reorganised
        raise IntegrationError(
            f"hf_activelr's Trainer integration needs {SUPPORTED}: {error}"
        ) from error
    _check([
        ("transformers.trainer_optimizer._OPTIMIZER_HANDLERS",
         isinstance(getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None), dict)),
        ("transformers.trainer_optimizer.OptimizerContext",
         hasattr(trainer_optimizer, "OptimizerContext")),
        ("transformers.trainer.DEFAULT_CALLBACKS",
         isinstance(getattr(trainer_module, "DEFAULT_CALLBACKS", None), list)),
        ("OptimizerNames._value2member_map_",
         isinstance(getattr(OptimizerNames, "_value2member_map_", None), dict)),
    ])
    return trainer_module, trainer_optimizer, OptimizerNames


def _add_enum_member(enum_cls, value: str) -> None:
    """Add ``value`` to a ``str`` Enum, as if it had been declared (argparse choices included)."""
    if value in enum_cls._value2member_map_:
        return
    member = str.__new__(enum_cls, value)
    member._name_ = value.upper()
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    if enum_cls.__name__ == "OptimizerNames":
        # Pickled (training_args.bin) as a call to optimizer_name, so that unpickling imports
        # hf_activelr first: enum's own pickling, OptimizerNames("active_adamw"), fails in a
        # process that has not imported it.
        member.__reduce_ex__ = _PickledName(value)
    enum_cls._member_map_[member._name_] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(member._name_)
    type.__setattr__(enum_cls, member._name_, member)


def optimizer_name(value: str):
    """The ``OptimizerNames`` member ``value``, the names registered (a ``training_args.bin``
    saved with ``optim="active_*"`` unpickles through this: importing this module imported
    hf_activelr)."""
    from transformers.training_args import OptimizerNames

    _patch_names(sys.modules[_TRAINING_ARGS])
    try:
        return OptimizerNames(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a registered optimizer name; if it was registered with "
            "hf_activelr.register(...) in the run that saved it, register it before "
            "loading") from None


class _PickledName:
    """A registered ``OptimizerNames`` member's ``__reduce_ex__``: :func:`optimizer_name`."""

    def __init__(self, value: str):
        self.value = value

    def __call__(self, protocol):
        return optimizer_name, (self.value,)


def optimizer_kwargs(args, options: dict[str, str]) -> tuple[type, dict]:
    """The class and keyword arguments for ``args.optim`` (a registered name), built from the
    usual TrainingArguments and ``optim_args``: learning_rate, adam_beta1/2, adam_epsilon;
    weight decay comes per group from the Trainer's decay / no-decay grouping."""
    entry = registry.get(args.optim)
    kwargs = {"lr": args.learning_rate}
    if "betas" in entry.trainer_arguments:
        kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
    if "eps" in entry.trainer_arguments:
        kwargs["eps"] = args.adam_epsilon
    kwargs.update(entry.defaults)
    kwargs.update(registry.parse_options(entry, options))
    if "period" in entry.accepted_options():
        # No period given: one epoch of optimizer updates, set at train start (the paper's).
        kwargs.setdefault("period", EPOCH)
    # fused / foreach not given: the class's default path, which compiles the step where it
    # wins (CUDA with Triton; CPU from hf_activelr.optim.paths.AUTO_FUSED_MIN_ELEMENTS).
    return entry.optimizer_cls, kwargs


def _handler(context):
    return optimizer_kwargs(context.args, context.optim_args)


def _check(checks) -> None:
    """Raise IntegrationError naming every internal that ``checks`` (label, present) misses."""
    import transformers

    missing = [label for label, present in checks if not present]
    if missing:
        raise IntegrationError(
            f"transformers {transformers.__version__} lacks {', '.join(missing)}, which "
            f"hf_activelr's Trainer integration uses (supported: {SUPPORTED}). Pin transformers "
            "to the supported range or upgrade hf-activelr; the optimizers themselves still "
            "work when passed to Trainer(optimizers=(optimizer, None))."
        )


def _patch_names(training_args) -> None:
    """Every registered name becomes an ``OptimizerNames`` member."""
    names = getattr(training_args, "OptimizerNames", None)
    _check([
        ("OptimizerNames", names is not None),
        ("OptimizerNames._value2member_map_",
         isinstance(getattr(names, "_value2member_map_", None), dict)),
    ])
    for name in registry.available_optimizers():
        _add_enum_member(names, name)


def _patch_handlers(trainer_optimizer) -> None:
    """Every registered name gets the handler that builds it."""
    _check([
        ("transformers.trainer_optimizer._OPTIMIZER_HANDLERS",
         isinstance(getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None), dict)),
        ("transformers.trainer_optimizer.OptimizerContext",
         hasattr(trainer_optimizer, "OptimizerContext")),
    ])
    training_args = sys.modules[_TRAINING_ARGS]  # trainer_optimizer imports it
    _patch_names(training_args)
    for name in registry.available_optimizers():
        member = training_args.OptimizerNames(name)
        trainer_optimizer._OPTIMIZER_HANDLERS[member] = _handler


def _patch_callbacks(trainer_module) -> None:
    """Every Trainer sets ``period="epoch"`` at train start."""
    _check([
        ("transformers.trainer.DEFAULT_CALLBACKS",
         isinstance(getattr(trainer_module, "DEFAULT_CALLBACKS", None), list)),
    ])
    from .callbacks import ActivePeriodCallback

    if ActivePeriodCallback not in trainer_module.DEFAULT_CALLBACKS:
        trainer_module.DEFAULT_CALLBACKS.append(ActivePeriodCallback)


_PATCHES = {_TRAINING_ARGS: _patch_names, _TRAINER_OPTIMIZER: _patch_handlers,
            _TRAINER: _patch_callbacks}


def _on_register(entry) -> None:
    """A name registered after transformers was imported: add it where it is loaded."""
    for module_name in (_TRAINING_ARGS, _TRAINER_OPTIMIZER):
        module = sys.modules.get(module_name)
        if module is not None:
            _PATCHES[module_name](module)


def _listen() -> None:
    global _INSTALLED
    if not _INSTALLED:
        registry._LISTENERS.append(_on_register)
        _INSTALLED = True


def install() -> None:
    """Import the transformers modules involved and make every registered name a Trainer
    optimizer, with the epoch-period callback; raises IntegrationError if they moved."""
    modules = _internals()  # (trainer, trainer_optimizer, OptimizerNames): checks all at once
    _patch_names(sys.modules[_TRAINING_ARGS])
    _patch_handlers(modules[1])
    _patch_callbacks(modules[0])
    _listen()


def _patch_warning(module_name: str, module) -> None:
    try:
        _PATCHES[module_name](module)
    except IntegrationError as error:
        warnings.warn(str(error), stacklevel=2)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the three modules above it asks the other finders for the
    spec and patches the module right after the module has run. Removes itself once all are
    patched."""

    def __init__(self, pending):
        self.pending = set(pending)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        run_module = loader.exec_module

        def exec_module(module):
            run_module(module)
            self.pending.discard(fullname)
            if not self.pending and self in sys.meta_path:
                sys.meta_path.remove(self)
            _patch_warning(fullname, module)

        # A file finder makes a new loader per spec: setting it on this one touches no other.
        loader.exec_module = exec_module
        return spec


def install_on_import() -> None:
    """Patch the transformers modules now where imported, and as soon as they are otherwise
    (``import hf_activelr`` runs this). A moved internal is a warning, not an error: the
    optimizers work without the Trainer names."""
    _listen()
    pending = []
    for module_name in _PATCHES:
        module = sys.modules.get(module_name)
        if module is None:
            pending.append(module_name)
        else:
            _patch_warning(module_name, module)
    if pending and not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(pending))
