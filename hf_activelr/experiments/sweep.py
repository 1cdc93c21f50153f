"""Learning-rate and batch-size sweeps: the paper's robustness claims, measured side by side.

    hf-activelr sweep --tasks vit-digits gpt2-text --output_dir outputs/sweep
    hf-activelr sweep --tasks vit-digits --batch-sizes 16 64 256 1024 --lr 1e-3 --lr-scaling sqrt

Each point (task, optimizer, learning rate, batch size, seed) is one training run of a small
offline task (:mod:`hf_activelr.experiments.sweep_tasks`) with the Hugging Face Trainer, a
constant learning rate and the final eval loss as the result. Finished runs are stored one
JSON file each under ``OUTPUT_DIR/runs/`` and never redone, so an interrupted sweep resumes
where it stopped. The sweep writes ``sweep.json`` (every run and the summary), ``sweep.md``
(per task and optimizer: the loss at every point, best, worst, spread) and ``sweep_<task>.png``
(loss against LR or batch size, one line per optimizer, the band spanning the seeds).

Optimizers are given as Trainer names (``active_adamw``, ``adamw_torch``,
``schedule_free_adamw``...) or peers with no Trainer name (``prodigy``, ``dadapt_adam``), with
optional ``optim_args`` after a colon: ``"active_adamw:preset=paper"``, ``"prodigy:d_coef=0.5"``
(read by the package's one ``key=value`` parser, :mod:`hf_activelr.optim.config`; a peer's
values are typed by its class's signature defaults). A run whose loss becomes
non-finite, or whose final eval loss is worse than a uniform guess (``chance_loss``), is
counted as diverged.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import pathlib
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from ..optim.config import EPOCH, parse_value, split_options
from .reporting import write_json

DEFAULT_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: The tasks a plain sweep runs when none are named: the two short ones (the protocol adds
#: the CNN, the LoRA fine-tune and the long run).
DEFAULT_TASKS = ("vit-digits", "gpt2-text")
DEFAULT_SEEDS = (0, 1)
LR_SCALINGS = ("none", "linear", "sqrt")

#: Peers without a Trainer name: (module, class, package to install, default arguments).
PEERS = {
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt", {}),
    "dadapt_adam": ("dadaptation", "DAdaptAdam", "dadaptation", {}),
    # The paper's other base: SGD with momentum (transformers' "sgd" has no momentum).
    "sgd_momentum": ("torch.optim", "SGD", "torch", {"momentum": 0.9}),
}
#: Peers that are part of torch, not optional packages (never "installed peers").
BUILTIN_PEERS = ("sgd_momentum",)
#: Peers with a Trainer name, and the package they need.
TRAINER_PEERS = {"schedule_free_adamw": "schedulefree"}


def installed_peers() -> list[str]:
    """The peer optimizers whose package is installed (a default sweep includes them)."""
    names = [name for name, (module, *_) in PEERS.items()
             if name not in BUILTIN_PEERS and importlib.util.find_spec(module)]
    names += [name for name, module in TRAINER_PEERS.items() if importlib.util.find_spec(module)]
    return names


def default_optimizers() -> list[str]:
    """The default Active AdamW, the paper's rule, their base and the installed peers."""
    return ["active_adamw", "active_adamw_paper", "adamw_torch", *installed_peers()]


@dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    task: str
    optim: str  # "name" or "name:key=value,key=value"
    lr: float
    batch_size: int
    seed: int
    epochs: float
    schedule: str = "constant"  # the Trainer's lr_scheduler_type

    @property
    def slug(self) -> str:
        optim = self.optim.replace(":", "--").replace(",", "-").replace("=", "_")
        schedule = "" if self.schedule == "constant" else f"_{self.schedule}"
        return (f"{self.task}/{optim}/"
                f"lr{self.lr:g}_bs{self.batch_size}_ep{self.epochs:g}{schedule}_s{self.seed}")


def split_optim(spec: str) -> tuple[str, str | None]:
    name, _, options = spec.partition(":")
    return name, options or None


def check_optimizer(spec: str) -> None:
    """Fail before any training when a name is unknown or a peer is not installed."""
    from transformers.training_args import OptimizerNames

    from ..integrations import registry

    name, options = split_optim(spec)
    if name in PEERS:
        module, _, package, _ = PEERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"optimizer {name!r} needs `pip install {package}`")
        _peer_optimizer(spec, 1e-3)  # an unknown or malformed option fails now
        return
    if name in TRAINER_PEERS and importlib.util.find_spec(TRAINER_PEERS[name]) is None:
        raise ValueError(f"optimizer {name!r} needs `pip install {TRAINER_PEERS[name]}`")
    if name not in OptimizerNames._value2member_map_:
        raise ValueError(
            f"unknown optimizer {name!r}: a transformers optim name (e.g. adamw_torch), one of "
            f"{', '.join(registry.available_optimizers())}, or a peer: {', '.join(PEERS)}"
        )
    kwargs = resolved_settings(spec)
    if kwargs is not None:
        import torch

        if kwargs.get("period", EPOCH) == EPOCH:
            kwargs["period"] = 1
        # Construct it once on a dummy parameter: out-of-range values fail now, not mid-sweep.
        registry.get(name).optimizer_cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def resolved_settings(spec: str) -> dict | None:
    """The ActiveLR keyword arguments ``spec`` stands for (its name's preset plus its options),
    stored with each run: a finished run is redone when they change (e.g. a new preset)."""
    from ..integrations import registry

    name, options = split_optim(spec)
    if name not in registry.available_optimizers():
        return None
    entry = registry.get(name)
    settings = {**entry.defaults, **registry.parse_options(entry, split_options(options))}
    return json.loads(json.dumps(settings))  # as a stored record reads it back (lists, not tuples)


def _peer_optimizer(spec: str, lr: float):
    """The class and keyword arguments of peer ``spec`` (``"prodigy:d_coef=0.5"``) at ``lr``.

    Options are split and parsed by the package's one parser (:func:`split_options`,
    :func:`parse_value`): a key whose default in the class's signature is a bool, int, float
    or str is parsed as that type (an int default also takes a float: torch's SGD declares
    ``momentum=0``); any other key's value is guessed (None, bool, int, float, else string).
    A key the signature does not have is an error, unless the class takes ``**kwargs``."""
    name, options = split_optim(spec)
    module, cls_name, _, defaults = PEERS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    parameters = inspect.signature(cls).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    valid = [key for key, p in parameters.items() if key not in ("self", "params")
             and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    kwargs = {"lr": lr, **defaults}
    for key, text in split_options(options).items():
        if key not in valid and not open_ended:
            raise ValueError(f"optimizer {spec!r}: unknown option {key!r} for peer {name!r} "
                             f"({cls.__module__}.{cls.__qualname__}); valid: {', '.join(valid)}")
        default = parameters[key].default if key in parameters else None
        kind = type(default) if isinstance(default, (bool, int, float, str)) else None
        try:
            try:
                kwargs[key] = parse_value(key, text, kind)
            except ValueError:
                if kind is not int:
                    raise
                kwargs[key] = parse_value(key, text, float)
        except ValueError as error:
            raise ValueError(f"optimizer {spec!r}: {error}") from None
    return cls, kwargs


def _divergence_callback():
    """A callback that stops a run as soon as its training loss is not finite (nothing more to
    learn) and remembers it in ``.diverged``."""
    from transformers import TrainerCallback

    class DivergenceCallback(TrainerCallback):
        diverged = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                self.diverged = True
                control.should_training_stop = True

    return DivergenceCallback()


def gain_health(optimizer) -> dict | None:
    """The whole model's median real gain and the shares of elements at ``gain_min`` and at
    ``gain_max`` (each group's bounds), or None for an optimizer without gains."""
    import torch

    from ..optim import rule, stats, unwrap_active

    active = unwrap_active(optimizer)
    if active is None:
        return None
    gains, at_min, at_max = [], 0, 0
    for group in active.param_groups:
        for param in group["params"]:
            packed = active.state.get(param, {}).get("gain")
            if packed is None:
                continue
            real = rule.decode_gain(packed).reshape(-1).float() * group["gain_init"]
            gains.append(real)
            low, high = stats.at_bounds(packed, group)
            at_min, at_max = at_min + low, at_max + high
    if not gains:
        return None
    flat = torch.cat(gains)
    return {"median": flat.median().item(), "at_min": at_min / flat.numel(),
            "at_max": at_max / flat.numel()}


def _gain_health_callback():
    """A callback that records :func:`gain_health` at every logging step in ``.history``:
    ``[step, median gain, share at gain_min, share at gain_max]``."""
    from transformers import TrainerCallback

    class GainHealthCallback(TrainerCallback):
        def __init__(self):
            self.history = []

        def on_log(self, args, state, control, optimizer=None, **kwargs):
            health = gain_health(optimizer) if optimizer is not None else None
            fresh = not self.history or self.history[-1][0] != state.global_step
            if health is not None and fresh:
                self.history.append([state.global_step, health["median"], health["at_min"],
                                     health["at_max"]])

    return GainHealthCallback()


_DATA_CACHE: dict = {}


def run_point(point: Point) -> dict:
    """Train ``point`` in this process; returns its record (losses, gains, time)."""
    import torch
    from transformers import TrainingArguments, default_data_collator, set_seed

    import hf_activelr  # noqa: F401  (registers the Trainer names)

    from ..integrations.trainer import ActiveTrainer
    from ..optim import unwrap_active
    from .sweep_tasks import get_task

    task = get_task(point.task)
    if point.task not in _DATA_CACHE:
        _DATA_CACHE[point.task] = task.build_data()
    train, held_out, info = _DATA_CACHE[point.task]
    set_seed(point.seed)
    model = task.build_model(info)
    name, options = split_optim(point.optim)
    peer = _peer_optimizer(point.optim, point.lr) if name in PEERS else None
    diverged = _divergence_callback()
    health = _gain_health_callback()
    total_steps = task.max_steps or math.ceil(
        math.ceil(len(train) / point.batch_size) * point.epochs)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, optim="adamw_torch" if peer else name,
            optim_args=None if peer else options, learning_rate=point.lr,
            lr_scheduler_type=point.schedule, weight_decay=0.0, num_train_epochs=point.epochs,
            max_steps=task.max_steps or -1,
            per_device_train_batch_size=point.batch_size, per_device_eval_batch_size=256,
            eval_strategy="no", save_strategy="no", report_to="none", seed=point.seed,
            logging_steps=max(total_steps // 20, 1), disable_tqdm=True,
            logging_nan_inf_filter=False,  # a NaN loss must reach the divergence check
            dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        )
        trainer = ActiveTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=held_out,
            data_collator=default_data_collator, callbacks=[diverged, health],
            optimizer_cls_and_kwargs=peer,
        )
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        eval_loss = float(trainer.evaluate()["eval_loss"])
        active = unwrap_active(trainer.optimizer)
        gains = active.gain_stats()[0] if active is not None else None
        history = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history
                   if "loss" in entry]
    chance = info["chance_loss"]
    return {
        **asdict(point),
        "settings": resolved_settings(point.optim),
        "eval_loss": eval_loss,
        "diverged": bool(diverged.diverged or not math.isfinite(eval_loss) or eval_loss > chance),
        "chance_loss": chance,
        "train_loss_curve": history,
        "steps": trainer.state.global_step,
        "train_wall_s": round(wall, 2),
        "gain": None if gains is None else {k: gains[k] for k in ("min", "median", "max")},
        "gain_health": health.history,
    }


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_and_store(job) -> dict:
    point, path = job
    record = run_point(point)
    write_json(path, record, indent=1)
    return record


def plan(tasks, optimizers, lrs, seeds, batch_sizes=None, lr=1e-3, lr_scaling="none",
         epochs=None) -> list[Point]:
    """The points of a sweep: over ``lrs``, or with ``batch_sizes`` over batch sizes at ``lr``
    (scaled from the task's own batch size by ``lr_scaling``: none, linear or sqrt)."""
    from .sweep_tasks import get_task

    if lr_scaling not in LR_SCALINGS:
        raise ValueError(f"lr_scaling must be one of {LR_SCALINGS}, got {lr_scaling!r}")
    for value in [*lrs, lr]:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"learning rates must be positive finite numbers, got {value!r}")
    for batch_size in batch_sizes or ():
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch sizes must be positive ints, got {batch_size!r}")
    for spec in optimizers:
        check_optimizer(spec)
    points = []
    for task_name in tasks:
        task = get_task(task_name)
        if batch_sizes:
            scale = {"none": lambda r: 1.0, "linear": lambda r: r, "sqrt": math.sqrt}[lr_scaling]
            settings = [(lr * scale(b / task.batch_size), b) for b in batch_sizes]
        else:
            settings = [(float(value), task.batch_size) for value in lrs]
        for spec in optimizers:
            for seed in seeds:
                for value, batch_size in settings:
                    points.append(Point(task_name, spec, value, batch_size, seed,
                                        task.epochs if epochs is None else epochs))
    return points


def _run_path(output_dir: pathlib.Path, point: Point) -> pathlib.Path:
    """Where the record of ``point`` is stored: one JSON file per run."""
    return output_dir / "runs" / f"{point.slug}.json"


def _stored(point: Point, path: pathlib.Path) -> dict | None:
    """The finished record of ``point`` at ``path``, or None (absent, or its optimizer's
    settings changed since)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("eval_loss", 0.0) is None:
        record["eval_loss"] = math.inf  # stored as null: no finite loss
    return record if record.get("settings") == resolved_settings(point.optim) else None


def finished(points: list[Point], output_dir) -> list[dict]:
    """The records of the ``points`` already finished under ``output_dir``, in order."""
    output_dir = pathlib.Path(output_dir)
    records = [_stored(point, _run_path(output_dir, point)) for point in points]
    return [record for record in records if record is not None]


def sweep(points: list[Point], output_dir, jobs: int = 1, threads: int | None = None,
          force: bool = False, progress=print) -> list[dict]:
    """Run the points not already finished under ``output_dir`` (``jobs`` processes of
    ``threads`` torch threads each) and return every record, in ``points`` order."""
    output_dir = pathlib.Path(output_dir)
    paths = {point: _run_path(output_dir, point) for point in points}
    records: dict[Point, dict] = {}
    todo = []
    for point, path in paths.items():
        record = None if force else _stored(point, path)
        if record is not None:
            records[point] = record
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            todo.append((point, path))
    if records:
        progress(f"{len(records)} of {len(points)} runs already done in {output_dir}/runs")
    threads = threads or max((os.cpu_count() or 1) // max(jobs, 1), 1)
    start = time.perf_counter()

    def report(done, record):
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (len(todo) - done)
        status = "diverged" if record["diverged"] else f"eval loss {record['eval_loss']:.4f}"
        progress(f"[{done}/{len(todo)}] {record['task']} {record['optim']} lr={record['lr']:g} "
                 f"bs={record['batch_size']} seed={record['seed']}: {status} "
                 f"({record['train_wall_s']:.0f} s; ETA {eta / 60:.1f} min)")

    if todo and jobs > 1:
        context = multiprocessing.get_context("spawn")
        with context.Pool(jobs, initializer=_worker_init, initargs=(threads,)) as pool:
            for done, record in enumerate(pool.imap_unordered(_run_and_store, todo), 1):
                records[_point_of(record)] = record
                report(done, record)
    else:
        if todo:
            _worker_init(threads)
        for done, job in enumerate(todo, 1):
            record = _run_and_store(job)
            records[job[0]] = record
            report(done, record)
    return [records[point] for point in points]


def _point_of(record: dict) -> Point:
    return Point(record["task"], record["optim"], record["lr"], record["batch_size"],
                 record["seed"], record["epochs"], record.get("schedule", "constant"))


# --- summaries ------------------------------------------------------------------------------


def summarize(records: list[dict], axis: str = "lr") -> list[dict]:
    """Per (task, optimizer): the mean final eval loss over seeds at each ``axis`` value
    (``lr`` or ``batch_size``), ``best``, ``worst``, ``spread`` = worst - best, and the points
    where any seed diverged.

    A point where any seed diverged counts as infinite loss for both ``best`` and ``worst``:
    it makes ``worst`` and ``spread`` infinite and is never the ``best`` (the mean of its
    surviving seeds is not a result). Where every point diverged, ``best``, ``worst`` and
    ``spread`` are all infinite."""
    groups: dict[tuple, dict] = {}
    for record in records:
        row = groups.setdefault((record["task"], record["optim"]), {})
        row.setdefault(record[axis], []).append(record)
    summary = []
    for (task, optim), by_value in groups.items():
        points = []
        for value in sorted(by_value):
            runs = by_value[value]
            losses = [r["eval_loss"] for r in runs]
            diverged = sum(r["diverged"] for r in runs)
            finite = [x for x in losses if math.isfinite(x)]
            points.append({
                axis: value, "mean": sum(finite) / len(finite) if finite else math.inf,
                "min": min(finite, default=math.inf), "max": max(losses),
                "seeds": len(runs), "diverged": diverged,
                "lr": runs[0]["lr"],
            })
        means = [p["mean"] if not p["diverged"] else math.inf for p in points]
        best, worst = min(means), max(means)
        spread = worst - best if math.isfinite(best) else math.inf  # not inf - inf = nan
        summary.append({"task": task, "optim": optim, "axis": axis, "points": points,
                        "best": best, "worst": worst, "spread": spread,
                        "diverged_points": sum(1 for p in points if p["diverged"])})
    return summary


def _fmt(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3f}"


def markdown(summary: list[dict]) -> str:
    """One table per task: final eval loss (mean over seeds) per point, best, worst, spread."""
    out = []
    for task in dict.fromkeys(row["task"] for row in summary):
        rows = [row for row in summary if row["task"] == task]
        axis = rows[0]["axis"]
        values = sorted({p[axis] for row in rows for p in row["points"]})
        label = "lr" if axis == "lr" else "batch size"
        header = [f"{task}: final eval loss", *[f"{label} {v:g}" for v in values],
                  "best", "worst", "spread"]
        out += [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
        for row in rows:
            cells = {p[axis]: p for p in row["points"]}
            line = [row["optim"].replace("|", "\\|")]
            for value in values:
                point = cells.get(value)
                if point is None:
                    line.append("")
                elif point["diverged"]:
                    line.append(f"diverged ({point['diverged']}/{point['seeds']})")
                else:
                    spread = (point["max"] - point["min"]) / 2
                    line.append(f"{point['mean']:.3f} ± {spread:.3f}" if point["seeds"] > 1
                                else f"{point['mean']:.3f}")
            line += [_fmt(row["best"]), _fmt(row["worst"]), _fmt(row["spread"])]
            out.append(f"| {' | '.join(line)} |")
        out.append("")
    return "\n".join(out)


def plot(summary: list[dict], output_dir) -> list[pathlib.Path]:
    """``sweep_<task>.png``: loss against the swept value (log scale), one line per optimizer,
    a band over the seeds; diverged points drawn as crosses at the chance loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in dict.fromkeys(row["task"] for row in summary):
        rows = [row for row in summary if row["task"] == task]
        axis = rows[0]["axis"]
        figure, ax = plt.subplots(figsize=(6.5, 4.2))
        for row in rows:
            xs = [p[axis] for p in row["points"]]
            ys = [p["mean"] for p in row["points"]]
            line, = ax.plot(xs, ys, marker="o", label=row["optim"])
            ax.fill_between(xs, [p["min"] for p in row["points"]],
                            [min(p["max"], 1e9) for p in row["points"]],
                            color=line.get_color(), alpha=0.15)
            crosses = [(p[axis], p["mean"]) for p in row["points"] if p["diverged"]]
            if crosses:
                ax.scatter(*zip(*crosses), marker="x", s=80, color=line.get_color())
        ax.set_xscale("log", base=10 if axis == "lr" else 2)
        ax.set_xlabel("initial learning rate" if axis == "lr" else "batch size")
        ax.set_ylabel("final eval loss")
        ax.set_title(f"{task}: final eval loss (mean over seeds; x: diverged)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        figure.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("_")  # "gpt2-text (linear)"
        path = pathlib.Path(output_dir) / f"sweep_{slug}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def write_reports(records: list[dict], output_dir, axis: str = "lr") -> str:
    """Write sweep.json, sweep.md and the plots; return the markdown."""
    from ..integrations.model_card import redact_command

    output_dir = pathlib.Path(output_dir)
    summary = summarize(records, axis)
    table = markdown(summary)
    (output_dir / "sweep.md").write_text(table)
    write_json(output_dir / "sweep.json",
               {"command": redact_command(sys.argv), "summary": summary, "runs": records},
               indent=1)
    plot(summary, output_dir)
    return table
