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


@pytest.mark.slow
def test_trainer_writes_a_valid_card(trained):
    trainer, output = trained
    card = ModelCard.load(output / "README.md")
    state = json.loads((output / "checkpoint-8" / "trainer_state.json").read_text())
    optimizer_state = torch.load(output / "checkpoint-8" / "optimizer.pt", weights_only=False)
    _check_card(card, state, optimizer_state)
    assert "ActiveAdamW" in card.text


@pytest.mark.slow
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


# --- security: loading a checkpoint runs no pickled code; secrets stay off the card ---------


class _RunsCode:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, creating the marker file
    (any callable would do, e.g. ``os.system``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _checkpoint_copy(trained, tmp_path):
    import shutil

    _, output = trained
    copy = tmp_path / "checkpoint-8"
    shutil.copytree(output / "checkpoint-8", copy)
    return copy


@pytest.mark.parametrize("filename", ["optimizer.pt", "training_args.bin"])
def test_a_checkpoint_pickle_that_runs_code_is_refused(trained, tmp_path, filename):
    from hf_activelr.integrations import model_card

    checkpoint = _checkpoint_copy(trained, tmp_path)
    model_card.card_from_checkpoint(checkpoint)  # the untouched copy renders
    marker = tmp_path / "code_ran"
    torch.save({"state": {}, "param_groups": [], "payload": _RunsCode(marker)},
               checkpoint / filename)
    error = None
    try:
        model_card.card_from_checkpoint(checkpoint)
    except Exception as caught:  # checked below, after the marker
        error = caught
    assert not marker.exists(), f"unpickling {filename} ran its code"
    assert isinstance(error, model_card.UnsafeCheckpointError), repr(error)
    assert str(checkpoint / filename) in str(error) and "io.open" in str(error)


def test_checkpoint_files_are_loaded_weights_only(trained, tmp_path, monkeypatch):
    from hf_activelr.integrations.model_card import card_from_checkpoint

    checkpoint = _checkpoint_copy(trained, tmp_path)
    calls, load = [], torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    card, _ = card_from_checkpoint(checkpoint)
    assert calls == [True, True]  # training_args.bin, optimizer.pt
    assert "transformer.h.*.attn.c_attn.weight" in card.text  # the optimizer state was read
    assert "| learning_rate | 0.001 |" in card.text  # and the training arguments


HF_TOKEN = "hf_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9"


@pytest.mark.parametrize("argv, expected", [
    (["python", "train.py", "--hub_token", HF_TOKEN, "--lr", "1e-3"],
     "python train.py --hub_token <redacted> --lr 1e-3"),
    (["python", "train.py", f"--hub_token={HF_TOKEN}", "--lr", "1e-3"],
     "python train.py --hub_token=<redacted> --lr 1e-3"),
    (["python", "t.py", "--api-key", "abc", "--wandb_secret=s3", "--db_password", "pw",
      "--use_auth_token", "--credentials_file", "c.json", "--output_dir", "out"],
     "python t.py --api-key <redacted> --wandb_secret=<redacted> --db_password <redacted> "
     "--use_auth_token --credentials_file <redacted> --output_dir out"),
    # a token-shaped value is redacted whatever the option, also inside a value
    (["python", "t.py", "--note", HF_TOKEN, f"--optim_args=a=1,b={HF_TOKEN}"],
     "python t.py --note <redacted> --optim_args=a=1,b=<redacted>"),
    # not secrets: tokenizer names and token counts are needed to reproduce the run
    (["python", "t.py", "--tokenizer_name", "gpt2", "--max_new_tokens", "20", "--push_to_hub"],
     "python t.py --tokenizer_name gpt2 --max_new_tokens 20 --push_to_hub"),
    # a recorded command string (old run records, the recipes' " ".join(sys.argv))
    (f"python train.py --hub_token {HF_TOKEN} --seed 0",
     "python train.py --hub_token <redacted> --seed 0"),
])
def test_redact_command(argv, expected):
    from hf_activelr.integrations.model_card import redact_command

    assert redact_command(argv) == expected
    assert redact_command(redact_command(argv)) == expected  # idempotent


def _card_trainer(trained, output_dir, **kwargs):
    """A trainer sharing the trained model and its log history, writing into output_dir."""
    trainer, _ = trained
    args = TrainingArguments(str(output_dir), optim="active_adamw", use_cpu=True, report_to=[],
                             hub_token=None)
    fresh = hf_activelr.ActiveTrainer(model=trainer.model, args=args, **kwargs)
    fresh.state.log_history = list(trainer.state.log_history)
    return fresh


def test_secrets_on_the_command_line_stay_off_the_card(trained, tmp_path, monkeypatch):
    argv = ["train.py", "--hub_token", HF_TOKEN, "--wandb_api_key=k3y", "--seed", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", *argv])  # what the run sees
    trainer = _card_trainer(trained, tmp_path / "out")
    card = trainer.create_model_card()
    written = [card.text, (tmp_path / "out" / "README.md").read_text(),
               (tmp_path / "out" / "activelr_run.json").read_text()]
    for text in written:
        assert HF_TOKEN not in text and "k3y" not in text
    assert "python train.py --hub_token <redacted> --wandb_api_key=<redacted> --seed 0" in card.text


def test_an_old_run_record_with_a_secret_renders_redacted(trained, tmp_path):
    from hf_activelr.integrations.model_card import RUN_RECORD, card_from_checkpoint

    checkpoint = _checkpoint_copy(trained, tmp_path)
    record = json.loads((checkpoint / RUN_RECORD).read_text())
    record["command"] = f"python train.py --hub_token={HF_TOKEN} --seed 0"
    (checkpoint / RUN_RECORD).write_text(json.dumps(record))
    card, _ = card_from_checkpoint(checkpoint)
    assert HF_TOKEN not in card.text
    assert "python train.py --hub_token=<redacted> --seed 0" in card.text


# --- create_model_card: the stock transformers signature --------------------------------------


def test_create_model_card_has_the_stock_signature():
    """A transformers upgrade that changes the stock signature fails here."""
    import inspect

    from transformers import Trainer

    def described(function):
        return [(p.name, p.kind, p.default)
                for p in inspect.signature(function).parameters.values()]

    ours = described(hf_activelr.ActiveTrainer.create_model_card)
    assert ours[-1] == ("sweep_table", inspect.Parameter.KEYWORD_ONLY, None)
    assert ours[:-1] == described(Trainer.create_model_card)


STOCK_CARD_ARGS = {
    "language": "en", "license": "apache-2.0", "tags": ["my-tag", "another-tag"],
    "model_name": "my-model", "finetuned_from": "openai-community/gpt2",
    "tasks": "text-generation", "dataset_tags": "Salesforce/wikitext",
    "dataset": "WikiText", "dataset_args": "wikitext-2-raw-v1",
}


@pytest.mark.parametrize("how", ["positional", "keywords"])
def test_create_model_card_puts_the_stock_arguments_in_the_card(trained, tmp_path, how):
    trainer = _card_trainer(trained, tmp_path / "out")
    if how == "positional":  # the stock order
        card = trainer.create_model_card(*STOCK_CARD_ARGS.values())
    else:
        card = trainer.create_model_card(**STOCK_CARD_ARGS)
    for loaded in (card, ModelCard.load(tmp_path / "out" / "README.md")):
        data = loaded.data.to_dict()
        assert data["language"] == ["en"]
        assert data["license"] == "apache-2.0"
        assert {"my-tag", "another-tag", "activelr", "active_adamw"} <= set(data["tags"])
        assert data["base_model"] == "openai-community/gpt2"
        assert data["datasets"] == ["Salesforce/wikitext"]
        name, results = model_index_to_eval_results(data["model-index"])
        assert name == "my-model" and results
        for result in results:
            assert result.task_type == "text-generation"
            assert result.dataset_type == "Salesforce/wikitext"
            assert result.dataset_name == "WikiText"
            assert result.dataset_config == "wikitext-2-raw-v1"
        text = loaded.text
        assert text.startswith("\n# my-model\n") or "\n# my-model\n" in text
        assert "| base model | openai-community/gpt2 |" in text
        assert "| data | WikiText (Salesforce/wikitext, configuration wikitext-2-raw-v1) |" in text
        assert "| language | en |" in text and "| license | apache-2.0 |" in text


def test_create_model_card_rejects_a_bad_argument_type(trained, tmp_path):
    trainer = _card_trainer(trained, tmp_path / "out")
    with pytest.raises(TypeError, match="tags"):
        trainer.create_model_card(tags=3)


@pytest.mark.parametrize("orig_argv, expected", [
    (["/usr/bin/python3.11", "-m", "hf_activelr.run", "run_clm.py", "--optim", "active_adamw",
      "--hub_token", "hf_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1x"],
     "python -m hf_activelr.run run_clm.py --optim active_adamw --hub_token <redacted>"),
    (["/opt/venv/bin/python", "/opt/venv/bin/hf-activelr", "run", "train.py", "--seed", "1"],
     "hf-activelr run train.py --seed 1"),
    (["python3", "-u", "train.py"], "python -u train.py"),
])
def test_the_recorded_command_is_the_one_that_started_the_run(tmp_path, monkeypatch,
                                                              orig_argv, expected):
    """``python -m hf_activelr.run SCRIPT`` is recorded as such (sys.argv alone would lose the
    ``-m hf_activelr.run``, and ``python SCRIPT --optim active_adamw`` is refused)."""
    from hf_utils import make_trainer

    from hf_activelr import ActiveTrainer

    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    trainer = make_trainer(tmp_path, trainer_cls=ActiveTrainer)
    assert trainer.run_info["command"] == expected
