"""DeepSpeed ZeRO-2 on 2 CPU processes (gloo): ``active_adamw`` steps each rank's flat fp32
partition of the parameters; ZeRO checkpoints, resume, the consistency check at save time
(which must not compare the partitions), gain statistics of the whole model, and agreement
with one process on the same global batch. Skipped where deepspeed is not installed (it is
no dependency of the package: ``pip install deepspeed`` builds a pure-Python wheel, and its
CPU accelerator uses gloo).

The worker is tests/scripts/train_sharded.py with ``--deepspeed`` and ``--use_cpu``: unlike
FSDP, accelerate applies DeepSpeed to CPU processes as it is (see the script). Tolerances:
as tests/test_fsdp2.py (exact after a resume; to float32 rounding, and exactly for the gains
but the zero-gradient elements, against one process).
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_utils import (
    assert_close_masked,
    one_thread,  # noqa: F401  (an autouse fixture: one torch thread in this module)
)
from sharded_helpers import (
    PERIOD,
    STEPS,
    assert_stats_close,
    run_trio,
    train_logs,
    whole_model_stats,
)

pytestmark = pytest.mark.slow  # integration: subprocesses, training runs

pytest.importorskip("deepspeed")

ZERO_CONFIG = {
    "zero_optimization": {"stage": 2},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,  # DeepSpeed's word for any optimizer not its own
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2")
    config = tmp / "zero2.json"
    config.write_text(json.dumps(ZERO_CONFIG))
    return run_trio(tmp, ["--deepspeed", str(config)])


def test_zero2_partitions_the_optimizer_state(runs):
    ranks = runs["full"]
    for rank, record in enumerate(ranks):
        assert record["rank"] == rank and record["world_size"] == 2
        assert record["deepspeed_enabled"] and not record["fsdp_enabled"]
        assert record["global_step"] == STEPS and record["active_step"] == [STEPS] * 2
        assert record["period"] == [PERIOD] * 2
    # one flat partition per group and rank, half of the group (no padding here)
    sizes = {name: sum(ranks[0]["gains"][n].numel() for n in names)
             for name, names in zip(("group0", "group1"), ranks[0]["group_names"])}
    assert ranks[0]["zero_partitions"] == {k: (v // 2,) for k, v in sizes.items()}
    folder = runs["checkpoint"] / "global_step5"
    assert sorted(p.name for p in folder.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_consistency_check_at_save_compares_no_partition(runs):
    """ActiveTrainer passes ``sharded=True`` under ZeRO (a raise would have ended the run):
    clocks and hyperparameters compared, partitions not. Without it the equal-size
    partitions would be compared as if replicated: a false alarm."""
    for run, steps in (("full", [5, 10, 12]), ("resumed", [10, 12])):
        for record in runs[run]:
            assert [r["step"] for r in record["save_reports"]] == steps
            for report in record["save_reports"]:
                assert report["consistent"] is True and report["compared_params"] == [0, 0]
                for rows in report["groups"]:
                    assert rows[0][0] == rows[1][0] == report["step"]
                unflagged = report["unflagged"]
                assert unflagged["consistent"] is False
                assert unflagged["compared_params"] == [1, 1]


def test_resumed_from_zero_checkpoint_ends_identical(runs):
    for a, b in zip(runs["full"], runs["resumed"]):
        assert b["global_step"] == STEPS and b["active_step"] == [STEPS] * 2
        for key in ("params", "raw_gains", "grad_sums"):
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
        assert train_logs(b) == train_logs(a)
        assert b["final_gain_stats"] == a["final_gain_stats"]


def test_zero2_matches_one_process(runs):
    ranks, single = runs["full"], runs["single"]
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["raw_gains"], ranks[1]["raw_gains"], rtol=0, atol=0)
    assert_close_masked(ranks[0]["params"], single["params"], atol=1e-5, rtol=1e-5,
                        what="params")
    assert_close_masked(ranks[0]["gains"], single["gains"], atol=0.0, what="gains")


def test_zero2_logs_gain_statistics_of_the_whole_model(runs):
    ranks, single = runs["full"], runs["single"]
    assert train_logs(ranks[0]) == train_logs(ranks[1])  # every rank: the same figures
    for group in (0, 1):
        whole = whole_model_stats(ranks[0], group)
        final = ranks[0]["final_gain_stats"][group]
        assert final["elements"] == whole["elements"]  # both partitions, not one
        for key in ("min", "median", "max"):
            assert final[key] == whole[key], key
        assert final["mean"] == pytest.approx(whole["mean"], rel=1e-12)
        assert_stats_close(final, single["final_gain_stats"][group], group, ranks[0])
        for sharded_entry, single_entry in zip(train_logs(ranks[0]), train_logs(single)):
            assert_stats_close(sharded_entry, single_entry, group, ranks[0],
                               prefix=f"gain/group{group}/")
