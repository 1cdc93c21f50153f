#!/usr/bin/env python
"""Train the tiny GPT-2 of the test suite with ``active_adamw`` under whatever launcher started
this process (plain python, ``torchrun`` or ``accelerate launch``), then save, per rank,
``rank{N}.pt`` in ``output_dir``: the final parameters, the decoded gains and the raw
``state['gain']`` by parameter name, and the period and world size the optimizer saw."""

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_utils  # noqa: E402  (tests/hf_utils.py: the tiny model and data)


@dataclass
class RunArguments:
    num_train_examples: int = field(default=16)
    float64: bool = field(default=False, metadata={"help": "train in float64"})


def main():
    parser = HfArgumentParser((RunArguments, TrainingArguments))
    run_args, args = parser.parse_args_into_dataclasses()
    model = hf_utils.tiny_model(seed=0)
    if run_args.float64:
        model = model.double()
    trainer = Trainer(model=model, args=args,
                      train_dataset=hf_utils.token_dataset(run_args.num_train_examples))
    trainer.train()
    active = hf_utils.active_optimizer(trainer)
    record = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "global_step": trainer.state.global_step,
        "period": [g["period"] for g in active.param_groups],
        "active_step": [g["active_step"] for g in active.param_groups],
        "params": hf_utils.named_params(trainer.model),
        "gains": hf_utils.named_gains(trainer),
        "raw_gains": hf_utils.raw_gain_state(trainer),
        "distributed": torch.distributed.is_available() and torch.distributed.is_initialized(),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    torch.save(record, os.path.join(args.output_dir, f"rank{args.process_index}.pt"))


if __name__ == "__main__":
    main()
