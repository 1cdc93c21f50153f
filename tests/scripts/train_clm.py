#!/usr/bin/env python
"""A tiny causal-LM training script shaped like transformers'
examples/pytorch/language-modeling/run_clm.py: dataclass arguments parsed with HfArgumentParser,
the stock Trainer, no reference to hf_activelr anywhere. The model is a small GPT-2 built from a
config and the data are generated token sequences, so nothing is downloaded.

It writes ``run_summary.json`` to ``output_dir``: the train metrics, the optimizer class, and
its param groups' settings (found by unwrapping ``trainer.optimizer``), the dataloader length.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Arguments pertaining to which model we are going to train from scratch."""

    n_embd: int = field(default=32, metadata={"help": "Hidden size."})
    n_layer: int = field(default=2, metadata={"help": "Number of layers."})
    n_head: int = field(default=2, metadata={"help": "Number of attention heads."})
    vocab_size: int = field(default=64, metadata={"help": "Vocabulary size."})


@dataclass
class DataTrainingArguments:
    """Arguments pertaining to what data we are going to input our model for training."""

    num_train_examples: int = field(default=10, metadata={"help": "Generated training examples."})
    block_size: int = field(default=8, metadata={"help": "Sequence length."})
    generation_seed: int = field(default=0, metadata={"help": "Seed of the generated data."})


def make_dataset(num_examples, block_size, vocab_size, seed):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab_size, (num_examples, 1), generator=gen)
    rows = ((start + torch.arange(block_size)) % vocab_size).tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": [list(r) for r in rows]})


def describe_optimizer(optimizer):
    inner = optimizer
    for _ in range(8):  # Accelerate (and others) wrap the optimizer built by the Trainer
        if not hasattr(inner, "optimizer"):
            break
        inner = inner.optimizer
    groups = []
    for group in inner.param_groups:
        groups.append({k: v for k, v in group.items()
                       if isinstance(v, (int, float, str, bool, type(None)))})
    return {"class": type(inner).__name__, "module": type(inner).__module__, "groups": groups}


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(
            json_file=os.path.abspath(sys.argv[1])
        )
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(level=logging.WARNING)
    set_seed(training_args.seed)

    config = GPT2Config(
        vocab_size=model_args.vocab_size, n_embd=model_args.n_embd, n_layer=model_args.n_layer,
        n_head=model_args.n_head, n_positions=max(16, data_args.block_size),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    train_dataset = make_dataset(
        data_args.num_train_examples, data_args.block_size, model_args.vocab_size,
        data_args.generation_seed,
    )

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)
    train_result = trainer.train()
    metrics = train_result.metrics
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)

    if trainer.is_world_process_zero():
        summary = {
            "metrics": metrics,
            "global_step": trainer.state.global_step,
            "optim": str(getattr(training_args.optim, "value", training_args.optim)),
            "optimizer": describe_optimizer(trainer.optimizer),
            "train_dataloader_len": len(trainer.get_train_dataloader()),
            "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
            "world_size": training_args.world_size,
            "final_loss": next(
                (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None
            ),
        }
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "run_summary.json"), "w") as handle:
            json.dump(summary, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
