"""The period boundary's cost, and the gain statistics', beside torch's fused AdamW step.

    python benchmarks/boundary_cost.py              # GPT-2-small-shaped parameters (124M)
    python benchmarks/boundary_cost.py --layers 2   # smaller, for a quick look

A boundary runs once per period (every 10 steps with the default preset): it adapts every
gain, and, once ``gain_stats()`` has been called (the Trainer integration calls it at each
log), keeps the statistics in passing (exact min, max, mean; the histogram the median is read
from). Prints, as multiples of one fused AdamW step on the same parameters, timed in turn with
it (the paired median of the ratios, as ``step_cost.py`` does): the eager and the compiled
boundary with and without the statistics, a ``gain_stats()`` call after a boundary (it sums up
the histogram), and the statistics computed from the gains (what a call costs after a load).
The default preset's settings (significance test, bounds, ``gain_init``), random period
sums and gains on its lattice; ``--lean``: bfloat16 gains and sums; ``--pooled Z``: with the
tensor-wide test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_activelr.optim import presets, rule
from hf_activelr.optim import stats as gain_statistics
from hf_activelr.optim._fused import fused_boundary

try:
    from step_cost import gpt2_shapes  # run as a script from benchmarks/
except ImportError:  # pragma: no cover - imported as benchmarks.boundary_cost
    from .step_cost import gpt2_shapes


def make_states(shapes, lean: bool, generator, pooled=None):
    group = {**presets.SIGNIFICANT.group_values(), "pooled": pooled}
    if lean:
        group.update(gain_dtype="bfloat16", grad_sum_dtype="bfloat16")
    states = []
    for shape in shapes:
        param = torch.empty(shape)
        state: dict = {}
        rule.init_state(param, state, group["zero_sum"], group["grad_sum_dtype"], True,
                        group["gain_dtype"])
        lattice = 1.5 ** torch.randint(-3, 4, shape, generator=generator).float()
        signs = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
        state["gain"].copy_(lattice * signs)
        states.append(state)
    return states, group


def refill(states, generator):
    """New period sums (a third stand out of their noise at z = 2)."""
    for state in states:
        state["grad_sum"].copy_(torch.randn(state["grad_sum"].shape, generator=generator) * 3)
        state["grad_sq_sum"].copy_(torch.rand(state["grad_sq_sum"].shape, generator=generator)
                                   * 3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lean", action="store_true", help="bfloat16 gains and sums")
    parser.add_argument("--pooled", type=float, help="with the tensor-wide test pooled=Z")
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    shapes = gpt2_shapes(args.layers, vocab=args.vocab, width=args.width)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator) * 1e-2
    peer = torch.optim.AdamW(params, fused=True)
    peer.step()
    states, group = make_states(shapes, args.lean, generator, args.pooled)

    def boundary(code, with_stats: bool):
        stats = gain_statistics.GainStats(torch.device("cpu")) if with_stats else None
        counts = rule.end_period(states, group, code, stats)
        return counts, stats

    refill(states, generator)
    boundary(fused_boundary, True)  # compile both graphs before timing
    refill(states, generator)
    boundary(fused_boundary, False)

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    rows = {
        "boundary, eager, with statistics": lambda: boundary(rule.boundary_tensor, True),
        "boundary, eager, without": lambda: boundary(rule.boundary_tensor, False),
        "boundary, compiled, with statistics": lambda: boundary(fused_boundary, True),
        "boundary, compiled, without": lambda: boundary(fused_boundary, False),
    }
    ratios: dict[str, list[float]] = {name: [] for name in rows}
    ratios["gain_stats() after a boundary"] = []
    ratios["statistics from the gains (after a load)"] = []
    for _ in range(args.repeats):
        for name, fn in rows.items():
            refill(states, generator)
            step = timed(peer.step)
            ratios[name].append(timed(fn) / step)
        refill(states, generator)
        counts, stats = boundary(fused_boundary, True)
        step = timed(peer.step)
        ratios["gain_stats() after a boundary"].append(timed(
            lambda counts=counts, stats=stats: gain_statistics.gain_summary(None, counts,
                                                                 group["gain_init"], stats))
            / step)
        step = timed(peer.step)
        ratios["statistics from the gains (after a load)"].append(timed(
            lambda counts=counts: gain_statistics.gain_summary([s["gain"] for s in states], counts,
                                                    group["gain_init"]))
            / step)
    elements = sum(p.numel() for p in params)
    print(f"\n{elements / 1e6:.0f}M parameters in {len(params)} tensors, "
          f"{'bfloat16' if args.lean else 'float32'} gains and sums, "
          f"{'pooled=' + format(args.pooled, 'g') + ', ' if args.pooled else ''}"
          f"{torch.get_num_threads()} threads; {args.repeats} pairs each\n")
    print("| what | x a fused AdamW step (paired median) | range |")
    print("|---|---|---|")
    for name, values in ratios.items():
        print(f"| {name} | {statistics.median(values):.2f}x | "
              f"{min(values):.2f}-{max(values):.2f} |")


if __name__ == "__main__":
    main()
