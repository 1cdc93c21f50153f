#!/usr/bin/env python
"""Causal language modelling with GPT-2, trained with any optimizer (`--optim active_adamw`).

Online:  --model_name_or_path gpt2 --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1
Offline (default, nothing downloaded): a small GPT-2 config trained from scratch on English text
that ships with Python (hf_activelr.experiments.offline.python_docs_corpus) with a byte-level
BPE tokenizer trained on it. If the Hub cannot be reached, the online names fall back to this,
with a warning.

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml \
        recipes/gpt2_wikitext/run_gpt2_wikitext.py --output_dir out/gpt2 --optim active_adamw

Every TrainingArguments flag works. Writes results.json (eval loss, perplexity, wall time,
optimizer settings, gain statistics) and training.png (loss curves, gains) to --output_dir;
TensorBoard logs with --report_to tensorboard.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_activelr
from hf_activelr.experiments import offline, reporting

logger = logging.getLogger("gpt2_wikitext")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A Hub model (e.g. gpt2); default: a small GPT-2 config."}
    )
    n_layer: int = field(default=2, metadata={"help": "Layers of the from-scratch model."})
    n_embd: int = field(default=128, metadata={"help": "Width of the from-scratch model."})
    n_head: int = field(default=4, metadata={"help": "Heads of the from-scratch model."})
    vocab_size: int = field(default=2048, metadata={"help": "BPE vocabulary trained offline."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub dataset (e.g. wikitext); default: offline corpus."}
    )
    dataset_config_name: str | None = field(default=None)
    block_size: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    max_corpus_chars: int | None = field(
        default=None, metadata={"help": "Truncate the offline corpus (quick runs and tests)."}
    )


def load_texts(data_args) -> tuple[dict[str, list[str]], str]:
    """Train/validation texts and a description of where they came from."""
    if data_args.dataset_name:
        try:
            from datasets import load_dataset

            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
            texts = {split: [t for t in raw[split]["text"] if t.strip()]
                     for split in ("train", "validation")}
            return texts, f"{data_args.dataset_name}/{data_args.dataset_config_name}"
        except Exception as error:  # offline, or a name that does not exist
            logger.warning("could not load %s (%s): using the offline corpus",
                           data_args.dataset_name, error)
    texts = offline.python_docs_corpus()
    if data_args.max_corpus_chars:
        for split, documents in texts.items():
            budget = data_args.max_corpus_chars // (10 if split == "validation" else 1)
            kept, used = [], 0
            for document in documents:
                if used >= budget:
                    break
                kept.append(document)
                used += len(document)
            texts[split] = kept
    return texts, "offline: Python documentation topics and standard-library docstrings"


def load_model_and_tokenizer(model_args, train_texts):
    if model_args.model_name_or_path:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
            model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
            return model, tokenizer, model_args.model_name_or_path
        except Exception as error:
            logger.warning("could not load %s (%s): using a small GPT-2 from scratch",
                           model_args.model_name_or_path, error)
    tokenizer = offline.train_tokenizer(train_texts, vocab_size=model_args.vocab_size)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=1024, n_embd=model_args.n_embd,
        n_layer=model_args.n_layer, n_head=model_args.n_head,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config), tokenizer, "gpt2 config from scratch"


def to_blocks(texts: list[str], tokenizer, block_size: int, limit: int | None) -> Dataset:
    """Concatenate the tokenized texts (EOS between them) and cut into equal blocks."""
    ids: list[int] = []
    for encoded in tokenizer(texts)["input_ids"]:
        ids.extend(encoded + [tokenizer.eos_token_id])
    count = len(ids) // block_size
    if limit is not None:
        count = min(count, limit)
    blocks = [ids[i * block_size:(i + 1) * block_size] for i in range(count)]
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def main(argv=None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(sys.argv[1])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    set_seed(training_args.seed)

    texts, source = load_texts(data_args)
    model, tokenizer, model_source = load_model_and_tokenizer(model_args, texts["train"])
    block_size = min(data_args.block_size, model.config.n_positions)
    with training_args.main_process_first(desc="tokenizing"):
        data = DatasetDict(
            train=to_blocks(texts["train"], tokenizer, block_size, data_args.max_train_samples),
            validation=to_blocks(texts["validation"], tokenizer, block_size,
                                 data_args.max_eval_samples),
        )
    trainer = hf_activelr.ActiveTrainer(
        model=model, args=training_args, train_dataset=data["train"],
        eval_dataset=data["validation"], data_collator=default_data_collator,
        run_info={"task": "causal-lm", "data": source, "base_model": model_args.model_name_or_path,
                  "facts": {"parameters": sum(p.numel() for p in model.parameters()),
                            "block size": block_size, "model": model_source}},
    )
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    wall_time = time.perf_counter() - start
    metrics = dict(train_output.metrics)
    metrics.update(trainer.evaluate())
    metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    metrics["train_wall_time_s"] = wall_time
    trainer.log_metrics("all", metrics)
    # The whole model's gain figures: a collective under FSDP2 and ZeRO (every rank).
    gains = reporting.final_gain_stats(trainer)
    if trainer.is_world_process_zero():
        results = reporting.build_results(trainer, metrics, final_gain_stats=gains, extra={
            "task": "causal-lm", "model": model_source, "data": source,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_blocks": len(data["train"]), "eval_blocks": len(data["validation"]),
            "block_size": block_size, "command": trainer.run_info["command"],  # redacted
            "world_size": training_args.world_size,
        })
        reporting.write_results(os.path.join(training_args.output_dir, "results.json"), results)
        try:
            reporting.plot_runs({str(results["optim"]): trainer.state.log_history},
                                os.path.join(training_args.output_dir, "training.png"),
                                title=f"GPT-2 causal LM, {results['optim']}")
        except ImportError:
            logger.warning("matplotlib not installed: no training.png (pip install matplotlib)")
    trainer.save_final_model()
    if training_args.should_save:
        tokenizer.save_pretrained(training_args.output_dir)
        trainer.create_model_card(model_name=os.path.basename(training_args.output_dir))
    return metrics


if __name__ == "__main__":
    main()
