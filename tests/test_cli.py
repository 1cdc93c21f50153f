"""Zero-code use: an unmodified ``run_clm.py``-style script (tests/scripts/train_clm.py, which
never imports hf_activelr) trains with ``--optim active_adamw`` only when started through
``python -m hf_activelr.run``, ``hf-activelr run`` or ``accelerate launch -m hf_activelr.run``.
Each run is a subprocess; the script writes ``run_summary.json`` to its output_dir."""

from __future__ import annotations

import json
import math
import sys

import pytest
from hf_utils import SCRIPTS, console_script, run_command

import hf_activelr
from hf_activelr import cli, run

SCRIPT = SCRIPTS / "train_clm.py"

# 10 examples, batch 2: 5 batches per epoch; accumulation 2: ceil(5 / 2) = 3 updates per epoch.
EXAMPLES, BATCH, ACCUMULATION, EPOCHS = 10, 2, 2, 2
UPDATES_PER_EPOCH = 3


def script_args(output_dir, *extra) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none",
        "--disable_tqdm", "true", "--save_strategy", "no", "--logging_steps", "1",
        "--num_train_examples", str(EXAMPLES), "--per_device_train_batch_size", str(BATCH),
        "--gradient_accumulation_steps", str(ACCUMULATION), "--num_train_epochs", str(EPOCHS),
        "--learning_rate", "1e-2", "--seed", "0", *extra,
    ]


def read_summary(output_dir) -> dict:
    return json.loads((output_dir / "run_summary.json").read_text())


def check_epoch_period_run(summary: dict, cls: str = "ActiveAdamW") -> None:
    optimizer = summary["optimizer"]
    assert optimizer["class"] == cls
    assert optimizer["module"].startswith("hf_activelr.")
    batches = summary["train_dataloader_len"]
    assert batches == math.ceil(EXAMPLES / BATCH)
    expected = math.ceil(batches / summary["gradient_accumulation_steps"])
    assert expected == UPDATES_PER_EPOCH  # 5 // 2 would be 2
    assert [g["period"] for g in optimizer["groups"]] == [expected] * len(optimizer["groups"])
    assert summary["global_step"] == EPOCHS * expected
    assert all(g["active_step"] == EPOCHS * expected for g in optimizer["groups"])
    assert math.isfinite(summary["metrics"]["train_loss"])


@pytest.mark.slow
def test_plain_python_rejects_the_active_optim_name(tmp_path):
    """Without hf_activelr the script's own HfArgumentParser refuses the name."""
    result = run_command(
        [sys.executable, str(SCRIPT), *script_args(tmp_path / "out", "--optim", "active_adamw")],
        cwd=tmp_path, check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "argument --optim: invalid choice: 'active_adamw'" in result.stderr
    assert not (tmp_path / "out" / "run_summary.json").exists()


@pytest.mark.slow
def test_python_m_hf_activelr_run(tmp_path):
    out = tmp_path / "out"
    run_command(
        [sys.executable, "-m", "hf_activelr.run", str(SCRIPT),
         *script_args(out, "--optim", "active_adamw_paper", "--optim_args", "fused=false")],
        cwd=tmp_path,
    )
    summary = read_summary(out)
    assert summary["optim"] == "active_adamw_paper"
    check_epoch_period_run(summary)
    assert all(g["fused"] is False for g in summary["optimizer"]["groups"])
    assert (out / "train_results.json").exists()


@pytest.mark.slow
def test_hf_activelr_run_console_script(tmp_path):
    exe = console_script("hf-activelr")
    if exe is None:
        pytest.skip("the hf-activelr console script is not installed")
    out = tmp_path / "out"
    run_command(
        [exe, "run", str(SCRIPT),
         *script_args(out, "--optim", "active_radam",
                      "--optim_args", "period=2,lr_high=0.1,fused=false")],
        cwd=tmp_path,
    )
    summary = read_summary(out)
    assert summary["optimizer"]["class"] == "ActiveRAdam"
    for group in summary["optimizer"]["groups"]:
        assert (group["period"], group["lr_high"]) == (2, 0.1)
    assert summary["global_step"] == EPOCHS * UPDATES_PER_EPOCH


@pytest.mark.slow
def test_hf_activelr_list_console_script(tmp_path):
    exe = console_script("hf-activelr")
    if exe is None:
        pytest.skip("the hf-activelr console script is not installed")
    result = run_command([exe, "list"], cwd=tmp_path)
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert listed == hf_activelr.available_optimizers()
    assert "ActiveAdaBound(lr_high=0.05, lr_low=0.95, amsbound=True)" in result.stdout


@pytest.mark.slow
def test_accelerate_launch_one_process(tmp_path):
    exe = console_script("accelerate")
    if exe is None:
        pytest.skip("accelerate's console script is not installed")
    out = tmp_path / "out"
    run_command(
        [exe, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "hf_activelr.run", str(SCRIPT),
         *script_args(out, "--optim", "active_adamw_paper", "--optim_args", "fused=false")],
        cwd=tmp_path,
    )
    summary = read_summary(out)
    assert summary["world_size"] == 1
    check_epoch_period_run(summary)


# --- in process: the command-line entry points themselves ------------------------------------


def test_cli_list_in_process(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in hf_activelr.available_optimizers():
        assert name in out


def test_run_without_a_script_prints_usage(capsys):
    assert run.main([]) == 2
    assert "hf_activelr.run SCRIPT.py" in capsys.readouterr().out
    assert run.main(["--help"]) == 0


def test_cli_requires_a_command():
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_cli_list_options_prints_every_active_option(capsys):
    from hf_activelr.optim.config import OPTION_NAMES

    assert cli.main(["list", "--options"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert listed == list(OPTION_NAMES)


# --- the script's folder comes first on sys.path, as with `python dir/script.py` -------------


def _script_with_a_sibling(tmp_path):
    """dir/script.py imports dir/helper.py (as run_qa.py imports utils_qa) and reports
    sys.path[0]; run from another folder, so only the script's folder can provide helper."""
    folder = tmp_path / "examples"
    folder.mkdir()
    (folder / "helper.py").write_text("VALUE = 'from the sibling module'\n")
    (folder / "script.py").write_text(
        "import json, sys\n"
        "import helper\n"
        "with open(sys.argv[1], 'w') as handle:\n"
        "    json.dump({'value': helper.VALUE, 'path0': sys.path[0]}, handle)\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return folder, elsewhere


@pytest.mark.slow
def test_python_m_run_puts_the_script_folder_on_sys_path(tmp_path):
    folder, elsewhere = _script_with_a_sibling(tmp_path)
    reports = {}
    for how, command in {
        "python": [sys.executable],  # the reference: what python itself does
        "run": [sys.executable, "-m", "hf_activelr.run"],
    }.items():
        target = tmp_path / f"{how}.json"
        run_command([*command, "../examples/script.py", str(target)], cwd=elsewhere)
        reports[how] = json.loads(target.read_text())
    assert reports["run"] == reports["python"]
    assert reports["run"] == {"value": "from the sibling module", "path0": str(folder.resolve())}


def test_run_script_in_process_puts_the_script_folder_on_sys_path(tmp_path, monkeypatch):
    folder, elsewhere = _script_with_a_sibling(tmp_path)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", list(sys.path))  # run_script changes them, as python does
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.delitem(sys.modules, "helper", raising=False)
    target = tmp_path / "report.json"
    run.run_script("../examples/script.py", [str(target)])
    sys.modules.pop("helper", None)
    assert json.loads(target.read_text()) == {"value": "from the sibling module",
                                              "path0": str(folder.resolve())}
