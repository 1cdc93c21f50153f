"""Data-parallel training on 2 CPU processes (gloo): every rank ends with the same parameters
and gains, and they match a 1-process run with the same global batch.

The worker is tests/scripts/train_ddp.py (tiny GPT-2, stock Trainer, ``active_adamw_paper`` with the
default one-epoch period, ``fused=false``); it saves ``rank{N}.pt`` per process.

Launchers: ``torchrun`` (``python -m torch.distributed.run``) and ``accelerate launch
--multi_gpu`` (on a CPU-only machine this starts torch.distributed.run with gloo).
``accelerate launch --cpu --num_processes 2`` is not used: with no mpirun hostfile, accelerate's
"simple launcher" starts ONE process for ``--cpu`` whatever ``--num_processes`` says.
"""

from __future__ import annotations

import runpy
import sys

import pytest
import torch
from hf_utils import (
    SCRIPTS,
    assert_close_masked,
    console_script,
    one_thread,  # noqa: F401  (an autouse fixture: one torch thread in this module)
    run_command,
)

pytestmark = pytest.mark.slow  # integration: subprocesses, training runs

SCRIPT = SCRIPTS / "train_ddp.py"
EXAMPLES = 16
GLOBAL_BATCH = 4
EPOCHS = 2
PERIOD = 4  # 16 examples / global batch 4: 4 updates per epoch, on 1 or 2 processes


def worker_args(output_dir, per_device_batch: int) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none",
        "--disable_tqdm", "true", "--save_strategy", "no", "--seed", "0",
        "--optim", "active_adamw_paper", "--optim_args", "fused=false",
        "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
        "--num_train_epochs", str(EPOCHS), "--num_train_examples", str(EXAMPLES),
        "--per_device_train_batch_size", str(per_device_batch),
        "--logging_steps", "1",
    ]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, monkeypatch_module):
    """The 1-process reference (global batch 4), run in this process."""
    out = tmp_path_factory.mktemp("single")
    monkeypatch_module.setattr(sys, "argv", [str(SCRIPT), *worker_args(out, GLOBAL_BATCH)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return torch.load(out / "rank0.pt", weights_only=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def launch_command(launcher: str) -> list[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    exe = console_script("accelerate")
    if exe is None:
        pytest.skip("accelerate's console script is not installed")
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_agree_with_each_other_and_with_one(tmp_path, launcher, single_process):
    out = tmp_path / "ddp"
    run_command(
        [*launch_command(launcher), str(SCRIPT), *worker_args(out, GLOBAL_BATCH // 2)],
        cwd=tmp_path, timeout=300,
    )
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]

    for rank, record in enumerate(ranks):
        assert record["rank"] == rank and record["world_size"] == 2 and record["distributed"]
        assert record["global_step"] == EPOCHS * PERIOD
        # the epoch period counts this process's batches: 16 / 2 ranks / batch 2 = 4
        assert record["period"] == [PERIOD, PERIOD]
        assert record["active_step"] == [EPOCHS * PERIOD] * 2

    # every rank holds the same parameters and gains, bit for bit
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["raw_gains"], ranks[1]["raw_gains"], rtol=0, atol=0)

    # and match one process with the same global batch (up to summation order), except the
    # elements whose true gradient is zero (see hf_utils.zero_gradient_mask)
    single = single_process
    assert single["world_size"] == 1 and single["period"] == [PERIOD, PERIOD]
    assert single["global_step"] == EPOCHS * PERIOD
    assert_close_masked(ranks[0]["params"], single["params"], atol=1e-5, rtol=1e-5,
                        what="params")
    assert_close_masked(ranks[0]["gains"], single["gains"], atol=0.0, what="gains")
    gains = torch.cat([g.flatten() for g in single["gains"].values()])
    assert (gains != 1).any() and (gains > 1).any() and (gains < 1).any()
