"""Model cards for checkpoints trained with ActiveLR, in the Hub's own format.

One renderer, two sources: a live ``ActiveTrainer`` (``create_model_card``, hence
``push_to_hub``) and a saved checkpoint folder (``hf-activelr card DIR``): both are reduced to
the same inputs, the log history, the training arguments, the optimizer state dict and the
run record that ActiveTrainer saves (``activelr_run.json``: command, task, model, data).

A checkpoint folder may come from anyone (a Hub download): its pickles are unpickled with
``weights_only=True`` (no code runs), and secrets on the recorded command line are redacted
before they reach a card, which ``push_to_hub`` publishes.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import math
import pathlib
import pickle
import re
import shlex
from importlib import resources

import torch

from ..optim import rule, stats

RUN_RECORD = "activelr_run.json"
TASKS = {
    "causal-lm": ("causal_lm.md.j2", "text-generation", "Causal language modelling"),
    "image-classification": ("image_classification.md.j2", "image-classification",
                             "Image classification"),
    "lora-adapter": ("lora_adapter.md.j2", None, "LoRA fine-tuning (peft adapter)"),
}
_HIDDEN_GROUP_KEYS = ("params", "param_names", "gain_changes")
_METRIC_NAMES = {"eval_loss": "loss", "perplexity": "perplexity", "eval_accuracy": "accuracy"}

REDACTED = "<redacted>"
_SECRET_OPTION_WORDS = ("token", "key", "secret", "passw", "auth", "credential")
# Option words that hold one of the above but no secret, and are needed to reproduce a run:
# tokenizer names, token counts (--max_new_tokens), special tokens (--pad_token), authors,
# keywords. Anything else named like a secret is redacted (--api_tokens too): a redacted
# setting costs a rerun a guess, a leaked one costs the account.
_NOT_SECRET_WORDS = re.compile(
    r"tokeni[sz]\w*|(?:max|min|num|new|total)_(?:new_)?tokens"
    r"|(?:pad|eos|bos|unk|sep|cls|mask)_token(?:_ids?)?|authors?|keywords?|keyframes?")
# Credentials inside a URL: scheme://user:password@host.
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# Separators of key=value lists inside one argument (optim_args="a=1,api_key=...").
_LIST_SEPARATOR = re.compile(r"([,;])")
# Values that are secrets whatever the option: Hugging Face user and org tokens, GitHub and
# OpenAI tokens, AWS access key ids.
_SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(?:hf_[A-Za-z0-9]{20,}|api_org_[A-Za-z0-9]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|sk-[A-Za-z0-9_-]{20,}"
    r"|AKIA[0-9A-Z]{16})"
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds a pickle that could run code when loaded; it is not loaded."""


def _is_secret_option(name: str) -> bool:
    name = _NOT_SECRET_WORDS.sub("", name.lstrip("-").lower())
    return any(word in name for word in _SECRET_OPTION_WORDS)


def _redact_arg(arg: str) -> str:
    """One argument with its secrets redacted: after a name that looks like a secret and
    ``=`` (``--hub_token=X``, ``WANDB_API_KEY=X``, ``optim_args=a=1,api_key=X``), in a URL's
    user info, and anything shaped like a known token."""
    name, equals, _ = arg.partition("=")
    if equals and name.startswith("-") and _is_secret_option(name):
        return f"{name}={REDACTED}"  # the whole value, commas included
    pieces = _LIST_SEPARATOR.split(arg)
    for index, piece in enumerate(pieces):
        parts = piece.split("=")
        for at, name in enumerate(parts[:-1]):
            if _is_secret_option(name):
                pieces[index] = "=".join([*parts[:at + 1], REDACTED])
                break
    arg = "".join(pieces)
    arg = _URL_USERINFO.sub(REDACTED + "@", arg)
    return _SECRET_VALUE.sub(REDACTED, arg)


def redact_command(command: str | list[str]) -> str:
    """The command line as a shell string, with secrets replaced by ``<redacted>``: the values
    of options named like a secret (``--hub_token X``, ``--hub_token=X``, ``--api_key``,
    ``--password``, ...; see ``_SECRET_OPTION_WORDS``), of ``NAME=value`` pairs so named
    (``WANDB_API_KEY=...``, also inside a ``key=value,...`` list), a URL's user info
    (``https://user:pw@host``) and anything shaped like a known token (``hf_...``), wherever
    it is.

    ``command`` is an argv list, or a string (a record written before redaction existed)."""
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError:  # e.g. an unbalanced quote from a plain " ".join(argv)
            argv = command.split()
    else:
        argv = [str(arg) for arg in command]
    redacted, secret_next = [], False
    for arg in argv:
        if secret_next and not arg.startswith("-"):  # a flag's next option is not its value
            redacted.append(REDACTED)
            secret_next = False
            continue
        secret_next = arg.startswith("-") and "=" not in arg and _is_secret_option(arg)
        redacted.append(_redact_arg(arg))
    # Quoted for the shell, except the marker (it stands for a value, it is not one).
    return " ".join(
        REDACTED.join(shlex.quote(part) if part else "" for part in arg.split(REDACTED))
        if REDACTED in arg else shlex.quote(arg)
        for arg in redacted
    )


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


layer_type = stats.layer_type  # the card's per-layer rows


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


def string_list(name: str, value) -> list[str]:
    """``value`` (None, a string or a list of strings, as the stock ``create_model_card`` takes
    them) as a list; anything else is an error naming ``name``."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise TypeError(f"{name} must be a string or a list of strings, got {value!r}")


def _datasets(run: dict) -> list[tuple[str | None, str, str | None]]:
    """(Hub id, name, configuration) per dataset, paired by position as transformers pairs
    ``dataset_tags``, ``dataset`` and ``dataset_args``."""
    ids = string_list("dataset_tags", run.get("dataset_tags"))
    names = string_list("data", run.get("data"))
    configs = string_list("dataset_args", run.get("dataset_args"))
    return [
        (ids[i] if i < len(ids) else None,
         names[i] if i < len(names) else ids[i],
         configs[i] if i < len(configs) else None)
        for i in range(max(len(ids), len(names)))
    ]


def _dataset_text(hub_id, name, config) -> str:
    details = [detail for detail in (hub_id if hub_id != name else None,
                                     config and f"configuration {config}") if detail]
    return f"{name} ({', '.join(details)})" if details else name


def build_card(
    *, log_history, training_args: dict, optimizer_state: dict, run: dict,
    optimizer_class: str = "", model_config: dict | None = None, is_adapter=False,
    repo_id: str | None = None, sweep_table: str | None = None,
):
    """A ``huggingface_hub.ModelCard`` from the run's records.

    ``run`` (the run record) may also hold the stock ``create_model_card`` values, under their
    own names: ``language``, ``license``, ``tags``, ``tasks``, ``dataset_tags``,
    ``dataset_args``; ``model_name``, ``base_model`` (``finetuned_from``) and ``data``
    (``dataset``) are the record's own names."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    from jinja2 import Environment, FileSystemLoader

    task = run.get("task") or infer_task(model_config, is_adapter)
    template, pipeline_tag, task_title = TASKS[task]
    tasks = string_list("tasks", run.get("tasks"))
    pipeline_tag = pipeline_tag or (tasks[0] if tasks else None)
    optim_name = str(run.get("optim") or training_args.get("optim") or "unknown")
    model_name = run.get("model_name") or repo_id or pathlib.Path(
        training_args.get("output_dir") or "model").name
    datasets = _datasets(run)
    base_model = run.get("base_model")
    languages = string_list("language", run.get("language"))
    license_ = run.get("license")
    if license_ is not None and not isinstance(license_, str):
        raise TypeError(f"license must be a string, got {license_!r}")
    results = final_results(log_history)
    eval_results = [
        EvalResult(task_type=task_type, task_name=task_title if task_type == pipeline_tag else None,
                   dataset_type=hub_id or name, dataset_name=name, dataset_config=config,
                   metric_type=_METRIC_NAMES[key], metric_value=float(value))
        for task_type in (tasks or [pipeline_tag or "text-classification"])
        for hub_id, name, config in (datasets or [(None, "custom", None)])
        for key, value in results.items() if key in _METRIC_NAMES
    ]
    tags = ["activelr", "hf-activelr", optim_name, task]
    tags += [tag for tag in string_list("tags", run.get("tags")) if tag not in tags]
    card_data = ModelCardData(
        model_name=model_name,
        language=languages or None,
        license=license_,
        library_name="peft" if is_adapter else "transformers",
        tags=tags,
        pipeline_tag=pipeline_tag,
        base_model=base_model or None,
        datasets=[hub_id for hub_id, _, _ in datasets if hub_id] or None,
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
    facts = {"language": ", ".join(languages), "license": license_}
    facts = {key: value for key, value in facts.items() if value}
    facts.update({k: _fmt(v) for k, v in (run.get("facts") or {}).items()})
    environment = Environment(
        loader=FileSystemLoader(str(resources.files("hf_activelr.integrations") / "templates")),
        keep_trailing_newline=True,
    )
    command = run.get("command")
    body = environment.get_template(template).render(
        model_name=model_name, task_title=task_title,
        summary=run.get("summary") or f"A {task_title.lower()} model trained with ActiveLR.",
        base_model=base_model,
        dataset="; ".join(_dataset_text(*entry) for entry in datasets) or None,
        extra_facts=facts,
        optimizer={"name": optim_name, "class": optimizer_class or run.get("optimizer_class", ""),
                   "groups": groups, "rows": keys},
        training=training, results={k: _fmt(v) for k, v in results.items()},
        gains=gain_rows(optimizer_state), boundary_changes=boundary_changes(optimizer_state),
        sweep_table=sweep_table, repo_id=repo_id or model_name,
        # Records written before redaction existed may hold a raw command line.
        command=redact_command(command) if command else None,
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


def _pickled_globals(path: pathlib.Path) -> list[str]:
    """The ``module.name`` globals the pickle in ``path`` references beyond torch's default
    weights-only ones; it reads the opcodes and runs nothing. [] for the pre-1.6 file format,
    which it cannot read (torch.load weights-only still checks those)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:
        return []


def _load_weights_only(path: pathlib.Path, allowed: list | tuple = ()):
    """``torch.load`` with ``weights_only=True`` (tensors and plain Python values, plus the
    ``allowed`` classes): a pickle that would call anything else is refused, not run."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        allowed_names = {f"{cls.__module__}.{cls.__qualname__}" for cls in allowed}
        extra = [name for name in _pickled_globals(path) if name not in allowed_names]
        # torch's message ends by suggesting to allow the global: not advice to pass on here.
        reason = (f"it references {', '.join(extra)}" if extra else
                  str(error).split("WeightsUnpickler error: ")[-1].split(". Please")[0].strip())
        raise UnsafeCheckpointError(
            f"{path} holds more than tensors and plain Python values ({reason}), which the "
            "Trainer does not save there: refusing to unpickle it, as that could run code"
        ) from None


# The modules whose classes a pickled TrainingArguments references (its enums, the
# AcceleratorConfig dataclass, accelerate's PartialState and DistributedType).
_TRAINING_ARGS_MODULES = (
    "transformers.training_args", "transformers.training_args_seq2seq",
    "transformers.trainer_utils", "transformers.trainer_pt_utils", "transformers.debug_utils",
    "accelerate.state", "accelerate.utils.dataclasses",
)


def _training_args_class(name: str):
    """The class ``module.Class`` if a TrainingArguments pickle may hold it, else None: an enum,
    a dataclass (TrainingArguments itself) or accelerate's PartialState, from the modules above
    only (the module is imported only if it is one of them). Unpickling them sets attributes
    (or looks an enum member up): their code is not given the pickle's choice of callable."""
    if name == "hf_activelr.integrations.transformers_patch.optimizer_name":
        # An ActiveLR optimizer name (transformers_patch._PickledName): it looks the
        # OptimizerNames member up, nothing else.
        from . import transformers_patch

        return transformers_patch.optimizer_name
    module, _, attribute = name.rpartition(".")
    if module not in _TRAINING_ARGS_MODULES:
        return None
    cls = getattr(importlib.import_module(module), attribute, None)
    if not isinstance(cls, type):
        return None
    if issubclass(cls, enum.Enum) or dataclasses.is_dataclass(cls) or name == (
            "accelerate.state.PartialState"):
        return cls
    return None


def _load_training_args(path: pathlib.Path) -> dict:
    """The Trainer's ``training_args.bin`` (a pickled TrainingArguments) as a dict, unpickled
    weights-only with exactly the classes it references allowed, if all are ones above."""
    allowed = []
    for name in _pickled_globals(path):
        cls = _training_args_class(name)
        if cls is None:
            raise UnsafeCheckpointError(
                f"{path} references {name}, which is not part of a pickled TrainingArguments: "
                "refusing to unpickle it, as that could run arbitrary code"
            )
        allowed.append(cls)
    from transformers import TrainingArguments

    args = _load_weights_only(path, allowed)
    if not isinstance(args, TrainingArguments):
        raise UnsafeCheckpointError(f"{path} holds a {type(args).__name__}, not the "
                                    "TrainingArguments the Trainer saves there")
    return args.to_dict()


def card_from_checkpoint(directory, repo_id=None, sweep_table=None):
    """Render the card of a saved checkpoint (or the latest ``checkpoint-*`` inside).

    The folder may come from anyone: its pickles are loaded weights-only (see
    ``_load_weights_only``); one that would run code raises ``UnsafeCheckpointError``."""
    directory = _latest_checkpoint(pathlib.Path(directory))
    trainer_state = json.loads((directory / "trainer_state.json").read_text())
    training_args = {}
    if (directory / "training_args.bin").exists():
        training_args = _load_training_args(directory / "training_args.bin")
    optimizer_state = {}
    if (directory / "optimizer.pt").exists():
        # An optimizer state dict is tensors, numbers, strings, None, tuples, lists and dicts
        # (param groups: betas tuples, param_names lists, period "epoch"): no class to allow.
        optimizer_state = _load_weights_only(directory / "optimizer.pt")
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
