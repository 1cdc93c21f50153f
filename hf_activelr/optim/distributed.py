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
    """Per group: clock, sum of gains, sum of the packed gains (their sign bits hold the last
    signs), sum and sum of |.| of the running sums, and a position-weighted sum of the gains
    (so a permutation within a tensor shows)."""
    rows = []
    for group in optimizer.param_groups:
        sums = torch.zeros(5, dtype=torch.float64)
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "gain" in state and type(param.data).__name__ != "DTensor":
                packed = state["gain"].double().reshape(-1)
                grad_sum = state["grad_sum"].double().reshape(-1)
                gain = rule.decode_gain(packed)
                weights = torch.arange(1, packed.numel() + 1, dtype=torch.float64,
                                       device=packed.device)
                sums += torch.stack([
                    gain.sum(), packed.sum(), grad_sum.sum(), grad_sum.abs().sum(),
                    (gain * weights).sum(),
                ]).cpu()  # the state may live on a GPU
        rows.append([float(group["active_step"]), *sums.tolist()])
    return torch.tensor(rows, dtype=torch.float64)


def consistency_report(optimizer) -> dict:
    """``{"consistent": bool, "world_size": n, "groups": [...]}``; each group lists its per-rank
    checksums (see ``_checksums``). One process: trivially consistent."""
    from ._mixin import unwrap_active

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
            f"(per rank checksums: clock, gains, signed gains, running sums, |running sums|, "
            f"position-weighted gains: {[report['groups'][i] for i in bad]}). "
            "Every rank must call optimizer.step() "
            "with the same (all-reduced) gradients."
        )
    return report
