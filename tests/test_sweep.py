"""``hf-activelr sweep``: planning, resumable runs, reports, peers, and the CLI end to end."""

from __future__ import annotations

import importlib.machinery
import json
import math
import subprocess
import sys

import pytest

from hf_activelr.experiments import sweep
from hf_activelr.experiments.sweep_tasks import SweepTask, available_tasks, get_task, register_task


def test_plan_learning_rates_and_batch_sizes():
    points = sweep.plan(["vit-digits"], ["active_adamw", "adamw_torch"], [1e-4, 1e-2], [0, 1])
    assert len(points) == 8
    assert {p.batch_size for p in points} == {get_task("vit-digits").batch_size}
    linear = sweep.plan(["vit-digits"], ["adamw_torch"], [], [0], batch_sizes=[16, 128],
                        lr=1e-3, lr_scaling="linear")
    assert [(p.batch_size, p.lr) for p in linear] == [(16, 5e-4), (128, 4e-3)]
    root = sweep.plan(["vit-digits"], ["adamw_torch"], [], [0], batch_sizes=[128], lr=1e-3,
                      lr_scaling="sqrt")
    assert math.isclose(root[0].lr, 2e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(optimizers=["adamw_typo"]), "unknown optimizer 'adamw_typo'"),
    (dict(lrs=[-1e-3]), "positive finite"),
    (dict(lrs=[float("nan")]), "positive finite"),
    (dict(batch_sizes=[0]), "positive ints"),
    (dict(lr_scaling="cubic"), "lr_scaling must be one of"),
    (dict(optimizers=["active_adamw:lr_low=2"]), "lr_low"),
    (dict(optimizers=["active_adamw:preset=fast"]), "preset must be one of"),
    (dict(tasks=["mnist"]), "unknown sweep task 'mnist'"),
])
def test_plan_rejects_bad_input_before_training(kwargs, message):
    arguments = dict(tasks=["vit-digits"], optimizers=["adamw_torch"], lrs=[1e-3], seeds=[0])
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        sweep.plan(**arguments)


def test_missing_peer_names_the_package(monkeypatch):
    monkeypatch.setattr(sweep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install prodigyopt"):
        sweep.check_optimizer("prodigy")
    assert sweep.installed_peers() == []
    assert sweep.default_optimizers() == ["active_adamw", "active_adamw_paper", "adamw_torch"]


class _FakePeer:
    """A peer optimizer's signature: typed defaults, untyped ones, no ``**kwargs``."""

    def __init__(self, params, lr=1e-3, d_coef=1.0, slice_p=1, decouple=True, name="adam",
                 betas=(0.9, 0.999), beta3=None):
        pass


class _FakePeerWithKwargs:
    def __init__(self, params, lr=1e-3, **extra):
        pass


@pytest.fixture
def fake_peers(monkeypatch):
    module = type(sys)("fake_peer_module")
    module.__spec__ = importlib.machinery.ModuleSpec("fake_peer_module", None)
    module.FakePeer, module.FakePeerWithKwargs = _FakePeer, _FakePeerWithKwargs
    monkeypatch.setitem(sys.modules, "fake_peer_module", module)
    monkeypatch.setitem(sweep.PEERS, "fake", ("fake_peer_module", "FakePeer", "fake", {}))
    monkeypatch.setitem(sweep.PEERS, "fake_kw", ("fake_peer_module", "FakePeerWithKwargs",
                                                 "fake", {}))


@pytest.mark.parametrize("options, expected", [
    ("", {}),
    ("beta3=", {"beta3": ""}),  # an empty value stays a string: no JSON guess to crash
    ("beta3=tanh", {"beta3": "tanh"}),
    ("beta3=.5", {"beta3": 0.5}),
    ("beta3=1e-3", {"beta3": 1e-3}),
    ("beta3=true", {"beta3": True}),
    ("beta3=none", {"beta3": None}),
    ("beta3=3", {"beta3": 3}),
    ("d_coef=1", {"d_coef": 1.0}),  # typed by the signature's default: a float
    ("decouple=false,name=tanh", {"decouple": False, "name": "tanh"}),
    ("slice_p=2", {"slice_p": 2}),
    ("slice_p=0.5", {"slice_p": 0.5}),  # an int default also takes a float (torch's SGD)
    (" d_coef = 2 , beta3 = none ", {"d_coef": 2.0, "beta3": None}),
])
def test_peer_options_use_the_one_parser(fake_peers, options, expected):
    cls, kwargs = sweep._peer_optimizer(f"fake:{options}", 0.1)
    assert cls is _FakePeer
    assert kwargs == {"lr": 0.1, **expected}
    assert [type(v) for v in kwargs.values()] == [type(v) for v in {"lr": 0.1, **expected}
                                                  .values()]


def test_peer_option_errors_are_clear(fake_peers):
    with pytest.raises(ValueError, match=r"unknown option 'd_cof' for peer 'fake'.*d_coef"):
        sweep._peer_optimizer("fake:d_cof=1", 0.1)
    with pytest.raises(ValueError, match="unknown option 'd_cof' for peer 'fake'"):
        sweep.check_optimizer("fake:d_cof=1")  # before any training
    with pytest.raises(ValueError, match=r"'fake:d_coef=fast': option d_coef='fast': expected a"):
        sweep._peer_optimizer("fake:d_coef=fast", 0.1)
    with pytest.raises(ValueError, match="expected key=value"):
        sweep._peer_optimizer("fake:d_coef", 0.1)
    with pytest.raises(ValueError, match="given twice"):
        sweep._peer_optimizer("fake:d_coef=1,d_coef=2", 0.1)
    # A peer that takes **kwargs accepts any key, its value guessed.
    assert sweep._peer_optimizer("fake_kw:anything=.5", 0.1)[1] == {"lr": 0.1, "anything": 0.5}


def test_builtin_peer_options():
    cls, kwargs = sweep._peer_optimizer("sgd_momentum:weight_decay=1e-4,nesterov=true", 0.1)
    assert kwargs == {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    cls([__import__("torch").nn.Parameter(__import__("torch").zeros(1))], **kwargs)


def _record(optim, lr, seed, loss, diverged=False):
    return {"task": "t", "optim": optim, "lr": lr, "batch_size": 8, "seed": seed,
            "epochs": 1, "eval_loss": loss, "diverged": diverged}


def test_summary_best_worst_spread_and_divergence():
    records = [
        _record("a", 1e-3, 0, 1.0), _record("a", 1e-3, 1, 2.0),
        _record("a", 1e-1, 0, 3.0), _record("a", 1e-1, 1, 5.0),
        _record("b", 1e-3, 0, 0.5), _record("b", 1e-3, 1, 0.5),
        _record("b", 1e-1, 0, float("nan"), diverged=True), _record("b", 1e-1, 1, 0.7),
    ]
    summary = {row["optim"]: row for row in sweep.summarize(records)}
    assert summary["a"]["best"] == 1.5 and summary["a"]["worst"] == 4.0
    assert summary["a"]["spread"] == 2.5 and summary["a"]["diverged_points"] == 0
    assert summary["b"]["diverged_points"] == 1 and summary["b"]["spread"] == math.inf
    table = sweep.markdown(list(summary.values()))
    assert "| a | 1.500 ± 0.500 | 4.000 ± 1.000 | 1.500 | 4.000 | 2.500 |" in table
    assert "diverged (1/2)" in table and "| inf | inf |" in table


def test_summary_best_skips_points_where_a_seed_diverged():
    """A point where any seed diverged is infinite for ``worst`` and no candidate for ``best``
    (its surviving seeds' mean is not a result); every point diverged: best is inf."""
    records = [
        _record("b", 1e-3, 0, 0.5), _record("b", 1e-3, 1, 0.5),
        # The surviving seed's 0.2 beats every other point, but its other seed diverged.
        _record("b", 1e-1, 0, float("nan"), diverged=True), _record("b", 1e-1, 1, 0.2),
        _record("c", 1e-3, 0, 9.0, diverged=True), _record("c", 1e-1, 0, 8.0, diverged=True),
    ]
    summary = {row["optim"]: row for row in sweep.summarize(records)}
    assert summary["b"]["best"] == 0.5 and summary["b"]["worst"] == math.inf
    assert summary["c"]["best"] == math.inf and summary["c"]["worst"] == math.inf
    assert summary["c"]["spread"] == math.inf and summary["c"]["diverged_points"] == 2
    assert "| c | diverged (1/1) | diverged (1/1) | inf | inf | inf |" in sweep.markdown(
        [summary["c"]])


def test_reports_are_standard_json(tmp_path, monkeypatch):
    """Infinite spreads and NaN losses are written as null (Python's Infinity is not JSON),
    and a stored null loss reads back as a diverged run when the sweep resumes."""
    monkeypatch.setattr(sweep, "plot", lambda summary, output_dir: None)
    records = [_record("b", 1e-3, 0, 0.5), _record("b", 1e-1, 0, float("nan"), diverged=True)]
    sweep.write_reports(records, tmp_path)
    text = (tmp_path / "sweep.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in sweep.json"))
    assert report["summary"][0]["spread"] is None and report["runs"][1]["eval_loss"] is None
    point = sweep.Point("vit-digits", "adamw_torch", 1e-1, 32, 0, 20)
    stored = {**records[1], "settings": sweep.resolved_settings("adamw_torch")}
    sweep.write_json(tmp_path / "runs" / f"{point.slug}.json", stored)
    [resumed] = sweep.sweep([point], tmp_path, progress=lambda message: None)
    assert resumed["eval_loss"] == math.inf and resumed["diverged"]


@pytest.mark.slow
def test_registered_task_is_swept():
    base = get_task("vit-digits")
    register_task(SweepTask("vit-digits-short", "test", base.build_data, base.build_model,
                            epochs=0.25, batch_size=64))
    assert "vit-digits-short" in available_tasks()
    record = sweep.run_point(sweep.Point("vit-digits-short", "active_adamw", 1e-3, 64, 0, 0.25))
    assert record["steps"] == 6 and math.isfinite(record["eval_loss"])
    assert record["gain"]["min"] >= 0.001 and record["gain"]["max"] <= 100  # two-sided preset


@pytest.mark.slow
def test_nonfinite_loss_stops_the_run_and_counts_as_diverged():
    record = sweep.run_point(sweep.Point("vit-digits", "adamw_torch", 1e30, 64, 0, 1))
    assert record["diverged"]
    assert record["steps"] < math.ceil(1437 / 64)  # stopped at the first non-finite log


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["prodigy", "dadapt_adam", "schedule_free_adamw"])
def test_peers_train(peer):
    module = {"prodigy": "prodigyopt", "dadapt_adam": "dadaptation",
              "schedule_free_adamw": "schedulefree"}[peer]
    pytest.importorskip(module)
    record = sweep.run_point(sweep.Point("vit-digits", peer, 1.0 if peer != "schedule_free_adamw"
                                         else 1e-3, 64, 0, 1))
    assert math.isfinite(record["eval_loss"]) and record["eval_loss"] < math.log(10)
    assert record["gain"] is None


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hf_activelr.cli", "sweep", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_cli_sweep_is_resumable_and_writes_reports(tmp_path):
    args = ["--tasks", "vit-digits", "--optims", "active_adamw", "adamw_torch",
            "--lrs", "1e-3", "1e-1", "--seeds", "0", "--epochs", "1", "--jobs", "2",
            "--output_dir", str(tmp_path / "out")]
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[4/4]" in first.stdout and "ETA" in first.stdout
    out = tmp_path / "out"
    report = json.loads((out / "sweep.json").read_text())
    assert len(report["runs"]) == 4
    assert {row["optim"] for row in report["summary"]} == {"active_adamw", "adamw_torch"}
    assert (out / "sweep_vit-digits.png").stat().st_size > 10_000
    table = (out / "sweep.md").read_text()
    assert "| vit-digits: final eval loss | lr 0.001 | lr 0.1 | best | worst | spread |" in table
    # A second call redoes nothing; a new learning rate runs only its own points.
    again = _cli(*args[:-2], "--lrs", "1e-3", "1e-1", "1e-2", "--output_dir", str(out),
                 cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 of 6 runs already done" in again.stdout and "[2/2]" in again.stdout
    assert len(json.loads((out / "sweep.json").read_text())["runs"]) == 6
    # Changing what a name stands for (here: its preset's gain_init) redoes its runs only.
    from hf_activelr.integrations import registry

    entry = registry.get("active_adamw")
    stored = json.loads(next((out / "runs" / "vit-digits" / "active_adamw").glob("*.json"))
                        .read_text())
    assert stored["settings"] == entry.defaults
    stored["settings"]["gain_init"] = 0.5
    path = next((out / "runs" / "vit-digits" / "active_adamw").glob("*.json"))
    path.write_text(json.dumps(stored))
    third = _cli(*args, cwd=tmp_path)
    assert "3 of 4 runs already done" in third.stdout and "[1/1]" in third.stdout


@pytest.mark.slow
def test_cli_batch_size_sweep(tmp_path):
    result = _cli("--tasks", "vit-digits", "--optims", "active_adamw", "--batch-sizes", "64",
                  "256", "--lr", "1e-3", "--lr-scaling", "linear", "--seeds", "0",
                  "--epochs", "1", "--jobs", "1", "--output_dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert sorted((r["batch_size"], r["lr"]) for r in runs) == [(64, 2e-3), (256, 8e-3)]
    assert "batch size 64 | batch size 256" in (tmp_path / "sweep.md").read_text()
