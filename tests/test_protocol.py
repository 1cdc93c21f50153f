"""The quality protocol (``hf-activelr sweep --protocol``): its plan, its tasks, its report."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from hf_activelr.experiments import protocol, sweep
from hf_activelr.experiments.sweep_tasks import get_task


def test_published_plan_covers_every_task_schedule_and_the_half_decade_grid():
    points = protocol.plan(peers=False)
    assert {p.task for p in points} == {"vit-digits", "gpt2-text", "resnet-digits",
                                        "lora-minilm", "gpt2-long"}
    assert {p.schedule for p in points} == {"linear", "constant"}
    for task in ("lora-minilm", "gpt2-long"):  # the constant schedule on every task
        assert {p.schedule for p in points if p.task == task} == {"linear", "constant"}
    # Without finished runs, seed 0 only: later seeds go where seed 0 says they decide.
    assert {p.seed for p in points} == {0}
    assert protocol.ADAMW_LRS == (1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2,
                                  0.1)
    active = {p.lr for p in points if p.task == "gpt2-text" and p.batch_size == 32
              and p.optim == "active_adamw"}
    assert active == set(protocol.ADAMW_LRS)
    sgd = {p.lr for p in points if p.optim == "active_sgd:momentum=0.9"}
    assert sgd == set(protocol.SGD_LRS)
    assert {p.batch_size for p in points if p.task == "gpt2-text"} == {32, 512}
    # The retired two-sided preset is gone; the default, the paper's rule and AdamW remain.
    for task in ("vit-digits", "gpt2-text", "resnet-digits", "lora-minilm", "gpt2-long"):
        optims = {p.optim for p in points if p.task == task and "sgd" not in p.optim}
        assert optims == set(protocol.ADAMW_OPTIMS), task
    assert len(points) == len(set(points))


def test_the_start_scale_control_is_planned_where_the_grid_lacks_it():
    """AdamW at gain_init * lr beside every lr of an Active optimizer: from the grid where it
    holds the point (a start of 10 ** -0.5), else run for it."""
    start = protocol.gain_init_of("active_adamw")
    points = protocol.plan(peers=False, only_tasks=["vit-digits"], only_schedules=["linear"])
    base = {p.lr for p in points if p.optim == "adamw_torch" and p.batch_size == 32}
    for lr in protocol.ADAMW_LRS:
        assert any(math.isclose(b, lr * start, rel_tol=1e-2) for b in base), lr
    on_grid = protocol.control_lrs("active_adamw:gain_init=0.316", protocol.ADAMW_LRS)
    assert on_grid[1e-3] == 3.16e-4 and on_grid[1e-5] == 3.16e-6
    assert protocol.control_lrs("active_adamw_paper", protocol.ADAMW_LRS) == {}


def test_peers_run_at_their_defaults_and_on_their_grids():
    points = protocol.plan(only_tasks=["vit-digits", "lora-minilm"], only_schedules=["linear"])
    installed = set(sweep.installed_peers())
    for peer in protocol.PEERS:
        if peer.name not in installed:
            continue
        grid = {p.lr for p in points if p.optim == peer.name and p.task == "vit-digits"
                and p.batch_size == 32}
        assert grid == {*peer.grid, peer.default_lr}
        lora = {p.lr for p in points if p.optim == peer.name and p.task == "lora-minilm"}
        assert lora == {peer.default_lr}
    assert not {p.optim for p in points if p.batch_size == 512} & set(protocol.PEER_NAMES)


def test_later_seeds_go_where_the_first_says_they_decide():
    arm = next(a for a in protocol.arms() if a.task == "gpt2-text" and a.batch_size is None)
    low_start = "active_adamw:gain_init=0.31622776601683794"  # gains from 10 ** -0.5
    records = []
    for lr in arm.lrs:
        records.append(_record("gpt2-text", "adamw_torch", lr, 0, 2.0 + abs(math.log10(lr) + 2.5)))
        records.append(_record("gpt2-text", "active_adamw", lr, 0,
                               2.0 + abs(math.log10(lr) + 1.5)))
        records.append(_record("gpt2-text", low_start, lr, 0, 2.0 + abs(math.log10(lr) + 1.5)))
    optims = [*protocol.ADAMW_OPTIMS, low_start]
    decisive = protocol.decisive_lrs(records, arm, "linear", optims)
    # The base's best (3.16e-3) and its neighbours, the optimizer's best (3.16e-2), 1e-3.
    assert set(decisive["active_adamw"]) == {1e-3, 3.16e-3, 1e-2, 3.16e-2}
    assert set(decisive[low_start]) == {1e-3, 3.16e-3, 1e-2, 3.16e-2}
    assert {1e-3, 3.16e-3, 1e-2} <= set(decisive["adamw_torch"])
    assert protocol.gain_init_of("active_adamw") == 1.0  # the default: its control is the base
    start = protocol.gain_init_of(low_start)
    assert any(math.isclose(lr, 3.16e-2 * start, rel_tol=2e-2)
               for lr in decisive["adamw_torch"])  # the control of the low start's best
    points = protocol.plan(peers=False, only_tasks=["gpt2-text"], only_schedules=["linear"],
                           records=records, candidates=[low_start])
    later = {(p.optim, p.lr) for p in points if p.seed == 2 and p.batch_size == 32}
    assert later == {(o, lr) for o, lrs in decisive.items() for lr in lrs}
    # The paper's rule has no seed-0 runs here: the base's neighbourhood and 1e-3 only.
    assert set(decisive["active_adamw_paper"]) == {1e-3, 3.16e-3, 1e-2}
    assert protocol.decisive_lrs([], arm, "linear", ["adamw_torch"]) == {}


def test_quick_plan_is_small_and_candidates_join_their_family():
    quick = protocol.plan(quick=True, candidates=["active_adamw:significance=3",
                                                  "active_sgd:momentum=0.9,period=5"])
    assert protocol.estimate_hours(protocol.plan(quick=True)) < 10 / 60
    assert {p.schedule for p in quick} == {"linear"}
    sgd_arm = {p.optim for p in quick if p.task == "resnet-digits"}
    assert "active_sgd:momentum=0.9,period=5" in sgd_arm
    assert "active_adamw:significance=3" not in sgd_arm
    assert "active_adamw:significance=3" in {p.optim for p in quick if p.task == "gpt2-text"}
    with pytest.raises(ValueError, match="significance"):
        protocol.plan(quick=True, candidates=["active_adamw:significance=-1"])


def _record(task, optim, lr, seed, loss, *, batch=32, schedule="linear", diverged=False,
            health=None):
    return {"task": task, "optim": optim, "lr": lr, "batch_size": batch, "seed": seed,
            "epochs": 1, "schedule": schedule, "eval_loss": loss, "diverged": diverged,
            "train_wall_s": 1.0, "gain_health": health or [], "chance_loss": 4.0}


def test_summary_measures_sensitivity_width_and_the_start(tmp_path):
    records = []
    grid = (1e-4, 3.16e-4, 1e-3, 3.16e-3)
    adamw = {1e-4: 3.0, 3.16e-4: 2.2, 1e-3: 2.0, 3.16e-3: 2.5}
    active = {1e-4: 2.6, 3.16e-4: 2.1, 1e-3: 2.01, 3.16e-3: 2.04}
    for seed, noise in ((0, -0.01), (1, 0.01)):
        for lr in grid:
            records.append(_record("gpt2-text", "adamw_torch", lr, seed, adamw[lr] + noise))
            records.append(_record("gpt2-text", "active_adamw:gain_init=0.316", lr, seed,
                                   active[lr] + noise, health=[[10, 0.316, 0, 0],
                                                               [20, 0.5, 0.01, 0.02]]))
    records.append(_record("gpt2-text", "adamw_torch", 1e-1, 0, 9.0, diverged=True))
    (block,) = protocol.summarize(records)
    assert block["arm"] == "gpt2-text (linear)" and block["best_lr"] == 1e-3
    assert math.isclose(block["tolerance"], torch.tensor([0.99, 1.01]).std().item(),
                        rel_tol=1e-6)
    assert math.isclose(block["task_best"], 2.0)
    rows = {row["optim"]: row for row in block["rows"]}
    mine, base = rows["active_adamw:gain_init=0.316"], rows["adamw_torch"]
    assert math.isclose(mine["vs_base"], 0.01, abs_tol=1e-9)
    assert mine["within_tolerance"]  # 0.01 within the base's seed std (0.0141)
    # LR sensitivity: the mean over the grid of the loss above the task's best; the base's
    # diverged point at 0.1 counts as the uniform guess (4.0), not as its loss.
    assert math.isclose(mine["sensitivity"], (0.6 + 0.1 + 0.01 + 0.04) / 4, abs_tol=1e-9)
    assert base["sensitivity"] is not None and base["diverged_runs"] == 1
    # Width: points within 0.05 of the base's best (2.0): two of the default's, one of AdamW's.
    assert mine["width"] == 1.0 and base["width"] == 0.5
    # The start-scale control: AdamW one grid point down (3.16e-4 for 1e-3, ...).
    assert mine["control_lrs"][1e-3] == 3.16e-4
    start = protocol.beats_start(mine, base["points"], block["tolerance"])
    # 1e-4 has no control run; at 3.16e-3 the default (2.04) is worse than AdamW at 1e-3.
    assert start == {"better": 2, "worse": 1, "even": 0}
    table = protocol.targets([block], ["active_adamw:gain_init=0.316"])
    assert "no (2 better, 1 worse of 3)" in table
    assert "0.50 from 0.32 at lr 0.0001" in table  # the gain grew at the smallest lr
    text = protocol.report(records, tmp_path)
    assert "start-scale control" in text and "LR sensitivity" in text
    assert (tmp_path / "protocol.json").exists()
    assert (tmp_path / "sweep_gpt2-text_linear.png").exists()


def test_base_best_lr_is_never_a_point_where_a_seed_diverged():
    """The base's best LR, and every row's best, skip an LR where any seed diverged (the
    surviving seeds' mean is not a result); where every LR has one, the best is inf."""
    records = []
    for seed in (0, 1):
        records += [
            _record("gpt2-text", "adamw_torch", 1e-3, seed, 2.0 + 0.01 * seed),
            # Seed 1 beats every other run here, but seed 0 diverged.
            _record("gpt2-text", "adamw_torch", 1e-2, seed, 9.0 if seed == 0 else 1.5,
                    diverged=seed == 0),
            _record("gpt2-text", "active_adamw", 1e-3, seed, 9.0, diverged=True),
            _record("gpt2-text", "active_adamw", 1e-2, seed, 9.0, diverged=seed == 1),
        ]
    (block,) = protocol.summarize(records)
    assert block["best_lr"] == 1e-3
    rows = {row["optim"]: row for row in block["rows"]}
    assert math.isclose(rows["adamw_torch"]["best"], 2.005)
    assert rows["active_adamw"]["best"] == math.inf
    # Both of the default's points count as a uniform guess (4.0) in its sensitivity.
    assert math.isclose(rows["active_adamw"]["sensitivity"], 4.0 - 2.005)


def test_a_loss_beyond_tolerance_is_reported_worse():
    records = [_record("vit-digits", "adamw_torch", 1e-3, s, 0.10 + 0.01 * s) for s in (0, 1)]
    records += [_record("vit-digits", "active_adamw", 1e-3, s, 0.2) for s in (0, 1)]
    (block,) = protocol.summarize(records)
    row = next(r for r in block["rows"] if r["optim"] == "active_adamw")
    assert not row["within_tolerance"]
    assert "no (+0.095)" in protocol.targets([block])


def test_gain_health_counts_elements_at_the_bounds():
    from hf_activelr import ActiveAdamW

    weight = torch.nn.Parameter(torch.zeros(4))
    optimizer = ActiveAdamW([weight], lr=1e-3, period=1, gain_min=0.1, gain_max=10.0,
                            gain_init=0.5)
    assert sweep.gain_health(optimizer) is None  # no state yet
    weight.grad = torch.ones(4)
    optimizer.step()
    # Real gains 0.1 (at the floor), 0.5 (unset: gain_init), 2.0, 10 (at the cap).
    optimizer.state[weight]["gain"].copy_(torch.tensor([0.2, 0.0, 4.0, 20.0]))
    health = sweep.gain_health(optimizer)
    assert health == {"median": 0.5, "at_min": 0.25, "at_max": 0.25}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet-digits", "lora-minilm", "gpt2-long"])
def test_protocol_tasks_build_offline(name):
    task = get_task(name)
    train, held_out, info = task.build_data()
    model = task.build_model(info)
    batch = {key: torch.stack([train[i][key] for i in range(2)]) for key in train[0]}
    output = model(**batch)
    assert torch.isfinite(output.loss) and output.loss.item() < 2 * info["chance_loss"]
    assert len(held_out) > 0
    if name == "gpt2-long":
        assert task.max_steps >= 3000
        assert len(train) * 128 > 1_000_000  # the whole corpus, not the 300k of gpt2-text
        # An epoch is longer than the run: the paper's epoch period would never move a gain.
    if name == "lora-minilm":
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n or "classifier" in n for n in trainable)


@pytest.mark.slow
def test_resnet_task_trains_with_active_sgd():
    record = sweep.run_point(sweep.Point("resnet-digits", "active_sgd:momentum=0.9", 0.1, 32,
                                         0, 2, "linear"))
    assert record["eval_loss"] < 0.5 and not record["diverged"]
    assert record["gain_health"] and record["gain_health"][-1][0] == record["steps"]


@pytest.mark.slow
def test_cli_protocol_runs_resumes_and_reports(tmp_path):
    args = [sys.executable, "-m", "hf_activelr.cli", "sweep", "--protocol", "--quick",
            "--tasks", "resnet-digits", "--output_dir", str(tmp_path)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    text = (tmp_path / "protocol.md").read_text()
    assert "resnet-digits (linear, SGD)" in text and "sgd_momentum" in text
    assert "Targets for the default" in text
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "runs already done" in again.stdout
    assert "[1/" not in again.stdout  # nothing ran again
    summary = json.loads((tmp_path / "protocol.json").read_text())["summary"]
    assert summary[0]["base"] == "sgd_momentum"


def test_the_whole_protocol_fits_in_8_hours_on_2_cores():
    """Seed 0 everywhere, then the later seeds where a seed-0 result (best at 1e-3, peers at
    their default multiplier) says they decide: under 8 hours at the measured run times."""
    first = protocol.plan()
    records = [_record(p.task, p.optim, p.lr, 0, 1 + abs(math.log10(
        p.lr / (1.0 if p.optim in ("prodigy", "dadapt_adam") else 1e-3))),
        batch=p.batch_size, schedule=p.schedule) for p in first]
    everything = protocol.plan(records=records)
    assert {p.seed for p in everything} == set(protocol.PUBLISHED_SEEDS)
    assert protocol.estimate_hours(everything) < 8.0
    # The long runs confirm only the default against AdamW.
    later = {p.optim for p in everything if p.task == "gpt2-long" and p.seed > 0}
    assert later == {"active_adamw", "adamw_torch"}
