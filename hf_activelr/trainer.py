"""Trainer integration: the paper's one-epoch period, and gain statistics in the logs."""

from __future__ import annotations

import math

from transformers import Trainer, TrainerCallback

from ._mixin import ActiveMixin
from ._validation import EPOCH


def unwrap_active(optimizer):
    """The Active optimizer inside Accelerate's (or another) wrapper, or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, ActiveMixin) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, ActiveMixin) else None


def updates_per_epoch(train_dataloader, gradient_accumulation_steps: int) -> int:
    """Optimizer updates in one epoch, counted as the Trainer counts them: batches of this
    process's (Accelerate-prepared) dataloader over gradient accumulation, a last partial
    accumulation included."""
    try:
        batches = len(train_dataloader)
    except TypeError:
        raise ValueError(
            "period='epoch' needs a training dataset with a length, to count optimizer updates "
            "per epoch; with an IterableDataset pass the period explicitly, e.g. "
            "optim_args='period=1000' or ActiveAdamW(..., period=1000)"
        ) from None
    return max(math.ceil(batches / gradient_accumulation_steps), 1)


class ActivePeriodCallback(TrainerCallback):
    """Sets ``period="epoch"`` to the real number of optimizer updates per epoch at train start.

    Added to every Trainer by ``import hf_activelr``; explicit periods are left alone, and on
    resume the period saved in the optimizer state is kept.
    """

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None,
                       **kwargs):
        active = unwrap_active(optimizer)
        if active is None or all(g["period"] != EPOCH for g in active.param_groups):
            return
        if train_dataloader is None:
            raise ValueError("period='epoch' needs the Trainer's train dataloader; pass period=N")
        active.set_period(updates_per_epoch(train_dataloader, args.gradient_accumulation_steps))


class ActiveTrainer(Trainer):
    """``transformers.Trainer`` for Active optimizers.

    - ``period`` not given: one epoch of optimizer updates (dataloader length per process, over
      gradient accumulation; ``max_steps``-only runs too), as in the paper;
    - gain statistics (min, median, mean, max, shares grown / shrunk at the last boundary) are
      added to every training log, per param group, so they reach ``report_to`` backends.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(cb, ActivePeriodCallback)
                   for cb in self.callback_handler.callbacks):
            self.add_callback(ActivePeriodCallback)

    def gain_log(self) -> dict:
        """Gain statistics as flat log entries: ``gain/group{i}/{stat}``."""
        active = unwrap_active(self.optimizer)
        if active is None:
            return {}
        entries = {}
        for index, stats in enumerate(active.gain_stats()):
            if stats["elements"] == 0:
                continue
            for key in ("min", "median", "mean", "max", "grew", "shrank"):
                entries[f"gain/group{index}/{key}"] = round(float(stats[key]), 6)
        return entries

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # training logs, not evaluation ones
            logs = {**logs, **self.gain_log()}
        super().log(logs, *args, **kwargs)
