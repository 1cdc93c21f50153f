"""Trainer integration: the paper's one-epoch period, and gain statistics in the logs."""

from __future__ import annotations

import json
import os
import sys

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..optim import unwrap_active
from .callbacks import (  # noqa: F401  (updates_per_epoch: public here)
    ActivePeriodCallback,
    ActivePrinterCallback,
    ActiveProgressCallback,
    GainHistogramCallback,
    GainSummaryCallback,
    updates_per_epoch,
)


def zero_partitioned(trainer) -> bool:
    """Whether DeepSpeed ZeRO (stage 1 or more) gave the optimizer per-rank partitions."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None)
    return stage is None or stage >= 1  # unknown: do not compare partitions


class _RunRecordCallback(TrainerCallback):
    """At every save: checks the ActiveLR state is the same on all ranks (raises if not), and
    saves the run record (command, task, data) beside the checkpoint, for model cards."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        from ..optim.distributed import check_consistent

        if args.world_size > 1 and unwrap_active(self.trainer.optimizer) is not None:
            # Every rank, before a bad state is kept. Sharded state (FSDP2 DTensors, FSDP1
            # flat parameters) is recognised per parameter; DeepSpeed ZeRO's flat partitions
            # are not marked, so under ZeRO only clocks and hyperparameters are compared.
            check_consistent(self.trainer.optimizer, sharded=zero_partitioned(self.trainer))
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self.trainer.write_run_record(folder)


class _GainSummaryCallback(GainSummaryCallback):
    """The end-of-training gain table; with gains sharded across ranks (FSDP2 DTensors,
    DeepSpeed ZeRO partitions) its figures are the whole model's, reduced on every rank
    (``optimizer.gain_stats()`` on the main process alone would read, or wait for, the other
    ranks' shards)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        from ..optim.distributed import gain_stats, has_sharded_gains
        from ..optim.stats import gain_table

        active = unwrap_active(optimizer)
        partitioned = zero_partitioned(self.trainer) and args.world_size > 1
        if active is None or not (partitioned or has_sharded_gains(active)):
            return super().on_train_end(args, state, control, optimizer=optimizer, **kwargs)
        figures = gain_stats(active, partitioned=partitioned)  # a collective: every rank
        if not state.is_world_process_zero:
            return None
        table = gain_table(figures)
        if table:
            print(f"ActiveLR gains at step {state.global_step}:\n{table}")
        return None


def launch_command() -> list[str]:
    """The command that started this process, for the card's "reproduce" section.

    ``sys.orig_argv`` keeps what ``sys.argv`` loses: ``python -m hf_activelr.run SCRIPT``
    (runpy replaces ``sys.argv`` with the script's) and interpreter options; without
    ``-m hf_activelr.run`` a recorded ``python SCRIPT --optim active_adamw`` would be refused
    by the script's parser. The interpreter's path becomes ``python``, the console script's
    path ``hf-activelr``. (Under ``accelerate launch`` each process sees the command the
    launcher gave it: the launcher's own options are not known here.)"""
    argv = list(getattr(sys, "orig_argv", None) or ["python", *sys.argv])
    argv[0] = "python"
    if len(argv) > 1 and os.path.basename(argv[1]) == "hf-activelr":
        argv = ["hf-activelr", *argv[2:]]
    return argv


class ActiveTrainer(Trainer):
    """``transformers.Trainer`` for Active optimizers.

    - ``period`` not given: one epoch of optimizer updates (dataloader length per process, over
      gradient accumulation; ``max_steps``-only runs too), as in the paper;
    - gain statistics (min, median, mean, max, shares grown / shrunk at the last boundary) are
      added to every training log, per param group, so they reach ``report_to`` backends;
    - parameter names are kept in the optimizer's param groups (``param_names``), and a run
      record (``activelr_run.json``: command, task, model, data) is saved with checkpoints, so
      ``create_model_card`` / ``push_to_hub`` / ``hf-activelr card`` describe the run.

    ``run_info``: facts for the model card, e.g. ``{"task": "causal-lm", "data": "wikitext",
    "base_model": "gpt2", "model_name": "gpt2-wikitext-activelr"}``.
    """

    def __init__(self, *args, run_info: dict | None = None, **kwargs):
        from .model_card import redact_command

        super().__init__(*args, **kwargs)
        self.run_info = {"command": launch_command(), **(run_info or {})}
        # The command goes into the run record and the card (both pushed to the Hub): no
        # --hub_token or other secret in it, whether ours or one given in run_info.
        if self.run_info.get("command"):
            self.run_info["command"] = redact_command(self.run_info["command"])
        if not any(isinstance(cb, ActivePeriodCallback)
                   for cb in self.callback_handler.callbacks):
            self.add_callback(ActivePeriodCallback)
        self.add_callback(_RunRecordCallback(self))
        # The console shows one median per group (the full gain/... set still reaches the
        # report_to backends), a table of the gains at the end, and TensorBoard histograms.
        for stock, compact in ((ProgressCallback, ActiveProgressCallback),
                               (PrinterCallback, ActivePrinterCallback)):
            if any(type(cb) is stock for cb in self.callback_handler.callbacks):
                self.callback_handler.pop_callback(stock)
                self.add_callback(compact)
        self.add_callback(_GainSummaryCallback(self))
        self.add_callback(GainHistogramCallback(self))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        names = {id(p): n for n, p in (model or self.model).named_parameters()}
        for group in optimizer.param_groups:
            if "param_names" not in group and all(id(p) in names for p in group["params"]):
                group["param_names"] = [names[id(p)] for p in group["params"]]
        return optimizer

    def _load_optimizer_and_scheduler(self, checkpoint):
        # A sharded (DCP) optimizer checkpoint loads into a template made from the live
        # optimizer: its groups' entries must be nested as in the checkpoint (gain_changes).
        folder = os.path.join(checkpoint, "optimizer_0") if checkpoint else None
        active = unwrap_active(self.optimizer)
        if folder and self.is_fsdp_enabled and active is not None and os.path.isfile(
                os.path.join(folder, ".metadata")):
            from ..optim.distributed import match_checkpoint_groups

            match_checkpoint_groups(active, folder, key="optimizer")
        return super()._load_optimizer_and_scheduler(checkpoint)

    def save_final_model(self, output_dir: str | None = None) -> None:
        """Save the trained model; call it on every rank. Under FSDP the full state dict is
        gathered first (with a SHARDED_STATE_DICT config, ``save_model`` writes no weights in
        transformers 5); otherwise only the main process writes."""
        if self.is_fsdp_enabled:
            state_dict = self.accelerator.get_state_dict(self.model)  # a collective
            if self.is_world_process_zero():
                self.accelerator.unwrap_model(self.model).save_pretrained(
                    output_dir or self.args.output_dir, state_dict=state_dict)
        else:
            self.save_model(output_dir)

    def write_run_record(self, folder: str, run: dict | None = None) -> None:
        """Save ``run`` (default: ``run_info``) with the optimizer's name and class as
        ``activelr_run.json`` in ``folder``, for ``hf-activelr card``."""
        from .model_card import RUN_RECORD, redact_command

        active = unwrap_active(self.optimizer)
        record = {"optim": str(getattr(self.args.optim, "value", self.args.optim)),
                  "optimizer_class": type(active).__name__ if active is not None else None,
                  **(self.run_info if run is None else run)}
        if record.get("command"):  # run_info may have been changed since __init__
            record["command"] = redact_command(record["command"])
        with open(os.path.join(folder, RUN_RECORD), "w") as handle:
            json.dump(record, handle, indent=2, default=str)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        *,
        sweep_table: str | None = None,
    ):
        """Write the ActiveLR model card (README.md) to ``output_dir``; ``push_to_hub`` calls
        this before uploading, and returns the ``ModelCard``.

        The stock ``Trainer.create_model_card`` signature (transformers' example scripts and
        ``push_to_hub(**kwargs)`` pass it): ``language``, ``license``, ``tags`` (added to
        ours), ``finetuned_from`` (the base model), ``tasks``, ``dataset_tags`` (Hub dataset
        ids), ``dataset`` (their names) and ``dataset_args`` (their configurations) go into
        the card's metadata and text, and override ``run_info``; ``sweep_table``: a markdown
        LR-sweep table to include. They are also saved in the run record in ``output_dir``."""
        from .model_card import build_card, string_list

        if not self.is_world_process_zero():
            return None
        given = {"language": language, "license": license, "tags": tags,
                 "model_name": model_name, "base_model": finetuned_from, "tasks": tasks,
                 "dataset_tags": dataset_tags, "data": dataset, "dataset_args": dataset_args}
        stock_names = {"base_model": "finetuned_from", "data": "dataset"}
        for key, value in given.items():
            if key in ("license", "model_name", "base_model"):
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"{stock_names.get(key, key)} must be a string, "
                                    f"got {value!r}")
            else:
                string_list(stock_names.get(key, key), value)
        active = unwrap_active(self.optimizer)
        run = {**self.run_info, **{key: value for key, value in given.items() if value}}
        run.setdefault("optim", str(getattr(self.args.optim, "value", self.args.optim)))
        config = getattr(getattr(self.model, "config", None), "to_dict", lambda: None)()
        card = build_card(
            log_history=self.state.log_history, training_args=self.args.to_dict(),
            optimizer_state=active.state_dict() if active is not None else {},
            optimizer_class=type(active).__name__ if active is not None else "",
            run=run, model_config=config, is_adapter=hasattr(self.model, "peft_config"),
            repo_id=self.args.hub_model_id, sweep_table=sweep_table,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))
        self.write_run_record(self.args.output_dir, run)
        return card

    def gain_log(self) -> dict:
        """Gain statistics as flat log entries: ``gain/group{i}/{stat}``, over the whole
        model: under FSDP2 and DeepSpeed ZeRO each rank's shard is reduced across ranks
        (:func:`hf_activelr.optim.distributed.gain_stats`, a collective there: called on
        every rank, as ``Trainer.log`` is)."""
        from ..optim.distributed import gain_stats

        active = unwrap_active(self.optimizer)
        if active is None:
            return {}
        entries = {}
        partitioned = zero_partitioned(self)
        for index, stats in enumerate(gain_stats(active, partitioned=partitioned)):
            if stats["elements"] == 0:
                continue
            for key in ("min", "median", "mean", "max", "grew", "shrank"):
                if stats[key] is not None:  # None: counts a mixed sharded group cannot sum
                    entries[f"gain/group{index}/{key}"] = round(float(stats[key]), 6)
        return entries

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # training logs, not evaluation ones
            logs = {**logs, **self.gain_log()}
        super().log(logs, *args, **kwargs)
