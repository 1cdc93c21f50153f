"""A training process killed mid-period and resumed from its checkpoint ends identical to
the uninterrupted run (two subprocesses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    SCRIPTS,
    _env,
)

from hf_activelr.optim.rule import decode_gain

pytestmark = pytest.mark.slow  # integration: subprocesses, training runs



def _train_command(output_dir, *extra):
    return [
        sys.executable, "-m", "hf_activelr.run", str(SCRIPTS / "reliability_train.py"),
        "--output_dir", str(output_dir), "--optim", "active_adamw",
        "--optim_args", "fused=false,period=3,significance=1", "--save_steps", "4",
        "--max_steps", "12",
        "--seed", "0", "--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", *extra,
    ]


def _start(command, log: Path, cwd: Path, **env):
    handle = open(log, "w")  # noqa: SIM115 - closed by _finish, after the process ends
    return subprocess.Popen(command, cwd=str(cwd), env=_env(**env), stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True), handle


def _finish(proc, handle, log: Path, timeout=240):
    try:
        proc.wait(timeout=timeout)
    finally:
        handle.close()
    if proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{log.read_text()[-6000:]}")


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    full_dump, resumed_dump, ready = (tmp_path / "full.pt", tmp_path / "resumed.pt",
                                      tmp_path / "ready")
    crash_dir = tmp_path / "crash"
    # The uninterrupted run and the run to be killed, side by side.
    full, full_log = _start(_train_command(tmp_path / "full"), tmp_path / "full.log", tmp_path,
                            RELIABILITY_DUMP=str(full_dump))
    victim, victim_log = _start(
        _train_command(crash_dir), tmp_path / "crash.log", tmp_path,
        RELIABILITY_DUMP=str(tmp_path / "never.pt"), RELIABILITY_HANG_AT="9",
        RELIABILITY_READY=str(ready))
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            if victim.poll() is not None:
                raise AssertionError("the run to be killed ended early:\n"
                                     + (tmp_path / "crash.log").read_text()[-6000:])
            assert time.monotonic() < deadline, "the run never reached step 9"
            time.sleep(0.2)
        # Step 9 (a period boundary) ran in memory only; checkpoint-8 is on disk.
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        victim_log.close()
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "never.pt").exists()
    last = get_last_checkpoint(str(crash_dir))
    assert last is not None and Path(last).name == "checkpoint-8"
    assert not (crash_dir / "checkpoint-12").exists()
    saved = torch.load(Path(last) / "optimizer.pt", weights_only=True)
    assert all(g["active_step"] == 8 for g in saved["param_groups"])  # mid-period (period 3)
    assert any(torch.count_nonzero(s["grad_sum"]) for s in saved["state"].values())

    resumed, resumed_log = _start(_train_command(crash_dir, "--resume_from_checkpoint", last),
                                  tmp_path / "resumed.log", tmp_path,
                                  RELIABILITY_DUMP=str(resumed_dump))
    _finish(full, full_log, tmp_path / "full.log")
    _finish(resumed, resumed_log, tmp_path / "resumed.log")

    expected = torch.load(full_dump, weights_only=True)
    got = torch.load(resumed_dump, weights_only=True)
    assert got["global_step"] == expected["global_step"] == 12
    assert got["active_step"] == expected["active_step"] == [12, 12]
    assert got["optimizer_class"] == "ActiveAdamW" and got["period"] == [3, 3]
    assert set(got["params"]) == set(expected["params"])
    for name, value in expected["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=0, msg=name)
    assert set(got["state"]) == set(expected["state"])
    for name, state in expected["state"].items():
        assert set(got["state"][name]) == set(state), name
        for key, value in state.items():
            torch.testing.assert_close(got["state"][name][key], value, rtol=0, atol=0,
                                       msg=f"{name}.{key}")
    gains = torch.cat([decode_gain(s["gain"]).flatten() for s in expected["state"].values()])
    assert (gains > 1).any() and (gains < 1).any()  # the gains moved: the check is not vacuous
