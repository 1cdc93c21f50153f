"""Run reports: a results JSON and a PNG of loss curves and the gain distribution over training.

Both read only what the Trainer records (``trainer.state.log_history``, where ActiveTrainer
puts the gain statistics), so they also work on a saved ``trainer_state.json``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re

_GAIN_KEY = re.compile(r"^gain/group(\d+)/(\w+)$")


def describe_optimizer(optimizer) -> dict:
    """Class and hyperparameters of the (possibly Accelerate-wrapped) optimizer, per group."""
    from ..optim import unwrap_active

    active = unwrap_active(optimizer)
    inner = active if active is not None else getattr(optimizer, "optimizer", optimizer)
    groups = []
    for group in inner.param_groups:
        groups.append({
            key: value for key, value in group.items()
            if key not in ("params", "param_names", "gain_changes")
            and isinstance(value, (int, float, str, bool, tuple, list, type(None)))
        })
    return {"class": type(inner).__name__, "param_groups": groups}


def final_gain_stats(trainer) -> list[dict] | None:
    """The whole model's gain figures at the end of a run (None without gains). Under FSDP2
    and DeepSpeed ZeRO a collective: call it on every rank, before the main process writes
    the results (``build_results(..., final_gain_stats=...)``)."""
    from ..integrations.trainer import zero_partitioned
    from ..optim import unwrap_active
    from ..optim.distributed import gain_stats

    active = unwrap_active(trainer.optimizer)
    if active is None:
        return None
    return gain_stats(active, partitioned=zero_partitioned(trainer)
                      and trainer.args.world_size > 1)


_OWN = object()  # build_results: no figures given, the optimizer's own (one process)


def build_results(trainer, metrics: dict, extra: dict | None = None,
                  final_gain_stats=_OWN) -> dict:
    """What a run produced, in one JSON-able dict. ``final_gain_stats``: the figures of
    :func:`final_gain_stats` (taken on every rank; needed under FSDP2 and ZeRO), else the
    optimizer's own ``gain_stats()``."""
    from ..optim import unwrap_active

    active = unwrap_active(trainer.optimizer)
    if final_gain_stats is _OWN:
        final_gain_stats = active.gain_stats() if active is not None else None
    results = {
        "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
        "optim_args": trainer.args.optim_args,
        "learning_rate": trainer.args.learning_rate,
        "seed": trainer.args.seed,
        "metrics": metrics,
        "optimizer": describe_optimizer(trainer.optimizer) if trainer.optimizer else None,
        "final_gain_stats": final_gain_stats,
        "log_history": trainer.state.log_history,
    }
    results.update(extra or {})
    return results


def finite_or_none(data):
    """``data`` with every NaN or infinite float replaced by ``None``: standard JSON has no
    ``Infinity`` (Python writes it, other readers refuse it)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(value) for value in data]
    return data


def write_json(path, data, indent: int | None = 2) -> pathlib.Path:
    """Write ``data`` as standard JSON (non-finite floats as ``null``) atomically (a temporary
    file, then a rename): a concurrent reader or an interrupted run never sees half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    text = json.dumps(finite_or_none(data), indent=indent, default=str, allow_nan=False)
    temporary.write_text(text + "\n")
    temporary.replace(path)
    return path


def write_results(path, results: dict) -> pathlib.Path:
    return write_json(path, results)


def series(log_history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` in a log history."""
    points = [(entry["step"], entry[key]) for entry in log_history
              if key in entry and "step" in entry and _finite(entry[key])]
    return [p[0] for p in points], [p[1] for p in points]


def gain_series(log_history: list[dict]) -> dict[int, dict[str, tuple[list, list]]]:
    """Per param group: stat name -> (steps, values), from ActiveTrainer's gain logs."""
    groups: dict[int, dict] = {}
    for entry in log_history:
        for key in entry:
            match = _GAIN_KEY.match(key)
            if match:
                groups.setdefault(int(match.group(1)), {})[match.group(2)] = None
    return {
        group: {stat: series(log_history, f"gain/group{group}/{stat}") for stat in stats}
        for group, stats in groups.items()
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_runs(runs: dict[str, list[dict]], path, title: str = "") -> pathlib.Path:
    """PNG: training and eval loss per run (left); gain median with its min-max band per run
    and param group (right, log scale). ``runs``: label -> log history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, gain_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, history) in enumerate(runs.items()):
        color = colors[index % len(colors)]
        steps, values = series(history, "loss")
        loss_axes.plot(steps, values, color=color, alpha=0.6, label=f"{label} train")
        steps, values = series(history, "eval_loss")
        if steps:
            loss_axes.plot(steps, values, "o-", color=color, label=f"{label} eval")
        for group, stats in gain_series(history).items():
            if "median" not in stats:
                continue
            steps, median = stats["median"]
            line = "-" if group == 0 else "--"
            gain_axes.plot(steps, median, line, color=color, label=f"{label} group {group} median")
            if "min" in stats and "max" in stats:
                gain_axes.fill_between(steps, stats["min"][1], stats["max"][1], color=color,
                                       alpha=0.12)
    loss_axes.set(xlabel="optimizer step", ylabel="loss", title="loss")
    loss_axes.legend(fontsize=8)
    gain_axes.set(xlabel="optimizer step", ylabel="gain (median, min-max band)",
                  title="ActiveLR gains", yscale="log")
    if gain_axes.lines:
        gain_axes.legend(fontsize=8)
    else:
        gain_axes.text(0.5, 0.5, "no Active optimizer in these runs", ha="center",
                       transform=gain_axes.transAxes)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
