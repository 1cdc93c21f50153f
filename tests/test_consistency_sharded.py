"""The cross-rank consistency check on sharded and replicated state, and the gain statistics
of sharded DTensors, with two real processes (gloo).

The worker is tests/scripts/consistency_sharded.py; every rank runs every scenario and writes
what it saw. What must match across ranks is compared (each group's clock and
hyperparameters, the state of tensors every rank holds whole); shards, which legitimately
differ, never are.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hf_utils import SCRIPTS, subprocess_env

pytestmark = pytest.mark.slow  # integration: two processes


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_consistency")
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "consistency_sharded.py"), str(out)], cwd=str(out),
        env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    loaded = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in loaded:
        assert "worker_error" not in rank, rank["worker_error"]
    return loaded


def reported(rank: dict, scenario: str) -> tuple[dict, dict]:
    entry = rank[scenario]
    assert entry["report"]["raised"] is None, entry["report"]
    return entry["report"]["report"], entry["check"]


@pytest.mark.parametrize("scenario,compared", [
    ("replicate_same", [2]),            # Replicate DTensors: their local tensors compared
    ("shard_differ", [0]),              # Shard(0) DTensors whose shards differ
    ("flat_marked", [0]),               # FSDP1-marked flat partitions of per-rank sizes
    ("partition_shapes_differ", [0]),   # unmarked partitions: shapes differ across ranks
    ("equal_partitions_flagged", [0]),  # equal-size partitions, sharded=True (DeepSpeed)
    ("mixed_shard_differs", [1]),       # a shard and a whole tensor: only the latter
])
def test_legitimately_different_shards_raise_no_alarm(ranks, scenario, compared):
    for rank in ranks:
        report, check = reported(rank, scenario)
        assert report["consistent"] is True, report["problems"]
        assert report["world_size"] == 2
        assert report["compared_params"] == compared
        assert check["raised"] is None
        # the clocks are always compared, and agree
        for rows in report["groups"]:
            assert rows[0][0] == rows[1][0] > 0


@pytest.mark.parametrize("scenario,group,what", [
    ("replicate_differ", 0, "checksums"),       # a Replicate DTensor differs
    ("mixed_plain_differs", 0, "checksums"),    # the whole tensor beside a shard differs
    ("equal_partitions_unflagged", 0, "checksums"),  # unmarked equal-size: why the flag
    ("hyper_differ", 1, "hyperparameter 'lr_high'"),
    ("shard_hyper_differ", 0, "hyperparameter 'period'"),  # sharded group: still compared
    ("shard_extra_step", 0, "period clock"),    # sharded: the clock still compared
    ("flat_marked_extra_step", 0, "period clock"),
])
def test_what_must_match_is_reported(ranks, scenario, group, what):
    for rank in ranks:
        report, check = reported(rank, scenario)
        assert report["consistent"] is False
        assert list(report["problems"]) == [str(group)]  # JSON keys
        assert any(what in problem for problem in report["problems"][str(group)])
        assert check["raised"] == "RuntimeError"
        assert f"param group(s) [{group}]" in check["message"]
        assert what in check["message"]
        assert "optimizer.step()" in check["message"]
    if scenario == "hyper_differ":
        (problem,) = ranks[0][scenario]["report"]["report"]["problems"]["1"]
        assert "0.5" in problem and "0.75" in problem
        # group 0 has the same settings and state on both ranks
        rows = ranks[0][scenario]["report"]["report"]["groups"][0]
        assert rows[0] == rows[1]


def test_sharded_gain_stats_are_the_whole_tensors(ranks):
    """``distributed.gain_stats`` on Shard(0) DTensors (one unevenly sharded: 5 rows on 2
    ranks) equals the statistics of the same gains held whole, at every step, on both
    ranks: each rank holds about half the elements and reports all of them."""
    stats = [rank["gain_stats"] for rank in ranks]
    assert sorted(s["local_elements"] for s in stats) == [13, 16]  # 29 elements in all
    for rank_stats in stats:
        changed = False
        for entry in rank_stats["history"]:
            (sharded,), (whole,) = entry["sharded"], entry["whole"]
            assert sharded["elements"] == whole["elements"] == 29
            for key in ("min", "max"):
                assert sharded[key] == whole[key], (entry["step"], key)
            assert sharded["mean"] == pytest.approx(whole["mean"], rel=1e-12)
            # whole["median"] may be read from a histogram (stats.HIST_BINS): its bin's
            # middle, within 2 ** -8 of the exact median
            assert sharded["median"] == pytest.approx(whole["median"], rel=2**-7)
            changed = changed or whole["max"] != whole["min"]
        assert changed  # the gains did move
    assert stats[0]["history"] == stats[1]["history"]


def test_sharded_boundary_counts_are_the_whole_tensors(ranks):
    for rank in ranks:
        for entry in rank["gain_stats"]["history"]:
            (sharded,), (whole,) = entry["sharded"], entry["whole"]
            for key in ("grew", "shrank", "nonfinite"):
                assert sharded[key] == whole[key], (entry["step"], key)
