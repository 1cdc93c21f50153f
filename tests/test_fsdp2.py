"""FSDP2 on 2 CPU processes (gloo): ``active_adamw`` on a sharded tiny GPT-2, sharded (DCP)
checkpoints, resume, the consistency check at save time, gain statistics of the whole model,
and agreement with one process on the same global batch.

Two paths:

- the Trainer (tests/scripts/train_sharded.py): ``ActiveTrainer`` with ``--fsdp full_shard``
  and an FSDP2 ``--fsdp_config`` (``SHARDED_STATE_DICT``, GPT2Block auto wrap) under
  ``torchrun``. accelerate does not apply FSDP to CPU processes (it drops the plugin without
  a message: ``AcceleratorState.__init__`` in accelerate/state.py switches to
  ``DistributedType.FSDP`` only from accelerator distributed types, and a gloo group on the
  CPU is ``MULTI_CPU``), so the script makes the two assignments that code makes on a GPU
  machine; the rest is accelerate's and transformers' own FSDP2 code (see the script);
- ``fully_shard`` and ``torch.distributed.checkpoint`` directly (tests/scripts/fsdp2_direct.py),
  no Trainer, no accelerate.

Tolerances. Resumed vs uninterrupted: exact (the same operations in the same order on the
same shards; the sharded checkpoint holds every bit of the state). FSDP2 vs one process: the
gradients are averaged across ranks by a reduce-scatter instead of summed in one batch, so
parameters agree to float32 rounding (atol 1e-5, as tests/test_distributed.py), and gains
exactly, except the elements whose true gradient is zero (GPT-2's attention key bias, see
hf_utils.zero_gradient_mask): their period sums are rounding noise, whose signs differ
between mathematically equal runs. Gain statistics: exact where no such element is in the
group (group 0: the weight matrices); in group 1 (biases, LayerNorms) those elements bound
the difference (see ``assert_stats_close``).
"""

from __future__ import annotations

import pytest
import torch
from hf_utils import (
    SCRIPTS,
    assert_close_masked,
    one_thread,  # noqa: F401  (an autouse fixture: one torch thread in this module)
    run_command,
)
from sharded_helpers import (
    PERIOD,
    STATS,
    STEPS,
    assert_stats_close,
    fsdp_args,
    load,
    run_trio,
    torchrun,
    train_logs,
    whole_model_stats,
)

pytestmark = pytest.mark.slow  # integration: subprocesses, training runs

DIRECT = SCRIPTS / "fsdp2_direct.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted FSDP2 run, the run resumed from its step-5 checkpoint, and the
    1-process reference (global batch 4, no FSDP)."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    return run_trio(tmp, fsdp_args(tmp))


# --- the Trainer path --------------------------------------------------------------------


def test_trainer_shards_with_fsdp2_and_saves_sharded_checkpoints(runs):
    ranks = runs["full"]
    for rank, record in enumerate(ranks):
        assert record["rank"] == rank and record["world_size"] == 2
        # on CPU accelerate dropped the plugin; the script restored it (module docstring)
        assert record["fsdp_dropped_on_cpu"] and record["fsdp_enabled"]
        assert record["fsdp_version"] == 2 and record["model_class"].startswith("FSDP")
        assert set(map(tuple, record["placements"].values())) == {("S(0)",)}
        assert record["global_step"] == STEPS and record["active_step"] == [STEPS] * 2
        assert record["period"] == [PERIOD] * 2
    total = sum(g.numel() for g in ranks[0]["gains"].values())
    assert sum(r["local_gain_elements"] for r in ranks) == total  # each rank: its shard
    assert all(0 < r["local_gain_elements"] < total for r in ranks)
    # SHARDED_STATE_DICT: DCP folders, one file per rank, no full optimizer.pt
    checkpoint = runs["checkpoint"]
    for folder in ("optimizer_0", "pytorch_model_fsdp_0"):
        assert sorted(p.name for p in (checkpoint / folder).glob("*.distcp")) == [
            "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "optimizer.pt").exists()


def test_consistency_check_at_save_raises_no_false_alarm(runs):
    """ActiveTrainer runs check_consistent at every save (a raise would have ended the run);
    the recorded reports: the clocks compared and equal, the shards not compared."""
    for run, steps in (("full", [5, 10, 12]), ("resumed", [10, 12])):
        for record in runs[run]:
            assert [r["step"] for r in record["save_reports"]] == steps
            for report in record["save_reports"]:
                assert report["consistent"] is True and report["problems"] == {}
                assert report["world_size"] == 2
                assert report["sharded"] == [True, True]
                assert report["compared_params"] == [0, 0]
                for rows in report["groups"]:
                    assert rows[0][0] == rows[1][0] == report["step"]  # the clocks


def test_resumed_from_sharded_checkpoint_ends_identical(runs):
    full, resumed = runs["full"], runs["resumed"]
    for a, b in zip(full, resumed):
        assert b["global_step"] == STEPS and b["active_step"] == [STEPS] * 2
        for key in ("params", "raw_gains", "grad_sums"):
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
        # the logs after the resume, gain statistics included, are the uninterrupted ones
        assert train_logs(b) == train_logs(a)
        assert b["final_gain_stats"] == a["final_gain_stats"]


def test_trainer_matches_one_process(runs):
    ranks, single = runs["full"], runs["single"]
    assert single["world_size"] == 1 and not single["fsdp_enabled"]
    assert single["global_step"] == STEPS
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    assert_close_masked(ranks[0]["params"], single["params"], atol=1e-5, rtol=1e-5,
                        what="params")
    assert_close_masked(ranks[0]["gains"], single["gains"], atol=0.0, what="gains")
    gains = torch.cat([g.flatten() for g in single["gains"].values()])
    assert (gains != 1).any() and len(gains.unique()) > 2  # the gains moved


def test_trainer_logs_gain_statistics_of_the_whole_model(runs):
    ranks, single = runs["full"], runs["single"]
    # every rank logs the same figures, those of the whole model's gains
    assert train_logs(ranks[0]) == train_logs(ranks[1])
    for group in (0, 1):
        whole = whole_model_stats(ranks[0], group)
        final = ranks[0]["final_gain_stats"][group]
        assert final["elements"] == whole["elements"]
        for key in ("min", "median", "max"):
            assert final[key] == whole[key], key
        assert final["mean"] == pytest.approx(whole["mean"], rel=1e-12)
        last = train_logs(ranks[0])[-1]
        for key in ("min", "median", "mean", "max"):
            assert last[f"gain/group{group}/{key}"] == round(whole[key], 6), key
    # and those of one process on the same global batch, at every step
    fsdp_logs, single_logs = train_logs(ranks[0]), train_logs(single)
    assert [e["step"] for e in fsdp_logs] == [e["step"] for e in single_logs]
    moved = False
    for fsdp_entry, single_entry in zip(fsdp_logs, single_logs):
        for group in (0, 1):
            prefix = f"gain/group{group}/"
            assert {k for k in fsdp_entry if k.startswith(prefix)} == {
                prefix + s for s in STATS}
            assert_stats_close(fsdp_entry, single_entry, group, ranks[0], prefix,
                               counts=False)
        moved = moved or fsdp_entry["gain/group0/max"] != fsdp_entry["gain/group0/min"]
    assert moved
    for group in (0, 1):
        assert_stats_close(ranks[0]["final_gain_stats"][group],
                           single["final_gain_stats"][group], group, ranks[0], counts=False)


def test_trainer_logs_grown_and_shrunk_shares_of_the_whole_model(runs):
    """The boundary's shares (grew, shrank) as one process logs them, at every step."""
    ranks, single = runs["full"], runs["single"]
    for fsdp_entry, single_entry in zip(train_logs(ranks[0]), train_logs(single)):
        for group in (0, 1):
            assert_stats_close(fsdp_entry, single_entry, group, ranks[0],
                               f"gain/group{group}/")


# --- fully_shard and DCP directly --------------------------------------------------------


@pytest.fixture(scope="module")
def direct(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2_direct")
    run_command([*torchrun(), str(DIRECT), str(tmp / "out")], cwd=tmp, timeout=300)
    return load(tmp / "out")


def test_fully_shard_with_dcp_checkpoint_and_resume(direct):
    for rank, record in enumerate(direct):
        assert record["rank"] == rank and record["world_size"] == 2
        assert set(map(tuple, record["placements"].values())) == {("S(0)",)}
        assert record["checkpoint_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        # the check at save (mid-period, after a boundary): clocks compared, shards not
        report = record["save_report"]
        assert report["consistent"] and report["compared_params"] == [0, 0]
        assert [rows[0][0] for rows in report["groups"]] == [4.0, 4.0]
        assert record["final_report"]["consistent"]
        # resumed from the DCP checkpoint: the clock restored, the end identical
        assert record["loaded_active_step"] == [4, 4]
        for key in ("params", "gains"):
            torch.testing.assert_close(record["resumed"][key], record["uninterrupted"][key],
                                       rtol=0, atol=0, msg=key)
        assert record["resumed"]["active_step"] == record["uninterrupted"]["active_step"]
        assert record["resumed_gain_stats"] == record["gain_stats"]
    total = sum(g.numel() for g in direct[0]["uninterrupted"]["gains"].values())
    assert sum(r["local_gain_elements"] for r in direct) == total


def test_fully_shard_matches_one_process(direct):
    """The plain model each rank trained on the whole global batch is the reference."""
    uninterrupted, reference = direct[0]["uninterrupted"], direct[0]["reference"]
    assert_close_masked(uninterrupted["params"], reference["params"], atol=1e-5, rtol=1e-5,
                        what="params")
    assert_close_masked(uninterrupted["gains"], reference["gains"], atol=0.0, what="gains")
    # ActiveAdamW's default gain_init: 1
    record = {**direct[0], "gains": uninterrupted["gains"], "gain_init": [1.0, 1.0]}
    for group in (0, 1):
        stats = record["gain_stats"][group]
        whole = whole_model_stats(record, group)
        assert stats["elements"] == whole["elements"]
        for key in ("min", "median", "max"):
            assert stats[key] == whole[key], key
        assert stats["mean"] == pytest.approx(whole["mean"], rel=1e-12)
        assert_stats_close(stats, record["reference_gain_stats"][group], group, record,
                           counts=False)
    assert direct[0]["gain_stats"] == direct[1]["gain_stats"]
    # optimizer.gain_stats() under FSDP2: the whole model's, not one rank's shard
    assert direct[0]["method_gain_stats"] == direct[0]["gain_stats"]
    assert direct[1]["method_gain_stats"] == direct[1]["gain_stats"]


def test_fully_shard_grown_and_shrunk_shares_match_one_process(direct):
    record = {**direct[0], "gains": direct[0]["uninterrupted"]["gains"]}
    for group in (0, 1):
        assert_stats_close(record["gain_stats"][group], record["reference_gain_stats"][group],
                           group, record)
