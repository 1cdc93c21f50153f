"""Two CPU processes (torch.multiprocessing spawn, gloo on a free localhost port) run
hf_activelr.consistency_report / check_consistent on optimizers holding each kind of sharded
and replicated state, and hf_activelr.optim.distributed.gain_stats on sharded DTensors; each
rank writes what it saw to ``OUT_DIR/rank{r}.json`` for tests/test_consistency_sharded.py.

    python tests/scripts/consistency_sharded.py OUT_DIR

Every rank runs every scenario, in order, so that the collectives line up.
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
ACTIVE = dict(lr=1e-2, period=2, lr_high=0.5, lr_low=0.5, foreach=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def outcome(fn):
    try:
        return {"raised": None, "report": fn()}
    except Exception as error:
        return {"raised": type(error).__name__, "message": str(error)}


def scenario(opt, sharded=False):
    from hf_activelr import check_consistent, consistency_report

    return {"report": outcome(lambda: consistency_report(opt, sharded=sharded)),
            "check": outcome(lambda: check_consistent(opt, sharded=sharded))}


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def train(opt, params, grad_for, steps):
    """``steps`` optimizer steps; ``grad_for(param_index, step)`` gives each gradient."""
    for step in range(1, steps + 1):
        for index, param in enumerate(params):
            param.grad = grad_for(index, step)
        opt.step()


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

        from hf_activelr import ActiveAdamW
        from hf_activelr.optim import rule
        from hf_activelr.optim.distributed import gain_stats

        mesh = init_device_mesh("cpu", (WORLD,))
        shapes = [(4, 3), (6,)]

        # --- replicated DTensors: the local tensors are compared ---------------------------
        for name, seed_of_rank in (("replicate_same", 0), ("replicate_differ", rank)):
            params = [torch.nn.Parameter(distribute_tensor(randn(s, i), mesh, [Replicate()]))
                      for i, s in enumerate(shapes)]
            opt = ActiveAdamW(params, **ACTIVE)

            def grad(i, step, seed=seed_of_rank, params=params):
                local = randn(shapes[i], 100 * step + i + 1000 * seed)
                return DTensor.from_local(local, mesh, [Replicate()], run_check=False)

            train(opt, params, grad, 5)
            results[name] = scenario(opt)

        # --- Shard-placed DTensors: local shards differ, never compared ---------------------
        # (rank 1's extra step is no boundary: a boundary on sharded DTensors is a
        # collective, which one rank cannot run alone)
        for name, steps in (("shard_differ", 5), ("shard_extra_step", 4 + rank)):
            params = [torch.nn.Parameter(DTensor.from_local(randn((2, 3), 10 + rank), mesh,
                                                            [Shard(0)], run_check=False))]
            opt = ActiveAdamW(params, **ACTIVE)
            # each rank's own gradient for its shard (as FSDP2's reduce-scatter leaves them)
            train(opt, params, lambda i, step: DTensor.from_local(
                randn((2, 3), 1000 * rank + step), mesh, [Shard(0)], run_check=False), steps)
            results[name] = scenario(opt)

        # --- a group hyperparameter that differs -------------------------------------------
        params = [torch.nn.Parameter(randn(s, i)) for i, s in enumerate(shapes)]
        opt = ActiveAdamW([{"params": params[:1]},
                           {"params": params[1:], "lr_high": 0.5 if rank == 0 else 0.75}],
                          **ACTIVE)
        train(opt, params, lambda i, step: randn(shapes[i], 100 * step + i), 3)
        results["hyper_differ"] = scenario(opt)

        # --- a sharded group whose hyperparameter differs: still reported -------------------
        params = [torch.nn.Parameter(DTensor.from_local(randn((2, 3), rank), mesh, [Shard(0)],
                                                        run_check=False))]
        opt = ActiveAdamW(params, **{**ACTIVE, "period": 2 + rank})
        results["shard_hyper_differ"] = scenario(opt)

        # --- FSDP1-style flattened partitions of per-rank sizes -----------------------------
        for name, steps in (("flat_marked", 4), ("flat_marked_extra_step", 4 + rank)):
            flat = torch.nn.Parameter(randn((7 + 3 * rank,), rank))
            flat._fsdp_flattened = True  # what torch sets on FlatParameter and its views
            whole = torch.nn.Parameter(randn((5,), 99))  # replicated, in the same group
            opt = ActiveAdamW([flat, whole], **ACTIVE)
            sizes = [(flat.numel(),), (5,)]
            train(opt, [flat, whole], lambda i, step, sizes=sizes: randn(
                sizes[i], 1000 * rank * (i == 0) + step), steps)
            results[name] = scenario(opt)

        # --- one group: a Shard-placed DTensor and a plain (replicated) tensor --------------
        # The shard differs between ranks in both runs; the plain tensor in the second only.
        for name, plain_seed in (("mixed_shard_differs", 0), ("mixed_plain_differs", rank)):
            shard = torch.nn.Parameter(DTensor.from_local(randn((2, 3), rank), mesh, [Shard(0)],
                                                          run_check=False))
            plain = torch.nn.Parameter(randn((5,), 99))
            opt = ActiveAdamW([shard, plain], **ACTIVE)

            def grad(i, step, plain_seed=plain_seed):
                if i == 0:
                    return DTensor.from_local(randn((2, 3), 1000 * rank + step), mesh,
                                              [Shard(0)], run_check=False)
                return randn((5,), 1000 * plain_seed + step)

            train(opt, [shard, plain], grad, 5)
            results[name] = scenario(opt)

        # --- unmarked partitions of different shapes (the generic rule) ---------------------
        part = torch.nn.Parameter(randn((6 + rank,), rank))
        opt = ActiveAdamW([part], **ACTIVE)
        train(opt, [part], lambda i, step: randn((6 + rank,), 1000 * rank + step), 4)
        results["partition_shapes_differ"] = scenario(opt)

        # --- DeepSpeed-like partitions of equal (padded) size: need sharded=True ------------
        part = torch.nn.Parameter(randn((8,), rank))
        opt = ActiveAdamW([part], **ACTIVE)
        train(opt, [part], lambda i, step: randn((8,), 1000 * rank + step), 4)
        results["equal_partitions_flagged"] = scenario(opt, sharded=True)
        results["equal_partitions_unflagged"] = scenario(opt)

        # --- gain statistics of sharded DTensors vs the same tensors whole ------------------
        # An unevenly sharded matrix (5 rows on 2 ranks) and even ones; every rank also steps
        # a plain copy of the whole model with the same full gradients: the reference.
        full_shapes = [(5, 3), (4, 2), (6,)]
        inits = [randn(s, 50 + i) for i, s in enumerate(full_shapes)]
        whole = [torch.nn.Parameter(t.clone()) for t in inits]
        sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)]))
                   for t in inits]
        settings = {**ACTIVE, "period": 3}
        reference = ActiveAdamW(whole, **settings)
        subject = ActiveAdamW(sharded, **settings)

        def full_grad(i, step):
            g = randn(full_shapes[i], 7 * step + i)
            if step % 2 == 0:
                g = g + 0.5  # some consistent signs, so that gains grow as well as shrink
            return g

        stats_after = []
        for step in range(1, 11):
            for i, (w, s) in enumerate(zip(whole, sharded)):
                g = full_grad(i, step)
                w.grad = g
                s.grad = distribute_tensor(g, mesh, [Shard(0)])
            reference.step()
            subject.step()
            stats_after.append({"step": step, "sharded": gain_stats(subject),
                                "whole": reference.gain_stats()})
        local_elements = sum(rule.decode_gain(subject.state[p]["gain"].to_local()).numel()
                             for p in sharded)
        results["gain_stats"] = {"history": stats_after, "local_elements": local_elements,
                                 "cache_primed": subject._runtime.distributed_stats is not None}
    except Exception:
        results["worker_error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle, default=str)
        dist.destroy_process_group()


def main() -> int:
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
