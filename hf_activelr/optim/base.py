"""`ActiveOptimizer`: the class every Active variant derives from.

It validates and holds state, keeps the period clock, and runs the ActiveLR rule
(:mod:`hf_activelr.optim.rule`) around the variant's base update. A variant supplies:

- ``_check_group(group)``: validation of its own hyperparameters;
- ``_init_base_state(param, state, group)``: the base optimizer's state, same keys as torch's;
- ``_prepare(group, param, state) -> (tensors, scalars)`` and a pure ``_delta`` function:
  the base update at gain 1 for one tensor. Run eagerly it is the single-tensor path (the
  readable reference); compiled it is the fused path;
- ``_foreach_delta(group, params, grads, states) -> (deltas, alpha)``: the multi-tensor path.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch
from torch.optim import Optimizer

from . import loading, paths, rule
from ._fused import fused_chunks, fused_step
from ._mixin import ActiveMixin
from ._validation import check_bool
from .config import ActiveConfig


def _scalar_dtype():
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step_counter() -> torch.Tensor:
    """A per-parameter step count, stored as torch.optim stores it (loads either way)."""
    return torch.tensor(0.0, dtype=_scalar_dtype())


class ActiveOptimizer(ActiveMixin, Optimizer):
    """Base class of the Active variants (see module docstring)."""

    _base_state_key: str | None = None  # a key that marks the base state as initialised
    _step_scalars: tuple = ()  # scalars of _delta that change from step to step

    #: The paper's ``lr_high`` / ``lr_low`` for this variant, where the authors published them
    #: (the class's defaults); empty: the caller must give them (or a preset).
    paper_options: dict = {}

    def __init__(self, params, defaults: dict, *, config: ActiveConfig | None = None,
                 foreach=None, fused=None, **options):
        """``config`` and ``options`` (keyword arguments, which win over ``config``) are the
        ActiveLR options: see :class:`~hf_activelr.optim.config.ActiveConfig`."""
        if config is not None and not isinstance(config, ActiveConfig):
            raise TypeError(f"config must be an ActiveConfig, got {type(config).__name__}")
        base = config.group_values() if config is not None else dict(self.paper_options)
        active = ActiveConfig.from_options(options, base).group_values()
        _check_paths({"foreach": foreach, "fused": fused})
        defaults = {**defaults, **active, "foreach": foreach, "fused": fused}
        super().__init__(params, defaults)

    # -- groups -----------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
            self._init_active_group(self.param_groups[-1])
            self._forget_gain_stats()
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict) -> None:  # pragma: no cover - every variant overrides
        raise NotImplementedError

    # -- state ------------------------------------------------------------------------------

    def _init_base_state(self, param, state, group) -> None:
        """Create the base optimizer's state (variants with lazily created state skip this)."""

    def _kept_dtypes(self, param, group) -> dict:
        """The dtypes ``_init_base_state`` gives ``param``'s floating state tensors, found on
        the meta device (no memory); the step count keeps torch's rule."""
        template: dict = {}
        self._init_base_state(torch.empty_like(param, device="meta"), template, group)
        return {key: value.dtype for key, value in template.items()
                if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0}

    def _state_for(self, param, group) -> dict:
        state = self.state[param]
        if self._base_state_key is not None and self._base_state_key not in state:
            self._init_base_state(param, state, group)
        self._ensure_active_state(param, state, group)
        return state

    # -- the step ---------------------------------------------------------------------------

    def _use_path(self, group) -> str:
        """The group's path (:func:`paths.choose`): ``fused=True``: fused; ``foreach=False``:
        single-tensor; ``foreach=True``: foreach; neither set (the default): fused where it
        wins, else foreach; a fused path that failed stays off for good."""
        return paths.choose(group["fused"], group["foreach"], self._runtime, self._all_params)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step: the base update scaled per element by the gain (see rule)."""
        loss = self._begin_step(closure)
        for group in self.param_groups:
            params, grads, states = self._collect(group)
            if params:
                self._update(group, params, grads, states)
            self._tick(group)
        return loss

    def _collect(self, group):
        """The group's parameters that have a gradient, their gradients and their state."""
        params, grads, states = [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            params.append(param)
            grads.append(param.grad)
            states.append(self._state_for(param, group))
        return params, grads, states

    def _update(self, group, params, grads, states) -> None:
        """Base update and rule, on the group's path (foreach, single-tensor or fused)."""
        path = self._use_path(group)
        if path == "foreach":
            for idx in _group_by_device_and_dtype(params):
                p_, g_, s_ = ([seq[i] for i in idx] for seq in (params, grads, states))
                deltas, alpha = self._foreach_delta(group, p_, g_, s_)
                rule.apply_foreach(
                    p_, g_, [s["gain"] for s in s_], [s["grad_sum"] for s in s_], deltas,
                    alpha * group["gain_init"], self._gain_multipliers,
                    [s["grad_sq_sum"] for s in s_] if rule.keeps_squares(group) else None,
                )
            return
        prepared = [self._prepare(group, p, s) for p, s in zip(params, states)]
        if path == "single":
            for param, grad, state, (tensors, scalars) in zip(params, grads, states, prepared):
                delta = type(self)._delta(param, grad, *tensors, **scalars)
                rule.apply_single(param, grad, state["gain"], state["grad_sum"], delta,
                                  group["gain_init"], _sq_sum(group, state))
            return
        def eager(indices):  # the code the kernels are compiled from: the same results
            for index in indices:
                tensors, scalars = prepared[index]
                delta = type(self)._delta(params[index], grads[index], *tensors, **scalars)
                rule.apply_single(params[index], grads[index], states[index]["gain"],
                                  states[index]["grad_sum"], delta, group["gain_init"],
                                  _sq_sum(group, states[index]))

        scalar_cache: dict = {}  # the fused path's per-step scalars, shared by the group
        if len(params) == len(group["params"]):
            # Every parameter stepped: chunks of parameters that share device, dtype, scalars
            # and state layout go through one compiled call each.
            buckets: dict = defaultdict(list)
            for index, (param, (tensors, scalars)) in enumerate(zip(params, prepared)):
                layout = tuple(t is None for t in tensors)
                buckets[(param.device, param.dtype, layout,
                         tuple(sorted(scalars.items())))].append(index)

            def compiled(indices, progress):
                fused_chunks(
                    type(self)._delta, [params[i] for i in indices],
                    [grads[i] for i in indices], [states[i] for i in indices],
                    [prepared[i][0] for i in indices], prepared[indices[0]][1],
                    self._step_scalars, scalar_cache, group["gain_init"],
                    rule.keeps_squares(group), progress=progress, indices=indices,
                )

            paths.run(self, list(buckets.values()), compiled, eager)
            return

        # Some parameters have no gradient this step: one call per tensor, so a changing set
        # of parameters never triggers a compilation.
        def compiled_one(indices, progress):
            (index,) = indices
            tensors, scalars = prepared[index]
            fused_step(type(self)._delta, params[index], grads[index], states[index], tensors,
                       scalars, self._step_scalars, scalar_cache, group["gain_init"],
                       _sq_sum(group, states[index]))
            progress.append(index)

        paths.run(self, [[i] for i in range(len(params))], compiled_one, eager)

    def load_state_dict(self, state_dict) -> None:
        """torch's load, after one validation of the whole state (:mod:`.loading`); a load
        that is refused, or fails anyway, leaves the optimizer as it was."""
        self._validate_state_dict(state_dict)
        previous = [dict(group) for group in self.param_groups]
        with loading.all_or_nothing(self):
            super().load_state_dict(state_dict)
            self._restore_active_state(state_dict, previous)

    def _base_state_kinds(self, group: dict) -> dict | None:
        """What ``_init_base_state`` makes (on the meta device: no memory); variants whose
        base state is created lazily (SGD's momentum buffer) may keep or lack each key."""
        if self._base_state_key is None:
            return {key: loading.OPTIONAL_PER_ELEMENT for key in self._base_state_keys or ()}
        template: dict = {}
        self._init_base_state(torch.empty(2, device="meta"), template, group)
        return loading.template_kinds(template)

    def _group_checks(self) -> tuple:
        return (self._check_group, _check_paths)

    def _group_keys(self) -> tuple:
        """The variant's own settings, its constructor's (lr, betas, amsgrad...): a group
        saved without one was saved by another optimizer (torch's RAdam has no ``amsgrad``)."""
        parameters = inspect.signature(type(self)).parameters.values()
        return tuple(p.name for p in parameters
                     if p.kind is p.POSITIONAL_OR_KEYWORD and p.name in self.defaults)


def _check_paths(group: dict) -> None:
    """``foreach`` and ``fused``: None or a bool each, not both True (as the constructor)."""
    for name in ("foreach", "fused"):
        if group.get(name) is not None:
            check_bool(name, group[name])
    if group.get("fused") and group.get("foreach"):
        raise ValueError("fused=True and foreach=True are exclusive: pick one path")


def _sq_sum(group: dict, state: dict):
    """The period's sum of squared gradients, where the group keeps it (rule.keeps_squares)."""
    return state["grad_sq_sum"] if rule.keeps_squares(group) else None


def _group_by_device_and_dtype(tensors) -> list[list[int]]:
    """Indices of tensors that share a device and dtype (foreach kernels want that)."""
    buckets: dict = defaultdict(list)
    for index, tensor in enumerate(tensors):
        buckets[(tensor.device, tensor.dtype)].append(index)
    return list(buckets.values())
