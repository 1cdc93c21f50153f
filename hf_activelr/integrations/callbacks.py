"""Callbacks: the epoch period (every Trainer gets it once hf_activelr is imported), and what
ActiveTrainer shows of the gains (compact console lines, a table at the end, TensorBoard
histograms per layer type).

Their own module, importing only ``transformers.trainer_callback``: the transformers patch adds
it to ``transformers.trainer.DEFAULT_CALLBACKS`` while ``transformers.trainer`` is being
imported, when this package's ``trainer`` module (which imports ``transformers.Trainer``)
cannot be imported yet.
"""

from __future__ import annotations

import math

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

from ..optim import stats, unwrap_active
from ..optim.config import EPOCH


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


# -- what the console and TensorBoard show of the gains -------------------------------------


def compact_gain_logs(logs: dict) -> dict:
    """The console's view of a training log: ActiveTrainer's ``gain/group{i}/{stat}`` entries
    (6 per group, kept in full for ``report_to`` backends) become one ``gain_median`` field,
    the median gain of each group."""
    if not any(key.startswith("gain/") for key in logs):
        return logs
    compact = {key: value for key, value in logs.items() if not key.startswith("gain/")}
    medians = [value for key, value in logs.items()
               if key.startswith("gain/") and key.endswith("/median")]
    compact["gain_median"] = " ".join(f"{value:.3g}" for value in medians)
    return compact


class ActiveProgressCallback(ProgressCallback):
    """The progress bar's log lines, with the gains in one field (:func:`compact_gain_logs`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=compact_gain_logs(dict(logs or {})), **kwargs)


class ActivePrinterCallback(PrinterCallback):
    """``disable_tqdm=True``'s printed logs, with the gains in one field."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=compact_gain_logs(dict(logs or {})), **kwargs)


def gain_table(optimizer) -> str:
    """Per param group: elements, min / median / mean / max gain, and the shares of elements at
    ``gain_min`` and ``gain_max`` (a bound that holds many gains is a sign the range or the
    learning rate is off; see README, "Failure modes"): :func:`stats.gain_table`."""
    active = unwrap_active(optimizer)
    if active is None:
        return ""
    figures = []
    for group, row in zip(active.param_groups, active.gain_stats()):
        at_min = at_max = 0
        for state in active._active_states(group):
            low, high = stats.at_bounds(state["gain"], group)
            at_min, at_max = at_min + low, at_max + high
        elements = max(row["elements"], 1)
        figures.append({**row, "at_gain_min": at_min / elements,
                        "at_gain_max": at_max / elements})
    return stats.gain_table(figures)


class GainSummaryCallback(TrainerCallback):
    """At the end of training, the gains as a table on the console (:func:`gain_table`)."""

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        table = gain_table(optimizer) if state.is_world_process_zero else ""
        if table:
            print(f"ActiveLR gains at step {state.global_step}:\n{table}")


layer_type = stats.layer_type  # the per-layer histograms' names


class GainHistogramCallback(TrainerCallback):
    """TensorBoard histograms of the gains per layer type (:func:`layer_type`), written at
    the first log after each period boundary (gains change only there), with the writer of
    ``report_to="tensorboard"``. Parameter names come from ``param_names`` in the groups
    (ActiveTrainer keeps them); without them a group is one histogram. At most
    ``max_elements`` gains per histogram, evenly strided, bound the cost on large models."""

    def __init__(self, trainer, max_elements: int = 1 << 20):
        self.trainer = trainer
        self.max_elements = max_elements
        self._written_at = None

    def _writer(self):
        for callback in self.trainer.callback_handler.callbacks:
            if type(callback).__name__ == "TensorBoardCallback":
                return getattr(callback, "tb_writer", None)
        return None

    def on_log(self, args, state, control, **kwargs):
        from ..optim import rule
        from ..optim.distributed import has_sharded_gains

        active = unwrap_active(self.trainer.optimizer)
        writer = self._writer() if state.is_world_process_zero else None
        if active is None or writer is None or has_sharded_gains(active):
            # Sharded gains (FSDP2): the main process holds its shard only, and reading the
            # others' would be a collective the other ranks never join. No histograms there.
            return
        boundaries = tuple(g["active_step"] // g["period"] for g in active.param_groups
                           if g["period"] != EPOCH)
        if boundaries == self._written_at:
            return
        self._written_at = boundaries
        by_type: dict[str, list] = {}
        for index, group in enumerate(active.param_groups):
            names = group.get("param_names") or [f"group{index}"] * len(group["params"])
            for name, param in zip(names, group["params"]):
                gain = active.state.get(param, {}).get("gain")
                if gain is not None:
                    decoded = rule.decode_gain(gain).reshape(-1).float() * group["gain_init"]
                    by_type.setdefault(layer_type(name), []).append(decoded.cpu())
        for kind, values in by_type.items():
            gains = torch.cat(values)
            if gains.numel() > self.max_elements:
                gains = gains[:: -(-gains.numel() // self.max_elements)]
            writer.add_histogram(f"gain/{kind}", gains, state.global_step)
