#!/usr/bin/env python
"""Train the tiny GPT-2 of the test suite with ``hf_activelr.ActiveTrainer`` under FSDP2 or
DeepSpeed ZeRO on CPU processes (``torchrun --nproc_per_node 2``, gloo), or on one plain
process as the reference, then save ``rank{N}.pt`` per rank in ``output_dir``: the full
(gathered) parameters and gains, the log history, the consistency reports taken at every
save, and how the parameters were sharded. Every ``TrainingArguments`` flag works
(``--fsdp``, ``--fsdp_config``, ``--deepspeed``, ``--resume_from_checkpoint``, ...).

On CPU, accelerate does not apply FSDP: ``AcceleratorState.__init__`` (accelerate/state.py)
switches ``distributed_type`` to ``FSDP`` and keeps the plugin only for accelerator
distributed types (``MULTI_GPU``, ``MULTI_XPU``, ...); a gloo group of CPU processes
(``--use_cpu``) is ``MULTI_CPU``, so the plugin is dropped without a message and the Trainer
trains plain DDP (``trainer.is_fsdp_enabled`` False). ``CpuShardedTrainer`` below makes,
after the Accelerator is built, the two assignments that branch makes on a GPU machine
(``distributed_type = FSDP``, ``fsdp_plugin = FullyShardedDataParallelPlugin(
**args.fsdp_plugin_args)``); from there on accelerate's and transformers' own FSDP2 code
runs: ``fully_shard`` on a CPU device mesh, sharded (DCP) checkpoints, resume. DeepSpeed
needs nothing of the kind: with ``--use_cpu`` its branch (``ACCELERATE_USE_DEEPSPEED and not
cpu``, where ``cpu`` is the Accelerator's argument, which the Trainer leaves False) applies.

Without ``--use_cpu``, on a machine without an accelerator ``PartialState`` finds no backend
and every process is a world of one: ``Trainer.__init__`` refuses FSDP ("Using fsdp only
works in distributed training.", transformers/trainer.py), and a DeepSpeed run starts but
each process reads the whole dataset as process 0 while ZeRO all-reduces gradients across
the processes behind the Trainer's back.
"""

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_utils  # noqa: E402  (tests/hf_utils.py: the tiny model and data)

from hf_activelr import ActiveTrainer, consistency_report  # noqa: E402
from hf_activelr.optim import rule  # noqa: E402
from hf_activelr.optim.distributed import gain_stats, is_dtensor  # noqa: E402


@dataclass
class RunArguments:
    num_train_examples: int = field(default=24)


class CpuShardedTrainer(ActiveTrainer):
    """ActiveTrainer whose FSDP configuration takes effect on CPU processes (module doc)."""

    def create_accelerator_and_postprocess(self):
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        state = AcceleratorState()
        self.fsdp_dropped_on_cpu = bool(
            self.args.fsdp_plugin_args and not self.is_fsdp_enabled
            and state.distributed_type == DistributedType.MULTI_CPU)
        if self.fsdp_dropped_on_cpu:
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True


class SaveRecorder(TrainerCallback):
    """At every save (after ActiveTrainer's own check_consistent, which raises on a
    difference): the consistency report, as every rank saw it; under DeepSpeed also the one
    without ``sharded=True`` (ZeRO's equal-size partitions compared as if replicated)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.reports = []

    def on_save(self, args, state, control, **kwargs):
        zero = self.trainer.is_deepspeed_enabled
        report = consistency_report(self.trainer.optimizer, sharded=zero)
        if zero:
            report["unflagged"] = consistency_report(self.trainer.optimizer)
        self.reports.append({"step": state.global_step, **report})


def full(tensor):
    """The whole tensor (a collective for a DTensor: call on every rank)."""
    return (tensor.full_tensor() if is_dtensor(tensor) else tensor).detach().clone()


def zero_gains(trainer, names) -> tuple[dict, dict, dict]:
    """Under DeepSpeed ZeRO 1/2 the Active optimizer steps one flat fp32 partition per group
    and rank: gather the partitions (a collective) and cut the whole flat tensor back into
    the parameters, in ZeRO's order (``round_robin_bit16_groups``; padding at the end)."""
    import torch.distributed as dist

    zero = trainer.optimizer.optimizer  # accelerate's wrapper -> DeepSpeedZeroOptimizer
    active = hf_utils.active_optimizer(trainer)
    raw, sums, shapes = {}, {}, {}
    for index, group in enumerate(active.param_groups):
        (partition,) = group["params"]
        shapes[f"group{index}"] = tuple(partition.shape)
        for key, out in (("gain", raw), ("grad_sum", sums)):
            local = active.state[partition][key]
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local.contiguous())
            flat, offset = torch.cat(parts), 0
            for param in zero.round_robin_bit16_groups[index]:
                out[names[id(param)]] = flat[offset:offset + param.numel()].view_as(param)
                offset += param.numel()
    return raw, sums, shapes


def main():
    parser = HfArgumentParser((RunArguments, TrainingArguments))
    run_args, args = parser.parse_args_into_dataclasses()
    trainer = CpuShardedTrainer(model=hf_utils.tiny_model(seed=0), args=args,
                             train_dataset=hf_utils.token_dataset(run_args.num_train_examples))
    recorder = SaveRecorder(trainer)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    active = hf_utils.active_optimizer(trainer)
    model = trainer.model
    names = {id(p): n for n, p in model.named_parameters()}
    params, raw, sums, placements, local_elements = {}, {}, {}, {}, 0
    for name, param in model.named_parameters():  # the same order on every rank
        params[name] = full(param)
        placements[name] = [str(p) for p in getattr(param, "placements", ())]
    partitions = None
    if trainer.is_deepspeed_enabled:
        raw, sums, partitions = zero_gains(trainer, names)
        group_names = [[names[id(p)] for p in group]
                       for group in trainer.optimizer.optimizer.round_robin_bit16_groups]
    else:
        for group in active.param_groups:
            for param in group["params"]:
                state = active.state.get(param, {})
                if "gain" in state:
                    name = names[id(param)]
                    raw[name] = full(state["gain"])
                    sums[name] = full(state["grad_sum"])
                    gain = state["gain"]
                    local_elements += (gain.to_local() if is_dtensor(gain) else gain).numel()
        group_names = [[names[id(p)] for p in g["params"]] for g in active.param_groups]
    gains = {name: rule.decode_gain(value) for name, value in raw.items()}
    record = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "fsdp_enabled": trainer.is_fsdp_enabled,
        "deepspeed_enabled": trainer.is_deepspeed_enabled,
        "zero_partitions": partitions,
        "fsdp_dropped_on_cpu": trainer.fsdp_dropped_on_cpu,
        "fsdp_version": getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None),
                                "fsdp_version", None),
        "model_class": type(model).__name__,
        "placements": placements,
        "local_gain_elements": local_elements,
        "global_step": trainer.state.global_step,
        "active_step": [g["active_step"] for g in active.param_groups],
        "period": [g["period"] for g in active.param_groups],
        "params": params,
        "gains": gains,
        "raw_gains": raw,
        "grad_sums": sums,
        "log_history": trainer.state.log_history,
        "save_reports": recorder.reports,
        "final_gain_stats": gain_stats(active, partitioned=trainer.is_deepspeed_enabled),
        "group_names": group_names,
        "gain_init": [g["gain_init"] for g in active.param_groups],
    }
    os.makedirs(args.output_dir, exist_ok=True)
    torch.save(record, os.path.join(args.output_dir, f"rank{args.process_index}.pt"))


if __name__ == "__main__":
    main()
