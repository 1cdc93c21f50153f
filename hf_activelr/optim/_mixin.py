"""What every Active optimizer shares, whatever computes its base step: group checks, the
period clock and boundary, gain statistics, and loading state without damaging the gains."""

from __future__ import annotations

import torch

from . import loading, paths, rule, stats
from ._fused import fused_boundary
from ._validation import EPOCH, check_period, check_significance_reachable
from .config import OPTION_NAMES, ActiveConfig


class _StatsCache:
    """Per group (by identity): the figures ``gain_stats`` returned, and the statistics the
    last boundary kept, not yet summed up."""

    def __init__(self):
        self.summary: dict = {}
        self.boundary: dict = {}
        self.median: dict = {}  # the last (relative) median (see stats.median_guesses)
        # Set by the first gain_stats() call: from then on boundaries keep the statistics
        # (a loop that never asks for them does not pay for them).
        self.tracking = False

    def clear_group(self, group) -> None:
        self.summary.pop(id(group), None)
        self.boundary.pop(id(group), None)


class Runtime:
    """What an Active optimizer keeps between steps besides its state, in one declared place:
    caches and the path's fate. Not pickled or copied (torch's optimizers pickle defaults,
    state and param_groups only): a copy or an unpickled optimizer starts a fresh one."""

    def __init__(self):
        self.multipliers = rule.GainMultipliers()  # the eager paths' gain decoding, per tensor
        self.stats = _StatsCache()  # gain_stats() figures and the boundary's statistics
        self.fused_error: Exception | None = None  # the compiled path failed: off for good
        self.auto_fused: bool | None = None  # the default path's choice, made once
        self.starts = None  # the wrapper's kept CPU buffers (WeakIdKeyDictionary)
        self.distributed_stats = None  # distributed.gain_stats's cache: (key, figures)


class ActiveMixin:
    """Mixed into ``torch.optim.Optimizer`` subclasses whose state holds ActiveLR gains."""

    # -- groups -----------------------------------------------------------------------------

    @staticmethod
    def _init_active_group(group: dict) -> None:
        """Validate a group's ActiveLR settings and start its period clock."""
        checked = ActiveConfig.from_options({key: group[key] for key in OPTION_NAMES})
        group.update(checked.group_values())  # normalised: torch.bfloat16 -> "bfloat16", ...
        for param in group["params"]:
            if param.is_complex():
                raise TypeError("ActiveLR does not support complex parameters")
        # The clock is the group's, so boundaries fall on the same step for every parameter.
        group.setdefault("active_step", 0)
        if group.get("gain_changes") is None:
            # The last boundary's counts; the same keys before the first one, so that the
            # state dict keeps one structure (a sharded DCP load matches it key by key).
            group["gain_changes"] = {"grew": 0, "shrank": 0, "elements": 0, "nonfinite": 0}

    @property
    def _runtime(self) -> Runtime:
        """This optimizer's :class:`Runtime` (made on first use, and after a copy)."""
        runtime = self.__dict__.get("_runtime_state")
        if runtime is None:
            runtime = self.__dict__["_runtime_state"] = Runtime()
        return runtime

    @property
    def _gain_multipliers(self) -> rule.GainMultipliers:
        """The eager multi-tensor paths' gain decoding, remembered per gain tensor."""
        return self._runtime.multipliers

    def _ensure_active_state(self, param, state, group) -> None:
        if "gain" not in state:
            self._forget_gain_stats()  # new state: the figures are computed afresh
        rule.ensure_state(param, state, group["zero_sum"], group["grad_sum_dtype"],
                          rule.keeps_squares(group), group["gain_dtype"])

    def set_period(self, period: int, *, only_epoch: bool = True) -> None:
        """Set ``period`` (optimizer steps) on the groups that asked for ``"epoch"`` (or on all
        groups with ``only_epoch=False``). The Trainer integration calls it at train start."""
        period = check_period(period, allow_epoch=False)
        for group in self.param_groups:
            if (group["period"] == EPOCH or not only_epoch) and group["significance"]:
                check_significance_reachable(group["significance"], period)
        for group in self.param_groups:
            if group["period"] == EPOCH or not only_epoch:
                group["period"] = period
        self._forget_gain_stats()

    def _begin_step(self, closure):
        """What every step starts with: the period must be set; the closure's loss (with
        gradients enabled, as torch's optimizers run it); every gradient usable (a step
        refused changes nothing: no group has moved, no clock ticked)."""
        self._check_period_set()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        return loss

    def _check_period_set(self) -> None:
        for group in self.param_groups:
            if group["period"] == EPOCH:
                raise RuntimeError(
                    "period='epoch' has not been set to a number of steps: it is set at train "
                    "start by hf_activelr.ActiveTrainer or by the stock transformers Trainer "
                    "after `import hf_activelr`; in a custom loop call "
                    "optimizer.set_period(len(train_dataloader)) or pass period=N"
                )

    def _check_grads(self) -> None:
        """Refuse a step any of whose gradients the step cannot take, before any group moves."""
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                if param.grad is not None and param.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients (param group "
                        f"{index}; e.g. nn.Embedding(sparse=True)); use dense gradients: "
                        "nothing was updated"
                    )

    def _active_states(self, group: dict) -> list[dict]:
        return [self.state[p] for p in group["params"] if "gain" in self.state.get(p, {})]

    def _tick(self, group: dict) -> None:
        """Advance the group's clock; at a period boundary, adapt its gains, and keep their
        statistics once someone reads them (they cost about as much as the boundary itself:
        README, "Benchmarks")."""
        group["active_step"] += 1
        if group["active_step"] % group["period"] == 0:
            states = self._active_states(group)
            cache = self._stats_cache()
            kept = None
            if cache.tracking:  # someone reads gain_stats(): keep them in passing
                guesses = stats.median_guesses(cache.median.get(id(group), 1.0), group)
                kept = stats.GainStats(states[0]["gain"].device if states else "cpu", guesses)
            group["gain_changes"] = rule.end_period(states, group, self._boundary_fn(group),
                                                    kept)
            cache.clear_group(group)
            if kept is not None:
                cache.boundary[id(group)] = kept

    def _boundary_fn(self, group: dict):
        """The boundary's code: eager (:func:`rule.boundary_tensor`); on the fused path
        compiled, falling back like the step (:func:`paths.or_eager`)."""
        if self._use_path(group) != paths.FUSED:
            return rule.boundary_tensor
        return paths.or_eager(self, fused_boundary, rule.boundary_tensor)

    def _all_params(self) -> list:
        return [param for group in self.param_groups for param in group["params"]]

    # -- statistics -------------------------------------------------------------------------

    def _stats_cache(self) -> _StatsCache:
        return self._runtime.stats

    def _forget_gain_stats(self) -> None:
        """The gains changed outside a boundary (new state, a load, a new group, a new
        period): the figures are computed afresh at the next call."""
        runtime = self.__dict__.get("_runtime_state")
        if runtime is not None:
            runtime.stats.summary.clear()
            runtime.stats.boundary.clear()

    def gain_stats(self) -> list[dict]:
        """Per param group: ``min``, ``median`` (lower), ``mean``, ``max`` of the gains;
        ``grew`` / ``shrank``: shares of elements whose gain grew (sign kept) or shrank (sign
        flipped) at the last boundary; ``elements``; ``step`` (the group's clock); ``period``.

        Gains change only at boundaries, so the figures are kept from the last boundary
        (which computed them in passing) or, after a load or a new group, computed once in
        two passes over the gains (exact min, max and mean; the median from a histogram, see
        :data:`stats.HIST_BINS`): calling this at every logging step costs nothing in
        between.

        Under FSDP2 (gains held as sharded DTensors across ranks) the figures are the whole
        model's, computed by :func:`hf_activelr.optim.distributed.gain_stats`: a collective,
        to be called on every rank.
        """
        from . import distributed  # it imports this module

        if distributed.has_sharded_gains(self):
            # FSDP2: this rank holds a shard of each gain. The whole model's figures, not the
            # shard's: a collective (call it on every rank), as distributed.gain_stats.
            return distributed.gain_stats(self)
        cache = self._stats_cache()
        cache.tracking = True
        result = []
        for group in self.param_groups:
            summary = cache.summary.get(id(group))
            if summary is None:
                summary = stats.gain_summary(
                    [s["gain"] for s in self._active_states(group)], group.get("gain_changes"),
                    group["gain_init"], cache.boundary.pop(id(group), None),
                    cache.median, id(group),
                )
                cache.summary[id(group)] = summary
            result.append({**summary, "step": group["active_step"], "period": group["period"]})
        return result

    # -- loading ----------------------------------------------------------------------------

    _base_state_keys: frozenset | None = None  # None: any (the wrapper's inner optimizer)

    def _validate_state_dict(self, state_dict) -> None:
        """Refuse a state dict that does not fit, before anything is loaded: nothing is lost
        (:func:`loading.validate`)."""
        loading.validate(self, state_dict, base_keys=self._base_state_keys,
                         base_kinds=self._base_state_kinds, group_checks=self._group_checks(),
                         group_keys=self._group_keys())

    def _base_state_kinds(self, group: dict) -> dict | None:
        """``{key: kind}`` of the base state a parameter of ``group`` needs (None: unknown)."""
        return None

    def _group_checks(self) -> tuple:
        """Checks a loaded group passes besides the ActiveLR options'."""
        check = getattr(self, "_check_group", None)
        return () if check is None else (check,)

    def _group_keys(self) -> tuple:
        """Settings every saved group must hold."""
        return ()

    def _kept_dtypes(self, param, group) -> dict:
        """``{state key: dtype}`` of the base state this optimizer keeps for ``param``
        (empty: whatever was saved)."""
        return {}

    def _restore_active_state(self, state_dict: dict, previous_groups: list[dict]) -> None:
        """Finish a ``load_state_dict``: gains and sums keep their own dtype (torch would cast
        a bf16 parameter's float32 gains to bf16); groups saved by a plain optimizer get this
        optimizer's ActiveLR settings and start with gains at 1."""
        for group, previous in zip(self.param_groups, previous_groups):
            merged = loading.merged_group(group, previous)  # the values validate() checked
            merged.pop("params")
            group.update(merged)
        id_to_param = {
            saved_id: param
            for saved, group in zip(state_dict["param_groups"], self.param_groups)
            for saved_id, param in zip(saved["params"], group["params"])
        }
        group_of = {param: group for group in self.param_groups for param in group["params"]}
        for saved_id, saved_state in state_dict["state"].items():
            param = id_to_param.get(saved_id)
            if param is None:
                continue
            for key in rule.ACTIVE_STATE_KEYS:
                if key in saved_state:
                    self.state[param][key] = saved_state[key].to(device=param.device, copy=True)
            # torch casts every floating state tensor to the parameter's dtype; a variant may
            # keep another (ActiveAdaBelief: float32 moments for float16 parameters, whose
            # float16 copies overflow). Rebuilt from the saved tensor: no value is lost.
            for key, dtype in self._kept_dtypes(param, group_of[param]).items():
                saved = saved_state.get(key)
                if torch.is_tensor(saved) and self.state[param][key].dtype != dtype:
                    self.state[param][key] = saved.to(device=param.device, dtype=dtype,
                                                      copy=True)
        for group in self.param_groups:
            self._init_active_group(group)
            # The storage of sums and gains follows the group's setting (a state saved under
            # the other setting converts: bf16 -> fp32 is exact; fp32 -> bf16 keeps every
            # sign, and rounds each gain to nearest as a boundary would).
            for param in group["params"]:
                dtypes = {"gain": rule.gain_dtype_of(param, group["gain_dtype"])}
                dtypes["grad_sum"] = dtypes["grad_sq_sum"] = rule.sum_dtype(
                    param, group["grad_sum_dtype"])
                for key, dtype in dtypes.items():
                    kept = self.state.get(param, {}).get(key)
                    if kept is not None and kept.dtype != dtype:
                        self.state[param][key] = kept.to(dtype)
        self._forget_gain_stats()


def unwrap_active(optimizer):
    """The Active optimizer inside Accelerate's (or another) wrapper, or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, ActiveMixin) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, ActiveMixin) else None
