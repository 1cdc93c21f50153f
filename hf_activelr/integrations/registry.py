"""One registry from optimizer names to classes, shared by the Trainer integration and the CLI.

``register(name, optimizer_cls, **defaults)`` adds a name; with transformers installed it
becomes a valid ``TrainingArguments(optim=...)`` and ``--optim`` choice at once.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..optim import (
    ActiveAdaBelief,
    ActiveAdaBound,
    ActiveAdamW,
    ActiveMixin,
    ActiveRAdam,
    ActiveSGD,
)
from ..optim.config import OPTION_PARSERS, parse_value
from ..optim.presets import DEFAULT_PRESET, PAPER_FALLBACK, preset_kwargs

# The Active classes' path switches, whose defaults (None) do not tell their type.
PATH_OPTION_TYPES = {"fused": bool, "foreach": bool}
# Arguments the Trainer fills in from TrainingArguments; optim_args may not repeat them.
TRAINER_ARGUMENTS = ("params", "lr", "betas", "eps", "weight_decay")


@dataclass(frozen=True)
class RegisteredOptimizer:
    """A registry entry: the class, the defaults the name implies, and its description."""

    name: str
    optimizer_cls: type
    defaults: dict = field(default_factory=dict)

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.optimizer_cls) or ""
        return doc.splitlines()[0] if doc else self.optimizer_cls.__name__

    @cached_property
    def _signature(self) -> dict:
        """The class's parameters, read once per entry."""
        return dict(inspect.signature(self.optimizer_cls).parameters)

    @cached_property
    def trainer_arguments(self) -> tuple[str, ...]:
        """Which of ``betas`` and ``eps`` the class takes (the Trainer fills them from
        TrainingArguments' adam_beta1/2 and adam_epsilon)."""
        return tuple(name for name in ("betas", "eps") if name in self._signature)

    def accepted_options(self) -> dict:
        """Keys ``optim_args`` may set (the class's keyword arguments but those the Trainer
        fills in), with what parses their string value (a type, or an ActiveLR option's
        parser: :data:`~hf_activelr.optim.config.OPTION_PARSERS`). Computed once per entry."""
        return dict(self._accepted)

    @cached_property
    def _accepted(self) -> dict:
        options = {}
        for name, parameter in self._signature.items():
            if name in (*TRAINER_ARGUMENTS, "config") or parameter.kind in (
                parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD
            ):
                continue
            default = parameter.default
            if name in PATH_OPTION_TYPES:
                options[name] = PATH_OPTION_TYPES[name]
            elif isinstance(default, (bool, int, float, str)):
                options[name] = type(default)
            else:
                options[name] = float
        if issubclass(self.optimizer_cls, ActiveMixin):
            options.update(OPTION_PARSERS)  # the ActiveLR options: ActiveConfig's
        return options


_REGISTRY: dict[str, RegisteredOptimizer] = {}
_LISTENERS: list = []  # called with each new entry (the transformers integration)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_BUILT_IN_DONE = False  # the built-in names below are known not to clash with transformers'



def register(name: str, optimizer_cls, **defaults) -> RegisteredOptimizer:
    """Register ``optimizer_cls`` under ``name`` (lowercase letters, digits, ``_``), with
    ``defaults`` passed to it unless the user overrides them (e.g. ``amsbound=True``)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"optimizer name must match {_NAME.pattern}, got {name!r}")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
        )
    if name in _REGISTRY and _REGISTRY[name].optimizer_cls is not optimizer_cls:
        raise ValueError(
            f"optimizer name {name!r} is already registered to "
            f"{_REGISTRY[name].optimizer_cls.__name__}"
        )
    if name not in _REGISTRY and _BUILT_IN_DONE and name in transformers_names():
        raise ValueError(
            f"optimizer name {name!r} is transformers' own (TrainingArguments(optim={name!r}) "
            "builds its optimizer): registering it would change what the stock name trains "
            "with; choose another name")
    entry = RegisteredOptimizer(name, optimizer_cls, dict(defaults))
    unknown = set(defaults) - set(entry.accepted_options())
    if unknown:
        raise TypeError(
            f"unknown defaults {sorted(unknown)} for {optimizer_cls.__name__}; "
            f"valid: {sorted(entry.accepted_options())}"
        )
    _REGISTRY[name] = entry
    for listener in _LISTENERS:
        listener(entry)
    return entry


def transformers_names() -> set[str]:
    """The optimizer names transformers itself defines (empty without transformers). Imports
    transformers: asked only when a name is registered after the built-in ones."""
    try:
        from transformers.training_args import OptimizerNames
    except ImportError:
        return set()
    # The enum holds the registered names too (transformers_patch adds them).
    return {str(member.value) for member in OptimizerNames} - set(_REGISTRY)


def available_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> RegisteredOptimizer:
    """The entry for ``name``; an unknown name is an error listing the valid ones."""
    key = getattr(name, "value", name)  # an OptimizerNames member
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown ActiveLR optimizer {key!r}; available: {', '.join(available_optimizers())}"
        )
    return _REGISTRY[key]


def parse_options(entry: RegisteredOptimizer, options: dict[str, str]) -> dict:
    """Turn ``optim_args`` strings (``"lr_high=0.05,period=200"``) into typed keyword args."""
    accepted = entry.accepted_options()
    parsed = {}
    options = dict(options)
    if "preset" in options:  # first, so that the other keys override it
        parsed.update(preset_kwargs(options.pop("preset"), entry.optimizer_cls))
    for key, text in options.items():
        if key not in accepted:
            raise ValueError(
                f"unknown optim_args key {key!r} for {entry.name}; valid keys: preset, "
                f"{', '.join(sorted(accepted))} (lr, betas, eps and weight_decay come from "
                "TrainingArguments)"
            )
        parsed[key] = _parse_value(key, text, accepted[key])
    return parsed


def _parse_value(key: str, text, kind: type):
    try:
        return parse_value(key, text, kind)
    except ValueError as error:
        raise ValueError(f"optim_args {error}") from None


# Built-in names. ``active_sgd`` and ``active_adamw`` use the default preset (significant,
# chosen by the quality protocol: README), the families it was measured on; the paper's rule
# stays available, unchanged, as ``*_paper`` or optim_args="preset=paper". ActiveSGD and
# ActiveAdaBound have no published ActiveLR settings: their paper preset takes the
# conservative RAdam/AdaBelief ones (lr_high=0.05, lr_low=0.95).
register("active_sgd", ActiveSGD, **preset_kwargs(DEFAULT_PRESET, ActiveSGD))
register("active_sgd_paper", ActiveSGD, **preset_kwargs("paper", ActiveSGD))
register("active_adamw", ActiveAdamW, **preset_kwargs(DEFAULT_PRESET, ActiveAdamW))
register("active_adamw_paper", ActiveAdamW, **preset_kwargs("paper", ActiveAdamW))
register("active_radam", ActiveRAdam)
register("active_adabelief", ActiveAdaBelief)
register("active_adabound", ActiveAdaBound, **PAPER_FALLBACK)
register("active_amsbound", ActiveAdaBound, **PAPER_FALLBACK, amsbound=True)
_BUILT_IN_DONE = True
