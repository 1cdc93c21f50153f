"""Are the ActiveLR states the same on every rank? (Data-parallel training keeps them so.)

Under DDP every rank sees the same averaged gradients, so gains, running sums and period
clocks stay identical. A user who steps the optimizer on one rank only, or feeds ranks
different gradients, breaks that silently: the models drift apart. ``consistency_report``
compares a checksum per param group across ranks; ActiveTrainer runs it at every save.
Sharded parameters (FSDP, DTensor) hold different shards per rank and are not compared.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import rule


def _checksums(optimizer) -> torch.Tensor:
    rows = []
    for group in optimizer.param_groups:
        gains = grad_sums = 0.0
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "gain" in state and type(param.data).__name__ != "DTensor":
                gains += rule.decode_gain(state["gain"]).double().sum().item()
                grad_sums += state["grad_sum"].double().abs().sum().item()
        rows.append([float(group["active_step"]), gains, grad_sums])
    return torch.tensor(rows, dtype=torch.float64)


def consistency_report(optimizer) -> dict:
    """``{"consistent": bool, "world_size": n, "groups": [...]}``; each group lists its
    per-rank (clock, sum of gains, sum of |running sums|). One process: trivially consistent."""
    from .trainer import unwrap_active

    active = unwrap_active(optimizer)
    if active is None:
        raise TypeError(f"{type(optimizer).__name__} holds no ActiveLR state")
    local = _checksums(active)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"consistent": True, "world_size": 1, "groups": [[row.tolist()] for row in local]}
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if backend_device == "cuda":
        local_dev = local.cuda()
        gathered = [g.cuda() for g in gathered]
        dist.all_gather(gathered, local_dev)
        gathered = [g.cpu() for g in gathered]
    else:
        dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)  # ranks x groups x 3
    reference = stacked[0]
    consistent = bool(torch.allclose(stacked, reference.expand_as(stacked), rtol=1e-9, atol=0))
    groups = [[stacked[r, g].tolist() for r in range(stacked.shape[0])]
              for g in range(stacked.shape[1])]
    return {"consistent": consistent, "world_size": stacked.shape[0], "groups": groups}


def check_consistent(optimizer) -> dict:
    """``consistency_report``, raising ``RuntimeError`` naming the groups whose ActiveLR
    state differs between ranks."""
    report = consistency_report(optimizer)
    if not report["consistent"]:
        bad = [i for i, ranks in enumerate(report["groups"])
               if any(r != ranks[0] for r in ranks)]
        raise RuntimeError(
            f"ActiveLR state differs between ranks in param group(s) {bad} "
            f"(per rank: step, sum of gains, sum of |running sums|: "
            f"{[report['groups'][i] for i in bad]}). Every rank must call optimizer.step() "
            "with the same (all-reduced) gradients."
        )
    return report
