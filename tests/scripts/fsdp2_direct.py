#!/usr/bin/env python
"""FSDP2 without the Trainer: ``torch.distributed.fsdp.fully_shard`` on a CPU device mesh
(gloo), ``ActiveAdamW`` on the sharded (DTensor) parameters, a sharded checkpoint with
``torch.distributed.checkpoint`` (DCP) and a resume from it. Run under
``torchrun --nproc_per_node 2``; each rank saves ``rank{N}.pt`` in OUT_DIR.

    torchrun --standalone --nproc_per_node 2 tests/scripts/fsdp2_direct.py OUT_DIR

Every rank also trains a plain (unsharded) copy of the model on the whole global batch, the
1-process reference. Runs, on the same data (global batch 4, 2 rows per rank):

- ``uninterrupted``: STEPS steps, with a DCP checkpoint after step SAVE_AT (mid-period);
- ``resumed``: a fresh model and optimizer load the checkpoint and run the remaining steps.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_utils  # noqa: E402  (tests/hf_utils.py: the tiny model and data)

from hf_activelr import ActiveAdamW, check_consistent, consistency_report  # noqa: E402
from hf_activelr.optim import rule  # noqa: E402
from hf_activelr.optim.distributed import (  # noqa: E402
    gain_stats,
    is_dtensor,
    match_checkpoint_groups,
)

STEPS, SAVE_AT, GLOBAL_BATCH = 8, 4, 4
SETTINGS = dict(lr=1e-2, period=3, lr_high=0.5, lr_low=0.5, fused=False)


def optimizer_for(model):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return ActiveAdamW([{"params": decay, "weight_decay": 0.01},
                        {"params": other, "weight_decay": 0.0}], **SETTINGS)


def step(model, optimizer, rows):
    ids = torch.tensor(rows)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def full(tensor):
    return (tensor.full_tensor() if is_dtensor(tensor) else tensor).detach().clone()


def snapshot(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    gains = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "gain" in state:
                gains[names[id(param)]] = rule.decode_gain(full(state["gain"]))
    return {"params": {n: full(p) for n, p in model.named_parameters()}, "gains": gains,
            "active_step": [g["active_step"] for g in optimizer.param_groups]}


def main():
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    per_rank = GLOBAL_BATCH // world
    rows = hf_utils.token_rows(STEPS * GLOBAL_BATCH)

    def batch(t, whole=False):  # step t (0-based): the global batch, or this rank's part
        start = t * GLOBAL_BATCH + (0 if whole else rank * per_rank)
        return rows[start:start + (GLOBAL_BATCH if whole else per_rank)]

    def sharded_model():
        model = hf_utils.tiny_model(seed=0)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    checkpoint = os.path.join(out_dir, "checkpoint")
    record = {"rank": rank, "world_size": world}

    # uninterrupted, with a sharded checkpoint mid-run; the plain reference beside it
    model, reference = sharded_model(), hf_utils.tiny_model(seed=0)
    optimizer, reference_optimizer = optimizer_for(model), optimizer_for(reference)
    record["placements"] = {n: [str(p) for p in param.placements]
                            for n, param in model.named_parameters()}
    for t in range(STEPS):
        step(model, optimizer, batch(t))
        step(reference, reference_optimizer, batch(t, whole=True))
        if t + 1 == SAVE_AT:
            record["save_report"] = check_consistent(optimizer)
            model_state, optim_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optim_state},
                     checkpoint_id=checkpoint)
    record["uninterrupted"] = snapshot(model, optimizer)
    record["reference"] = snapshot(reference, reference_optimizer)
    record["gain_stats"] = gain_stats(optimizer)
    # The method itself gives the whole model's figures too (a collective on every rank).
    record["method_gain_stats"] = optimizer.gain_stats()
    record["reference_gain_stats"] = reference_optimizer.gain_stats()
    names = {id(p): n for n, p in model.named_parameters()}
    record["group_names"] = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    record["local_gain_elements"] = sum(
        s["gain"].to_local().numel() for g in optimizer.param_groups
        for s in (optimizer.state[p] for p in g["params"]))
    record["final_report"] = consistency_report(optimizer)

    # resumed: a fresh model and optimizer, loaded from the checkpoint
    model, optimizer = sharded_model(), None
    optimizer = optimizer_for(model)
    match_checkpoint_groups(optimizer, checkpoint, key="optimizer")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    record["loaded_active_step"] = [g["active_step"] for g in optimizer.param_groups]
    for t in range(SAVE_AT, STEPS):
        step(model, optimizer, batch(t))
    record["resumed"] = snapshot(model, optimizer)
    record["resumed_gain_stats"] = gain_stats(optimizer)
    record["checkpoint_files"] = sorted(os.listdir(checkpoint))

    os.makedirs(out_dir, exist_ok=True)
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
