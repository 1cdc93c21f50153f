"""Shared helpers for the Hugging Face integration tests (test_trainer, test_cli,
test_distributed): a tiny GPT-2 built from a config, generated token data, TrainingArguments
for quick CPU runs, and subprocess helpers. No network: nothing is downloaded."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_activelr  # noqa: F401  (registers the active_* names with transformers)
from hf_activelr.integrations.trainer import unwrap_active
from hf_activelr.optim.rule import decode_gain

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "scripts"
REPO = TESTS.parent

VOCAB = 64
SEQ_LEN = 8

# Most tests skip the compiled fused step (torch.compile costs seconds per process).
FAST = "fused=false"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much faster than on two when the CPUs are
    shared (OpenMP threads wait on each other). Import this fixture into a test module to use
    it there; the previous setting is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides):
    from transformers import GPT2Config

    config = dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # deterministic across resumes
        bos_token_id=0, eos_token_id=0,
    )
    config.update(overrides)
    return GPT2Config(**config)


def tiny_model(seed: int = 0, **overrides):
    """A 2-layer GPT-2 with random weights, the same for the same seed."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config(**overrides))


def token_rows(n: int, seq_len: int = SEQ_LEN, seed: int = 0) -> list[list[int]]:
    """``n`` sequences of random tokens with a learnable pattern (token t+1 = t + 1 mod V on
    most positions), so the loss goes down and gradient signs are consistent."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    rows = (start + torch.arange(seq_len)) % VOCAB
    noise = torch.rand(n, seq_len, generator=gen) < 0.2
    rows = torch.where(noise, torch.randint(0, VOCAB, (n, seq_len), generator=gen), rows)
    return rows.tolist()


def token_dataset(n: int, seq_len: int = SEQ_LEN, seed: int = 0):
    """A ``datasets.Dataset`` of ``n`` causal-LM examples (labels = input_ids)."""
    from datasets import Dataset

    rows = token_rows(n, seq_len, seed)
    return Dataset.from_dict({"input_ids": rows, "labels": [list(r) for r in rows]})


class TokenStream(torch.utils.data.IterableDataset):
    """An IterableDataset without ``__len__`` (streaming data)."""

    def __init__(self, n: int = 16, seed: int = 0):
        self.rows = token_rows(n, seed=seed)

    def __iter__(self):
        for row in self.rows:
            ids = torch.tensor(row)
            yield {"input_ids": ids, "labels": ids.clone()}


def training_args(output_dir, **overrides):
    """TrainingArguments for a quick CPU run with ``active_adamw_paper`` (the paper's rule, one
    epoch per period; fused path off)."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir), use_cpu=True, report_to=[], disable_tqdm=True,
        per_device_train_batch_size=2, num_train_epochs=1, learning_rate=1e-2,
        lr_scheduler_type="constant", optim="active_adamw_paper", optim_args=FAST,
        logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(output_dir, *, n: int = 10, trainer_cls=None, model=None, dataset=None,
                 **arg_overrides):
    """A Trainer (stock by default) on the tiny model and ``n`` generated examples."""
    from transformers import Trainer

    trainer_cls = trainer_cls or Trainer
    return trainer_cls(
        model=model if model is not None else tiny_model(),
        args=training_args(output_dir, **arg_overrides),
        train_dataset=dataset if dataset is not None else token_dataset(n),
    )


def updates_per_epoch(n: int, batch_size: int, accumulation: int = 1) -> int:
    """Optimizer updates per epoch as counted independently of the library."""
    return math.ceil(math.ceil(n / batch_size) / accumulation)


def active_optimizer(trainer):
    """The Active optimizer inside the Trainer's (Accelerate-wrapped) optimizer."""
    active = unwrap_active(trainer.optimizer)
    assert active is not None, f"no Active optimizer in {type(trainer.optimizer).__name__}"
    return active


def named_params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def named_gains(trainer) -> dict[str, torch.Tensor]:
    """Decoded gains (``state['gain']``) by parameter name, for parameters that have state."""
    active = active_optimizer(trainer)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    out = {}
    for group in active.param_groups:
        for param in group["params"]:
            state = active.state.get(param, {})
            if "gain" in state:
                out[names[id(param)]] = decode_gain(state["gain"]).detach().clone()
    return out


def raw_gain_state(trainer) -> dict[str, torch.Tensor]:
    """The packed ``state['gain']`` tensors (sign bit included) by parameter name."""
    active = active_optimizer(trainer)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return {
        names[id(p)]: active.state[p]["gain"].detach().clone()
        for group in active.param_groups for p in group["params"]
        if "gain" in active.state.get(p, {})
    }


def zero_gradient_mask(name: str, tensor: torch.Tensor, n_embd: int = 32) -> torch.Tensor:
    """True where a parameter element has a real gradient. The *key* bias of GPT-2 attention
    (``c_attn.bias[n_embd:2*n_embd]``) has an exactly zero true gradient (softmax ignores a
    shift common to all scores): its computed gradient is rounding noise, so its period sums'
    signs (hence its gains, and AdamW's normalised steps) depend on the summation order and
    differ between mathematically equal runs (DDP vs one process, compiled vs eager)."""
    mask = torch.ones_like(tensor, dtype=torch.bool)
    if name.endswith("attn.c_attn.bias"):
        mask[..., n_embd:2 * n_embd] = False
    return mask


def assert_close_masked(actual: dict, expected: dict, *, atol: float, rtol: float = 0.0,
                        what: str = "") -> None:
    """``torch.testing.assert_close`` per name, zero-gradient elements left out."""
    assert actual.keys() == expected.keys(), f"{what}: different names"
    for name in expected:
        mask = zero_gradient_mask(name, expected[name])
        torch.testing.assert_close(
            actual[name][mask], expected[name][mask], atol=atol, rtol=rtol,
            msg=lambda m, name=name: f"{what} {name}: {m}",
        )


# --- subprocesses --------------------------------------------------------------------------


def console_script(name: str) -> str | None:
    """A console script installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def subprocess_env(**extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", WANDB_DISABLED="true",
        PYTHONWARNINGS="ignore",
    )
    env.pop("ACCELERATE_DYNAMO_BACKEND", None)
    # The repository on the path, whether or not the package is installed editable.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_command(command: list[str], *, cwd, timeout: float = 180, check: bool = True, **env):
    """Run ``command``; on an unexpected exit status fail with its output."""
    result = subprocess.run(
        command, cwd=str(cwd), env=subprocess_env(**env), capture_output=True, text=True,
        timeout=timeout, check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"command failed ({result.returncode}): {' '.join(command)}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result
