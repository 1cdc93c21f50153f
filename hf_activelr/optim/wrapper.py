"""`ActiveLR`: make any constructed torch optimizer Active.

The gain scales the element's learning rate. For optimizers whose step is linear in ``lr``
(SGD, Adam, AdamW, Adagrad, Lion, ... with decoupled weight decay scaled by ``lr``) that is
``p_new = p_old + g * (p_base - p_old)``, where ``p_base`` is where the wrapped optimizer's
own step takes the parameter. The wrapper remembers ``p_old``, lets the optimizer step, and
scales the displacement: no knowledge of the optimizer's internals, so it works with third
party optimizers too. It costs a copy of the stepped parameters per step (none for a tensor
whose gains all read 1) and a few passes over them; the built-in variants (``ActiveAdamW``,
...) fold the gain into their update instead.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim import Optimizer

from . import rule
from ._mixin import ActiveMixin
from .config import OPTION_NAMES, ActiveConfig


class ActiveLR(ActiveMixin, Optimizer):
    """ActiveLR (Wadi et al., arXiv 2301.10133) around ``optimizer``.

    It is itself a ``torch.optim.Optimizer``: ``param_groups`` are the wrapped optimizer's
    (schedulers move ``lr`` on both), ``state_dict`` holds the wrapped optimizer's state plus
    ``gain`` and ``grad_sum`` per parameter, ``zero_grad`` and hooks work as usual.
    The ActiveLR options (``config`` and keyword arguments, see
    :class:`~hf_activelr.optim.config.ActiveConfig`; ``lr_high``, ``lr_low`` and ``period``
    are required) are stored in each param group.
    """

    def __init__(self, optimizer: Optimizer, *, config: ActiveConfig | None = None, **options):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a constructed torch.optim.Optimizer, got {type(optimizer)!r}"
            )
        if isinstance(optimizer, ActiveMixin):
            raise TypeError(f"{type(optimizer).__name__} is already Active; do not wrap it again")
        if config is not None and not isinstance(config, ActiveConfig):
            raise TypeError(f"config must be an ActiveConfig, got {type(config).__name__}")
        base = config.group_values() if config is not None else {}
        active = ActiveConfig.from_options(options, base).group_values()
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, {**optimizer.defaults, **active})
        # One list of group dicts for both: schedulers and add_param_group see the same groups.
        self.param_groups = optimizer.param_groups

    def add_param_group(self, param_group: dict) -> None:
        added = False
        if not any(param_group is group for group in self.optimizer.param_groups):
            for key in OPTION_NAMES:
                param_group.setdefault(key, self.defaults[key])
            self.optimizer.add_param_group(param_group)
            param_group = self.optimizer.param_groups[-1]
            added = True
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        try:
            self._init_active_group(param_group)
        except (TypeError, ValueError):
            if added:
                self.optimizer.param_groups.pop()
            raise
        self._forget_gain_stats()
        if self.param_groups is not self.optimizer.param_groups:  # during __init__ only
            self.param_groups.append(param_group)

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles defaults, state and param_groups only; the wrapped
        # optimizer goes along (its param_groups are this one's: one list, kept by the memo).
        return {**super().__getstate__(), "optimizer": self.optimizer}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.param_groups = self.optimizer.param_groups

    def __repr__(self) -> str:
        group = self.param_groups[0] if self.param_groups else {}
        settings = ", ".join(f"{k}={group.get(k)}" for k in ("lr_high", "lr_low", "period"))
        return f"ActiveLR({settings},\n{self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._begin_step(closure)
        moved = []  # per group: the parameters whose step the gains change, where they stood
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("ActiveLR does not support sparse gradients; use dense ones")
            states = []
            for param in params:
                state = self.state[param]
                self._ensure_active_state(param, state, group)
                states.append(state)
            if not params:
                continue
            # The raw gradients, before the wrapped optimizer may touch them.
            torch._foreach_add_([s["grad_sum"] for s in states], [p.grad for p in params])
            if group["significance"] is not None:
                torch._foreach_addcmul_([s["grad_sq_sum"] for s in states],
                                        [p.grad for p in params], [p.grad for p in params])
            # Where every gain reads 1 (and gain_init is 1) the wrapped step stands as it is.
            keep = [i for i, s in enumerate(states) if group["gain_init"] != 1.0
                    or not self._gain_multipliers.reads_one(s["gain"])]
            if keep:
                params = [params[i] for i in keep]
                moved.append((group, params, [states[i] for i in keep],
                              torch._foreach_mul(params, 1.0)))  # where they stood
        self.optimizer.step()
        for group, params, states, starts in moved:
            scales = self._gain_multipliers([s["gain"] for s in states])
            scaled = [i for i, scale in enumerate(scales) if scale is not None]
            torch._foreach_sub_(params, starts)  # the wrapped optimizer's displacement
            if scaled:
                torch._foreach_mul_([params[i] for i in scaled], [scales[i] for i in scaled])
            if group["gain_init"] != 1.0:
                torch._foreach_mul_(params, group["gain_init"])
            torch._foreach_add_(params, starts)
        for group in self.param_groups:
            self._tick(group)
        return loss

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict with ``gain``/``grad_sum`` added per parameter."""
        merged = self.optimizer.state_dict()
        active = Optimizer.state_dict(self)
        for index, state in active["state"].items():
            merged["state"].setdefault(index, {}).update(state)
        return merged

    def load_state_dict(self, state_dict: dict) -> None:
        self._validate_state_dict(state_dict)
        previous = [dict(group) for group in self.param_groups]
        base_state = {
            index: {k: v for k, v in state.items() if k not in rule.ACTIVE_STATE_KEYS}
            for index, state in state_dict["state"].items()
        }
        self.optimizer.load_state_dict({**state_dict, "state": base_state})
        self.param_groups = self.optimizer.param_groups
        self.state = defaultdict(dict)
        self._restore_active_state(state_dict, previous)
