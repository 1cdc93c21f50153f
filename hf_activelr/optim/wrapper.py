"""`ActiveLR`: make any constructed torch optimizer Active.

The gain scales the element's learning rate. For optimizers whose step is linear in ``lr``
(SGD, Adam, AdamW, Adagrad, Lion, ... with decoupled weight decay scaled by ``lr``) that is
``p_new = p_old + g * (p_base - p_old)``, where ``p_base`` is where the wrapped optimizer's
own step takes the parameter. The wrapper remembers ``p_old``, lets the optimizer step, and
scales the displacement: no knowledge of the optimizer's internals, so it works with third
party optimizers too; the built-in variants (``ActiveAdamW``, ...) fold the gain into their
update instead, at a fraction of the cost.

What it costs: two passes over the stepped tensors besides the wrapped step. Before it,
``grad_sum += grad`` (and ``grad_sq_sum += grad ** 2`` with ``significance``) and a copy of
the parameters; after it, ``p = start + gain_init * g * (p - start)``. For float32 that is
20 + 16 bytes of memory traffic per parameter (read grad, read-write the sum, read p, write
the copy; read p, the copy and the gain, write p) against about 28 for fused AdamW's own
step: a two-pass wrapper cannot cost less than about 2.3x torch's fused AdamW step. Nothing
is copied or scaled for a tensor whose gains all read 1 (``gain_init`` 1, before its first
nonzero period sum). The copies live in buffers kept between steps on CPU (one more copy of
the parameters in memory; a fresh one faults in every page, every step), in the caching
allocator's blocks elsewhere.

Two paths, chosen as the variants choose theirs (``fused``; see ``ActiveLR``): compiled, each
pass one ``torch.compile``d loop per tensor, ``_fused.CHUNK`` tensors per call
(:func:`~hf_activelr.optim._fused.lr_wrapper_before` / ``lr_wrapper_after``), and eager
(``torch._foreach_*``), the reference the compiled path is tested against
(``tests/test_wrapper_fused.py``: bitwise for float32 on CPU).

What it costs, measured against torch's fused AdamW step: README, "Benchmarks"
(``benchmarks/step_cost.py``).
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import torch
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from . import _fused, loading, paths, rule
from ._mixin import ActiveMixin
from ._validation import check_bool
from .base import _group_by_device_and_dtype
from .config import OPTION_NAMES, ActiveConfig


class ActiveLR(ActiveMixin, Optimizer):
    """ActiveLR (Wadi et al., arXiv 2301.10133) around ``optimizer``.

    It is itself a ``torch.optim.Optimizer``: ``param_groups`` are the wrapped optimizer's
    (schedulers move ``lr`` on both), ``state_dict`` holds the wrapped optimizer's state plus
    ``gain`` and ``grad_sum`` per parameter, ``zero_grad`` and hooks work as usual.
    The ActiveLR options (``config`` and keyword arguments, see
    :class:`~hf_activelr.optim.config.ActiveConfig`; ``lr_high``, ``lr_low`` and ``period``
    are required) are stored in each param group.

    ``fused``: True compiles the wrapper's own work (two loops per tensor, see the module
    docstring), False keeps it eager (``torch._foreach_*``); None (default) compiles where it
    wins, as the variants' default does. The wrapped optimizer's step is its own either way.
    """

    def __init__(self, optimizer: Optimizer, *, config: ActiveConfig | None = None,
                 fused: bool | None = None, **options):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a constructed torch.optim.Optimizer, got {type(optimizer)!r}"
            )
        if isinstance(optimizer, ActiveMixin):
            raise TypeError(f"{type(optimizer).__name__} is already Active; do not wrap it again")
        _check_wrappable(optimizer)
        if config is not None and not isinstance(config, ActiveConfig):
            raise TypeError(f"config must be an ActiveConfig, got {type(config).__name__}")
        if fused is not None:
            check_bool("fused", fused)
        base = config.group_values() if config is not None else {}
        active = ActiveConfig.from_options(options, base).group_values()
        self.optimizer = optimizer
        self._fused_option = fused
        # Refused (e.g. complex parameters): the wrapped optimizer as it was.
        with loading.all_or_nothing(optimizer):
            super().__init__(optimizer.param_groups, {**optimizer.defaults, **active})
        optimizer.__dict__[_WRAPPED] = True
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
        return {**super().__getstate__(), "optimizer": self.optimizer,
                "_fused_option": self.__dict__.get("_fused_option")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.param_groups = self.optimizer.param_groups
        self.optimizer.__dict__[_WRAPPED] = True

    def __repr__(self) -> str:
        group = self.param_groups[0] if self.param_groups else {}
        settings = ", ".join(f"{k}={group.get(k)}" for k in ("lr_high", "lr_low", "period"))
        return f"ActiveLR({settings},\n{self.optimizer!r})"

    # -- the paths --------------------------------------------------------------------------

    def _use_path(self, group=None) -> str:
        """``fused=True``: compiled; ``fused=False``: the eager foreach code; None (default):
        compiled where it wins (:func:`paths.choose`, as the variants' default). The choice
        is the wrapper's, not per group: the groups are the wrapped optimizer's, whose own
        ``fused`` / ``foreach`` keys they keep."""
        fused = self.__dict__.get("_fused_option")  # absent: pickled before the option
        return paths.choose(fused, None, self._runtime, self._all_params)

    def _start_buffers(self, params) -> list[torch.Tensor]:
        """Where the parameters' values are kept during the wrapped step. On CPU one buffer
        per parameter, kept between steps (memory: one more copy of those parameters): a
        fresh tensor of GPT-2's embedding size is a fresh mmap whose every page faults on
        first write, every step (about 5x the cost of copying into a kept buffer on CPU).
        Elsewhere fresh tensors: the caching allocator
        hands back the same blocks at no cost, and between steps they serve activations."""
        if not params or params[0].device.type != "cpu":
            return [torch.empty_like(p) for p in params]
        buffers = self._runtime.starts
        if buffers is None:
            buffers = self._runtime.starts = WeakIdKeyDictionary()
        result = []
        for param in params:
            buffer = buffers.get(param)
            if buffer is None or (buffer.shape, buffer.dtype, buffer.stride()) != (
                    param.shape, param.dtype, param.stride()):
                buffer = buffers[param] = torch.empty_like(param)
            result.append(buffer)
        return result

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._begin_step(closure)
        moved = []  # per group: the parameters whose step the gains change, where they stood
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            states = []
            for param in params:
                state = self.state[param]
                self._ensure_active_state(param, state, group)
                states.append(state)
            if not params:
                continue
            # Where every gain reads 1 (and gain_init is 1) the wrapped step stands as it is.
            keep = [i for i, s in enumerate(states) if group["gain_init"] != 1.0
                    or not self._gain_multipliers.reads_one(s["gain"])]
            starts = self._before(group, params, states, keep)
            if keep:
                moved.append((group, [params[i] for i in keep], [states[i] for i in keep],
                              starts))
        self.optimizer.step()
        for group, params, states, starts in moved:
            self._after(group, params, states, starts)
        for group in self.param_groups:
            self._tick(group)
        return loss

    def _before(self, group, params, states, keep) -> list[torch.Tensor]:
        """Sum the raw gradients (before the wrapped optimizer may touch them) and remember
        where the parameters ``keep`` (indices) stand: their values, returned."""
        grads = [p.grad for p in params]
        sums = [s["grad_sum"] for s in states]
        squares = [s["grad_sq_sum"] for s in states] if rule.keeps_squares(group) \
            else None
        starts = self._start_buffers([params[i] for i in keep])
        start_of = dict(zip(keep, starts))
        def eager(indices):
            _before_eager([params[i] for i in indices], [grads[i] for i in indices],
                          [sums[i] for i in indices],
                          None if squares is None else [squares[i] for i in indices],
                          [(params[i], start_of[i]) for i in indices if i in start_of])

        if self._use_path() != paths.FUSED:
            eager(list(range(len(params))))
            return starts

        def compiled(subset, progress):
            copied = subset[0] in start_of  # a batch copies all its tensors or none
            local: list[int] = []
            try:
                _fused.lr_wrapper_before(
                    [params[i] for i in subset], [grads[i] for i in subset],
                    [sums[i] for i in subset],
                    None if squares is None else [squares[i] for i in subset],
                    [start_of[i] for i in subset] if copied else None, local)
            finally:
                progress.extend(subset[i] for i in local)

        # Two graphs per device and dtype: with the copy, without.
        batches = [subset for bucket in _group_by_device_and_dtype(params)
                   for copied in (True, False)
                   if (subset := [i for i in bucket if (i in start_of) == copied])]
        paths.run(self, batches, compiled, eager)
        return starts

    def _after(self, group, params, states, starts) -> None:
        """``p = start + gain_init * g * (p - start)``: the wrapped step's displacement,
        scaled by the gains."""
        def eager(indices):
            moved = [params[i] for i in indices]
            kept = [starts[i] for i in indices]
            scales = self._gain_multipliers([states[i]["gain"] for i in indices])
            scaled = [i for i, scale in enumerate(scales) if scale is not None]
            torch._foreach_sub_(moved, kept)  # the wrapped optimizer's displacement
            if scaled:
                torch._foreach_mul_([moved[i] for i in scaled], [scales[i] for i in scaled])
            if group["gain_init"] != 1.0:
                torch._foreach_mul_(moved, group["gain_init"])
            torch._foreach_add_(moved, kept)

        if self._use_path() != paths.FUSED:
            eager(list(range(len(params))))
            return

        def compiled(bucket, progress):
            local: list[int] = []
            try:
                _fused.lr_wrapper_after(
                    [params[i] for i in bucket], [starts[i] for i in bucket],
                    [states[i]["gain"] for i in bucket], group["gain_init"], local)
            finally:
                progress.extend(bucket[i] for i in local)

        paths.run(self, _group_by_device_and_dtype(params), compiled, eager)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict with ``gain``/``grad_sum`` added per parameter."""
        merged = self.optimizer.state_dict()
        active = Optimizer.state_dict(self)
        for index, state in active["state"].items():
            merged["state"].setdefault(index, {}).update(state)
        return merged

    def load_state_dict(self, state_dict: dict) -> None:
        """The wrapped optimizer's load and the gains', after one validation of the whole
        state (:mod:`.loading`); a load that is refused, or fails anyway (the wrapped
        optimizer's own checks), leaves both as they were."""
        self._validate_state_dict(state_dict)
        previous = [dict(group) for group in self.param_groups]
        base_state = {
            index: {k: v for k, v in state.items() if k not in rule.ACTIVE_STATE_KEYS}
            for index, state in state_dict["state"].items()
        }
        with loading.all_or_nothing(self, self.optimizer):
            try:
                self.optimizer.load_state_dict({**state_dict, "state": base_state})
            except (KeyError, TypeError, ValueError, RuntimeError) as error:
                raise ValueError(
                    f"ActiveLR: the wrapped {type(self.optimizer).__name__} refused the state "
                    f"({type(error).__name__}: {error}): it was saved by another optimizer "
                    "or is damaged") from error
            self.param_groups = self.optimizer.param_groups
            self.state = defaultdict(dict)
            self._restore_active_state(state_dict, previous)

    def _base_state_kinds(self, group: dict) -> dict | None:
        """What the wrapped optimizer keeps per parameter, learnt from a probe stepped with
        the group's values (:mod:`.loading`). The probe's failure refuses the values (torch's
        own load takes any: ``foreach=<a tensor>`` fails only at the next step), unless the
        wrapped optimizer cannot be probed at all (None: no check)."""
        cls, defaults = type(self.optimizer), self.optimizer.defaults
        try:
            return loading.probe(cls, group, defaults)
        except Exception as error:  # noqa: BLE001 - whatever it raises, it cannot step
            if loading.probe_state_kinds(cls, defaults, defaults) is None:
                return None
            raise ValueError(f"the wrapped {cls.__name__} cannot step with its values "
                             f"({type(error).__name__}: {error})") from None


def _check_wrappable(optimizer: Optimizer) -> None:
    """Refuse what the wrapper cannot honour, before it touches ``optimizer``: a step that
    needs a closure (LBFGS re-evaluates the loss inside its step, so the wrapper would have
    summed gradients of another point than the one it steps from), and an optimizer another
    ActiveLR already wraps (its groups hold that wrapper's settings: a second wrapper would
    silently keep its settings, or change the first one's). Per-group ActiveLR options in the
    optimizer's own groups are fine: that is how groups get their own settings."""
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"ActiveLR cannot wrap {type(optimizer).__name__}: its step needs a closure (it "
            "evaluates the loss several times per step), and ActiveLR scales one step's "
            "displacement by gains from the gradient it was given")
    if optimizer.__dict__.get(_WRAPPED):
        raise ValueError(
            f"this {type(optimizer).__name__} is already wrapped by an ActiveLR (its param "
            "groups hold that wrapper's settings, which a second wrapper would silently keep): "
            "use that wrapper, or wrap a fresh optimizer")


#: Set on an optimizer once an ActiveLR wraps it (see _check_wrappable).
_WRAPPED = "_wrapped_by_activelr"


def _before_eager(params, grads, sums, squares, copies) -> None:
    """The eager ``_before``: the sums (and squares) of ``params``' gradients; ``copies``:
    (parameter, buffer) pairs whose buffer takes the parameter's values."""
    if params:
        torch._foreach_add_(sums, grads)
        if squares is not None:
            torch._foreach_addcmul_(squares, grads, grads)
    if copies:
        torch._foreach_copy_([buffer for _, buffer in copies], [param for param, _ in copies])
