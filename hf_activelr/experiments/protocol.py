"""The quality protocol: one fixed set of runs behind every quality table in README and docs/.

    hf-activelr sweep --protocol --output_dir outputs/protocol            # published: 3 seeds
    hf-activelr sweep --protocol --quick --output_dir outputs/protocol_quick  # ~5 minutes

Tasks (all offline, :mod:`hf_activelr.experiments.sweep_tasks`): ``vit-digits``, ``gpt2-text``,
``resnet-digits`` (BatchNorm CNN; bases AdamW and SGD with momentum), ``lora-minilm`` (a LoRA
fine-tune of a real pretrained model, a few hundred steps), ``gpt2-long`` (3200 steps), and
``gpt2-text`` / ``vit-digits`` at batch 512. Schedules: transformers' default linear decay
(what users get) and constant. Learning rates: one per decade, 1e-5 ... 1e-1 for AdamW,
1e-4 ... 1 for SGD. The base of each task is the optimizer the Active ones are measured
against: ``adamw_torch`` or ``sgd_momentum``.

Runs are ordinary sweep points (:mod:`hf_activelr.experiments.sweep`), stored one file each, so the
protocol resumes where it stopped, and a run is redone only when the settings behind its
optimizer name change. :func:`report` turns the records into ``protocol.md``: per task and
schedule, the base's best learning rate and every optimizer's loss there (with the base's seed
standard deviation as the tolerance), best, worst, spread and divergences, the gains' health
at the end (median real gain, shares at ``gain_min`` / ``gain_max``), and the wall time; then
the targets, met or not, for the default.
"""

from __future__ import annotations

import math
import pathlib
import re
import statistics
from dataclasses import dataclass

from .sweep import Point, check_optimizer, installed_peers

ADAMW_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SGD_LRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SCHEDULES = ("linear", "constant")
PUBLISHED_SEEDS = (0, 1, 2)
SCREENING_SEEDS = (0, 1)

#: The AdamW-based optimizers every AdamW task compares: the default, the paper's rule, the
#: previous default (two-sided preset) and the base.
ADAMW_OPTIMS = ("active_adamw", "active_adamw_paper", "active_adamw:preset=two_sided",
                "adamw_torch")
#: SGD with momentum 0.9, Active and plain (the paper's SGD runs use momentum).
SGD_OPTIMS = ("active_sgd:momentum=0.9", "active_sgd_paper:momentum=0.9", "sgd_momentum")


@dataclass(frozen=True)
class Arm:
    """One row block of the protocol: a task at a batch size, its base and what it compares."""

    task: str
    base: str
    optims: tuple
    lrs: tuple
    batch_size: int | None = None  # None: the task's own
    schedules: tuple = SCHEDULES
    peers: bool = True  # add the installed peers (AdamW arms)

    def label(self, schedule: str) -> str:
        batch = f", batch {self.batch_size}" if self.batch_size else ""
        return f"{self.task} ({schedule}{batch})"


def arms(quick: bool = False) -> list[Arm]:
    """The protocol's arms; ``quick``: a subset of about 5 minutes on 2 cores (one seed,
    three learning rates, the linear schedule, the short tasks)."""
    if quick:
        lrs = (1e-4, 1e-3, 1e-2)
        return [
            Arm("vit-digits", "adamw_torch", ("active_adamw", "adamw_torch"), lrs,
                schedules=("linear",), peers=False),
            Arm("gpt2-text", "adamw_torch", ("active_adamw", "adamw_torch"), lrs,
                schedules=("linear",), peers=False),
            Arm("resnet-digits", "sgd_momentum", ("active_sgd:momentum=0.9", "sgd_momentum"),
                (1e-2, 1e-1, 1.0), schedules=("linear",), peers=False),
        ]
    return [
        Arm("vit-digits", "adamw_torch", ADAMW_OPTIMS, ADAMW_LRS),
        Arm("gpt2-text", "adamw_torch", ADAMW_OPTIMS, ADAMW_LRS),
        Arm("resnet-digits", "adamw_torch", ADAMW_OPTIMS, ADAMW_LRS),
        Arm("resnet-digits", "sgd_momentum", SGD_OPTIMS, SGD_LRS, peers=False),
        Arm("lora-minilm", "adamw_torch", ADAMW_OPTIMS, ADAMW_LRS),
        Arm("gpt2-long", "adamw_torch", ADAMW_OPTIMS, (1e-4, 1e-3, 1e-2), peers=False),
        Arm("vit-digits", "adamw_torch", ADAMW_OPTIMS, (1e-4, 1e-3, 1e-2), batch_size=512,
            schedules=("linear",), peers=False),
        Arm("gpt2-text", "adamw_torch", ADAMW_OPTIMS, (1e-4, 1e-3, 1e-2), batch_size=512,
            schedules=("linear",), peers=False),
    ]


def plan(quick: bool = False, seeds=None, candidates=(), only_tasks=None,
         only_schedules=None, peers: bool = True, candidates_only: bool = False
         ) -> list[Point]:
    """The protocol's points, seed by seed (so a partial run covers every task early).
    ``candidates``: extra optimizer specs screened on the AdamW arms (``"active_adamw:..."``)
    or the SGD arms (``"active_sgd:..."``); ``only_tasks`` / ``only_schedules``: keep these
    only (screening); ``peers=False``: leave out the installed peers; ``candidates_only``: the
    candidates and each arm's base, nothing else (a screen beside a finished protocol)."""
    from .sweep_tasks import get_task

    seeds = tuple(seeds or ((0,) if quick else PUBLISHED_SEEDS))
    peers = installed_peers() if peers else []
    points = []
    for arm in arms(quick):
        if only_tasks and arm.task not in only_tasks:
            continue
        task = get_task(arm.task)
        family = "active_sgd" if arm.base == "sgd_momentum" else "active_adamw"
        mine = [c for c in candidates if c.split(":")[0].startswith(family)]
        optims = ([arm.base, *mine] if candidates_only
                  else [*arm.optims, *mine, *(peers if arm.peers else ())])
        for spec in dict.fromkeys(optims):
            check_optimizer(spec)
        for seed in seeds:
            for schedule in arm.schedules:
                if only_schedules and schedule not in only_schedules:
                    continue
                for spec in dict.fromkeys(optims):
                    for lr in arm.lrs:
                        points.append(Point(arm.task, spec, float(lr),
                                            arm.batch_size or task.batch_size, seed,
                                            task.epochs, schedule))
    return points


# --- the report -----------------------------------------------------------------------------


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
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarize(records: list[dict], quick: bool = False) -> list[dict]:
    """Per arm and schedule: the base's best LR and tolerance, and per optimizer its loss at
    that LR, best, worst, spread, divergences, gain health at the base's best LR, wall time.

    An LR where any seed diverged counts as infinite loss, as in :func:`sweep.summarize`: it
    is never the base's best LR nor a row's ``best``, and it makes ``worst`` and ``spread``
    infinite (where every LR has one, ``best`` is infinite too). Only where every LR of the
    base has a diverged seed is the base's best LR the one with the lowest mean over the
    other seeds (a reference point is needed; its row shows the divergences)."""
    all_arms = arms(quick)
    blocks: dict = {}
    for record in records:
        arm = _arm_of(record, all_arms)
        if arm is None:
            continue
        key = (arm.label(record.get("schedule", "constant")), arm.base)
        blocks.setdefault(key, {}).setdefault(record["optim"], {}).setdefault(
            record["lr"], []).append(record)
    out = []
    for (label, base), by_optim in blocks.items():
        if base not in by_optim:
            continue
        base_runs = by_optim[base]
        best_lr = min(base_runs, key=lambda lr: (any(r["diverged"] for r in base_runs[lr]),
                                                 _mean([r["eval_loss"] for r in base_runs[lr]])))
        tolerance = _std([r["eval_loss"] for r in by_optim[base][best_lr]])
        rows = []
        for optim, by_lr in by_optim.items():
            means = {}
            diverged = 0
            for lr, runs in by_lr.items():
                bad = sum(r["diverged"] for r in runs)
                diverged += bad
                means[lr] = math.inf if bad else _mean([r["eval_loss"] for r in runs])
            at_best = by_lr.get(best_lr, [])
            health = [r["gain_health"][-1] for r in at_best if r.get("gain_health")]
            rows.append({
                "optim": optim,
                "at_base_best": _mean([r["eval_loss"] for r in at_best]) if at_best else None,
                "at_base_best_std": _std([r["eval_loss"] for r in at_best]),
                "diverged_at_base_best": sum(r["diverged"] for r in at_best),
                "best": min(means.values()), "worst": max(means.values()),
                "spread": (max(means.values()) - min(means.values())
                           if math.isfinite(min(means.values())) else math.inf),
                "diverged_runs": diverged,
                "runs": sum(len(runs) for runs in by_lr.values()),
                "seeds": len({r["seed"] for runs in by_lr.values() for r in runs}),
                "at_default_lr": means.get(1e-3),
                "gain_median": statistics.median(h[1] for h in health) if health else None,
                "gain_at_bounds": statistics.median(h[2] + h[3] for h in health)
                if health else None,
                "wall_s": sum(r["train_wall_s"] for runs in by_lr.values() for r in runs),
            })
        base_row = next(row for row in rows if row["optim"] == base)
        for row in rows:
            row["vs_base"] = (None if row["at_base_best"] is None
                              else row["at_base_best"] - base_row["at_base_best"])
            row["within_tolerance"] = (row["vs_base"] is not None
                                       and row["vs_base"] <= tolerance + 1e-12)
            row["spread_vs_base"] = (row["spread"] / base_row["spread"]
                                     if math.isfinite(base_row["spread"])
                                     and base_row["spread"] > 0 else None)
        out.append({"arm": label, "base": base, "best_lr": best_lr, "tolerance": tolerance,
                    "rows": rows})
    return out


def _f(value, digits=3, signed=False):
    if value is None:
        return ""
    if not math.isfinite(value):
        return "inf"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(summary: list[dict]) -> str:
    """One table per arm: the base's best LR, each optimizer's loss there, robustness, gains."""
    out = []
    for block in summary:
        out.append(f"#### {block['arm']}: base `{block['base']}`, its best lr "
                   f"{block['best_lr']:g} (tolerance: its seed std {block['tolerance']:.3f})")
        out.append("")
        out.append("| optimizer | loss at base's best lr | vs base | loss at lr 1e-3 | best | "
                   "worst | spread | diverged runs | median gain (end) | at a bound | "
                   "seeds | wall s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for row in block["rows"]:
            loss = _f(row["at_base_best"])
            if row["at_base_best"] is not None and row["seeds"] > 1:
                loss += f" ± {row['at_base_best_std']:.3f}"
            if row["diverged_at_base_best"]:
                loss += f" ({row['diverged_at_base_best']} diverged)"
            vs = _f(row["vs_base"], signed=True)
            if row["optim"] != block["base"] and row["vs_base"] is not None:
                vs += " ok" if row["within_tolerance"] else " worse"
            out.append("| " + " | ".join([
                f"`{row['optim']}`", loss, vs, _f(row["at_default_lr"]), _f(row["best"]),
                _f(row["worst"]), _f(row["spread"]), f"{row['diverged_runs']}/{row['runs']}",
                _f(row["gain_median"]), _f(row["gain_at_bounds"], 3),
                str(row["seeds"]), f"{row['wall_s']:.0f}",
            ]) + " |")
        out.append("")
    return "\n".join(out)


#: The Trainer names the targets are stated for: the defaults of the two measured families.
DEFAULT_SPECS = ("active_adamw", "active_sgd:momentum=0.9")


def targets(summary: list[dict], optims=DEFAULT_SPECS) -> str:
    """The targets, met or not, for ``optims`` (default: the Trainer names' defaults), per
    arm: at the base's best lr within the base's seed std, no divergence, spread at most half
    the base's, median gain in [0.3, 3] and at most 5% of elements at a bound at the end."""
    lines = ["| arm | optimizer | at base's best lr <= base + tol | never diverges | "
             "spread <= half the base's | gain median in [0.3, 3] | <= 5% at a bound |",
             "|---|---|---|---|---|---|---|"]
    for block in summary:
        base = next(r for r in block["rows"] if r["optim"] == block["base"])
        for row in block["rows"]:
            if row["optim"] not in optims:
                continue
            half = (row["spread"] <= base["spread"] / 2) if math.isfinite(row["spread"]) \
                else False
            health = row["gain_median"]
            lines.append("| " + " | ".join([
                block["arm"], f"`{row['optim']}`",
                "yes" if row["within_tolerance"] else f"no ({_f(row['vs_base'], signed=True)})",
                "yes" if row["diverged_runs"] == 0 else f"no ({row['diverged_runs']} runs)",
                ("yes" if half else "no") + f" ({_f(row['spread'])} vs {_f(base['spread'])})",
                "" if health is None else ("yes" if 0.3 <= health <= 3 else "no")
                + f" ({health:.2f})",
                "" if row["gain_at_bounds"] is None else
                ("yes" if row["gain_at_bounds"] <= 0.05 else "no")
                + f" ({row['gain_at_bounds']:.1%})",
            ]) + " |")
    return "\n".join(lines)


def headline(summary: list[dict]) -> str:
    """One row per arm: the base's best lr and loss there, and every other optimizer's loss at
    that lr (minus the base's), with its seeds."""
    names = list(dict.fromkeys(row["optim"] for block in summary for row in block["rows"]
                               if row["optim"] != block["base"]))
    lines = ["| task (schedule) | base, its best lr | base's loss | "
             + " | ".join(f"`{name}`" for name in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for block in summary:
        rows = {row["optim"]: row for row in block["rows"]}
        base = rows[block["base"]]
        cells = [block["arm"], f"`{block['base']}`, {block['best_lr']:g}",
                 f"{_f(base['at_base_best'])} ± {block['tolerance']:.3f} ({base['seeds']} seeds)"]
        for name in names:
            row = rows.get(name)
            if row is None or row["at_base_best"] is None:
                cells.append("")
                continue
            cell = f"{_f(row['at_base_best'])} ({_f(row['vs_base'], signed=True)})"
            if row["diverged_at_base_best"]:
                cell += f", {row['diverged_at_base_best']} diverged"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_health(records: list[dict], summary: list[dict], output_dir,
                quick: bool = False) -> list[pathlib.Path]:
    """``protocol_gains_<task>.png``: median real gain and the share at a bound over the run,
    per Active optimizer, at the base's best learning rate (seed 0), linear schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_arms = arms(quick)
    first_seed = min((r["seed"] for r in records), default=0)
    paths = []
    for block in summary:
        if "(linear" not in block["arm"]:
            continue
        chosen = []
        for record in records:
            arm = _arm_of(record, all_arms)
            if (arm is not None and arm.base == block["base"]
                    and arm.label(record.get("schedule", "constant")) == block["arm"]
                    and record["lr"] == block["best_lr"] and record["seed"] == first_seed
                    and record.get("gain_health")):
                chosen.append(record)
        if not chosen:
            continue
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True)
        for record in chosen:
            steps = [h[0] for h in record["gain_health"]]
            top.plot(steps, [h[1] for h in record["gain_health"]], label=record["optim"])
            bottom.plot(steps, [h[2] + h[3] for h in record["gain_health"]])
        top.set_yscale("log")
        top.set_ylabel("median real gain")
        top.set_title(f"{block['arm']}: gain health at lr {block['best_lr']:g}")
        top.legend(fontsize=7)
        bottom.set_ylabel("share at a bound")
        bottom.set_xlabel("optimizer step")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        figure.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", block["arm"]).strip("_")
        path = pathlib.Path(output_dir) / f"protocol_gains_{slug}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def report(records: list[dict], output_dir, quick: bool = False, command: str = "",
           candidates=()) -> str:
    """Write ``protocol.md``, ``protocol.json``, the loss-vs-LR plots (``sweep_<arm>.png``)
    and the gain-health plots; return the markdown. The targets are shown for the defaults
    and the ``candidates``."""
    from . import sweep
    from .reporting import write_json

    output_dir = pathlib.Path(output_dir)
    summary = summarize(records, quick)
    labelled = []
    all_arms = arms(quick)
    for record in records:
        arm = _arm_of(record, all_arms)
        if arm is not None:
            suffix = "" if "sgd" not in arm.base else ", SGD"
            labelled.append({**record, "task": arm.label(record.get("schedule", "constant"))
                             .replace(")", suffix + ")")})
    lr_summary = sweep.summarize(labelled)
    text = "\n".join([
        f"Command: `{command}`" if command else "",
        "",
        "### Targets for the default",
        "",
        targets(summary, (*DEFAULT_SPECS, *candidates)),
        "",
        "### At the base's best learning rate (difference to the base in brackets)",
        "",
        headline(summary),
        "",
        "### Per task",
        "",
        markdown(summary),
        "### Final eval loss at every learning rate (mean ± half the seed range)",
        "",
        sweep.markdown(lr_summary),
    ])
    (output_dir / "protocol.md").write_text(text)
    write_json(output_dir / "protocol.json", {"command": command, "summary": summary},
               indent=1)
    sweep.plot(lr_summary, output_dir)
    plot_health(records, summary, output_dir, quick)
    return text
