"""The quality protocol: one fixed set of runs behind every quality table in README and docs/.

    hf-activelr sweep --protocol --output_dir docs/protocol               # resumable

(The published runs are committed under ``docs/protocol/runs/``, so a later session resumes them.)
    hf-activelr sweep --protocol --quick --output_dir outputs/protocol_quick  # < 10 minutes

What it must be able to tell (issue 19): whether the ActiveLR *rule* makes training better and
the learning rate matter less, or only its starting scale does, and how it fares against what
a user would pick instead.

- **Tasks** (offline, :mod:`hf_activelr.experiments.sweep_tasks`): ``vit-digits``,
  ``gpt2-text``, ``resnet-digits`` (BatchNorm CNN; bases AdamW and SGD with momentum),
  ``lora-minilm`` (LoRA on a real pretrained model), ``gpt2-long`` (3200 steps), and
  ``vit-digits`` / ``gpt2-text`` at batch 512. Schedules: linear decay (the Trainer's default)
  and constant, on every task.
- **A half-decade grid** (:func:`half_decades`): AdamW 1e-5 ... 1e-1, SGD 1e-4 ... 1, so a
  base's best learning rate is found to within a factor of 3.2.
- **The start-scale control**: an Active optimizer whose gains start at ``gain_init != 1``
  is, if no gain ever moves, its base at ``gain_init * lr``. The report puts that run beside
  each of its points; the plan adds the base's runs at ``gain_init * lr`` wherever the grid
  does not hold them (a start of ``10 ** -0.5`` lands on the grid point below).
- **The peers** (:data:`PEERS`), at their documented defaults and on a grid: Prodigy and
  D-Adaptation Adam, whose ``lr`` is a multiplier of an estimated step size (grid: 1e-2 ...
  1e2, four decades as for AdamW's lr), and transformers' ``schedule_free_adamw`` (grid:
  AdamW's; the Trainer calls its ``train()`` / ``eval()``).
- **Seeds**: seed 0 everywhere; seeds 1 and 2 where they decide something
  (:func:`decisive_lrs`: each optimizer's best point and the base's neighbours, the untouched
  lr 1e-3, the start-scale controls of those points, the peers' defaults), chosen from the
  finished seed-0 runs, so a second round of planning adds them.

Pruned, to keep the whole near 8 hours on 2 cores (:func:`estimate_hours`): the previous
default (``preset=two_sided``) is retired from every arm; the peers run on their grids on the
three short tasks (on the LoRA and long runs, at their defaults only); the batch-512 arms use
the linear schedule and the middle of the grid; the LoRA and long runs use the part of the
grid where any optimizer learns in their few hundred / 3200 steps, and confirm with later
seeds only the default against AdamW (:attr:`Arm.confirm`).

Runs are ordinary sweep points (:mod:`hf_activelr.experiments.sweep`), stored one file each, so
the protocol resumes where it stopped, and a run is redone only when the settings behind its
optimizer name change. :func:`report` turns the records into ``protocol.md``.

Metrics, per task (arm and schedule) and optimizer (:func:`summarize`):

- the loss at each grid point (mean over seeds), and the start-scale control beside it;
- **LR sensitivity**: the mean over the optimizer's grid of (its loss - the task's best loss),
  a loss worse than a uniform guess, or a diverged run, counted as the uniform guess (after
  Wortsman et al., "Small-scale proxies for large-scale Transformer training instabilities",
  arXiv 2309.14322);
- **width**: how many decades of the grid (half a decade per point) come within 0.05 nats of
  the base's best loss;
- the loss at the untouched lr 1e-3 (peers: at their default), divergences, and the gains'
  median and share at a bound at the end, per lr.
"""

from __future__ import annotations

import math
import pathlib
import re
import statistics
from dataclasses import dataclass

from .sweep import Point, check_optimizer, installed_peers, resolved_settings


def half_decades(low_exponent: int, high_exponent: int) -> tuple:
    """``10 ** (k / 2)`` from ``10 ** low_exponent`` to ``10 ** high_exponent``, to 3
    significant digits (1e-05, 3.16e-05, 0.0001, ...): a base's best learning rate is found
    to within a factor of 3.2, and a gain start of 10 ** -0.5 lands on the grid point below."""
    return tuple(float(f"{10 ** (k / 2):.3g}")
                 for k in range(2 * low_exponent, 2 * high_exponent + 1))


ADAMW_LRS = half_decades(-5, -1)
SGD_LRS = half_decades(-4, 0)
#: Prodigy's and D-Adaptation's ``lr`` multiplies the step size they estimate (default 1).
PEER_MULTIPLIERS = half_decades(-2, 2)
SCHEDULES = ("linear", "constant")
PUBLISHED_SEEDS = (0, 1, 2)
#: The learning rate a user who does not tune keeps (the Active optimizers' claim).
UNTOUCHED_LR = 1e-3
#: A loss within this of the base's best counts toward an optimizer's width.
WIDTH_NATS = 0.05


@dataclass(frozen=True)
class Peer:
    """A peer optimizer: its name (a sweep spec), its documented default ``lr`` and its grid."""

    name: str
    default_lr: float
    grid: tuple


#: The peers (package defaults: prodigyopt and dadaptation ``lr=1.0``; schedulefree's
#: ``AdamWScheduleFree`` ``lr=0.0025``).
PEERS = (
    Peer("prodigy", 1.0, PEER_MULTIPLIERS),
    Peer("dadapt_adam", 1.0, PEER_MULTIPLIERS),
    Peer("schedule_free_adamw", 0.0025, ADAMW_LRS),
)
PEER_NAMES = tuple(peer.name for peer in PEERS)

#: The AdamW-based optimizers every AdamW arm compares: the default, the paper's rule, the base.
ADAMW_OPTIMS = ("active_adamw", "active_adamw_paper", "adamw_torch")
#: SGD with momentum 0.9, Active and plain (the paper's SGD runs use momentum).
SGD_OPTIMS = ("active_sgd:momentum=0.9", "active_sgd_paper:momentum=0.9", "sgd_momentum")


@dataclass(frozen=True)
class Arm:
    """One row block of the protocol: a task at a batch size, its base and what it compares.
    ``peers``: ``"grid"`` (the peers on their grids), ``"default"`` (at their defaults only)
    or ``"none"``."""

    task: str
    base: str
    optims: tuple
    lrs: tuple
    batch_size: int | None = None  # None: the task's own
    schedules: tuple = SCHEDULES
    peers: str = "grid"
    #: The optimizers that get the later seeds (None: all); the long runs confirm only the
    #: comparison the targets make (the default against its base).
    confirm: tuple | None = None

    def label(self, schedule: str) -> str:
        batch = f", batch {self.batch_size}" if self.batch_size else ""
        sgd = ", SGD" if "sgd" in self.base else ""
        return f"{self.task} ({schedule}{batch}{sgd})"


def arms(quick: bool = False) -> list[Arm]:
    """The protocol's arms; ``quick``: a subset of under 10 minutes on 2 cores (one seed, the
    linear schedule, the three short tasks, five learning rates around 1e-3 so that the
    default's start-scale control is on the grid)."""
    if quick:
        return [
            Arm("vit-digits", "adamw_torch", ("active_adamw", "adamw_torch"),
                half_decades(-4, -2), schedules=("linear",), peers="none"),
            Arm("gpt2-text", "adamw_torch", ("active_adamw", "adamw_torch"),
                half_decades(-4, -2), schedules=("linear",), peers="none"),
            Arm("resnet-digits", "sgd_momentum", ("active_sgd:momentum=0.9", "sgd_momentum"),
                half_decades(-2, 0), schedules=("linear",), peers="none"),
        ]
    return [
        Arm("vit-digits", "adamw_torch", ADAMW_OPTIMS, ADAMW_LRS),
        Arm("gpt2-text", "adamw_torch", ADAMW_OPTIMS, ADAMW_LRS),
        Arm("resnet-digits", "adamw_torch", ADAMW_OPTIMS, ADAMW_LRS),
        Arm("resnet-digits", "sgd_momentum", SGD_OPTIMS, SGD_LRS, peers="none"),
        Arm("lora-minilm", "adamw_torch", ADAMW_OPTIMS, half_decades(-4, -1), peers="default",
            confirm=("active_adamw", "adamw_torch")),
        Arm("gpt2-long", "adamw_torch", ADAMW_OPTIMS, (3.16e-4, 1e-3, 3.16e-3, 1e-2),
            peers="default", confirm=("active_adamw", "adamw_torch")),
        Arm("vit-digits", "adamw_torch", ADAMW_OPTIMS, half_decades(-4, -2), batch_size=512,
            schedules=("linear",), peers="none"),
        Arm("gpt2-text", "adamw_torch", ADAMW_OPTIMS, half_decades(-4, -2), batch_size=512,
            schedules=("linear",), peers="none"),
    ]


def _on(value: float, grid) -> float | None:
    """The grid point within 1% of ``value``, or None."""
    return next((x for x in grid if math.isclose(x, value, rel_tol=1e-2)), None)


def gain_init_of(spec: str) -> float:
    """The gains' start of optimizer ``spec`` (1 for an optimizer without gains)."""
    settings = resolved_settings(spec)
    return 1.0 if settings is None else float(settings.get("gain_init", 1.0))


def control_lrs(spec: str, lrs) -> dict:
    """``{lr: gain_init * lr}`` for an Active ``spec`` that starts its gains off 1: where its
    base would run if no gain moved (snapped to ``lrs`` where within 1% of a grid point)."""
    start = gain_init_of(spec)
    if start == 1.0:
        return {}
    return {lr: _on(lr * start, lrs) or float(f"{lr * start:.3g}") for lr in lrs}


def _peer(name: str) -> Peer | None:
    return next((peer for peer in PEERS if peer.name == name.split(":")[0]), None)


def decisive_lrs(records: list[dict], arm: Arm, schedule: str, optims: list[str]) -> dict:
    """``{optimizer: lrs}`` where seeds beyond the first decide something, read from the
    finished seed-0 records of ``arm`` / ``schedule``: each optimizer's best point; the base's
    best and its neighbours (where the comparison at the base's best is made); the untouched
    lr; an Active optimizer's start-scale controls at those points (run by the base); a
    peer's default. Empty until the arm's seed-0 runs are finished."""
    from .sweep_tasks import get_task

    batch = arm.batch_size or get_task(arm.task).batch_size
    first = {}
    for record in records:
        if (record["task"] == arm.task and record["batch_size"] == batch
                and record.get("schedule", "constant") == schedule and record["seed"] == 0):
            first.setdefault(record["optim"], {})[record["lr"]] = record
    if arm.base not in first:
        return {}

    def best(optim):
        points = first.get(optim, {})
        finite = {lr: r["eval_loss"] for lr, r in points.items()
                  if not r["diverged"] and math.isfinite(r["eval_loss"])}
        return min(finite, key=finite.get) if finite else None

    base_best = best(arm.base)
    grid = list(arm.lrs)
    around = set()
    if base_best is not None and _on(base_best, grid) is not None:
        index = grid.index(_on(base_best, grid))
        around = set(grid[max(index - 1, 0): index + 2])
    chosen: dict = {}
    for optim in optims:
        peer = _peer(optim)
        if peer is not None:
            lrs = {peer.default_lr, best(optim)}
        else:
            lrs = {best(optim), *around}
            if _on(UNTOUCHED_LR, grid) is not None:
                lrs.add(_on(UNTOUCHED_LR, grid))
            controls = control_lrs(optim, grid)
            for lr in [lr for lr in lrs if lr is not None]:
                if lr in controls:
                    chosen.setdefault(arm.base, set()).add(controls[lr])
        chosen.setdefault(optim, set()).update(lr for lr in lrs if lr is not None)
    return {optim: sorted(lrs) for optim, lrs in chosen.items()}


def _grid_of(arm: Arm, spec: str) -> list:
    """The learning rates ``spec`` runs at in ``arm`` (a peer: its grid, or its default)."""
    peer = _peer(spec)
    if peer is None:
        return list(arm.lrs)
    return list(peer.grid) if arm.peers == "grid" else [peer.default_lr]


def plan(quick: bool = False, seeds=None, candidates=(), only_tasks=None,
         only_schedules=None, peers: bool = True, candidates_only: bool = False,
         only_lrs=None, records=None, only_batch_sizes=None) -> list[Point]:
    """The protocol's points. ``candidates``: extra optimizer specs screened on the AdamW arms
    (``"active_adamw:..."``) or the SGD arms (``"active_sgd:..."``); ``only_tasks`` /
    ``only_schedules`` / ``only_lrs`` / ``only_batch_sizes``: keep these only (screening);
    ``peers=False``: leave out the installed peers; ``candidates_only``: the candidates and
    each arm's base, nothing else.
    ``seeds``: every point at each of these seeds (screening); default: seed 0 everywhere and
    the published seeds at the :func:`decisive_lrs` of ``records`` (the finished runs)."""
    from .sweep_tasks import get_task

    explicit_seeds = tuple(seeds) if seeds else None
    later_seeds = () if quick else tuple(s for s in PUBLISHED_SEEDS if s != 0)
    installed = set(installed_peers()) if peers else set()
    points = []
    for arm in arms(quick):
        if only_tasks and arm.task not in only_tasks:
            continue
        task = get_task(arm.task)
        batch = arm.batch_size or task.batch_size
        if only_batch_sizes and batch not in only_batch_sizes:
            continue
        family = "active_sgd" if arm.base == "sgd_momentum" else "active_adamw"
        mine = [c for c in candidates if c.split(":")[0].startswith(family)]
        arm_peers = [peer for peer in PEERS if peer.name in installed and arm.peers != "none"]
        optims = [arm.base, *mine] if candidates_only else [
            *arm.optims, *mine, *(peer.name for peer in arm_peers)]
        optims = list(dict.fromkeys(optims))
        for spec in optims:
            check_optimizer(spec)

        for schedule in arm.schedules:
            if only_schedules and schedule not in only_schedules:
                continue
            wanted: dict = {}  # (optim, lr) -> seeds
            for spec in optims:
                lrs = _grid_of(arm, spec)
                peer = _peer(spec)
                if peer is not None and peer.default_lr not in lrs:
                    lrs.append(peer.default_lr)
                for lr in lrs:
                    wanted.setdefault((spec, lr), set()).add(0)
                for control in control_lrs(spec, arm.lrs).values():
                    wanted.setdefault((arm.base, control), set()).add(0)
            if explicit_seeds is not None:
                for key in wanted:
                    wanted[key] = set(explicit_seeds)
            elif later_seeds and records is not None:
                confirmed = [o for o in optims if arm.confirm is None or o in arm.confirm
                             or o in mine]
                for spec, lrs in decisive_lrs(records, arm, schedule, confirmed).items():
                    for lr in lrs:
                        wanted.setdefault((spec, lr), set()).update(later_seeds)
            for (spec, lr), point_seeds in wanted.items():
                if only_lrs and not any(math.isclose(lr, x, rel_tol=1e-2) for x in only_lrs):
                    continue
                for seed in sorted(point_seeds):
                    points.append(Point(arm.task, spec, float(lr), batch, seed, task.epochs,
                                        schedule))
    points.sort(key=lambda p: p.seed)  # seed by seed: a partial run covers every task early
    return list(dict.fromkeys(points))


def estimate_hours(points: list[Point], jobs: int = 2) -> float:
    """The wall hours ``points`` take on 2 cores with ``jobs`` runs at a time, from the run
    times measured so far (:data:`RUN_SECONDS`, seconds per run with two runs side by side)."""
    seconds = sum(RUN_SECONDS.get((point.task, point.batch_size), 60.0) for point in points)
    return seconds / max(jobs, 1) / 3600


#: Seconds per run measured on 2 cores with two runs side by side (``train_wall_s`` of the
#: stored records, 2026-12-07), by (task, batch size).
RUN_SECONDS = {
    ("vit-digits", 32): 20.0, ("gpt2-text", 32): 55.0, ("resnet-digits", 32): 12.0,
    ("lora-minilm", 16): 170.0, ("gpt2-long", 16): 380.0, ("vit-digits", 512): 17.0,
    ("gpt2-text", 512): 130.0,
}


# --- the summary ----------------------------------------------------------------------------


def _arm_of(record: dict, all_arms: list[Arm]) -> Arm | None:
    from .sweep_tasks import get_task

    for arm in all_arms:
        batch = arm.batch_size or get_task(arm.task).batch_size
        family = "sgd" in arm.base
        if (arm.task == record["task"] and batch == record["batch_size"]
                and family == ("sgd" in record["optim"])):
            return arm
    return None


def _mean(values):
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf


def _std(values):
    finite = [v for v in values if math.isfinite(v)]
    return statistics.stdev(finite) if len(finite) > 1 else None


def _points(runs_by_lr: dict, chance: float) -> dict:
    """Per lr: the mean loss over seeds (inf where any seed diverged), its std, the seeds,
    the divergences, the loss capped at ``chance`` (a divergence counts as chance), and the
    gains' median and share at a bound at the end (median over seeds)."""
    out = {}
    for lr, runs in sorted(runs_by_lr.items()):
        bad = sum(bool(r["diverged"]) for r in runs)
        mean = math.inf if bad else _mean([r["eval_loss"] for r in runs])
        health = [r["gain_health"][-1] for r in runs if r.get("gain_health")]
        out[lr] = {
            "mean": mean, "std": _std([r["eval_loss"] for r in runs]), "seeds": len(runs),
            "diverged": bad, "capped": min(mean, chance),
            "gain_median": statistics.median(h[1] for h in health) if health else None,
            "at_bound": statistics.median(h[2] + h[3] for h in health) if health else None,
            "wall_s": sum(r["train_wall_s"] for r in runs),
        }
    return out


def _best(points: dict, grid=None):
    """The lr with the lowest mean among ``grid`` (all where None), skipping diverged ones."""
    candidates = {lr: p for lr, p in points.items() if grid is None or lr in grid}
    finite = {lr: p["mean"] for lr, p in candidates.items() if math.isfinite(p["mean"])}
    if not finite:  # every point diverged: the lowest mean of the surviving seeds
        return min(candidates, key=lambda lr: candidates[lr]["mean"], default=None)
    return min(finite, key=finite.get)


def summarize(records: list[dict], quick: bool = False) -> list[dict]:
    """Per arm and schedule: the base's best lr, the task's best loss, the tolerance (the
    base's seed std, pooled over its points with two seeds or more), and per optimizer its
    points, best, loss at the base's best lr and at the untouched lr (a peer: its default),
    LR sensitivity, width, divergences, its start-scale control and its gains.

    A point where any seed diverged counts as infinite loss (never a best; the sensitivity
    counts it as a uniform guess)."""
    all_arms = arms(quick)
    blocks: dict = {}
    for record in records:
        arm = _arm_of(record, all_arms)
        if arm is None:
            continue
        schedule = record.get("schedule", "constant")
        blocks.setdefault((arm, schedule), {}).setdefault(record["optim"], {}).setdefault(
            record["lr"], []).append(record)
    out = []
    for (arm, schedule), by_optim in blocks.items():
        if arm.base not in by_optim:
            continue
        chance = next(run for by_lr in by_optim.values() for runs in by_lr.values()
                      for run in runs).get("chance_loss", math.inf)
        points = {optim: _points(by_lr, chance) for optim, by_lr in by_optim.items()}
        base_points = points[arm.base]
        grid = list(arm.lrs)
        best_lr = _best(base_points, grid)
        if best_lr is None:  # the base has run no point of the grid yet
            continue
        variances = [p["std"] ** 2 for p in base_points.values() if p["std"] is not None]
        tolerance = math.sqrt(sum(variances) / len(variances)) if variances else 0.0
        task_best = min((p["mean"] for pts in points.values() for p in pts.values()),
                        default=math.inf)
        base_best_loss = base_points[best_lr]["mean"]
        rows = []
        for optim, pts in points.items():
            peer = _peer(optim)
            own_grid = [lr for lr in (peer.grid if peer else grid) if lr in pts] or list(pts)
            capped = [pts[lr]["capped"] - task_best for lr in own_grid]
            at_best = pts.get(best_lr)
            untouched = peer.default_lr if peer else _on(UNTOUCHED_LR, grid)
            controls = {} if peer else control_lrs(optim, grid)
            best = _best(pts, own_grid)
            rows.append({
                "optim": optim,
                "peer": peer is not None,
                "points": pts,
                "grid": own_grid,
                "best_lr": best,
                "best": pts[best]["mean"] if best is not None else math.inf,
                "at_base_best": None if at_best is None else at_best["mean"],
                "at_untouched": pts[untouched]["mean"] if untouched in pts else None,
                "untouched_lr": untouched,
                "sensitivity": sum(capped) / len(capped) if capped else None,
                "width": 0.5 * sum(
                    1 for lr in own_grid if pts[lr]["mean"] <= base_best_loss + WIDTH_NATS),
                "diverged_runs": sum(p["diverged"] for p in pts.values()),
                "runs": sum(p["seeds"] for p in pts.values()),
                "seeds": max(p["seeds"] for p in pts.values()),
                "gain_init": gain_init_of(optim) if not peer else None,
                "control_lrs": controls,
                "wall_s": sum(p["wall_s"] for p in pts.values()),
            })
        base_row = next(row for row in rows if row["optim"] == arm.base)
        for row in rows:
            row["vs_base"] = (None if row["at_base_best"] is None
                              else row["at_base_best"] - base_row["at_base_best"])
            row["within_tolerance"] = (row["vs_base"] is not None
                                       and row["vs_base"] <= tolerance + 1e-12)
        out.append({"arm": arm.label(schedule), "task": arm.task, "schedule": schedule,
                    "base": arm.base, "best_lr": best_lr, "tolerance": tolerance,
                    "task_best": task_best, "chance": chance, "grid": grid,
                    "rows": rows})
    out.sort(key=lambda block: block["arm"])
    return out


def start_controls(row: dict) -> dict:
    """``{lr: the base's lr that is this row's start}``: its start-scale controls; where the
    gains start at 1 (``gain_init_of`` says 1 for the base too), the base at the same lr;
    empty for a peer (no gain_init)."""
    if row["control_lrs"]:
        return row["control_lrs"]
    if row["gain_init"] == 1.0:
        return {lr: lr for lr in row["points"]}
    return {}


def beats_start(row: dict, base_points: dict, tolerance: float) -> dict:
    """Per grid lr with a start-scale control (:func:`start_controls`): better (by more than
    ``tolerance``), worse (by more than it) or even; counts of each."""
    better = worse = even = 0
    for lr, control_lr in start_controls(row).items():
        mine = row["points"].get(lr, {}).get("mean")
        control_point = base_points.get(control_lr)
        if mine is None or control_point is None:
            continue
        control = control_point["mean"]
        tol = control_point["std"] if control_point["std"] is not None else tolerance
        if mine < control - tol:
            better += 1
        elif mine > control + tol:
            worse += 1
        else:
            even += 1
    return {"better": better, "worse": worse, "even": even}


def _f(value, digits=3, signed=False):
    if value is None:
        return ""
    if not math.isfinite(value):
        return "inf"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


#: The Trainer names the targets are stated for: the defaults of the two measured families.
DEFAULT_SPECS = ("active_adamw", "active_sgd:momentum=0.9")


def targets(summary: list[dict], optims=DEFAULT_SPECS) -> str:
    """The issue's targets, met or not, for ``optims`` per arm: beats its start (no grid lr
    worse than the base at ``gain_init * lr`` + tol, better at half of them or more; gains from
    1: the base at the same lr); at the
    base's best lr within tol; LR sensitivity at most half the base's and no more than any
    peer's; never diverges; the median gain grows at the smallest lr; at most 5% of elements
    at a bound at the end (at the base's best lr); and the stretch: at lr 1e-3 within 0.05 of
    the base's best, better than every peer at its default."""
    lines = ["| task | optimizer | beats its start | at base's best lr | LR sensitivity | "
             "never diverges | gain grows at the smallest lr | <= 5% at a bound | "
             "stretch: at 1e-3 within 0.05 of base's best | stretch: beats peers' defaults |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for block in summary:
        rows = {row["optim"]: row for row in block["rows"]}
        base = rows[block["base"]]
        peers = [row for row in block["rows"] if row["peer"]]
        for optim in optims:
            row = rows.get(optim)
            if row is None:
                continue
            cells = [block["arm"], f"`{optim}`"]
            start = beats_start(row, base["points"], block["tolerance"])
            compared = sum(start.values())
            if compared:
                ok = start["worse"] == 0 and 2 * start["better"] >= compared
                cells.append(f"{'yes' if ok else 'no'} ({start['better']} better, "
                             f"{start['worse']} worse of {compared})")
            else:
                cells.append("")
            cells.append("yes" if row["within_tolerance"] else
                         f"no ({_f(row['vs_base'], signed=True)})")
            limit = base["sensitivity"] / 2 if base["sensitivity"] is not None else None
            peer_min = min((p["sensitivity"] for p in peers if p["sensitivity"] is not None),
                           default=None)
            sens = row["sensitivity"]
            ok = sens is not None and limit is not None and sens <= limit and (
                peer_min is None or sens <= peer_min)
            cells.append(f"{'yes' if ok else 'no'} ({_f(sens)} vs base {_f(base['sensitivity'])}"
                         + (f", best peer {_f(peer_min)})" if peer_min is not None else ")"))
            cells.append("yes" if row["diverged_runs"] == 0 else
                         f"no ({row['diverged_runs']} runs)")
            low = min(row["points"]) if row["points"] else None
            median = row["points"][low]["gain_median"] if low is not None else None
            if median is None or row["gain_init"] is None:
                cells.append("")
            else:
                cells.append(f"{'yes' if median > row['gain_init'] * 1.001 else 'no'} "
                             f"({median:.2f} from {row['gain_init']:.2f} at lr {low:g})")
            at_best = row["points"].get(block["best_lr"], {}).get("at_bound")
            cells.append("" if at_best is None else
                         f"{'yes' if at_best <= 0.05 else 'no'} ({at_best:.1%})")
            untouched = row["at_untouched"]
            base_best = base["at_base_best"]
            cells.append("" if untouched is None else
                         f"{'yes' if untouched <= base_best + WIDTH_NATS else 'no'} "
                         f"({_f(untouched - base_best, signed=True)})")
            defaults = [(p["optim"], p["at_untouched"]) for p in peers
                        if p["at_untouched"] is not None]
            if untouched is None or not defaults:
                cells.append("")
            else:
                beaten = [name for name, loss in defaults if untouched < loss]
                cells.append(f"{'yes' if len(beaten) == len(defaults) else 'no'} "
                             f"({len(beaten)} of {len(defaults)})")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sensitivity_table(summary: list[dict]) -> str:
    """Per task, per optimizer: LR sensitivity (mean over its grid of the loss above the
    task's best, divergences as a uniform guess), width (decades within 0.05 of the base's
    best) and divergences."""
    names = list(dict.fromkeys(row["optim"] for block in summary for row in block["rows"]))
    lines = ["| task | " + " | ".join(f"`{name}`" for name in names) + " |",
             "|---|" + "---|" * len(names)]
    for block in summary:
        rows = {row["optim"]: row for row in block["rows"]}
        cells = [block["arm"]]
        for name in names:
            row = rows.get(name)
            if row is None or row["sensitivity"] is None:
                cells.append("")
                continue
            cell = f"{_f(row['sensitivity'])} / {row['width']:g} dec"
            if row["diverged_runs"]:
                cell += f" / {row['diverged_runs']} div"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(point: dict | None) -> str:
    if point is None:
        return ""
    if point["diverged"]:
        return f"diverged ({point['diverged']}/{point['seeds']})"
    text = _f(point["mean"])
    if point["seeds"] > 1 and point["std"] is not None:
        text += f" ± {point['std']:.3f}"
    return text


def markdown(summary: list[dict]) -> str:
    """Per arm: every optimizer's loss at each grid lr (mean ± seed std), the start-scale
    control of each Active optimizer beside it, the gains at the end, and the summary
    figures."""
    out = []
    for block in summary:
        out.append(f"#### {block['arm']}: base `{block['base']}`, its best lr "
                   f"{block['best_lr']:g}; task's best loss {_f(block['task_best'])}; "
                   f"tolerance (base seed std) {block['tolerance']:.3f}")
        out.append("")
        grid = block["grid"]
        out.append("| optimizer | " + " | ".join(f"lr {lr:g}" for lr in grid)
                   + " | best | at base's best | LR sensitivity | width | diverged | seeds |")
        out.append("|---|" + "---|" * (len(grid) + 6))
        for row in block["rows"]:
            if row["peer"] and row["grid"] != grid:
                continue  # a multiplier grid: its own table below
            cells = [f"`{row['optim']}`"] + [_cell(row["points"].get(lr)) for lr in grid]
            cells += [_f(row["best"]) + (f" (lr {row['best_lr']:g})" if row["best_lr"] else ""),
                      _f(row["at_base_best"]), _f(row["sensitivity"]), f"{row['width']:g}",
                      f"{row['diverged_runs']}/{row['runs']}", str(row["seeds"])]
            out.append("| " + " | ".join(cells) + " |")
            if row["control_lrs"]:
                base = next(r for r in block["rows"] if r["optim"] == block["base"])
                cells = [f"↳ `{block['base']}` at {row['gain_init']:.3g} × lr (start-scale "
                         "control)"]
                cells += [_cell(base["points"].get(row["control_lrs"].get(lr)))
                          for lr in grid]
                out.append("| " + " | ".join(cells + [""] * 6) + " |")
                cells = [f"↳ `{row['optim']}` median gain / at a bound (end)"]
                for lr in grid:
                    point = row["points"].get(lr)
                    if point is None or point["gain_median"] is None:
                        cells.append("")
                    else:
                        cells.append(f"{point['gain_median']:.3g} / {point['at_bound']:.1%}")
                out.append("| " + " | ".join(cells + [""] * 6) + " |")
        out.append("")
        multiplier_rows = [row for row in block["rows"] if row["peer"] and row["grid"] != grid]
        if multiplier_rows:
            mgrid = sorted({lr for row in multiplier_rows for lr in row["points"]})
            out.append("| peer (lr: multiplier of its estimated step) | "
                       + " | ".join(f"{lr:g}" for lr in mgrid)
                       + " | best | LR sensitivity | width | diverged | seeds |")
            out.append("|---|" + "---|" * (len(mgrid) + 5))
            for row in multiplier_rows:
                cells = [f"`{row['optim']}`"] + [_cell(row["points"].get(lr)) for lr in mgrid]
                cells += [_f(row["best"]), _f(row["sensitivity"]), f"{row['width']:g}",
                          f"{row['diverged_runs']}/{row['runs']}", str(row["seeds"])]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def plot(summary: list[dict], output_dir) -> list[pathlib.Path]:
    """``sweep_<arm>.png``: loss against lr, one line per optimizer (band: min to max over
    seeds), the start-scale control of each Active optimizer dashed (its base's curve moved
    to the lr it starts from), the multiplier-grid peers' defaults as dotted horizontal lines;
    a diverged point is a cross at the uniform guess."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for block in summary:
        figure, ax = plt.subplots(figsize=(7.0, 4.4))
        rows = {row["optim"]: row for row in block["rows"]}
        base = rows[block["base"]]
        for row in block["rows"]:
            if row["peer"] and row["grid"] != block["grid"]:
                loss = row["at_untouched"]
                if loss is not None and math.isfinite(loss):
                    ax.axhline(loss, linestyle=":", linewidth=1.2,
                               label=f"{row['optim']} (default)", color=None)
                continue
            xs = [lr for lr in block["grid"] if lr in row["points"]]
            ys = [min(row["points"][lr]["mean"], block["chance"]) for lr in xs]
            line, = ax.plot(xs, ys, marker="o", markersize=4, label=row["optim"])
            crosses = [(lr, block["chance"]) for lr in xs if row["points"][lr]["diverged"]]
            if crosses:
                ax.scatter(*zip(*crosses), marker="x", s=70, color=line.get_color())
            if row["control_lrs"]:
                pairs = [(lr, base["points"][c]["mean"]) for lr, c in row["control_lrs"].items()
                         if c in base["points"] and math.isfinite(base["points"][c]["mean"])]
                if pairs:
                    ax.plot(*zip(*sorted(pairs)), linestyle="--", color=line.get_color(),
                            alpha=0.6, label=f"{block['base']} at {row['gain_init']:.3g}×lr "
                            f"(start of {row['optim']})")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (peers marked default: their lr multiplier 1)")
        ax.set_ylabel("final eval loss (capped at a uniform guess)")
        ax.set_title(f"{block['arm']}: mean over seeds")
        ax.legend(fontsize=6.5)
        ax.grid(alpha=0.3)
        paths.append(_save(figure, output_dir, "sweep", block["arm"]))
    return paths


def _save(figure, output_dir, prefix: str, arm: str) -> pathlib.Path:
    """Save ``figure`` as ``<prefix>_<arm as a file name>.png`` and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", arm).strip("_")
    path = pathlib.Path(output_dir) / f"{prefix}_{slug}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_health(records: list[dict], summary: list[dict], output_dir,
                quick: bool = False) -> list[pathlib.Path]:
    """``protocol_gains_<arm>.png``: median real gain and the share at a bound over the run,
    per Active optimizer and lr (seed 0), linear schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_arms = arms(quick)
    paths = []
    for block in summary:
        if block["schedule"] != "linear":
            continue
        chosen = [r for r in records if r["seed"] == 0 and r.get("gain_health")
                  and (arm := _arm_of(r, all_arms)) is not None
                  and arm.label(r.get("schedule", "constant")) == block["arm"]
                  and r["optim"] in DEFAULT_SPECS]
        if not chosen:
            continue
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
        for record in sorted(chosen, key=lambda r: r["lr"]):
            steps = [h[0] for h in record["gain_health"]]
            top.plot(steps, [h[1] for h in record["gain_health"]],
                     label=f"{record['optim']} lr {record['lr']:g}")
            bottom.plot(steps, [h[2] + h[3] for h in record["gain_health"]])
        top.set_yscale("log")
        top.set_ylabel("median real gain")
        top.set_title(f"{block['arm']}: gains of the default, per lr")
        top.legend(fontsize=6)
        bottom.set_ylabel("share at a bound")
        bottom.set_xlabel("optimizer step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        paths.append(_save(figure, output_dir, "protocol_gains", block["arm"]))
    return paths


def report(records: list[dict], output_dir, quick: bool = False, command: str = "",
           candidates=()) -> str:
    """Write ``protocol.md``, ``protocol.json``, the loss-vs-lr plots (``sweep_<arm>.png``)
    and the gain plots; return the markdown. The targets are shown for the defaults and the
    ``candidates``."""
    from .reporting import write_json

    output_dir = pathlib.Path(output_dir)
    summary = summarize(records, quick)
    text = "\n".join([
        f"Command: `{command}`" if command else "",
        "",
        "### Targets for the default",
        "",
        targets(summary, (*DEFAULT_SPECS, *candidates)),
        "",
        "### LR sensitivity / width / divergences",
        "",
        "LR sensitivity: the mean over an optimizer's grid of its loss above the task's best "
        "(a diverged run, or one worse than a uniform guess, counts as the uniform guess); "
        f"width: decades of its grid within {WIDTH_NATS} of the base's best loss (half a "
        "decade per point). Peers with a multiplier grid: over their own grid, as wide.",
        "",
        sensitivity_table(summary),
        "",
        "### Per task: loss at every grid point (mean ± seed std)",
        "",
        markdown(summary),
    ])
    (output_dir / "protocol.md").write_text(text)
    write_json(output_dir / "protocol.json", {"command": command, "summary": summary},
               indent=1)
    plot(summary, output_dir)
    plot_health(records, summary, output_dir, quick)
    return text
