"""Shared by the sharded-training tests (test_fsdp2, test_deepspeed): the worker
(tests/scripts/train_sharded.py), its arguments, the three runs each test module compares
(uninterrupted, resumed, one process), and the comparisons of gain statistics."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from hf_utils import SCRIPTS, run_command, zero_gradient_mask

SCRIPT = SCRIPTS / "train_sharded.py"
EXAMPLES = 24
GLOBAL_BATCH = 4
EPOCHS = 2
STEPS = EPOCHS * EXAMPLES // GLOBAL_BATCH  # 12
PERIOD = 3
SAVE_STEPS = 5  # checkpoints at 5 and 10: mid-period, running sums nonzero
# active_adamw is the "significant" preset; its significance=2 needs period > 4, so 1.5 here
OPTIM_ARGS = f"fused=false,period={PERIOD},significance=1.5"
FSDP_CONFIG = {
    "fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT",
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": ["GPT2Block"],
    "reshard_after_forward": True,
}
STATS = ("min", "median", "mean", "max", "grew", "shrank")
# a histogram median (stats.HIST_BINS): its bin's mean or middle, within a bin of the exact one
MEDIAN_REL = 2 ** (1 / 128) - 1  # within a bin (stats.HIST_BINS_PER_OCTAVE)


def torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def worker_args(output_dir, per_device_batch: int) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "0", "--optim", "active_adamw",
        "--optim_args", OPTIM_ARGS, "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
        "--num_train_epochs", str(EPOCHS), "--num_train_examples", str(EXAMPLES),
        "--per_device_train_batch_size", str(per_device_batch), "--logging_steps", "1",
        "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS),
    ]


def fsdp_args(tmp) -> list[str]:
    config = tmp / "fsdp_config.json"
    config.write_text(json.dumps(FSDP_CONFIG))
    return ["--fsdp", "full_shard", "--fsdp_config", str(config)]


def load(folder, ranks=2) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


def train_logs(record) -> list[dict]:
    return [entry for entry in record["log_history"] if "loss" in entry]


def whole_model_stats(record, group: int) -> dict:
    """min / median (lower) / mean / max of a group's gains, computed here from the gathered
    gains: on the float32 gains relative to gain_init, then scaled, as the optimizer does."""
    gains = torch.cat([record["gains"][name].reshape(-1).float()
                       for name in record["group_names"][group]])
    scale = record["gain_init"][group]
    return {"min": float(gains.min()) * scale, "median": float(gains.median()) * scale,
            "mean": float(gains.double().mean()) * scale, "max": float(gains.max()) * scale,
            "elements": gains.numel()}


def assert_stats_close(sharded: dict, single: dict, group: int, record,
                       prefix: str = "", counts: bool = True) -> None:
    """Gain statistics of a sharded run (FSDP2, ZeRO) vs one process. Group 0 holds no
    zero-gradient element: equal (the means to float64 summation order, the median to a
    histogram bin). Group 1 holds the attention key biases (n of its N elements, see
    hf_utils.zero_gradient_mask): each can have grown or shrunk differently, so the shares
    differ by at most n / N and the mean by at most n / N times the range of the gains.
    ``counts=False``: the figures only, not the boundary's shares (grew, shrank)."""
    get = (lambda s, k: s[f"{prefix}{k}"]) if prefix else (lambda s, k: s[k])
    shares = ("grew", "shrank") if counts else ()
    if group == 0:
        for key in ("min", "max", *shares):
            assert get(sharded, key) == get(single, key), key
        assert get(sharded, "mean") == pytest.approx(get(single, "mean"), rel=1e-9, abs=2e-6)
        assert get(sharded, "median") == pytest.approx(get(single, "median"), rel=MEDIAN_REL)
        return
    names = record["group_names"][group]
    masked = sum(int((~zero_gradient_mask(n, record["gains"][n])).sum()) for n in names)
    total = sum(record["gains"][n].numel() for n in names)
    share = masked / total
    spread = get(sharded, "max") - get(sharded, "min")
    for key in shares:
        assert abs(get(sharded, key) - get(single, key)) <= share + 2e-6, key
    assert abs(get(sharded, "mean") - get(single, "mean")) <= share * spread + 2e-6


def run_trio(tmp, sharding_args: list[str]) -> dict:
    """The uninterrupted sharded run (2 processes), the run resumed from its step-5
    checkpoint, and the 1-process reference (global batch 4, no sharding)."""
    full = tmp / "uninterrupted"
    run_command([*torchrun(), str(SCRIPT), *worker_args(full, GLOBAL_BATCH // 2),
                 *sharding_args], cwd=tmp, timeout=300)
    resumed = tmp / "resumed"
    run_command([*torchrun(), str(SCRIPT), *worker_args(resumed, GLOBAL_BATCH // 2),
                 *sharding_args, "--resume_from_checkpoint",
                 str(full / f"checkpoint-{SAVE_STEPS}")], cwd=tmp, timeout=300)
    single = tmp / "single"
    run_command([sys.executable, str(SCRIPT), *worker_args(single, GLOBAL_BATCH)], cwd=tmp,
                timeout=300)
    return {"full": load(full), "resumed": load(resumed), "single": load(single, 1)[0],
            "checkpoint": full / f"checkpoint-{SAVE_STEPS}"}

