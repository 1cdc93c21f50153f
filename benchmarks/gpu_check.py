"""The GPU check (issue 13): step cost, fused == single-tensor, and GPT-2 training, in one run.

    python benchmarks/gpu_check.py                      # CUDA, GPT-2 small (124M), 200 steps
    python benchmarks/gpu_check.py --quick              # 2 layers, 30 training steps
    python benchmarks/gpu_check.py --device cpu --quick # tiny, on CPU: what CI runs
    python benchmarks/gpu_check.py --sections fused     # only some sections

Nothing is downloaded: models are built from a ``GPT2Config``, the data are generated tokens.
Prints Markdown tables and writes them (``gpu_check.md``) and every figure (``gpu_check.json``)
to ``--output_dir`` (default ``outputs/gpu_check``), rewritten after each section, so a run cut
short keeps what it finished. Header: date, device name, torch / transformers / triton versions.

1. **Step cost** against torch's fused AdamW / SGD on GPT-2-small shapes (fp32 parameters,
   fixed gradients), with :mod:`step_cost`'s functions: median step, the *paired* ratio
   (median of per-pair ratios, peer and candidate stepping in turn), its mean (every Active
   row keeps a 10-step period here, so the mean includes a period boundary every 10 steps),
   one boundary step alone, state bytes per parameter, and the first step and first
   boundary (where compiled: their compilation) apart. Rows: ``active_adamw`` as the Trainer builds it on CUDA (fused, preset
   ``significant``; on CPU forced fused too, as the class default does from 10M elements),
   ``ActiveAdamW`` foreach, ``ActiveSGD`` fused, ``ActiveLR(torch.optim.AdamW(fused=True))``;
   all Active rows use the ``significant`` preset. Target: paired median <= 1.3x.
2. **Fused vs single-tensor**: the fused path (Triton on CUDA, Inductor's C++ on CPU) against
   the single-tensor path (``foreach=False``) it is compiled from, fp32 and bf16 parameters,
   a 3-step period over 10 steps (boundaries at 3, 6, 9), an lr scheduler moving lr every
   step: max abs / relative difference of the parameters, gains compared exactly. Tolerances
   as tests/test_fused.py asserts on CPU (:data:`TOLERANCES`).
3. **GPT-2 training** under the Hugging Face Trainer, ``optim="active_adamw"`` (its default:
   fused on CUDA, preset significant) and ``optim="adamw_torch_fused"``, same seed, model
   and data: samples/s over the steps after the warm-up (a callback times them, so the
   compilation and the first steps stay out), the Trainer's own samples/s (whole run), peak
   memory (``torch.cuda.max_memory_allocated``, reset between runs), train loss. bf16
   (mixed precision) on CUDA, fp32 on CPU. Target: active / adamw samples/s >= 0.97.

Exit status 1 if a fused-vs-single case fails; the speed targets are reported, not enforced.

On the lent GPU machine (a fresh copy of this repository; the tool sets ``$OUT``), the one
command (``benchmarks/gpu_check.sh`` does the same)::

    python3 -m pip install -q --retries 0 --timeout 10 torch==2.13.0 || echo keeping preinstalled torch; python3 -m pip install -q --no-deps --no-build-isolation -e . || echo using PYTHONPATH; PYTHONPATH=$PWD PYTHONUNBUFFERED=1 timeout 560 python3 benchmarks/gpu_check.py --output_dir $OUT 2>&1 | tee $OUT/gpu_check.log

That machine reaches no package index: the torch install fails at once and the image's own
torch / transformers / triton are used (the header records their versions); ``-e .`` goes
without dependencies, ``PYTHONPATH`` covers it if even that fails.
"""  # noqa: E501

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_cost, beside this file

import step_cost  # noqa: E402

import hf_activelr as hal  # noqa: E402
from hf_activelr.optim.rule import decode_gain  # noqa: E402

STEP_TARGET = 1.3  # an Active step at most 1.3x torch's fused peer (paired median)
THROUGHPUT_TARGET = 0.97  # Trainer samples/s with active_adamw at least 0.97x adamw_torch_fused
ROW_PERIOD = 10  # the period of the Active rows while paired (the Trainer default's)
# Fused vs single-tensor, as tests/test_fused.py asserts (torch.testing.assert_close:
# |fused - single| <= atol + rtol * |single|); the gains must be identical.
TOLERANCES = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "bfloat16": {"rtol": 2e-2, "atol": 2e-2}}
FUSED_PERIOD, FUSED_STEPS = 3, 10


# -- sizes ------------------------------------------------------------------------------------


def plan(device_type: str, quick: bool) -> dict:
    """Sizes of every section for ``device_type`` ("cuda" or "cpu") and ``quick``."""
    if device_type == "cuda":
        layers = 2 if quick else 12
        return {
            "step": {"layers": layers, "vocab": 50257, "positions": 1024, "width": 768,
                     "steps": 30, "warmup": 3, "pairs": 50 if quick else 100},
            "fused": {"shapes": [(257, 129), (4099,), (2, 3, 4), (64, 3, 3)],
                      "dtypes": ["float32", "bfloat16"], "bfloat16_cases": None},
            "train": {"layers": layers, "width": 768, "heads": 12, "vocab": 50257,
                      "positions": 1024, "seq_len": 512, "batch": 32, "steps": 30 if quick else 200,
                      "warmup_steps": 10 if quick else 20, "logging_steps": 10,
                      "bf16": True},
        }
    if device_type != "cpu":
        raise ValueError(f"device must be cuda or cpu, got {device_type!r}")
    return {
        # quick: no blocks (4 tensors): the fused kernel's compilation grows with the tensors
        # in a chunk, ~1 s each on CPU
        "step": {"layers": 0 if quick else 2, "vocab": 512 if quick else 2048,
                 "positions": 64 if quick else 128, "width": 64 if quick else 128,
                 "steps": 5 if quick else 10, "warmup": 1, "pairs": 10 if quick else 30},
        "fused": {"shapes": [(5, 3), (7,), (2, 3, 4)] if quick else
                  [(33, 17), (129,), (2, 3, 4), (8, 3, 3)],
                  # quick: bf16 for ActiveSGD (momentum, significant) only: each case compiles
                  # for seconds on CPU
                  "dtypes": ["float32", "bfloat16"], "bfloat16_cases": [2] if quick else None},
        "train": {"layers": 2, "width": 32 if quick else 64, "heads": 2,
                  "vocab": 256 if quick else 1024, "positions": 64 if quick else 128,
                  "seq_len": 32 if quick else 64,
                  "batch": 4 if quick else 8, "steps": 12 if quick else 60,
                  "warmup_steps": 4 if quick else 10, "logging_steps": 4 if quick else 10,
                  "bf16": False},
    }


# -- pure helpers -----------------------------------------------------------------------------


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; ``None`` cells print as an empty cell."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns")
        lines.append("| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |")
    return "\n".join(lines)


def verdict(value, limit: float, higher_is_better: bool = False) -> str:
    """``"PASS"`` / ``"FAIL"`` of ``value`` against ``limit`` (``"n/a"`` without a value)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    ok = value >= limit if higher_is_better else value <= limit
    return "PASS" if ok else "FAIL"


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def compare(fused: list[torch.Tensor], single: list[torch.Tensor], rtol: float,
            atol: float) -> dict:
    """Differences of two lists of tensors (``single`` the reference): max abs, max relative
    (over nonzero reference elements), the largest share of the allowed difference
    ``atol + rtol * |single|`` used (<= 1: within tolerance), and whether all are finite."""
    max_abs = max_rel = used = 0.0
    finite = True
    for a, b in zip(fused, single, strict=True):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if a.shape != b.shape:
            raise ValueError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
        finite = finite and bool(torch.isfinite(a).all() and torch.isfinite(b).all())
        diff = (a - b).abs()
        if diff.numel() == 0:
            continue
        max_abs = max(max_abs, diff.max().item())
        nonzero = b != 0
        if nonzero.any():
            max_rel = max(max_rel, (diff[nonzero] / b[nonzero].abs()).max().item())
        used = max(used, (diff / (atol + rtol * b.abs())).max().item())
    return {"max_abs": max_abs, "max_rel": max_rel, "tolerance_used": used,
            "within": finite and used <= 1.0, "finite": finite}


def steady_samples_per_second(steps: int, batch: int, seconds: float) -> float | None:
    """Samples per second over ``steps`` timed optimizer steps of ``batch`` samples."""
    if steps <= 0 or seconds <= 0:
        return None
    return steps * batch / seconds


def ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# -- the run's context ------------------------------------------------------------------------


def _version(name: str) -> str:
    """The installed distribution's version, else the module's ``__version__`` (a triton
    shipped under another distribution name), else "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(importlib.import_module(name).__version__)
    except (ImportError, AttributeError):
        return "not installed"


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine() or "cpu"
        name = f"CPU {name}, {torch.get_num_threads()} threads"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": name,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "hf_activelr": hal.__version__,
        "python": platform.python_version(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- 1. step cost -----------------------------------------------------------------------------


def trainer_kwargs(name: str, device: torch.device) -> dict:
    """The keyword arguments the Trainer gives registered optimizer ``name`` on ``device``
    (no optim_args; TrainingArguments' lr etc. replaced by the optimizer's own defaults)."""
    from hf_activelr.integrations.transformers_patch import optimizer_kwargs

    args = SimpleNamespace(optim=name, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-8, device=device)
    _, kwargs = optimizer_kwargs(args, {})
    return kwargs


def step_rows(device: torch.device):
    """(name, peer, factory, target): peers first; ``target`` True where the 1.3x applies."""
    adamw_default = trainer_kwargs("active_adamw", device)
    adamw_default.update(fused=True, lr=1e-3)  # the path the default takes at this size
    sgd_default = trainer_kwargs("active_sgd", device)
    sgd_default.update(fused=True, lr=0.1, momentum=0.9)
    significant = hal.preset_kwargs("significant")
    return [
        ("torch AdamW fused", "adamw", lambda p: torch.optim.AdamW(p, fused=True), False),
        ("active_adamw: Trainer default (fused, significant)", "adamw",
         lambda p: hal.ActiveAdamW(p, **adamw_default), True),
        ("ActiveAdamW foreach, significant", "adamw",
         lambda p: hal.ActiveAdamW(p, **significant, foreach=True), False),
        ("ActiveLR(torch AdamW fused), significant", "adamw",
         lambda p: hal.ActiveLR(torch.optim.AdamW(p, fused=True), **significant), False),
        ("torch SGD fused", "sgd",
         lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True), False),
        ("ActiveSGD fused, significant (active_sgd's default on CUDA)", "sgd",
         lambda p: hal.ActiveSGD(p, **sgd_default), True),
    ]


def time_boundary_step(optimizer, device: torch.device) -> float | None:
    """Milliseconds of one step that ends a period (the gains adapt), or None (no period)."""
    groups = optimizer.param_groups
    if not groups or "active_step" not in groups[0]:
        return None
    period, clock = groups[0]["period"], groups[0]["active_step"]
    for _ in range((period - 1 - clock) % period):  # up to the step before a boundary
        optimizer.step()
    _sync(device)
    start = time.perf_counter()
    optimizer.step()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def run_step_cost(sizes: dict, device: torch.device, log) -> dict:
    shapes = step_cost.gpt2_shapes(sizes["layers"], sizes["vocab"], sizes["positions"],
                                   sizes["width"])
    numel = sum(torch.Size(s).numel() for s in shapes)
    log(f"step cost: {numel / 1e6:.1f}M parameters in {len(shapes)} tensors, float32")
    peers: dict = {}
    rows = []
    for name, peer, factory, target in step_rows(device):
        params = step_cost.make_params(shapes, device, torch.float32)
        optimizer = factory(params)
        first, median = step_cost.time_steps(optimizer, sizes["steps"], sizes["warmup"],
                                             device)
        first_boundary = None
        if hasattr(optimizer, "set_period"):
            # time_steps left no boundary in reach: pair at the real period, after a first
            # boundary (where the boundary is compiled, its compilation) timed apart.
            optimizer.set_period(ROW_PERIOD, only_epoch=False)
            first_boundary = time_boundary_step(optimizer, device)
        row = {"name": name, "peer": peer, "median_ms": median, "first_step_ms": first,
               "first_boundary_ms": first_boundary,
               "state_bytes_per_param": step_cost.state_bytes(optimizer) / numel,
               "ratio_median": None, "ratio_q25": None, "ratio_q75": None, "ratio_mean": None,
               "boundary_step_ms": None, "target": STEP_TARGET if target else None,
               "verdict": None}
        if peer not in peers:
            peers[peer] = optimizer
            row.update(ratio_median=1.0, ratio_mean=1.0)
        else:
            ratios = step_cost.paired_ratios(optimizer, peers[peer], sizes["pairs"], device)
            low, high = step_cost.quartiles(ratios)
            row.update(ratio_median=statistics.median(ratios), ratio_q25=low, ratio_q75=high,
                       ratio_mean=statistics.fmean(ratios))
            if first_boundary is not None:
                row["boundary_step_ms"] = time_boundary_step(optimizer, device)
        if target:
            row["verdict"] = verdict(row["ratio_median"], STEP_TARGET)
        rows.append(row)
        log(f"  {name}: median {median:.2f} ms, paired {fmt(row['ratio_median'])}x, "
            f"first step {first:.0f} ms, first boundary {fmt(first_boundary, '.0f')} ms")
        del optimizer, params
        _free(device)
    peers.clear()
    _free(device)
    return {"parameters": numel, "tensors": len(shapes), "dtype": "float32",
            "blocks": sizes["layers"], "width": sizes["width"],
            "pairs": sizes["pairs"], "row_period": ROW_PERIOD, "rows": rows}


def step_cost_table(section: dict) -> str:
    headers = ["optimizer", "median step (ms)", "ratio to torch fused (paired median)",
               "ratio 25-75%", f"paired mean (boundary every {section['row_period']})",
               "boundary step (ms)", "state bytes/param", "first step (ms)",
               "first boundary (ms)", f"target <= {STEP_TARGET}x"]
    rows = []
    for row in section["rows"]:
        spread = (f"{row['ratio_q25']:.2f}-{row['ratio_q75']:.2f}"
                  if row["ratio_q25"] is not None else "")
        rows.append([
            row["name"], f"{row['median_ms']:.2f}", fmt(row["ratio_median"], suffix="x"), spread,
            fmt(row["ratio_mean"], suffix="x"), fmt(row["boundary_step_ms"], ".1f"),
            f"{row['state_bytes_per_param']:.1f}", f"{row['first_step_ms']:.0f}",
            fmt(row["first_boundary_ms"], ".0f"), row["verdict"] or "",
        ])
    return markdown_table(headers, rows)


# -- 2. fused vs single-tensor ----------------------------------------------------------------


def fused_cases() -> list[tuple[str, type, dict]]:
    """(label, class, options) with the period and steps of :data:`FUSED_PERIOD`: boundaries
    crossed, significance on and off, zero_sum hold and flip, amsgrad, momentum and nesterov."""
    significant = {**hal.preset_kwargs("significant"), "significance": 1.0}  # reachable at 3
    return [
        ("ActiveAdamW", "significant (z=1), hold", hal.ActiveAdamW, significant),
        ("ActiveAdamW", "paper rule, flip, amsgrad", hal.ActiveAdamW,
         dict(zero_sum="flip", amsgrad=True)),
        ("ActiveSGD", "momentum, significant (z=1), hold", hal.ActiveSGD,
         dict(significant, lr=0.1, momentum=0.9, weight_decay=0.1)),
        ("ActiveSGD", "nesterov, flip", hal.ActiveSGD,
         dict(lr=0.1, lr_high=0.5, lr_low=0.5, momentum=0.9, nesterov=True, weight_decay=0.1,
              zero_sum="flip")),
        ("ActiveRAdam", "decoupled wd", hal.ActiveRAdam,
         dict(weight_decay=0.1, decoupled_weight_decay=True)),
        ("ActiveAdaBelief", "rectified, wd, amsgrad", hal.ActiveAdaBelief,
         dict(weight_decay=0.1, amsgrad=True)),
        ("ActiveAdaBound", "amsbound, wd", hal.ActiveAdaBound,
         dict(lr_high=0.5, lr_low=0.5, weight_decay=0.1, amsbound=True)),
    ]


def run_path(cls, options: dict, fused: bool, dtype: torch.dtype, device: torch.device,
             shapes) -> tuple[list, list]:
    """Parameters and gains after :data:`FUSED_STEPS` steps on one path, from the same start,
    with the same gradients and an lr scheduler moving lr every step."""
    generator = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype))
              for shape in shapes]
    optimizer = cls(params, **{**options, "period": FUSED_PERIOD}, fused=fused,
                    foreach=None if fused else False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(FUSED_STEPS):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(device, dtype)
        optimizer.step()
        scheduler.step()
    gains = [decode_gain(optimizer.state[p]["gain"]).cpu() for p in params]
    return [p.detach().cpu() for p in params], gains


def run_fused_vs_single(sizes: dict, device: torch.device, log) -> dict:
    rows = []
    bf16_cases = sizes.get("bfloat16_cases")
    for index, (optimizer_name, label, cls, options) in enumerate(fused_cases()):
        for dtype_name in sizes["dtypes"]:
            if dtype_name == "bfloat16" and bf16_cases is not None and index not in bf16_cases:
                continue
            dtype = getattr(torch, dtype_name)
            start = time.perf_counter()
            fused_params, fused_gains = run_path(cls, options, True, dtype, device,
                                                 sizes["shapes"])
            seconds = time.perf_counter() - start
            single_params, single_gains = run_path(cls, options, False, dtype, device,
                                                   sizes["shapes"])
            tolerance = TOLERANCES[dtype_name]
            params = compare(fused_params, single_params, **tolerance)
            mismatched = sum(int((a != b).sum()) for a, b in zip(fused_gains, single_gains))
            moved = any(bool((g != 1).any()) for g in fused_gains)
            ok = params["within"] and mismatched == 0 and moved
            rows.append({"optimizer": optimizer_name, "options": label, "dtype": dtype_name,
                         "max_abs": params["max_abs"], "max_rel": params["max_rel"],
                         "tolerance_used": params["tolerance_used"],
                         "finite": params["finite"], "gain_mismatches": mismatched,
                         "gain_elements": sum(g.numel() for g in fused_gains),
                         "gains_moved": moved, "fused_seconds": seconds,
                         "verdict": "PASS" if ok else "FAIL"})
            log(f"  {optimizer_name} {label} {dtype_name}: {rows[-1]['verdict']} "
                f"(max abs {params['max_abs']:.2e}, fused run {seconds:.1f} s)")
    _free(device)
    return {"period": FUSED_PERIOD, "steps": FUSED_STEPS, "shapes": sizes["shapes"],
            "tolerances": TOLERANCES, "rows": rows,
            "passed": sum(row["verdict"] == "PASS" for row in rows),
            "all_pass": all(row["verdict"] == "PASS" for row in rows)}


def fused_table(section: dict) -> str:
    headers = ["optimizer", "options", "params", "max abs diff", "max rel diff",
               "share of tolerance", "gains differing", "gains moved", "fused run (s)",
               "verdict"]
    rows = [[row["optimizer"], row["options"], row["dtype"], f"{row['max_abs']:.2e}",
             f"{row['max_rel']:.2e}", f"{row['tolerance_used']:.3f}",
             f"{row['gain_mismatches']}/{row['gain_elements']}",
             "yes" if row["gains_moved"] else "no", f"{row['fused_seconds']:.1f}",
             row["verdict"]] for row in section["rows"]]
    return markdown_table(headers, rows)


# -- 3. GPT-2 training ------------------------------------------------------------------------


class TokenData(torch.utils.data.Dataset):
    """Generated causal-LM rows: random start tokens counting up (t+1 follows t) with 20% of
    the positions random, so the loss can fall; the same rows for the same seed."""

    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (rows, 1), generator=generator)
        tokens = (start + torch.arange(seq_len)) % vocab
        noise = torch.rand(rows, seq_len, generator=generator) < 0.2
        self.tokens = torch.where(
            noise, torch.randint(0, vocab, (rows, seq_len), generator=generator), tokens)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        row = self.tokens[index]
        return {"input_ids": row, "labels": row}


def _step_timer(warmup_steps: int, device: torch.device):
    """A TrainerCallback noting the time at train begin, after step ``warmup_steps`` and
    after the last step (the device synchronized first)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = {}

        def on_train_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.times["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup_steps, state.max_steps):
                _sync(device)
                key = "warm" if state.global_step == warmup_steps else "end"
                self.times[key] = time.perf_counter()

    return StepTimer()


def train_once(optim: str, sizes: dict, device: torch.device, data, log) -> dict:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        PrinterCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    set_seed(0)
    config = GPT2Config(vocab_size=sizes["vocab"], n_positions=sizes["positions"],
                        n_embd=sizes["width"], n_layer=sizes["layers"], n_head=sizes["heads"],
                        bos_token_id=sizes["vocab"] - 1, eos_token_id=sizes["vocab"] - 1)
    model = GPT2LMHeadModel(config)
    timer = _step_timer(sizes["warmup_steps"], device)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch, optim=optim, max_steps=sizes["steps"],
            per_device_train_batch_size=sizes["batch"], learning_rate=6e-4,
            lr_scheduler_type="linear", warmup_steps=max(sizes["steps"] // 10, 1),
            bf16=sizes["bf16"], use_cpu=device.type == "cpu",
            logging_steps=sizes["logging_steps"], save_strategy="no", report_to=[],
            disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # stdout: the report alone (losses: JSON)
        result = trainer.train()
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        group = inner.param_groups[0]
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        times = timer.times
        timed_steps = sizes["steps"] - sizes["warmup_steps"]
        run = {
            "optim": optim,
            "optimizer": type(inner).__name__,
            "path": ("fused" if group.get("fused") else
                     "single" if group.get("foreach") is False else "foreach"),
            "steady_samples_per_second": steady_samples_per_second(
                timed_steps, sizes["batch"], times["end"] - times["warm"]),
            "timed_steps": f"{sizes['warmup_steps'] + 1}-{sizes['steps']}",
            "warmup_seconds": times["warm"] - times["begin"],
            "trainer_samples_per_second": result.metrics.get("train_samples_per_second"),
            "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None),
            "final_loss": losses[-1] if losses else None,
            "mean_train_loss": result.training_loss,
            "losses": losses,
        }
        del trainer, inner, group
    del model
    _free(device)
    log(f"  {optim}: {fmt(run['steady_samples_per_second'], '.1f')} samples/s "
        f"(steps {run['timed_steps']}), loss {fmt(run['final_loss'], '.3f')}")
    return run


def run_training(sizes: dict, device: torch.device, log) -> dict:
    data = TokenData(sizes["steps"] * sizes["batch"], sizes["seq_len"], sizes["vocab"])
    runs = {optim: train_once(optim, sizes, device, data, log)
            for optim in ("adamw_torch_fused", "active_adamw")}
    active, adamw = runs["active_adamw"], runs["adamw_torch_fused"]
    throughput = ratio(active["steady_samples_per_second"], adamw["steady_samples_per_second"])
    memory = ratio(active["peak_memory_gib"], adamw["peak_memory_gib"])
    return {"model": {key: sizes[key] for key in ("layers", "width", "heads", "vocab")},
            "seq_len": sizes["seq_len"], "batch": sizes["batch"], "steps": sizes["steps"],
            "warmup_steps": sizes["warmup_steps"], "bf16": sizes["bf16"], "runs": runs,
            "throughput_ratio": throughput, "memory_ratio": memory,
            "target": THROUGHPUT_TARGET,
            "verdict": verdict(throughput, THROUGHPUT_TARGET, higher_is_better=True)}


def training_table(section: dict) -> str:
    headers = ["optim", "optimizer (path)", "samples/s, steps " +
               section["runs"]["active_adamw"]["timed_steps"], "Trainer samples/s (all steps)",
               f"first {section['warmup_steps']} steps (s)", "peak memory (GiB)",
               "final loss", "mean train loss"]
    rows = [[run["optim"], f"{run['optimizer']} ({run['path']})",
             fmt(run["steady_samples_per_second"], ".1f"),
             fmt(run["trainer_samples_per_second"], ".1f"), f"{run['warmup_seconds']:.1f}",
             fmt(run["peak_memory_gib"], ".2f"), fmt(run["final_loss"], ".4f"),
             fmt(run["mean_train_loss"], ".4f")]
            for run in section["runs"].values()]
    rows.append(["active / adamw", "", fmt(section["throughput_ratio"], ".3f", "x"), "", "",
                 fmt(section["memory_ratio"], ".3f", "x"), "", ""])
    return markdown_table(headers, rows)


# -- the report -------------------------------------------------------------------------------


def targets(results: dict) -> list[dict]:
    """Every target with its figure, limit and verdict."""
    out = []
    for row in results.get("step_cost", {}).get("rows", []):
        if row["target"] is not None:
            out.append({"target": f"step: {row['name']} / torch {row['peer']} fused "
                                  "(paired median)",
                        "value": row["ratio_median"], "limit": f"<= {STEP_TARGET}x",
                        "verdict": row["verdict"]})
    fused = results.get("fused_vs_single")
    if fused:
        out.append({"target": "fused == single-tensor (all cases)",
                    "value": f"{fused['passed']}/{len(fused['rows'])}", "limit": "all",
                    "verdict": "PASS" if fused["all_pass"] else "FAIL"})
    training = results.get("training")
    if training:
        out.append({"target": "Trainer throughput: active_adamw / adamw_torch_fused",
                    "value": training["throughput_ratio"], "limit": f">= {THROUGHPUT_TARGET}x",
                    "verdict": training["verdict"]})
    return out


def report(results: dict) -> str:
    env = results["environment"]
    device = env["device"]
    kernel = "Triton" if device == "cuda" else "Inductor C++"
    lines = [
        f"# GPU check ({'quick' if results['quick'] else 'full'}, {device})", "",
        f"- date: {env['date']}",
        f"- device: {env['device_name']}" + (f" (CUDA {env['cuda']})" if env["cuda"] else ""),
        f"- torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}, "
        f"hf_activelr {env['hf_activelr']}, python {env['python']}",
    ]
    if device != "cuda":
        lines.append("- on CPU the figures are a smoke test; the targets are meant for CUDA")
    section = results.get("step_cost")
    if section:
        lines += ["", f"## 1. Step cost: {section['parameters']:,} parameters "
                      f"(GPT-2 layout: {section['blocks']} blocks, width {section['width']}), "
                      f"{section['tensors']} tensors, fp32", "",
                  f"Paired over {section['pairs']} steps; Active rows at period "
                  f"{section['row_period']} while paired.", "", step_cost_table(section)]
    section = results.get("fused_vs_single")
    if section:
        tol = ", ".join(f"{dtype} rtol {t['rtol']:g} atol {t['atol']:g}"
                        for dtype, t in section["tolerances"].items())
        lines += ["", f"## 2. Fused ({kernel}) vs single-tensor: period {section['period']}, "
                      f"{section['steps']} steps", "",
                  f"Tolerance |fused - single| <= atol + rtol |single| ({tol}); gains "
                  "identical.", "", fused_table(section)]
    section = results.get("training")
    if section:
        model = section["model"]
        lines += ["", f"## 3. GPT-2 training under the Trainer: {model['layers']} layers, "
                      f"width {model['width']}, seq {section['seq_len']}, batch "
                      f"{section['batch']}, {section['steps']} steps, "
                      f"{'bf16' if section['bf16'] else 'fp32'}", "", training_table(section)]
    rows = [[t["target"], t["value"] if isinstance(t["value"], str) else fmt(t["value"], ".3f"),
             t["limit"], t["verdict"]] for t in targets(results)]
    if rows:
        lines += ["", "## Targets", "", markdown_table(["target", "figure", "limit", "verdict"],
                                                      rows)]
    seconds = results.get("section_seconds", {})
    if seconds:
        lines += ["", "Section times (s): " + ", ".join(f"{k} {v:.0f}"
                                                       for k, v in seconds.items())]
    return "\n".join(lines) + "\n"


def write(results: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    (output_dir / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    (output_dir / "gpu_check.md").write_text(report(results))


SECTIONS = {"step": ("step_cost", run_step_cost), "fused": ("fused_vs_single",
                                                            run_fused_vs_single),
            "train": ("training", run_training)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="2 layers, 30 training steps")
    parser.add_argument("--output_dir", default="outputs/gpu_check")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: 1 with --device cpu, where OpenMP "
                             "threads on shared cores wait on each other; torch's default "
                             "with cuda)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu")
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    sizes = plan(device.type, args.quick)
    output_dir = Path(args.output_dir)
    results = {"environment": environment(device), "quick": args.quick,
               "sections": args.sections, "plan": sizes, "section_seconds": {}}

    def log(message):
        print(message, file=sys.stderr, flush=True)

    for name in args.sections:
        key, run = SECTIONS[name]
        log(f"[{name}]")
        start = time.perf_counter()
        results[key] = run(sizes[name], device, log)
        results["section_seconds"][name] = time.perf_counter() - start
        write(results, output_dir)
    print(report(results), flush=True)
    log(f"written: {output_dir / 'gpu_check.md'}, {output_dir / 'gpu_check.json'}")
    fused = results.get("fused_vs_single")
    return 1 if fused and not fused["all_pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
