"""What a tensor's pooled period evidence says at learning rates too small, tuned and too large.

    python benchmarks/pooled_evidence.py vit-digits 1e-4,1e-3,1e-2,3e-2 --steps 300

Trains a protocol task (hf_activelr.experiments.sweep_tasks) with plain torch AdamW at each
learning rate (constant, seed 0, one thread) and, every ``--period`` steps, reads what
ActiveLR's rule would see, without acting on it:

- per tensor, the sign test of ``pooled=z`` (docs/algorithm.md, "Pooled evidence"): among the
  elements whose period sum is significant (``|s| > z * sqrt(q)``), how many agree with their
  previous counted sign (``A``) or are opposite (``F``); a tensor passes upward where
  ``A - F > z * sqrt(A + F)``, downward where ``F - A`` does;
- the variance ratio ``mean(s**2 / q)`` per tensor (1 for independent symmetric noise): its
  median over tensors and the share of tensors below 1;
- the hypergradient (Baydin et al., arXiv 1703.04782) pooled per tensor: each step
  ``h = g_t . (p_t - p_(t-1))``, the gradient against the previous step's displacement,
  which is ``lr`` times the derivative of the loss in the log learning rate
  (``dL/d log lr = -lr g_t . u_(t-1)``, with ``u`` the update). Summed over the period and
  scaled by its noise, ``T = sum h / sqrt(sum h**2)``: about N(0, 1) where the gradient is
  independent of the last step; below ``-z`` the step keeps going downhill (a larger lr would
  have helped: too small), above ``+z`` it overshoots (too large). Unlike a period sum's sign,
  it sees the step-to-step oscillation a period's sum cancels. Printed: tensors with ``T <
  -z`` / ``T > z`` (would grow / shrink) and the median ``T``.

Printed every five periods: training loss, tensors up / down / hold, ``A`` and ``F`` summed
over the model, the median ratio and the share below 1, and the hypergradient's readings.
Evidence for the rule, not a timing.
"""

from __future__ import annotations

import argparse
import math

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("lrs", help="comma-separated learning rates")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--period", type=int, default=10)
    parser.add_argument("--z", type=float, default=2.0, help="both tests' threshold")
    args = parser.parse_args()

    from hf_activelr.experiments.sweep_tasks import get_task

    torch.set_num_threads(1)
    task = get_task(args.task)
    train, _, info = task.build_data()
    for lr in (float(x) for x in args.lrs.split(",")):
        torch.manual_seed(0)
        model = task.build_model(info)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sums = [torch.zeros_like(p) for p in params]
        squares = [torch.zeros_like(p) for p in params]
        previous = [torch.zeros_like(p) for p in params]
        displacements = [torch.zeros_like(p) for p in params]  # p_t - p_(t-1)
        hyper = torch.zeros(len(params), dtype=torch.float64)  # sum of h over the period
        hyper_sq = torch.zeros(len(params), dtype=torch.float64)  # sum of h**2
        loader = torch.utils.data.DataLoader(train, batch_size=task.batch_size, shuffle=True,
                                             drop_last=True)
        batches = iter(loader)
        print(f"== {args.task}, AdamW lr {lr:g}")
        for step in range(1, args.steps + 1):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            for index, (param, total, square) in enumerate(zip(params, sums, squares)):
                total.add_(param.grad)
                square.addcmul_(param.grad, param.grad)
                h = float((param.grad.double() * displacements[index].double()).sum())
                hyper[index] += h
                hyper_sq[index] += h * h
                displacements[index].copy_(param.detach())
            optimizer.step()
            for param, moved in zip(params, displacements):
                torch.sub(param.detach(), moved, out=moved)
            if step % args.period:
                continue
            up = down = hold = agreed_all = flipped_all = 0
            ratios = []
            for total, square, prev in zip(sums, squares, previous):
                counted = torch.sign(total) * (total.abs() > args.z * square.sqrt())
                agreed = int(((counted != 0) & (counted == prev)).sum())
                flipped = int(((counted != 0) & (counted == -prev)).sum())
                agreed_all, flipped_all = agreed_all + agreed, flipped_all + flipped
                margin = args.z * math.sqrt(agreed + flipped)
                if agreed + flipped and agreed - flipped > margin:
                    up += 1
                elif agreed + flipped and flipped - agreed > margin:
                    down += 1
                else:
                    hold += 1
                valid = square > 0
                if int(valid.sum()) >= 2:
                    ratios.append(float((total[valid] ** 2 / square[valid]).mean()))
                prev.copy_(torch.where(counted != 0, counted, prev))
                total.zero_()
                square.zero_()
            valid = hyper_sq > 0
            t_stat = hyper[valid] / hyper_sq[valid].sqrt()
            hyper.zero_()
            hyper_sq.zero_()
            if step % (5 * args.period) == 0:
                ratio = torch.tensor(ratios)
                below = float((ratio < 1).float().mean())
                print(f"step {step}: loss {loss.item():.3f}; tensors up/down/hold "
                      f"{up}/{down}/{hold}; agreed {agreed_all}, flipped {flipped_all}; "
                      f"ratio median {ratio.median():.2f}, below 1 {below:.0%}; hypergradient "
                      f"grow/shrink {int((t_stat < -args.z).sum())}/"
                      f"{int((t_stat > args.z).sum())} of {t_stat.numel()}, median T "
                      f"{t_stat.median():.2f}", flush=True)


if __name__ == "__main__":
    main()
