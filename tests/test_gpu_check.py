"""benchmarks/gpu_check.py: its helpers, and (slow) the whole check on CPU, quick, in a
subprocess, as CI runs it: tables, JSON keys, the fused path equal to the single-tensor one."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_activelr as hal

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- sizes ------------------------------------------------------------------------------------


def test_plan_sizes(gc):
    full, quick = gc.plan("cuda", False), gc.plan("cuda", True)
    assert full["step"]["layers"] == 12 and full["train"]["layers"] == 12  # GPT-2 small
    assert (full["step"]["vocab"], full["step"]["width"]) == (50257, 768)
    assert full["train"]["steps"] == 200 and full["train"]["warmup_steps"] == 20
    assert full["train"]["bf16"] and full["train"]["seq_len"] >= 512
    assert quick["train"]["layers"] == 2 and quick["train"]["steps"] == 30
    assert not gc.plan("cpu", True)["train"]["bf16"]
    for device in ("cuda", "cpu"):
        for is_quick in (False, True):
            sizes = gc.plan(device, is_quick)
            assert 0 < sizes["train"]["warmup_steps"] < sizes["train"]["steps"]
            # whole periods paired: the paired mean counts every boundary once per period
            assert sizes["step"]["pairs"] % gc.ROW_PERIOD == 0
            assert set(sizes["fused"]["dtypes"]) == {"float32", "bfloat16"}
    with pytest.raises(ValueError, match="cuda or cpu"):
        gc.plan("mps", False)


def test_cpu_quick_is_smaller_than_cpu(gc):
    quick, full = gc.plan("cpu", True), gc.plan("cpu", False)
    assert quick["train"]["steps"] < full["train"]["steps"]
    assert quick["step"]["layers"] <= full["step"]["layers"]
    assert quick["fused"]["bfloat16_cases"] is not None and full["fused"]["bfloat16_cases"] is None


# -- pure helpers -----------------------------------------------------------------------------


def test_markdown_table(gc):
    table = gc.markdown_table(["a", "b"], [[1, None], ["x", 2.5]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 |  |", "| x | 2.5 |"]
    with pytest.raises(ValueError, match="2 columns"):
        gc.markdown_table(["a", "b"], [[1]])


def test_verdict(gc):
    assert gc.verdict(1.3, 1.3) == "PASS" and gc.verdict(1.31, 1.3) == "FAIL"
    assert gc.verdict(0.97, 0.97, higher_is_better=True) == "PASS"
    assert gc.verdict(0.9, 0.97, higher_is_better=True) == "FAIL"
    assert gc.verdict(None, 1.3) == "n/a" and gc.verdict(math.nan, 1.3) == "n/a"


def test_compare_identical_within_and_beyond_tolerance(gc):
    single = [torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64),
              torch.ones(2, 2, dtype=torch.float64)]
    same = gc.compare([t.clone() for t in single], single, rtol=1e-5, atol=1e-6)
    assert same == {"max_abs": 0.0, "max_rel": 0.0, "tolerance_used": 0.0, "within": True,
                    "finite": True}
    close = gc.compare([single[0] + torch.tensor([1e-6, 0.0, 0.0], dtype=torch.float64),
                        single[1]], single,
                       rtol=1e-5, atol=1e-6)
    assert close["within"] and 0 < close["tolerance_used"] < 1
    assert close["max_abs"] == pytest.approx(1e-6, rel=1e-3)
    assert close["max_rel"] == pytest.approx(1e-6, rel=1e-3)
    far = gc.compare([single[0], single[1] * 1.01], single, rtol=1e-5, atol=1e-6)
    assert not far["within"] and far["tolerance_used"] > 1
    assert far["max_rel"] == pytest.approx(0.01, rel=1e-3)


def test_compare_relative_difference_skips_zero_references_and_flags_nonfinite(gc):
    out = gc.compare([torch.tensor([0.5, 1.0])], [torch.tensor([0.0, 1.0])], rtol=0, atol=1)
    assert out["max_abs"] == 0.5 and out["max_rel"] == 0.0 and out["within"]
    bad = gc.compare([torch.tensor([math.nan])], [torch.tensor([1.0])], rtol=1, atol=1)
    assert not bad["finite"] and not bad["within"]
    assert gc.compare([torch.zeros(0)], [torch.zeros(0)], rtol=0, atol=0)["within"]
    with pytest.raises(ValueError, match="shape"):
        gc.compare([torch.zeros(2)], [torch.zeros(3)], rtol=0, atol=0)


def test_compare_bf16_against_its_tolerance(gc):
    single = torch.tensor([1.0, -0.5, 4.0], dtype=torch.bfloat16)
    one_ulp = torch.tensor([1 + 2**-7, -0.5 - 2**-8, 4.0], dtype=torch.bfloat16)  # bf16 ulps
    assert not torch.equal(one_ulp, single)
    assert gc.compare([one_ulp], [single], **gc.TOLERANCES["bfloat16"])["within"]
    assert not gc.compare([one_ulp], [single], **gc.TOLERANCES["float32"])["within"]


def test_throughput_and_ratio(gc):
    assert gc.steady_samples_per_second(180, 32, 9.0) == pytest.approx(640.0)
    assert gc.steady_samples_per_second(0, 32, 1.0) is None
    assert gc.steady_samples_per_second(10, 32, 0.0) is None
    assert gc.ratio(1.0, 2.0) == 0.5 and gc.ratio(None, 2.0) is None and gc.ratio(1.0, 0) is None
    assert gc.fmt(None) == "n/a" and gc.fmt(1.234, ".1f", "x") == "1.2x"


def test_fused_cases_cover_the_issue(gc):
    cases = gc.fused_cases()
    assert {cls for _, _, cls, _ in cases} == {hal.ActiveAdamW, hal.ActiveSGD, hal.ActiveRAdam,
                                              hal.ActiveAdaBelief, hal.ActiveAdaBound}
    options = [opts for _, _, _, opts in cases]
    assert any(o.get("significance") for o in options)
    assert any(not o.get("significance") for o in options)
    assert {o.get("zero_sum", "hold") for o in options} == {"hold", "flip"}
    assert any(o.get("amsgrad") for o in options) and any(o.get("nesterov") for o in options)
    assert any(o.get("momentum") and not o.get("nesterov") for o in options)
    for _, _, cls, opts in cases:  # every case is valid at the section's period
        cls([torch.nn.Parameter(torch.zeros(2))], **{**opts, "period": gc.FUSED_PERIOD})
    assert gc.FUSED_STEPS > 3 * gc.FUSED_PERIOD - 1  # three boundaries crossed


def test_run_path_single_tensor_is_deterministic(gc):
    cls, options = hal.ActiveAdamW, dict(zero_sum="flip")
    first = gc.run_path(cls, options, False, torch.float32, torch.device("cpu"), [(3, 2), (4,)])
    again = gc.run_path(cls, options, False, torch.float32, torch.device("cpu"), [(3, 2), (4,)])
    for a, b in zip(first[0] + first[1], again[0] + again[1]):
        assert torch.equal(a, b)
    assert any((gain != 1).any() for gain in first[1])  # boundaries crossed, gains moved


def test_time_boundary_step_ends_on_a_boundary(gc):
    params = [torch.nn.Parameter(torch.randn(4))]
    params[0].grad = torch.randn(4)
    active = hal.ActiveAdamW(params, period=4)
    active.step()
    assert gc.time_boundary_step(active, torch.device("cpu")) >= 0
    assert active.param_groups[0]["active_step"] % 4 == 0
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    assert gc.time_boundary_step(plain, torch.device("cpu")) is None


def test_trainer_kwargs_are_the_registry_defaults(gc):
    kwargs = gc.trainer_kwargs("active_adamw", torch.device("cpu"))
    for key, value in hal.preset_kwargs("significant").items():
        assert kwargs[key] == value
    assert kwargs.get("fused") is None  # the class picks the path (compiled where it wins)


def test_token_data(gc):
    data = gc.TokenData(rows=5, seq_len=7, vocab=11, seed=3)
    assert len(data) == 5
    item = data[2]
    assert item["input_ids"].shape == (7,) and torch.equal(item["input_ids"], item["labels"])
    assert int(data.tokens.min()) >= 0 and int(data.tokens.max()) < 11
    assert torch.equal(data.tokens, gc.TokenData(rows=5, seq_len=7, vocab=11, seed=3).tokens)


def _results(gc):
    return {
        "environment": {"date": "2026-01-01T00:00:00+00:00", "device": "cuda",
                        "device_name": "NVIDIA H200", "cuda": "13.0", "torch": "2.13.0",
                        "transformers": "5.0", "triton": "3.6.0", "hf_activelr": "0.1.0",
                        "python": "3.12"},
        "quick": False,
        "step_cost": {"parameters": 124439808, "tensors": 148, "blocks": 12, "width": 768,
                      "pairs": 100, "row_period": 10, "rows": [
                          {"name": "torch AdamW fused", "peer": "adamw", "median_ms": 1.0,
                           "first_step_ms": 5.0, "first_boundary_ms": None,
                           "state_bytes_per_param": 8.0, "ratio_median": 1.0, "ratio_q25": None,
                           "ratio_q75": None, "ratio_mean": 1.0, "boundary_step_ms": None,
                           "target": None, "verdict": None},
                          {"name": "active_adamw", "peer": "adamw", "median_ms": 1.2,
                           "first_step_ms": 9000.0, "first_boundary_ms": 2000.0,
                           "state_bytes_per_param": 20.0, "ratio_median": 1.2,
                           "ratio_q25": 1.1, "ratio_q75": 1.3, "ratio_mean": 1.5,
                           "boundary_step_ms": 4.0, "target": 1.3, "verdict": "PASS"}]},
        "fused_vs_single": {"period": 3, "steps": 10, "shapes": [(2,)],
                            "tolerances": gc.TOLERANCES, "passed": 1, "all_pass": True,
                            "rows": [{"optimizer": "ActiveAdamW", "options": "x",
                                      "dtype": "float32", "max_abs": 0.0, "max_rel": 0.0,
                                      "tolerance_used": 0.0, "finite": True,
                                      "gain_mismatches": 0, "gain_elements": 2,
                                      "gains_moved": True, "fused_seconds": 1.0,
                                      "verdict": "PASS"}]},
        "training": {"model": {"layers": 12, "width": 768, "heads": 12, "vocab": 50257},
                     "seq_len": 512, "batch": 32, "steps": 200, "warmup_steps": 20,
                     "bf16": True, "throughput_ratio": 0.96, "memory_ratio": 1.1,
                     "target": 0.97, "verdict": "FAIL", "runs": {
                         name: {"optim": name, "optimizer": "X", "path": "fused",
                                "steady_samples_per_second": 100.0, "timed_steps": "21-200",
                                "warmup_seconds": 3.0, "trainer_samples_per_second": 90.0,
                                "peak_memory_gib": 10.0, "final_loss": 3.0,
                                "mean_train_loss": 4.0, "losses": [4.0, 3.0]}
                         for name in ("adamw_torch_fused", "active_adamw")}},
        "section_seconds": {"step": 10.0},
    }


def test_report_and_targets(gc, tmp_path):
    results = _results(gc)
    targets = gc.targets(results)
    assert [t["verdict"] for t in targets] == ["PASS", "PASS", "FAIL"]
    assert targets[1]["value"] == "1/1"
    text = gc.report(results)
    for heading in ("# GPU check (full, cuda)", "## 1. Step cost", "## 2. Fused (Triton)",
                    "## 3. GPT-2 training", "## Targets"):
        assert heading in text
    assert "NVIDIA H200" in text and "triton 3.6.0" in text and "| 0.960x |" in text
    gc.write(results, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["targets"] == json.loads(json.dumps(targets))
    assert (tmp_path / "out" / "gpu_check.md").read_text() == text


# -- the whole check, CPU quick (what CI runs) ------------------------------------------------


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end >= 0 else None]


@pytest.mark.slow
def test_cpu_quick_run(tmp_path):
    out = tmp_path / "gpu_check"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--output_dir", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    markdown = (out / "gpu_check.md").read_text()
    # stdout: the report (the Trainer's own log lines are off; a library may still print)
    assert result.stdout.rstrip().endswith(markdown.strip())
    for heading in ("## 1. Step cost", "## 2. Fused (Inductor C++) vs single-tensor",
                    "## 3. GPT-2 training", "## Targets"):
        assert heading in markdown
    fused_md = _section(markdown, "## 2. Fused")
    assert "| PASS |" in fused_md and "FAIL" not in fused_md

    data = json.loads((out / "gpu_check.json").read_text())
    assert {"environment", "quick", "plan", "step_cost", "fused_vs_single", "training",
            "targets", "section_seconds"} <= set(data)
    env = data["environment"]
    for key in ("date", "device_name", "torch", "transformers", "triton"):
        assert env[key]
    assert env["device"] == "cpu" and data["quick"] is True

    rows = {row["name"]: row for row in data["step_cost"]["rows"]}
    assert len(rows) == 6
    assert {"torch AdamW fused", "torch SGD fused"} <= set(rows)
    assert any(name.startswith("active_adamw: Trainer default") for name in rows)
    assert any(name.startswith("ActiveLR(torch AdamW fused)") for name in rows)
    for row in rows.values():
        assert row["median_ms"] > 0 and row["state_bytes_per_param"] > 0
        assert row["ratio_median"] > 0 and row["ratio_mean"] > 0
    targeted = [row for row in rows.values() if row["target"] is not None]
    assert len(targeted) == 2 and all(row["verdict"] in ("PASS", "FAIL") for row in targeted)
    assert all(row["first_boundary_ms"] is not None for row in targeted)
    assert rows["torch AdamW fused"]["state_bytes_per_param"] == 8.0

    fused = data["fused_vs_single"]
    assert fused["all_pass"] and fused["passed"] == len(fused["rows"])
    assert {row["dtype"] for row in fused["rows"]} == {"float32", "bfloat16"}
    assert {row["optimizer"] for row in fused["rows"]} == {
        "ActiveAdamW", "ActiveSGD", "ActiveRAdam", "ActiveAdaBelief", "ActiveAdaBound"}
    for row in fused["rows"]:
        assert row["gain_mismatches"] == 0 and row["gains_moved"] and row["tolerance_used"] <= 1

    training = data["training"]
    assert set(training["runs"]) == {"active_adamw", "adamw_torch_fused"}
    for run in training["runs"].values():
        assert run["steady_samples_per_second"] > 0 and math.isfinite(run["final_loss"])
        assert run["peak_memory_gib"] is None  # CPU
    assert training["runs"]["active_adamw"]["optimizer"] == "ActiveAdamW"
    assert training["runs"]["adamw_torch_fused"]["path"] == "fused"
    assert training["throughput_ratio"] > 0
    assert [t["verdict"] for t in data["targets"]][2] == "PASS"  # fused == single
    assert len(data["targets"]) == 4
