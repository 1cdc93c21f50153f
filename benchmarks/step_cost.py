"""Optimizer step cost and state memory, Active variants beside their bases, in one run.

    python benchmarks/step_cost.py                  # GPT-2-small-shaped parameters (124M)
    python benchmarks/step_cost.py --layers 2       # a smaller model, same shapes per layer
    python benchmarks/step_cost.py --reference-dir PATH/TO/ConsciousLR   # + authors' ActiveAdam

Prints a markdown table: median step time (ms) over ``--steps`` timed steps after warm-up (a
fused variant's first step compiles its kernel: that time is reported apart), the ratio to
torch's fused AdamW (Adam family) or fused SGD (SGD), and optimizer state bytes per parameter.
Gradients are fixed random tensors, so only the step is timed.

The ratio is *paired*: the peer stays in memory and the two step in turn, and the ratio is the
median of the per-pair ratios (with its 25-75% range). On a shared machine the load drifts
between one optimizer's steps and the next's by 20-50%; adjacent steps see the same load.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

import hf_activelr as hal


def gpt2_shapes(layers: int, vocab: int = 50257, positions: int = 1024, width: int = 768):
    """Parameter shapes of GPT-2 small (transformers' GPT2LMHeadModel, tied head)."""
    shapes = [(vocab, width), (positions, width)]
    for _ in range(layers):
        shapes += [
            (width,), (width,),                       # ln_1
            (width, 3 * width), (3 * width,),         # attn.c_attn
            (width, width), (width,),                 # attn.c_proj
            (width,), (width,),                       # ln_2
            (width, 4 * width), (4 * width,),         # mlp.c_fc
            (4 * width, width), (width,),             # mlp.c_proj
        ]
    return shapes + [(width,), (width,)]              # ln_f


def make_params(shapes, device, dtype):
    generator = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype))
        param.grad = (torch.randn(shape, generator=generator) * 1e-2).to(device, dtype)
        params.append(param)
    return params


def load_reference(directory: str):
    """The authors' ActiveAdam class from a local checkout (not shipped with this project)."""
    path = Path(directory) / "ActiveAdam.py"
    spec = importlib.util.spec_from_file_location("authors_activeadam", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ActiveAdam


#: The lean state's options (see hf_activelr.optim.config: gain_dtype).
LEAN = dict(gain_dtype="bfloat16", grad_sum_dtype="bfloat16", gain_increase="multiplicative",
            lr_high=0.5, lr_low=1 / 1.5)


def candidates(args):
    """(name, peer, factory): peer names the torch fused optimizer the ratio is taken against."""
    # Period 1 for the first two steps, so every gain is set (steady state: the eager paths
    # skip work while gains read 1); then no boundary inside the timed steps (see settle).
    period = 1
    rows = [
        ("torch AdamW fused", "adamw", lambda p: torch.optim.AdamW(p, fused=True)),
        ("torch AdamW foreach", "adamw", lambda p: torch.optim.AdamW(p, foreach=True)),
        ("ActiveAdamW fused", "adamw", lambda p: hal.ActiveAdamW(p, period=period, fused=True)),
        ("ActiveAdamW fused, bf16 sums", "adamw", lambda p: hal.ActiveAdamW(
            p, period=period, grad_sum_dtype="bfloat16", fused=True)),
        # The class default (neither fused nor foreach): compiled from 10M parameter elements.
        ("ActiveAdamW default", "adamw", lambda p: hal.ActiveAdamW(p, period=period)),
        ("ActiveAdamW foreach", "adamw",
         lambda p: hal.ActiveAdamW(p, period=period, foreach=True)),
        # The significance test also sums squared gradients (one more stream, 4 bytes per
        # parameter). z = 0.5 lets every fixed-gradient sum count, so the gains are all set.
        ("ActiveAdamW fused, significance", "adamw", lambda p: hal.ActiveAdamW(
            p, period=period, significance=0.5, fused=True)),
        ("ActiveAdamW default, significance", "adamw", lambda p: hal.ActiveAdamW(
            p, period=period, significance=0.5)),
        ("ActiveAdamW foreach, significance", "adamw", lambda p: hal.ActiveAdamW(
            p, period=period, significance=0.5, foreach=True)),
        # The lean state: bfloat16 gains and sums (12 bytes per parameter, 14 with the
        # significance test), with the multiplicative rule it requires.
        ("ActiveAdamW fused, lean", "adamw", lambda p: hal.ActiveAdamW(
            p, period=period, fused=True, **LEAN)),
        ("ActiveAdamW default, lean", "adamw", lambda p: hal.ActiveAdamW(
            p, period=period, **LEAN)),
        ("ActiveAdamW fused, lean, significance", "adamw", lambda p: hal.ActiveAdamW(
            p, period=period, significance=0.5, fused=True, **LEAN)),
        ("ActiveAdamW foreach, lean", "adamw", lambda p: hal.ActiveAdamW(
            p, period=period, foreach=True, **LEAN)),
        # The wrapper around torch's fused AdamW: its default (compiled from 10M parameter
        # elements on CPU, on CUDA always), the compiled path and the eager (foreach) one.
        ("ActiveLR(torch AdamW fused) default", "adamw", lambda p: hal.ActiveLR(
            torch.optim.AdamW(p, fused=True), lr_high=2.0, lr_low=0.5, period=period)),
        ("ActiveLR(torch AdamW fused) compiled", "adamw", lambda p: hal.ActiveLR(
            torch.optim.AdamW(p, fused=True), lr_high=2.0, lr_low=0.5, period=period,
            fused=True)),
        ("ActiveLR(torch AdamW fused) compiled, significance", "adamw", lambda p: hal.ActiveLR(
            torch.optim.AdamW(p, fused=True), lr_high=2.0, lr_low=0.5, period=period,
            significance=0.5, fused=True)),
        ("ActiveLR(torch AdamW fused) eager", "adamw", lambda p: hal.ActiveLR(
            torch.optim.AdamW(p, fused=True), lr_high=2.0, lr_low=0.5, period=period,
            fused=False)),
        ("torch RAdam foreach", "adamw", lambda p: torch.optim.RAdam(p, foreach=True)),
        ("ActiveRAdam fused", "adamw", lambda p: hal.ActiveRAdam(p, period=period, fused=True)),
        ("ActiveRAdam foreach", "adamw",
         lambda p: hal.ActiveRAdam(p, period=period, foreach=True)),
        ("ActiveAdaBelief fused", "adamw",
         lambda p: hal.ActiveAdaBelief(p, period=period, fused=True)),
        ("ActiveAdaBelief foreach", "adamw",
         lambda p: hal.ActiveAdaBelief(p, period=period, foreach=True)),
        ("ActiveAdaBound fused", "adamw", lambda p: hal.ActiveAdaBound(
            p, lr_high=0.05, lr_low=0.95, period=period, fused=True)),
        ("ActiveAdaBound foreach", "adamw", lambda p: hal.ActiveAdaBound(
            p, lr_high=0.05, lr_low=0.95, period=period, foreach=True)),
        ("torch SGD fused", "sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True)),
        ("ActiveSGD fused", "sgd", lambda p: hal.ActiveSGD(
            p, lr=0.1, momentum=0.9, lr_high=0.05, lr_low=0.95, period=period, fused=True)),
        ("ActiveSGD fused, bf16 sums", "sgd", lambda p: hal.ActiveSGD(
            p, lr=0.1, momentum=0.9, lr_high=0.05, lr_low=0.95, period=period,
            grad_sum_dtype="bfloat16", fused=True)),
        ("ActiveSGD foreach", "sgd", lambda p: hal.ActiveSGD(
            p, lr=0.1, momentum=0.9, lr_high=0.05, lr_low=0.95, period=period, foreach=True)),
    ]
    if importlib.util.find_spec("adabelief_pytorch"):
        from adabelief_pytorch import AdaBelief

        rows.append(("adabelief_pytorch AdaBelief", "adamw",
                     lambda p: AdaBelief(p, print_change_log=False)))
    if importlib.util.find_spec("adabound"):
        from adabound import AdaBound

        rows.append(("adabound AdaBound", "adamw", lambda p: AdaBound(p)))
    if args.reference_dir:
        reference = load_reference(args.reference_dir)
        rows.append(("authors' ActiveAdam", "adamw",
                     lambda p: reference(p, stepSize=1000)))  # its step costs the same
    if args.only:
        rows = [row for row in rows if any(key.lower() in row[0].lower() for key in args.only)]
    return rows


def state_bytes(optimizer) -> int:
    inner = getattr(optimizer, "optimizer", None)
    states = [optimizer.state] + ([inner.state] if inner is not None else [])
    total = 0
    for state in states:
        for per_param in state.values():
            for value in per_param.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    total += value.numel() * value.element_size()
    return total


def settle(optimizer) -> None:
    """One more step at period 1 sets every gain (the fixed gradients have nonzero signs);
    then a period no timed step reaches: boundaries run once per period, not per step."""
    if hasattr(optimizer, "set_period"):
        optimizer.step()
        optimizer.set_period(10**9, only_epoch=False)


def time_steps(optimizer, steps: int, warmup: int, device) -> tuple[float, float]:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    optimizer.step()
    sync()
    first = time.perf_counter() - start
    settle(optimizer)
    for _ in range(warmup):
        optimizer.step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - start)
    return first * 1e3, statistics.median(times) * 1e3


def paired_ratios(optimizer, peer, steps: int, device) -> list[float]:
    """``steps`` pairs of (peer step, optimizer step); the ratio of each pair's times."""
    def timed(opt):
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return [timed(optimizer) / timed(peer) for _ in range(steps)]


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (12: GPT-2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reference-dir", help="a checkout of the authors' ConsciousLR code")
    parser.add_argument("--only", nargs="*", help="substrings of the rows to run")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = gpt2_shapes(args.layers)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"# step cost: {numel / 1e6:.1f}M parameters in {len(shapes)} tensors, {dtype}, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| optimizer | median step (ms) | ratio to torch fused peer (paired median) "
          "| ratio 25-75% | state bytes/param | first step (ms) |")
    print("|---|---|---|---|---|---|")
    peers: dict[str, object] = {}  # peer name -> its optimizer, kept for paired timing
    for name, peer, factory in candidates(args):
        params = make_params(shapes, device, dtype)
        optimizer = factory(params)
        first, median = time_steps(optimizer, args.steps, args.warmup, device)
        if name in ("torch AdamW fused", "torch SGD fused"):
            peers[peer] = optimizer
            ratio, spread = "1.00x", ""
        elif peer in peers:
            ratios = paired_ratios(optimizer, peers[peer], args.steps, device)
            low, high = quartiles(ratios)
            ratio, spread = f"{statistics.median(ratios):.2f}x", f"{low:.2f}-{high:.2f}"
        else:
            ratio, spread = "n/a", ""
        print(f"| {name} | {median:.1f} | {ratio} | {spread} | "
              f"{state_bytes(optimizer) / numel:.1f} | {first:.0f} |", flush=True)
        if optimizer not in peers.values():
            del optimizer
        del params
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
