"""Are the ActiveLR states the same on every rank? And the gain statistics of a sharded model.

Under data parallelism (DDP) every rank sees the same averaged gradients, so gains, running
sums and period clocks stay identical. A user who steps the optimizer on one rank only, or
feeds ranks different gradients, breaks that silently: the models drift apart.
``consistency_report`` compares, per param group and across ranks, what must match whatever
the sharding:

- the period clock (``active_step``) and every hyperparameter of the group (each key but
  ``params``, ``param_names``, the clock and ``gain_changes``, the last boundary's counts,
  which are rank-local under sharding);
- checksums of the ActiveLR state (gains, their sign bits, running sums) of the parameters
  that every rank holds whole: plain tensors and DTensors whose placements are all
  ``Replicate`` (their local tensors are compared).

It never compares state that legitimately differs between ranks:

- a DTensor with any ``Shard`` (or ``Partial``) placement (FSDP2, tensor parallelism);
- an FSDP1 flat parameter, or an original parameter FSDP1 flattened (``use_orig_params``
  views of the local shard, of per-rank sizes): torch marks both ``_fsdp_flattened``;
- a DeepSpeed ZeRO-3 parameter (``ds_id``), and, with ``sharded=True``, every parameter:
  ZeRO 1/2/3 give the optimizer per-rank flat partitions of the same padded size, which
  nothing marks (``ActiveTrainer`` passes ``sharded=True`` under ZeRO);
- any group whose parameter shapes (or count) differ between ranks: whatever holds it, it
  is partitioned.

``gain_stats`` gives the gain statistics of the whole model when the gains are sharded
DTensors (FSDP2) or ZeRO partitions: each rank reduces its own shard and the figures are
combined across ranks (see its docstring for why ``optimizer.gain_stats()`` alone is not
enough there). ``match_checkpoint_groups`` readies an optimizer for a sharded (DCP) load.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

from . import rule, stats
from .rule import local_tensor  # noqa: F401  (the one helper; callers import it here too)

# Keys of a param group that are not hyperparameters compared across ranks.
_NOT_COMPARED = frozenset({"params", "param_names", "active_step", "gain_changes"})

CHECKSUM_COLUMNS = (
    "clock", "gains", "signed gains", "running sums", "|running sums|",
    "position-weighted gains", "running sums of squares", "previous signs",
)


# --- what a parameter is on this rank ------------------------------------------------------


def is_dtensor(tensor) -> bool:
    # No DTensor exists unless torch.distributed.tensor was imported (FSDP2 imports it); not
    # importing it here keeps `import hf_activelr` about 0.5 s faster (it pulls in sympy).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def is_sharded_dtensor(tensor) -> bool:
    """A DTensor whose local tensor is not the whole tensor (any placement but Replicate)."""
    return is_dtensor(tensor) and not all(p.is_replicate() for p in tensor.placements)


def is_partitioned(param) -> bool:
    """True where each rank holds a different part of ``param`` (see the module docstring)."""
    if is_sharded_dtensor(param):
        return True
    if getattr(param, "_fsdp_flattened", False) or type(param).__name__ == "FlatParameter":
        return True
    return hasattr(param, "ds_id")  # a DeepSpeed ZeRO-3 parameter


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device(fallback: torch.device | None = None) -> torch.device:
    """Where tensors must be for the default process group's collectives."""
    backend = str(dist.get_backend())
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback is not None else torch.device("cpu")


# --- the consistency check -----------------------------------------------------------------


def _plain(value):
    """A group value as comparable plain data (tensors as lists, containers recursively)."""
    if torch.is_tensor(value):
        value = local_tensor(value)
        return ("tensor", str(value.dtype), value.detach().cpu().tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _plain(v)) for k, v in value.items()))
    return value


def _state_row(state: dict) -> torch.Tensor | None:
    """Checksums of one parameter's ActiveLR state (columns 1.. of ``CHECKSUM_COLUMNS``), on
    the state's device, or None when the parameter has no ActiveLR state yet."""
    if "gain" not in state:
        return None
    packed = local_tensor(state["gain"]).double().reshape(-1)
    grad_sum = local_tensor(state["grad_sum"]).double().reshape(-1)
    gain = rule.decode_gain(packed)
    weights = torch.arange(1, packed.numel() + 1, dtype=torch.float64, device=packed.device)
    zero = packed.new_zeros(())
    squares = state.get("grad_sq_sum")
    squares = local_tensor(squares).double().sum() if squares is not None else zero
    signs = state.get("prev_sign")
    signs = (local_tensor(signs).double().reshape(-1) * weights).sum() if signs is not None \
        else zero
    return torch.stack([
        gain.sum(), packed.sum(), grad_sum.sum(), grad_sum.abs().sum(), (gain * weights).sum(),
        squares, signs,
    ])


def _describe(optimizer, sharded: bool) -> dict:
    """What this rank holds, per group: the clock, the hyperparameters, the layout of its
    parameters (partitioned or whole, local shape) and the checksums of the whole ones."""
    groups = []
    width = len(CHECKSUM_COLUMNS) - 1
    for group in optimizer.param_groups:
        layout, rows = [], []
        for param in group["params"]:
            partitioned = sharded or is_partitioned(param)
            layout.append(("partitioned" if partitioned else "whole",
                           tuple(local_tensor(param).shape)))
            row = None if partitioned else _state_row(optimizer.state.get(param, {}))
            rows.append(row)
        present = [r for r in rows if r is not None]
        stacked = torch.stack(present).cpu() if present else None  # one copy from a GPU
        table, taken = [], 0
        for row in rows:
            if row is None:
                table.append([0.0] * width)
            else:
                table.append(stacked[taken].tolist())
                taken += 1
        hyper = {str(k): repr(_plain(v)) for k, v in group.items() if k not in _NOT_COMPARED}
        groups.append({"clock": float(group.get("active_step", 0)), "hyper": hyper,
                       "layout": layout, "rows": table})
    return {"groups": groups}


def _verdict(described: list[dict]) -> dict:
    """The report, from every rank's ``_describe`` (the same on every rank)."""
    world = len(described)
    counts = [len(d["groups"]) for d in described]
    if len(set(counts)) > 1:
        return {"consistent": False, "world_size": world, "groups": [],
                "sharded": [], "compared_params": [],
                "problems": {"all": [f"ranks hold different numbers of param groups: {counts}"]}}
    width = len(CHECKSUM_COLUMNS) - 1
    report_groups, sharded_flags, compared, problems = [], [], [], {}
    for index in range(counts[0]):
        per_rank = [d["groups"][index] for d in described]
        found = []
        clocks = [g["clock"] for g in per_rank]
        if len(set(clocks)) > 1:
            found.append(f"period clock (active_step) per rank: {clocks}")
        keys = sorted(set().union(*(g["hyper"] for g in per_rank)))
        for key in keys:
            values = [g["hyper"].get(key, "<missing>") for g in per_rank]
            if len(set(values)) > 1:
                found.append(f"hyperparameter {key!r} per rank: {values}")
        layouts = [[tuple(entry[1]) for entry in g["layout"]] for g in per_rank]
        kinds = [[entry[0] for entry in g["layout"]] for g in per_rank]
        same_layout = all(shapes == layouts[0] for shapes in layouts) and all(
            k == kinds[0] for k in kinds)
        # Compared: the parameters every rank holds whole, in a group laid out alike.
        whole = ([i for i, kind in enumerate(kinds[0]) if kind == "whole"]
                 if same_layout else [])
        rows = []
        for g in per_rank:
            sums = [0.0] * width
            for i in whole:  # summed in the same order on every rank
                sums = [a + b for a, b in zip(sums, g["rows"][i])]
            rows.append([g["clock"], *sums])
        if whole and any(not _rows_equal(row, rows[0]) for row in rows):
            found.append("ActiveLR state checksums of the parameters every rank holds whole")
        report_groups.append(rows)
        sharded_flags.append(len(whole) < len(per_rank[0]["layout"]))
        compared.append(len(whole))
        if found:
            problems[index] = found
    return {"consistent": not problems, "world_size": world, "groups": report_groups,
            "sharded": sharded_flags, "compared_params": compared, "problems": problems}


def _rows_equal(a: list[float], b: list[float]) -> bool:
    """Equal to a relative 1e-9 (the sums are float64; NaN equals NaN: a rank-wide NaN is
    not a divergence between ranks)."""
    for x, y in zip(a, b):
        if math.isnan(x) and math.isnan(y):
            continue
        if not (x == y or abs(x - y) <= 1e-9 * max(abs(x), abs(y))):
            return False
    return True


def consistency_report(optimizer, *, sharded: bool = False) -> dict:
    """Compare the ActiveLR state of ``optimizer`` across the ranks of the default process
    group; call it on every rank (it is a collective). ``sharded=True``: the optimizer holds
    per-rank partitions that nothing marks (DeepSpeed ZeRO): only clocks and hyperparameters
    are compared.

    Returns ``{"consistent", "world_size", "groups", "sharded", "compared_params",
    "problems"}``: ``groups[g][r]`` is rank ``r``'s row for group ``g`` (``CHECKSUM_COLUMNS``:
    the clock, then checksums summed over the parameters compared); ``sharded[g]``: some of
    the group's parameters were not compared (partitioned); ``compared_params[g]``: how many
    were; ``problems``: ``{group index: [what differs]}``. One process: trivially consistent.
    """
    from ._mixin import unwrap_active

    active = unwrap_active(optimizer)
    if active is None:
        raise TypeError(f"{type(optimizer).__name__} holds no ActiveLR state")
    local = _describe(active, sharded)
    world = _world()
    described = [local]
    if world > 1:
        described = [None] * world
        dist.all_gather_object(described, local)
    report = _verdict(described)
    if world == 1:
        report["consistent"], report["problems"] = True, {}
    return report


def check_consistent(optimizer, *, sharded: bool = False) -> dict:
    """``consistency_report``, raising ``RuntimeError`` naming the groups whose ActiveLR
    state differs between ranks, and what differs."""
    report = consistency_report(optimizer, sharded=sharded)
    if not report["consistent"]:
        bad = [i for i in report["problems"] if isinstance(i, int)]
        details = "; ".join(f"group {i}: " + ", ".join(found)
                            for i, found in report["problems"].items())
        raise RuntimeError(
            f"ActiveLR state differs between ranks in param group(s) {bad}: {details} "
            f"(per rank rows, columns {list(CHECKSUM_COLUMNS)}: "
            f"{[report['groups'][i] for i in bad]}). "
            "Every rank must call optimizer.step() with the same (all-reduced) gradients "
            "and the same hyperparameters."
        )
    return report


# --- gain statistics of a sharded model ----------------------------------------------------


def _owns(tensor) -> bool:
    """Whether this rank counts ``tensor``'s local elements in a sum over the world: a
    DTensor's local shard once per replica (coordinate 0 on its non-Shard mesh dims), a
    plain tensor (the same on every rank) on rank 0 only."""
    if is_dtensor(tensor):
        mesh = tensor.device_mesh
        return all(mesh.get_local_rank(dim) == 0
                   for dim, placement in enumerate(tensor.placements)
                   if not placement.is_shard())
    return dist.get_rank() == 0


def has_sharded_gains(optimizer) -> bool:
    """Whether ``optimizer`` (an Active one) holds gains as sharded DTensors in a process
    group of more than one rank: then :func:`gain_stats` is a collective."""
    return _world() > 1 and any(
        is_sharded_dtensor(state.get("gain"))
        for group in optimizer.param_groups for state in optimizer._active_states(group)
    )


def _cache_key(optimizer) -> tuple:
    clocks = tuple((g["active_step"], g["period"]) if isinstance(g["period"], str)
                   else (g["active_step"] // g["period"], g["period"])
                   for g in optimizer.param_groups)
    gains = tuple((id(s["gain"]), local_tensor(s["gain"])._version)
                  for g in optimizer.param_groups for s in optimizer._active_states(g))
    return clocks, gains


def gain_stats(optimizer, *, partitioned: bool = False) -> list[dict]:
    """``optimizer.gain_stats()`` over the whole model, on every rank, whatever the sharding
    of the gains; a collective where they are sharded DTensors (FSDP2) or ``partitioned``:
    call it on every rank.

    Why not ``gain_stats()`` itself under FSDP2: it accumulates DTensor results into plain
    tensors (``stats.GainStats.add``), which DTensor refuses (an ``AssertionError`` from
    torch/distributed/tensor/_dispatch.py), and once called it makes every later period
    boundary do the same inside ``optimizer.step()``. (Before the histogram statistics it
    ``torch.cat``-ed the gains: an all-gather of every gain onto every rank, refused for an
    unevenly sharded matrix, "Cannot flatten unevenly sharded tensor", and a collective that
    hangs when the main process calls it alone.)

    Here each rank reduces its local shard (min, max, sum, count, the boundary counts) and
    the ranks combine them with all-reduces; the lower median is found exactly by bisection
    on the float32 bit pattern (gains are positive), about 31 scalar all-reduces per
    boundary. The figures are cached until the next boundary (or a load, or any change of a
    gain tensor: its version counter is part of the key; ranks agree on a recompute with one
    scalar all-reduce per call). Besides
    ``gain_stats()``'s keys, ``at_gain_min`` / ``at_gain_max``: the shares of gains at the
    group's bounds (0 without a bound), as ``callbacks.gain_table`` counts them. Not sharded
    (one process, DDP): ``optimizer.gain_stats()``, unchanged.

    ``partitioned=True``: every rank's gains are its own partition of the group (DeepSpeed
    ZeRO's flat fp32 partitions, which nothing marks; ``ActiveTrainer`` passes it under
    ZeRO): each element is counted once, on the rank that holds it. ZeRO's alignment padding
    (a few elements at the end of the last partition, when a group's size is not a multiple
    of the world size times 2) is counted too; its gains never move.

    Boundary counts (``grew``/``shrank``/``nonfinite``) come from the group's
    ``gain_changes``, which for ZeRO partitions and sharded DTensors must hold the rank's
    own part of the counts (the local partial of a DTensor sum): they are summed across
    ranks. A group mixing sharded and whole gains has them as ``None`` (its per-rank counts
    cannot be told apart). FSDP1 flat parameters are neither DTensors nor marked partitions
    here: their figures stay the rank's own.
    """
    from ._mixin import unwrap_active

    active = unwrap_active(optimizer)
    if active is None:
        raise TypeError(f"{type(optimizer).__name__} holds no ActiveLR state")
    if not (has_sharded_gains(active) or (partitioned and _world() > 1)):
        return active.gain_stats()
    key = (_cache_key(active), partitioned)
    cached = active._runtime.distributed_stats
    # Every rank must take the same branch (the computation is a collective): recompute
    # where any rank's cache is stale (a scalar all-reduce per call).
    fresh = torch.tensor([int(cached is not None and cached[0] == key)], dtype=torch.int64)
    fresh = fresh.to(_collective_device())
    dist.all_reduce(fresh, op=dist.ReduceOp.MIN)
    if not int(fresh):
        cached = (key, _reduced_summaries(active, partitioned))
        active._runtime.distributed_stats = cached
    summaries = cached[1]
    return [{**stats, "step": group["active_step"], "period": group["period"]}
            for stats, group in zip(summaries, active.param_groups)]


def _reduced_summaries(active, partitioned: bool) -> list[dict]:
    """``optimizer.gain_stats()``'s figures per group, each combined across the ranks."""
    groups = active.param_groups
    locals_, owned, count_modes, tolerances = [], [], [], []
    device = None
    for group in groups:
        values, mine, gains = [], [], [s["gain"] for s in active._active_states(group)]
        tolerances.append(stats.bound_tolerance(gains[0]) if gains else 0.0)
        for gain in gains:
            # relative to gain_init, as the optimizer's own figures (times gain_init below)
            flat = rule.decode_gain(local_tensor(gain)).reshape(-1).float()
            values.append(flat)
            if partitioned or _owns(gain):
                mine.append(flat)
            device = device or flat.device
        locals_.append(torch.cat(values) if values else torch.zeros(0))
        owned.append(torch.cat(mine) if mine else torch.zeros(0, device=device or "cpu"))
        # The boundary's counts (gain_changes): for ZeRO partitions and sharded DTensors,
        # this rank's part of them (``int()`` of a DTensor sum reads the local partial),
        # summed over the ranks that own their shards; for whole tensors, the same on every
        # rank, counted once; a group mixing both cannot be told apart (None).
        sharded = [partitioned or is_sharded_dtensor(g) for g in gains]
        if sharded and all(sharded):
            count_modes.append("sum" if partitioned or all(_owns(g) for g in gains) else "")
        else:
            count_modes.append("mixed" if any(sharded) else
                               "sum" if dist.get_rank() == 0 else "")
    comm = _collective_device(device)
    n = len(groups)
    inf = float("inf")

    # sums: owned count, owned sum, boundary counts (summed where every gain is sharded),
    # owned gains at the bounds (as callbacks.gain_table counts them)
    totals = torch.zeros(n, 7, dtype=torch.float64)
    for i, (group, mine) in enumerate(zip(groups, owned)):
        changes = group.get("gain_changes") or {}
        counts = [changes.get(k, 0) for k in ("grew", "shrank", "nonfinite")]
        if count_modes[i] != "sum":
            counts = [0, 0, 0]
        at_min, at_max = stats.count_at_bounds(mine, group, tolerances[i])
        totals[i] = torch.tensor([mine.numel(), float(mine.double().sum()), *counts,
                                  at_min, at_max], dtype=torch.float64)
    low = torch.tensor([float(v.min()) if v.numel() else inf for v in locals_],
                       dtype=torch.float32)
    high = torch.tensor([float(v.max()) if v.numel() else -inf for v in locals_],
                        dtype=torch.float32)
    totals, low, high = totals.to(comm), low.to(comm), high.to(comm)
    dist.all_reduce(totals)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    totals, low, high = totals.cpu(), low.cpu(), high.cpu()

    # the lower median (element (n - 1) // 2 in sorted order), by bisection on the bits of
    # float32 values >= 0, whose int32 patterns sort as the values do
    elements = totals[:, 0].long()
    rank_k = (elements - 1).clamp(min=0) // 2 + 1  # the median is the rank_k-th smallest
    bits_lo = low.clamp(min=0).view(torch.int32).long()
    bits_hi = high.clamp(min=0).view(torch.int32).long()
    owned_bits = [mine.clamp(min=0).view(torch.int32) for mine in owned]
    while bool((bits_lo < bits_hi).any()):
        mid = (bits_lo + bits_hi) // 2
        below = torch.tensor(
            [int((bits <= int(m)).sum()) if lo < hi else 0
             for bits, m, lo, hi in zip(owned_bits, mid, bits_lo, bits_hi)],
            dtype=torch.int64)
        below = below.to(comm)
        dist.all_reduce(below)
        below = below.cpu()
        enough = below >= rank_k
        active_rows = bits_lo < bits_hi
        bits_hi = torch.where(active_rows & enough, mid, bits_hi)
        bits_lo = torch.where(active_rows & ~enough, mid + 1, bits_lo)
    medians = bits_lo.to(torch.int32).view(torch.float32)

    summaries = []
    for i, group in enumerate(groups):
        count = int(totals[i, 0])
        if count == 0:
            summaries.append({"nonfinite": 0, "min": group["gain_init"],
                              "median": group["gain_init"], "mean": group["gain_init"],
                              "max": group["gain_init"], "grew": 0.0, "shrank": 0.0,
                              "elements": 0, "at_gain_min": 0.0, "at_gain_max": 0.0})
            continue
        scale = group["gain_init"]
        mixed = count_modes[i] == "mixed"
        summaries.append({
            "nonfinite": None if mixed else int(totals[i, 4]),
            "min": float(low[i]) * scale,
            "median": float(medians[i]) * scale,
            "mean": float(totals[i, 1]) / count * scale,
            "max": float(high[i]) * scale,
            "grew": None if mixed else float(totals[i, 2]) / count,
            "shrank": None if mixed else float(totals[i, 3]) / count,
            "elements": count,
            "at_gain_min": float(totals[i, 5]) / count,
            "at_gain_max": float(totals[i, 6]) / count,
        })
    return summaries


# --- sharded (DCP) checkpoints -------------------------------------------------------------


def match_checkpoint_groups(optimizer, checkpoint_dir: str, *, key: str = "optimizer") -> None:
    """Before loading a ``torch.distributed.checkpoint`` (DCP) optimizer checkpoint: give each
    param group's dict-or-None entries the nesting they have in the checkpoint.

    DCP loads into a template made from the live optimizer (``get_optimizer_state_dict``),
    flattened key by key, and refuses a key it cannot find. ``gain_changes`` (the last
    boundary's counts) is None before the first period boundary and a dict after, so a fresh
    optimizer resuming from a checkpoint saved after a boundary fails with "Missing key in
    checkpoint state_dict: optimizer.param_groups.0.gain_changes". ``key``: where the optimizer
    state sits in the saved state dict (accelerate saves ``{"optimizer": ...}``). The values
    placed here are overwritten by the load; a group already nested as saved is unchanged.
    """
    import torch.distributed.checkpoint as dcp

    from ._mixin import unwrap_active

    active = unwrap_active(optimizer)
    if active is None:
        raise TypeError(f"{type(optimizer).__name__} holds no ActiveLR state")
    saved = dcp.FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
    for index, group in enumerate(active.param_groups):
        prefix = f"{key}.param_groups.{index}."
        nested: dict = {}
        for name in saved:
            if name.startswith(prefix) and "." in name[len(prefix):]:
                entry, _, rest = name[len(prefix):].partition(".")
                nested.setdefault(entry, []).append(rest)
        for entry, value in list(group.items()):
            if entry in ("params", "param_names") or not (value is None
                                                          or isinstance(value, dict)):
                continue
            if entry in nested:
                structure: dict = {}
                for path in nested[entry]:
                    *parents, leaf = path.split(".")
                    node = structure
                    for parent in parents:
                        node = node.setdefault(parent, {})
                    node[leaf] = 0
                group[entry] = structure
            elif prefix + entry in saved:
                group[entry] = None
