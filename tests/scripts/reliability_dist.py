"""Two CPU processes (torch.multiprocessing spawn, gloo on a free localhost port) step Active
optimizers and call hf_activelr.consistency_report / check_consistent; each rank writes what
it saw to ``OUT_DIR/rank{r}.json`` for tests/test_reliability.py to check.

    python tests/scripts/reliability_dist.py OUT_DIR

Scenarios (every rank runs every scenario, in order, so the collectives line up):

- ``same``: both ranks step with the same gradients (across a period boundary and mid-period);
- ``extra_step``: rank 1 steps once more than rank 0;
- ``different_grads``: two param groups; rank 1 gets different gradients in group 1 only;
- ``wrapper_same`` / ``wrapper_different``: the same for ``ActiveLR(torch.optim.SGD)``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def grads_for(params, step: int, seed: int):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def outcome(fn):
    """Call ``fn``; return what happened as plain data."""
    try:
        report = fn()
        return {"raised": None, "report": report}
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error)}


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        import hf_activelr
        from hf_activelr import ActiveAdamW, ActiveLR, check_consistent, consistency_report

        def make_params(seed=0):
            gen = torch.Generator().manual_seed(seed)
            shapes = [(4, 3), (5,), (2, 2)]
            return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]

        # same gradients on every rank
        params = make_params()
        opt = ActiveAdamW(params, lr=1e-2, period=2, lr_high=0.5, lr_low=0.5)
        for step in range(1, 6):  # boundaries at 2 and 4; ends mid-period with nonzero sums
            for p, g in zip(params, grads_for(params, step, seed=0)):
                p.grad = g
            opt.step()
        results["same"] = {
            "report": outcome(lambda: consistency_report(opt)),
            "check": outcome(lambda: check_consistent(opt)),
        }

        # rank 1 steps one more time
        params = make_params()
        opt = ActiveAdamW(params, lr=1e-2, period=2, lr_high=0.5, lr_low=0.5)
        steps = 4 + (1 if rank == 1 else 0)
        for step in range(1, steps + 1):
            for p, g in zip(params, grads_for(params, step, seed=0)):
                p.grad = g
            opt.step()
        results["extra_step"] = {
            "report": outcome(lambda: consistency_report(opt)),
            "check": outcome(lambda: check_consistent(opt)),
        }

        # different gradients on rank 1, group 1 only
        params = make_params()
        groups = [{"params": params[:2]}, {"params": params[2:], "period": 3}]
        opt = ActiveAdamW(groups, lr=1e-2, period=2, lr_high=0.5, lr_low=0.5)
        for step in range(1, 8):
            grads = grads_for(params, step, seed=0)
            if rank == 1:
                grads[2] = grads_for(params, step, seed=7)[2]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        results["different_grads"] = {
            "report": outcome(lambda: consistency_report(opt)),
            "check": outcome(lambda: check_consistent(opt)),
        }

        # negated gradients on rank 1: same magnitudes, opposite signs
        params = make_params()
        opt = ActiveAdamW(params, lr=1e-2, period=2, lr_high=0.5, lr_low=0.5)
        for step in range(1, 6):
            for p, g in zip(params, grads_for(params, step, seed=0)):
                p.grad = -g if rank == 1 else g
            opt.step()
        results["negated_grads"] = {
            "report": outcome(lambda: consistency_report(opt)),
            "check": outcome(lambda: check_consistent(opt)),
        }

        # the wrapper
        for name, seed in (("wrapper_same", 0), ("wrapper_different", rank)):
            params = make_params()
            opt = ActiveLR(torch.optim.SGD(params, lr=0.1, momentum=0.9),
                           lr_high=0.25, lr_low=0.5, period=2)
            for step in range(1, 6):
                for p, g in zip(params, grads_for(params, step, seed=seed)):
                    p.grad = g
                opt.step()
            results[name] = {
                "report": outcome(lambda opt=opt: consistency_report(opt)),
                "check": outcome(lambda opt=opt: check_consistent(opt)),
            }
        results["version"] = hf_activelr.__version__
    except Exception:
        results["worker_error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
        dist.destroy_process_group()


def main() -> int:
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
