#!/usr/bin/env python
"""Image classification with a Vision Transformer (ViT), trained with any optimizer
(`--optim active_adamw`).

Online:  --model_name_or_path google/vit-base-patch16-224-in21k --dataset_name beans
         (or --dataset_name cifar10; image and label columns are found by name, or pass
         --image_column_name / --label_column_name)
Offline (default, nothing downloaded): a small ViT config (8x8 one-channel images, 2x2
patches, width 64, 2 layers) trained from scratch on scikit-learn's handwritten digits
(hf_activelr.experiments.offline.digits_images: 1,797 8x8 images, 10 classes, shipped
with the package),
split into train/validation at random by --split_seed (default 0: 1,438 / 359 images). If the
Hub cannot be reached, the online names fall back to this, with a warning.

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml \
        recipes/vit_classification/run_vit_classification.py --output_dir out/vit \
        --optim active_adamw --num_train_epochs 10

Accuracy is computed with `evaluate`, from the metric module in recipes/metrics/accuracy loaded
by path (no Hub access). Every TrainingArguments flag works. Writes results.json (eval loss,
eval accuracy, wall time, optimizer settings, gain statistics) and training.png (loss curves,
gains) to --output_dir; TensorBoard logs with --report_to tensorboard.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    set_seed,
)

import hf_activelr
from hf_activelr.experiments import offline, reporting

logger = logging.getLogger("vit_classification")

ACCURACY_METRIC = pathlib.Path(__file__).resolve().parents[1] / "metrics" / "accuracy"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A Hub model (e.g. google/vit-base-patch16-224-in21k); "
                          "default: a small ViT config from scratch."},
    )
    image_size: int = field(default=8, metadata={"help": "Image side of the from-scratch ViT."})
    patch_size: int = field(default=2, metadata={"help": "Patch side of the from-scratch ViT."})
    hidden_size: int = field(default=64, metadata={"help": "Width of the from-scratch ViT."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Layers of the from-scratch ViT."})
    num_attention_heads: int = field(default=4, metadata={"help": "Heads of the from-scratch ViT."})
    intermediate_size: int = field(default=128, metadata={"help": "MLP width (from scratch)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset (e.g. beans, cifar10); default: digits."}
    )
    dataset_config_name: str | None = field(default=None)
    image_column_name: str | None = field(default=None, metadata={"help": "Default: found."})
    label_column_name: str | None = field(default=None, metadata={"help": "Default: found."})
    validation_fraction: float = field(
        default=0.2, metadata={"help": "Held-out share when the dataset has no validation split."}
    )
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the train/validation split (fixed across runs)."}
    )
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)


def _first_present(names, candidates, given):
    if given:
        return given
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise ValueError(f"no column among {candidates} in {names}: pass the column name")


def _split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    held = max(round(count * fraction), 1)
    return np.sort(order[held:]), np.sort(order[:held])


def load_data(data_args) -> tuple[DatasetDict, list[str], str]:
    """Columns "image" (PIL image, or float32 array [C, H, W] in [0, 1]) and "labels"."""
    if data_args.dataset_name:
        try:
            from datasets import load_dataset

            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
            columns = raw["train"].column_names
            image_column = _first_present(columns, ("image", "img", "pixel_values"),
                                          data_args.image_column_name)
            label_column = _first_present(columns, ("labels", "label", "fine_label"),
                                          data_args.label_column_name)
            label_names = raw["train"].features[label_column].names
            if "validation" in raw:
                train, validation = raw["train"], raw["validation"]
            elif "test" in raw:
                train, validation = raw["train"], raw["test"]
            else:
                train_idx, eval_idx = _split(len(raw["train"]), data_args.validation_fraction,
                                             data_args.split_seed)
                train, validation = raw["train"].select(train_idx), raw["train"].select(eval_idx)
            data = DatasetDict(train=train, validation=validation)
            data = data.select_columns([image_column, label_column])
            if image_column != "image":
                data = data.rename_column(image_column, "image")
            if label_column != "labels":
                data = data.rename_column(label_column, "labels")
            return data, label_names, "/".join(filter(None, (data_args.dataset_name,
                                                             data_args.dataset_config_name)))
        except Exception as error:  # offline, or a name that does not exist
            logger.warning("could not load %s (%s): using scikit-learn's digits",
                           data_args.dataset_name, error)
    images, labels = offline.digits_images()
    train_idx, eval_idx = _split(len(labels), data_args.validation_fraction, data_args.split_seed)
    data = DatasetDict(
        train=Dataset.from_dict({"image": images[train_idx], "labels": labels[train_idx]}),
        validation=Dataset.from_dict({"image": images[eval_idx], "labels": labels[eval_idx]}),
    ).with_format("numpy")
    source = (f"offline: scikit-learn digits (8x8 grayscale, 10 classes), "
              f"{len(train_idx)}/{len(eval_idx)} train/validation, split_seed "
              f"{data_args.split_seed}")
    return data, [str(i) for i in range(10)], source


def load_model(model_args, label_names, offline_data: bool):
    """(model, image processor or None, description)."""
    id2label = dict(enumerate(label_names))
    label2id = {name: i for i, name in id2label.items()}
    if model_args.model_name_or_path:
        try:
            processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path, num_labels=len(label_names), id2label=id2label,
                label2id=label2id, ignore_mismatched_sizes=True,
            )
            return model, processor, model_args.model_name_or_path
        except Exception as error:
            logger.warning("could not load %s (%s): using a small ViT from scratch",
                           model_args.model_name_or_path, error)
    config = ViTConfig(
        image_size=model_args.image_size, patch_size=model_args.patch_size,
        num_channels=1 if offline_data else 3, hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size, num_labels=len(label_names),
        id2label=id2label, label2id=label2id,
    )
    return ViTForImageClassification(config), None, "vit config from scratch"


class Collator:
    """Rows {"image", "labels"} -> {"pixel_values", "labels"} tensors: through the model's
    image processor if it has one; otherwise resized to the model's image size and channels
    (arrays already of that shape pass unchanged)."""

    def __init__(self, processor, config):
        self.processor = processor
        self.size = config.image_size
        self.channels = config.num_channels

    def _to_pil(self, image):
        from PIL import Image

        if isinstance(image, Image.Image):
            return image
        array = np.asarray(image, dtype=np.float32)
        if array.ndim == 3 and array.shape[0] in (1, 3):  # [C, H, W] -> [H, W, C]
            array = np.moveaxis(array, 0, -1)
        array = np.clip(array * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)

    def _pixels(self, image) -> np.ndarray:
        array = np.asarray(image, dtype=np.float32) if not hasattr(image, "convert") else None
        if array is not None and array.shape == (self.channels, self.size, self.size):
            return array
        pil = self._to_pil(image).convert("L" if self.channels == 1 else "RGB")
        pil = pil.resize((self.size, self.size))
        array = np.asarray(pil, dtype=np.float32) / 255.0
        return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)

    def __call__(self, rows):
        images = [row["image"] for row in rows]
        if self.processor is not None:
            pixels = self.processor(images=[self._to_pil(i).convert("RGB") for i in images],
                                    return_tensors="pt")["pixel_values"]
        else:
            pixels = torch.from_numpy(np.stack([self._pixels(i) for i in images]))
        labels = torch.tensor([int(row["labels"]) for row in rows], dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}


def main(argv=None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    training_args.remove_unused_columns = False  # the collator needs the "image" column
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)

    import evaluate

    data, label_names, source = load_data(data_args)
    if data_args.max_train_samples is not None:
        data["train"] = data["train"].select(range(min(data_args.max_train_samples,
                                                       len(data["train"]))))
    if data_args.max_eval_samples is not None:
        data["validation"] = data["validation"].select(range(min(data_args.max_eval_samples,
                                                                 len(data["validation"]))))
    model, processor, model_source = load_model(model_args, label_names,
                                                source.startswith("offline"))
    with training_args.main_process_first(desc="loading the accuracy metric"):
        accuracy = evaluate.load(str(ACCURACY_METRIC), keep_in_memory=True)

    def compute_metrics(prediction):
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return accuracy.compute(predictions=np.argmax(logits, axis=-1),
                                references=prediction.label_ids)

    parameters = sum(p.numel() for p in model.parameters())
    trainer = hf_activelr.ActiveTrainer(
        model=model, args=training_args, train_dataset=data["train"],
        eval_dataset=data["validation"], data_collator=Collator(processor, model.config),
        compute_metrics=compute_metrics,
        run_info={"task": "image-classification", "data": source,
                  "base_model": model_args.model_name_or_path,
                  "facts": {"parameters": parameters, "classes": len(label_names),
                            "model": model_source}},
    )
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    wall_time = time.perf_counter() - start
    metrics = dict(train_output.metrics)
    metrics.update(trainer.evaluate())
    metrics["train_wall_time_s"] = wall_time
    trainer.log_metrics("all", metrics)
    # The whole model's gain figures: a collective under FSDP2 and ZeRO (every rank).
    gains = reporting.final_gain_stats(trainer)
    if trainer.is_world_process_zero():
        results = reporting.build_results(trainer, metrics, final_gain_stats=gains, extra={
            "task": "image-classification", "model": model_source, "data": source,
            "parameters": parameters, "classes": label_names,
            "train_examples": len(data["train"]), "eval_examples": len(data["validation"]),
            "command": trainer.run_info["command"],  # the redacted command
            "world_size": training_args.world_size,
        })
        reporting.write_results(os.path.join(training_args.output_dir, "results.json"), results)
        try:
            reporting.plot_runs({str(results["optim"]): trainer.state.log_history},
                                os.path.join(training_args.output_dir, "training.png"),
                                title=f"ViT image classification, {results['optim']}")
        except ImportError:
            logger.warning("matplotlib not installed: no training.png (pip install matplotlib)")
    trainer.save_final_model()
    if training_args.should_save:
        if processor is not None:
            processor.save_pretrained(training_args.output_dir)
        trainer.create_model_card(model_name=os.path.basename(training_args.output_dir))
    return metrics


if __name__ == "__main__":
    main()
