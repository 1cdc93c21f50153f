"""Crash-and-resume subject for tests/test_reliability.py: a tiny GPT-2 (random weights from a
config) trained by hf_activelr.ActiveTrainer on generated tokens. Run it as
``python -m hf_activelr.run tests/scripts/reliability_train.py --output_dir DIR --optim
active_adamw --optim_args fused=false,period=3 ...`` (every TrainingArguments flag works).

Environment:

- ``RELIABILITY_DUMP``: where to ``torch.save`` the final parameters and ActiveLR state;
- ``RELIABILITY_HANG_AT``: at the end of this optimizer step, write ``RELIABILITY_READY`` (a
  file path) and sleep, so that the test can SIGKILL the run at a known point.

No network: nothing is downloaded.
"""

from __future__ import annotations

import os
import time

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    TrainerCallback,
    TrainingArguments,
)

import hf_activelr
from hf_activelr.integrations.trainer import unwrap_active

VOCAB, SEQ_LEN, EXAMPLES = 64, 8, 20


class Tokens(torch.utils.data.Dataset):
    """Generated causal-LM rows with a learnable pattern (next token = token + 1 mostly)."""

    def __init__(self, n: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=gen)
        rows = (start + torch.arange(SEQ_LEN)) % VOCAB
        noise = torch.rand(n, SEQ_LEN, generator=gen) < 0.2
        self.rows = torch.where(noise, torch.randint(0, VOCAB, (n, SEQ_LEN), generator=gen), rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {"input_ids": self.rows[index], "labels": self.rows[index].clone()}


class HangAt(TrainerCallback):
    """Signal readiness through a file at the end of a given step, then never return."""

    def __init__(self, step: int, ready: str):
        self.step, self.ready = step, ready

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with open(self.ready, "w") as handle:
                handle.write(str(state.global_step))
            while True:  # the test kills the process here
                time.sleep(1)


def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(1234)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    trainer = hf_activelr.ActiveTrainer(model=model, args=args, train_dataset=Tokens(EXAMPLES))
    if os.environ.get("RELIABILITY_HANG_AT"):
        trainer.add_callback(HangAt(int(os.environ["RELIABILITY_HANG_AT"]),
                                    os.environ["RELIABILITY_READY"]))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    active = unwrap_active(trainer.optimizer)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    dump = {
        "global_step": trainer.state.global_step,
        "active_step": [g["active_step"] for g in active.param_groups],
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "state": {
            names[id(p)]: {k: v.detach().clone() for k, v in active.state[p].items()
                           if torch.is_tensor(v)}
            for group in active.param_groups for p in group["params"] if p in active.state
        },
        "optimizer_class": type(active).__name__,
        "period": [g["period"] for g in active.param_groups],
    }
    torch.save(dump, os.environ["RELIABILITY_DUMP"])


if __name__ == "__main__":
    main()
