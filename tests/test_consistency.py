"""The cross-rank consistency check, with two real processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from reliability_helpers import (
    ADAMW,
    SCRIPTS,
    _env,
    _params,
    _set_grads,
)

from hf_activelr import (
    check_consistent,
    consistency_report,
)

pytestmark = pytest.mark.slow  # integration: two processes



def test_consistency_single_process_is_trivially_consistent():
    params = _params()
    opt = ADAMW(params)
    _set_grads(params, 1)
    opt.step()
    report = check_consistent(opt)
    assert report["consistent"] and report["world_size"] == 1
    assert report["groups"][0][0][0] == 1.0  # the group clock
    with pytest.raises(TypeError, match="no ActiveLR state"):
        consistency_report(torch.optim.SGD(params, lr=0.1))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "reliability_dist.py"), str(out)], cwd=str(out),
        env=_env(), capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert "worker_error" not in rank, rank["worker_error"]
    return ranks


@pytest.mark.parametrize("scenario", ["same", "wrapper_same"])
def test_two_ranks_same_gradients_are_consistent(two_rank_results, scenario):
    for rank in two_rank_results:
        report = rank[scenario]["report"]
        assert report["raised"] is None
        assert report["report"]["consistent"] is True
        assert report["report"]["world_size"] == 2
        (group,) = report["report"]["groups"]
        assert group[0] == group[1]
        assert group[0][0] == 5.0  # clock: five steps
        assert group[0][4] > 0  # mid-period: running sums are part of the comparison
        assert rank[scenario]["check"]["raised"] is None


@pytest.mark.parametrize("scenario,bad_groups", [
    ("extra_step", "[0]"), ("different_grads", "[1]"), ("wrapper_different", "[0]"),
    ("negated_grads", "[0]"),
])
def test_two_ranks_diverged_state_is_reported(two_rank_results, scenario, bad_groups):
    for rank in two_rank_results:
        assert rank[scenario]["report"]["report"]["consistent"] is False
        check = rank[scenario]["check"]
        assert check["raised"] == "RuntimeError"
        assert f"param group(s) {bad_groups}" in check["message"]
        assert "optimizer.step()" in check["message"]
    # The extra step shows in the clocks; different gradients in gains / running sums.
    if scenario == "extra_step":
        (group,) = two_rank_results[0][scenario]["report"]["report"]["groups"]
        assert [row[0] for row in group] == [4.0, 5.0]
    if scenario == "different_grads":
        groups = two_rank_results[0][scenario]["report"]["report"]["groups"]
        assert groups[0][0] == groups[0][1]  # group 0 saw the same gradients
        assert groups[1][0] != groups[1][1]
