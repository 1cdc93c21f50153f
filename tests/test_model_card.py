"""Model cards: written by ActiveTrainer and by `hf-activelr card`, valid Hub metadata, numbers
equal to what the Trainer recorded."""

import json
import math
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import hf_activelr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    output = tmp_path_factory.mktemp("card_run")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                       n_head=2))
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        str(output), optim="active_adamw",
        optim_args="fused=false,period=2,lr_high=0.5,significance=1",
        per_device_train_batch_size=4, max_steps=8, logging_steps=2, eval_strategy="steps",
        eval_steps=8, save_steps=8, use_cpu=True, report_to=[], learning_rate=1e-3, seed=0,
    )
    trainer = hf_activelr.ActiveTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=data,
        run_info={"task": "causal-lm", "data": "random tokens", "model_name": "tiny-gpt2"},
    )
    trainer.train()
    trainer.create_model_card()
    return trainer, output


def _check_card(card: ModelCard, trainer_state: dict, optimizer_state: dict):
    data = card.data.to_dict()
    assert {"activelr", "hf-activelr", "active_adamw"} <= set(data["tags"])
    assert data["library_name"] == "transformers"
    _, results = model_index_to_eval_results(data["model-index"])  # validates the structure
    metrics = {r.metric_type: r.metric_value for r in results}
    last_eval = [e for e in trainer_state["log_history"] if "eval_loss" in e][-1]
    assert metrics["loss"] == pytest.approx(last_eval["eval_loss"], rel=1e-12)
    assert metrics["perplexity"] == pytest.approx(math.exp(last_eval["eval_loss"]), rel=1e-12)
    group = optimizer_state["param_groups"][0]
    text = card.text
    for key in ("lr_high", "lr_low", "period"):
        assert f"| `{key}` | {group[key]:.4g}" in text if isinstance(group[key], float) \
            else f"| `{key}` | {group[key]}" in text
    assert "transformer.h.*.attn.c_attn.weight" in text  # gains per layer type
    assert "arXiv:2301.10133" in text


def test_trainer_writes_a_valid_card(trained):
    trainer, output = trained
    card = ModelCard.load(output / "README.md")
    state = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())
    optimizer_state = torch.load(output / "checkpoint-8" / "optimizer.pt", weights_only=False)
    _check_card(card, state, optimizer_state)
    assert "ActiveAdamW" in card.text


def test_cli_renders_card_from_checkpoint(trained, tmp_path):
    _, output = trained
    target = tmp_path / "README.md"
    done = subprocess.run(
        [sys.executable, "-m", "hf_activelr.cli", "card", str(output), "--output", str(target)],
        capture_output=True, text=True, check=True,
    )
    assert str(target) in done.stdout
    card = ModelCard.load(target)
    checkpoint = output / "checkpoint-8"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    _check_card(card, state, torch.load(checkpoint / "optimizer.pt", weights_only=False))
    assert "tiny-gpt2" in card.text and "ActiveAdamW" in card.text


def test_push_to_hub_writes_the_card_before_uploading(trained, monkeypatch):
    """Uploading needs the network (none here): everything up to the upload call is checked;
    the upload itself goes through huggingface_hub's upload_folder, as the Trainer does it."""
    trainer, output = trained
    uploads = []

    class FakeApi:
        def upload_folder(self, **kwargs):
            uploads.append({**kwargs, "card": (output / "README.md").read_text()})

    (output / "README.md").unlink()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: FakeApi())
    trainer.hub_model_id = "user/tiny-gpt2"
    trainer.push_to_hub(commit_message="test")
    assert len(uploads) == 1
    assert uploads[0]["repo_id"] == "user/tiny-gpt2"
    assert uploads[0]["folder_path"] == str(output)
    assert "activelr" in uploads[0]["card"] and "ActiveAdamW" in uploads[0]["card"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        from hf_activelr.integrations.model_card import card_from_checkpoint

        card_from_checkpoint(tmp_path)
