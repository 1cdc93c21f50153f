"""A whole training step (forward, backward, optimizer, logging) of GPT-2 small under the
Hugging Face Trainer: Active optimizers beside ``adamw_torch_fused``, same model, data, seed.

    python benchmarks/train_step.py                      # 124M parameters, 40 steps each
    python benchmarks/train_step.py --layers 2 --steps 20  # smaller, for a quick look

Every optimizer trains the same GPT-2 (built from ``GPT2Config``, synthetic tokens, no
download) for ``--steps`` steps, with the Active names' defaults (``active_adamw``: period 10,
significance test, gain statistics logged every ``--logging-steps``). A callback times each
step; the first ``--warmup`` steps (compilation of a fused path included) are reported apart.
The runs go in the order A, B, ..., then reversed, and each optimizer's figure is the median
over both of its runs, so a load that drifts during the benchmark biases no one. Prints a
Markdown table: median and mean step time after the first steps (the mean includes the
period boundaries, one step in ten with the default), samples/s from the mean, its ratio to
``adamw_torch_fused``, the first steps' time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def build_model(layers: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers))


class Tokens(torch.utils.data.Dataset):
    def __init__(self, examples: int, length: int, vocab: int = 50257, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (examples, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def train(optim: str, optim_args: str | None, args) -> list[float]:
    """Step times (s) of one run."""
    from transformers import TrainerCallback, TrainingArguments

    import hf_activelr  # noqa: F401  (the Trainer names)
    from hf_activelr import ActiveTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir, optim=optim, optim_args=optim_args, learning_rate=1e-4,
            per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            logging_steps=args.logging_steps, save_strategy="no", report_to="none",
            use_cpu=args.device == "cpu", seed=0, disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = ActiveTrainer(
            model=build_model(args.layers, 0), args=training_args,
            train_dataset=Tokens(args.steps * args.batch_size, args.length),
            callbacks=[StepTimer()],
        )
        trainer.train()
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--optims", nargs="*", default=[
        "adamw_torch_fused", "active_adamw", "active_adamw:fused=false,foreach=true",
        "active_adamw:fused=true"])
    args = parser.parse_args(argv)
    runs: dict[str, list[list[float]]] = {spec: [] for spec in args.optims}
    for spec in args.optims + args.optims[::-1]:
        optim, _, options = spec.partition(":")
        runs[spec].append(train(optim, options or None, args))
        print(f"[train_step] {spec}: run {len(runs[spec])} done", flush=True)
    parameters = sum(p.numel() for p in build_model(args.layers, 0).parameters())
    print(f"\nGPT-2 {parameters / 1e6:.0f}M parameters, batch {args.batch_size} x "
          f"{args.length} tokens, {args.steps} steps per run, 2 runs each "
          f"({args.device}, {torch.get_num_threads()} threads)\n")
    print("| optimizer | median step (s) | mean step (s) | samples/s (mean) | "
          f"x adamw_torch_fused | first {args.warmup} steps (s) |")
    print("|---|---|---|---|---|---|")
    base = None
    for spec, times in runs.items():
        steady = [t for run in times for t in run[args.warmup:]]
        median, mean = statistics.median(steady), statistics.fmean(steady)
        first = statistics.median([sum(run[:args.warmup]) for run in times])
        rate = args.batch_size / mean
        base = base or rate
        print(f"| `{spec}` | {median:.3f} | {mean:.3f} | {rate:.2f} | {rate / base:.3f} | "
              f"{first:.1f} |")


if __name__ == "__main__":
    main()
