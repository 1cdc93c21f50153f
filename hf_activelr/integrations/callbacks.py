"""The epoch period: the callback every Trainer gets once hf_activelr is imported.

Its own module, importing only ``transformers.trainer_callback``: the transformers patch adds
it to ``transformers.trainer.DEFAULT_CALLBACKS`` while ``transformers.trainer`` is being
imported, when this package's ``trainer`` module (which imports ``transformers.Trainer``)
cannot be imported yet.
"""

from __future__ import annotations

import math

from transformers.trainer_callback import TrainerCallback

from ..optim._mixin import unwrap_active
from ..optim._validation import EPOCH


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
