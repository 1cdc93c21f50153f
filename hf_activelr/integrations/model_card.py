"""Model cards for checkpoints trained with ActiveLR, in the Hub's own format.

One renderer, two sources: a live ``ActiveTrainer`` (``create_model_card``, hence
``push_to_hub``) and a saved checkpoint folder (``hf-activelr card DIR``): both are reduced to
the same inputs, the log history, the training arguments, the optimizer state dict and the
run record that ActiveTrainer saves (``activelr_run.json``: command, task, model, data).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from importlib import resources

import torch

from ..optim import rule

RUN_RECORD = "activelr_run.json"
TASKS = {
    "causal-lm": ("causal_lm.md.j2", "text-generation", "Causal language modelling"),
    "image-classification": ("image_classification.md.j2", "image-classification",
                             "Image classification"),
    "lora-adapter": ("lora_adapter.md.j2", None, "LoRA fine-tuning (peft adapter)"),
}
_HIDDEN_GROUP_KEYS = ("params", "param_names", "gain_changes")
_METRIC_NAMES = {"eval_loss": "loss", "perplexity": "perplexity", "eval_accuracy": "accuracy"}


def infer_task(config: dict | None, is_adapter: bool) -> str:
    if is_adapter:
        return "lora-adapter"
    architectures = " ".join((config or {}).get("architectures") or [])
    if "ImageClassification" in architectures:
        return "image-classification"
    return "causal-lm"


def final_results(log_history: list[dict]) -> dict:
    """The last evaluation in the log history (perplexity derived from the eval loss)."""
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    if not evaluations:
        return {}
    last = evaluations[-1]
    results = {key: last[key] for key in ("eval_loss", "eval_accuracy") if key in last}
    if "perplexity" in last:
        results["perplexity"] = last["perplexity"]
    elif "eval_loss" in last and "eval_accuracy" not in last:
        results["perplexity"] = math.exp(min(last["eval_loss"], 50.0))
    return results


def layer_type(name: str) -> str:
    """``model.layers.3.attn.q.weight`` -> ``model.layers.*.attn.q.weight``."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def gain_rows(optimizer_state: dict) -> list[dict]:
    """Gain statistics per layer type (per param group when names are unknown)."""
    by_type: dict[str, list[torch.Tensor]] = {}
    for index, group in enumerate(optimizer_state.get("param_groups", [])):
        names = group.get("param_names") or [f"group {index}"] * len(group["params"])
        for param_id, name in zip(group["params"], names):
            state = optimizer_state["state"].get(param_id, {})
            if "gain" in state:
                key = layer_type(name)
                gain = rule.decode_gain(state["gain"]).reshape(-1) * group.get("gain_init", 1.0)
                by_type.setdefault(key, []).append(gain)
    rows = []
    for name, gains in sorted(by_type.items()):
        flat = torch.cat(gains).float()
        rows.append({
            "name": name, "elements": flat.numel(), "min": _fmt(flat.min().item()),
            "median": _fmt(flat.median().item()), "mean": _fmt(flat.double().mean().item()),
            "max": _fmt(flat.max().item()),
            "below": f"{(flat < 1).double().mean().item():.1%}",
            "above": f"{(flat > 1).double().mean().item():.1%}",
        })
    return rows


def boundary_changes(optimizer_state: dict) -> list[dict]:
    changes = []
    for index, group in enumerate(optimizer_state.get("param_groups", [])):
        counts = group.get("gain_changes")
        if counts and counts.get("elements"):
            changes.append({
                "group": index, "step": group.get("active_step"),
                "grew": f"{counts['grew'] / counts['elements']:.1%}",
                "shrank": f"{counts['shrank'] / counts['elements']:.1%}",
            })
    return changes


def optimizer_table(optimizer_state: dict) -> tuple[list[dict], list[str]]:
    groups = [
        {key: _fmt(value) for key, value in group.items() if key not in _HIDDEN_GROUP_KEYS}
        for group in optimizer_state.get("param_groups", [])
    ]
    keys = sorted({key for group in groups for key in group})
    return groups, keys


def build_card(
    *, log_history, training_args: dict, optimizer_state: dict, run: dict,
    optimizer_class: str = "", model_config: dict | None = None, is_adapter=False,
    repo_id: str | None = None, sweep_table: str | None = None,
):
    """A ``huggingface_hub.ModelCard`` from the run's records."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    from jinja2 import Environment, FileSystemLoader

    task = run.get("task") or infer_task(model_config, is_adapter)
    template, pipeline_tag, task_title = TASKS[task]
    optim_name = str(run.get("optim") or training_args.get("optim") or "unknown")
    model_name = run.get("model_name") or repo_id or pathlib.Path(
        training_args.get("output_dir") or "model").name
    dataset = run.get("data")
    base_model = run.get("base_model")
    results = final_results(log_history)
    eval_results = [
        EvalResult(task_type=pipeline_tag or "text-classification",
                   dataset_type=dataset or "custom",
                   dataset_name=dataset or "custom", metric_type=_METRIC_NAMES[key],
                   metric_value=float(value), task_name=task_title)
        for key, value in results.items() if key in _METRIC_NAMES
    ]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="peft" if is_adapter else "transformers",
        tags=["activelr", "hf-activelr", optim_name, task],
        pipeline_tag=pipeline_tag,
        base_model=base_model if (is_adapter or base_model) else None,
        eval_results=eval_results or None,
    )
    groups, keys = optimizer_table(optimizer_state)
    training = {
        key: training_args[key] for key in (
            "learning_rate", "lr_scheduler_type", "num_train_epochs", "max_steps",
            "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "bf16", "fp16",
        ) if key in training_args
    }
    steps = [entry.get("step") for entry in log_history if "step" in entry]
    if steps:
        training["optimizer steps"] = max(steps)
    environment = Environment(
        loader=FileSystemLoader(str(resources.files("hf_activelr.integrations") / "templates")),
        keep_trailing_newline=True,
    )
    body = environment.get_template(template).render(
        model_name=model_name, task_title=task_title,
        summary=run.get("summary") or f"A {task_title.lower()} model trained with ActiveLR.",
        base_model=base_model, dataset=dataset,
        extra_facts={k: _fmt(v) for k, v in (run.get("facts") or {}).items()},
        optimizer={"name": optim_name, "class": optimizer_class or run.get("optimizer_class", ""),
                   "groups": groups, "rows": keys},
        training=training, results={k: _fmt(v) for k, v in results.items()},
        gains=gain_rows(optimizer_state), boundary_changes=boundary_changes(optimizer_state),
        sweep_table=sweep_table, command=run.get("command"), repo_id=repo_id or model_name,
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def _latest_checkpoint(directory: pathlib.Path) -> pathlib.Path:
    if (directory / "trainer_state.json").exists():
        return directory
    checkpoints = sorted(directory.glob("checkpoint-*"),
                         key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit()
                         else -1)
    if not checkpoints:
        raise FileNotFoundError(
            f"{directory} has no trainer_state.json and no checkpoint-* folder: "
            "pass a folder saved by the Trainer"
        )
    return checkpoints[-1]


def card_from_checkpoint(directory, repo_id=None, sweep_table=None):
    """Render the card of a saved checkpoint (or the latest ``checkpoint-*`` inside)."""
    directory = _latest_checkpoint(pathlib.Path(directory))
    trainer_state = json.loads((directory / "trainer_state.json").read_text())
    training_args = {}
    if (directory / "training_args.bin").exists():
        # Our own file, written by the Trainer: a pickled TrainingArguments.
        args = torch.load(directory / "training_args.bin", weights_only=False)
        training_args = args.to_dict()
    optimizer_state = {}
    if (directory / "optimizer.pt").exists():
        optimizer_state = torch.load(directory / "optimizer.pt", map_location="cpu",
                                     weights_only=False)
    run = {}
    for candidate in (directory / RUN_RECORD, directory.parent / RUN_RECORD):
        if candidate.exists():
            run = json.loads(candidate.read_text())
            break
    config = None
    if (directory / "config.json").exists():
        config = json.loads((directory / "config.json").read_text())
    is_adapter = (directory / "adapter_config.json").exists()
    if is_adapter and "base_model" not in run:
        adapter = json.loads((directory / "adapter_config.json").read_text())
        run = {**run, "base_model": adapter.get("base_model_name_or_path")}
    card = build_card(
        log_history=trainer_state.get("log_history", []), training_args=training_args,
        optimizer_state=optimizer_state, run=run, model_config=config, is_adapter=is_adapter,
        repo_id=repo_id, sweep_table=sweep_table,
    )
    return card, directory
