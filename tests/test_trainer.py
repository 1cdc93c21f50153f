"""The Hugging Face Trainer integration, end to end on a tiny GPT-2 (CPU, no network).

1. Registry: the built-in names, ``register()`` of a new name, errors for unknown names/keys.
2. ``import hf_activelr`` makes ``TrainingArguments(optim="active_adamw")`` valid and the stock
   ``Trainer`` builds the optimizer from TrainingArguments, its decay grouping and optim_args.
3. No period given: one epoch of real optimizer updates (accumulation, partial last batch,
   drop_last, max_steps-only runs); an IterableDataset without a length is an error.
4. ``ActiveTrainer`` logs gain statistics.
5. Guard on the transformers internals the integration touches.
7. Resume from a checkpoint saved inside a period gives the uninterrupted run, exactly.
9. LoRA (peft), bf16 mixed precision, bf16 weights, activation checkpointing, torch.compile,
   and the default (compiled, fused) optimizer step.
"""

from __future__ import annotations

import math
import warnings

import hf_utils
import pytest
import torch
import transformers
from transformers.trainer_callback import PrinterCallback
from hf_utils import (
    FAST,
    active_optimizer,
    assert_close_masked,
    make_trainer,
    named_gains,
    named_params,
    one_thread,  # noqa: F401  (an autouse fixture: one torch thread in this module)
    raw_gain_state,
    tiny_model,
    token_dataset,
    training_args,
    updates_per_epoch,
)
from transformers import Trainer, TrainingArguments

import hf_activelr
from hf_activelr import ActivePeriodCallback, ActiveTrainer
from hf_activelr.integrations import registry, transformers_patch
from hf_activelr.optim import ActiveAdaBelief, ActiveAdaBound, ActiveAdamW, ActiveRAdam, ActiveSGD

BUILT_IN = {
    "active_sgd": ActiveSGD,
    "active_sgd_paper": ActiveSGD,
    "active_adamw": ActiveAdamW,
    "active_adamw_paper": ActiveAdamW,
    "active_radam": ActiveRAdam,
    "active_adabelief": ActiveAdaBelief,
    "active_adabound": ActiveAdaBound,
    "active_amsbound": ActiveAdaBound,
}
GAIN_STATS = ("min", "median", "mean", "max", "grew", "shrank")


def enum_values():
    from transformers.training_args import OptimizerNames

    return {member.value for member in OptimizerNames}


@pytest.fixture
def scratch_registration():
    """Names registered by a test are removed afterwards (registry, enum, handler table), so
    other tests still see exactly the built-in names."""
    before = set(registry._REGISTRY)
    yield
    _, trainer_optimizer, OptimizerNames = transformers_patch._internals()
    for name in set(registry._REGISTRY) - before:
        del registry._REGISTRY[name]
        member = OptimizerNames._value2member_map_.pop(name, None)
        if member is not None:
            trainer_optimizer._OPTIMIZER_HANDLERS.pop(member, None)
            OptimizerNames._member_map_.pop(member._name_, None)
            OptimizerNames._member_names_.remove(member._name_)
            type.__delattr__(OptimizerNames, member._name_)


# --- 1. registry ---------------------------------------------------------------------------


def test_available_optimizers_lists_the_built_in_names():
    names = hf_activelr.available_optimizers()
    assert names == sorted(names)
    assert set(BUILT_IN) <= set(names)
    for name, cls in BUILT_IN.items():
        assert registry.get(name).optimizer_cls is cls
    assert registry.get("active_amsbound").defaults["amsbound"] is True
    # every registered name is a TrainingArguments choice
    assert set(names) <= enum_values()


def test_register_makes_a_new_name_a_trainer_optimizer(tmp_path, scratch_registration):
    class MyActiveSGD(ActiveSGD):
        """SGD with ActiveLR gains, registered by a user."""

    with pytest.raises(ValueError):
        TrainingArguments(str(tmp_path), optim="active_mysgd", use_cpu=True, report_to=[])
    entry = hf_activelr.register("active_mysgd", MyActiveSGD, lr_high=0.25, lr_low=0.9,
                                  momentum=0.5)
    assert "active_mysgd" in hf_activelr.available_optimizers()
    assert entry.description.startswith("SGD with ActiveLR gains")
    assert "active_mysgd" in enum_values()

    trainer = make_trainer(tmp_path, optim="active_mysgd", optim_args="period=3,fused=false")
    assert str(getattr(trainer.args.optim, "value", trainer.args.optim)) == "active_mysgd"
    trainer.train()
    active = active_optimizer(trainer)
    assert type(active) is MyActiveSGD
    for group in active.param_groups:
        assert (group["lr_high"], group["momentum"], group["period"]) == (0.25, 0.5, 3)

    # the same name for another class is refused; the same class again is fine
    with pytest.raises(ValueError, match="already registered"):
        hf_activelr.register("active_mysgd", ActiveAdamW)
    hf_activelr.register("active_mysgd", MyActiveSGD)
    with pytest.raises(TypeError, match="valid"):
        hf_activelr.register("active_mysgd2", MyActiveSGD, lr_hi=0.1)
    with pytest.raises(ValueError, match="must match"):
        hf_activelr.register("Active-Bad", MyActiveSGD)


def test_unknown_active_name_lists_the_valid_names(tmp_path):
    with pytest.raises(ValueError) as info:
        TrainingArguments(str(tmp_path), optim="active_adamx", use_cpu=True, report_to=[])
    message = str(info.value)
    assert "active_adamx" in message and "active_adamw" in message
    with pytest.raises(ValueError) as info:
        registry.get("active_adamx")
    message = str(info.value)
    for name in BUILT_IN:
        assert name in message


@pytest.mark.parametrize(
    "optim_args, match",
    [
        ("lr_hgh=0.1", r"unknown optim_args key 'lr_hgh'.*valid keys: .*lr_high.*period"),
        ("lr=0.1", r"unknown optim_args key 'lr'.*TrainingArguments"),
        ("betas=0.1", r"unknown optim_args key 'betas'"),
        ("fused=maybe", r"fused='maybe': expected true or false"),
        ("period=often", r"period='often': expected a int"),
        ("lr_low=1.5", r"lr_low must be in"),
        ("grad_sum_dtype=float16", r"grad_sum_dtype must be None .* \('bfloat16',\)"),
    ],
)
def test_bad_optim_args_are_clear_errors(tmp_path, optim_args, match):
    trainer = make_trainer(tmp_path, optim_args=optim_args)
    with pytest.raises(ValueError, match=match):
        trainer.create_optimizer()


def test_lean_state_from_optim_args_trains_and_resumes(tmp_path):
    """optim_args="grad_sum_dtype=bfloat16,gain_dtype=bfloat16" (the lean state) reaches the
    optimizer, sums and gains are bfloat16 in training and in the checkpoint, and training
    resumes from it."""
    common = dict(n=8, max_steps=12, save_strategy="steps", save_steps=6, optim="active_adamw",
                  optim_args="period=5,grad_sum_dtype=bfloat16,gain_dtype=bfloat16," + FAST)
    trainer = make_trainer(tmp_path, **common)
    trainer.train()
    optimizer = active_optimizer(trainer)
    assert {g["grad_sum_dtype"] for g in optimizer.param_groups} == {"bfloat16"}
    assert {g["gain_dtype"] for g in optimizer.param_groups} == {"bfloat16"}
    for key in ("grad_sum", "gain"):
        assert {s[key].dtype for s in optimizer.state.values()} == {torch.bfloat16}
        saved = torch.load(tmp_path / "checkpoint-6" / "optimizer.pt")
        assert {s[key].dtype for s in saved["state"].values()} == {torch.bfloat16}
    resumed = make_trainer(tmp_path, **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert resumed.state.global_step == 12
    resumed_state = active_optimizer(resumed).state.values()
    for key in ("grad_sum", "gain"):
        assert {s[key].dtype for s in resumed_state} == {torch.bfloat16}


# --- 2. the stock Trainer builds the optimizer -------------------------------------------


def test_stock_trainer_builds_active_adamw_from_training_arguments(tmp_path):
    args = TrainingArguments(
        str(tmp_path), optim="active_adamw", use_cpu=True, report_to=[],
        learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
        weight_decay=0.1, optim_args="lr_high=0.05,lr_low=0.95,period=7",
    )
    model = tiny_model()
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(8))
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is ActiveAdamW

    decay = set(trainer.get_decay_parameter_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(optimizer.param_groups) == 2
    seen = set()
    for group in optimizer.param_groups:
        group_names = {names[id(p)] for p in group["params"]}
        seen |= group_names
        if group["weight_decay"] == 0.1:
            assert group_names and group_names <= decay
        else:
            assert group["weight_decay"] == 0.0
            assert group_names and not group_names & decay
        assert group["lr"] == 3e-3
        assert group["betas"] == (0.8, 0.95)
        assert group["eps"] == 1e-7
        assert (group["lr_high"], group["lr_low"], group["period"]) == (0.05, 0.95, 7)
        # fused not given: the class decides (the compiled step where it wins)
        assert group["fused"] is None
    assert seen == set(names.values())
    assert any("bias" in n or "ln_" in n for n in seen - decay)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_every_built_in_name_trains_with_the_stock_trainer(tmp_path, name):
    model = tiny_model()
    before = named_params(model)
    # Two 2-step periods: a significance test needs z < sqrt(2) to be reachable.
    significance = "significance=1," if registry.get(name).defaults.get("significance") else ""
    trainer = make_trainer(tmp_path, model=model, optim=name,
                           optim_args=f"period=2,{significance}" + FAST, max_steps=4,
                           learning_rate=1e-3)
    trainer.train()
    active = active_optimizer(trainer)
    assert type(active) is BUILT_IN[name]
    for key, value in registry.get(name).defaults.items():
        if key not in ("period", "significance"):  # given in optim_args
            assert active.param_groups[0][key] == value
    assert all(g["active_step"] == 4 for g in active.param_groups)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    after = named_params(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    gains = torch.cat([g.flatten() for g in named_gains(trainer).values()])
    assert (gains != 1).any()  # two boundaries passed


def test_explicit_period_is_kept(tmp_path):
    trainer = make_trainer(tmp_path, n=10, optim_args="period=7," + FAST, num_train_epochs=2)
    trainer.train()
    assert [g["period"] for g in active_optimizer(trainer).param_groups] == [7, 7]


def test_period_epoch_in_optim_args_means_one_epoch(tmp_path):
    trainer = make_trainer(tmp_path, n=10, optim_args="period=epoch," + FAST)
    trainer.train()
    assert [g["period"] for g in active_optimizer(trainer).param_groups] == [5, 5]


def test_the_optimizer_passed_by_hand_also_gets_the_epoch_period(tmp_path):
    model = tiny_model()
    optimizer = ActiveAdamW(model.parameters(), lr=1e-3, period="epoch", fused=False)
    args = training_args(tmp_path, optim="adamw_torch", optim_args=None)
    trainer = Trainer(model=model, args=args,
                      train_dataset=token_dataset(6), optimizers=(optimizer, None))
    trainer.train()
    assert optimizer.param_groups[0]["period"] == 3


# --- 3. the default period: one epoch of optimizer updates ------------------------------


PERIOD_CASES = [
    # (examples, batch size, accumulation, extra args) -> one epoch of updates
    pytest.param(10, 2, 2, {}, id="5-batches-accum2"),  # ceil(5/2) = 3, not 5 // 2
    pytest.param(9, 2, 1, {}, id="partial-last-batch"),  # 5 batches
    pytest.param(9, 2, 1, {"dataloader_drop_last": True}, id="drop-last"),  # 4 batches
    pytest.param(14, 2, 3, {}, id="7-batches-accum3"),  # ceil(7/3) = 3
]


@pytest.mark.slow
@pytest.mark.parametrize("trainer_cls", [Trainer, ActiveTrainer], ids=["Trainer", "ActiveTrainer"])
@pytest.mark.parametrize("n, batch, accumulation, extra", PERIOD_CASES)
def test_default_period_is_one_epoch_of_updates(tmp_path, trainer_cls, n, batch, accumulation,
                                               extra):
    trainer = make_trainer(
        tmp_path, n=n, trainer_cls=trainer_cls, per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, num_train_epochs=2, **extra,
    )
    assert any(isinstance(cb, ActivePeriodCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    batches = len(trainer.get_train_dataloader())
    expected = math.ceil(batches / accumulation)
    if not extra.get("dataloader_drop_last"):
        assert expected == updates_per_epoch(n, batch, accumulation)
    active = active_optimizer(trainer)
    assert [g["period"] for g in active.param_groups] == [expected, expected]
    # the Trainer made the same number of updates: two epochs, two boundaries per group
    assert trainer.state.global_step == 2 * expected
    assert all(g["active_step"] == 2 * expected for g in active.param_groups)
    assert all(s["period"] == expected for s in active.gain_stats())


@pytest.mark.slow
@pytest.mark.parametrize("trainer_cls", [Trainer, ActiveTrainer], ids=["Trainer", "ActiveTrainer"])
def test_default_period_with_max_steps_only(tmp_path, trainer_cls):
    trainer = make_trainer(tmp_path, n=10, trainer_cls=trainer_cls, max_steps=7,
                           gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.state.global_step == 7
    assert [g["period"] for g in active_optimizer(trainer).param_groups] == [3, 3]


@pytest.mark.slow
@pytest.mark.parametrize("trainer_cls", [Trainer, ActiveTrainer], ids=["Trainer", "ActiveTrainer"])
def test_iterable_dataset_without_length_needs_a_period(tmp_path, trainer_cls):
    trainer = make_trainer(tmp_path, trainer_cls=trainer_cls, dataset=hf_utils.TokenStream(),
                           max_steps=3)
    with pytest.raises(ValueError, match="period") as info:
        trainer.train()
    assert "IterableDataset" in str(info.value)

    trainer = make_trainer(tmp_path, trainer_cls=trainer_cls, dataset=hf_utils.TokenStream(),
                           max_steps=3, optim_args="period=2," + FAST)
    trainer.train()
    assert trainer.state.global_step == 3
    assert [g["period"] for g in active_optimizer(trainer).param_groups] == [2, 2]


# --- 4. gain statistics in the logs ------------------------------------------------------


def test_active_trainer_logs_gain_statistics(tmp_path):
    # 8 examples, batch 2: 4 updates per epoch = the period; 3 epochs, logs every 2 steps
    trainer = make_trainer(tmp_path, n=8, trainer_cls=ActiveTrainer, num_train_epochs=3,
                           logging_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6, 8, 10, 12]
    for entry in logs:
        for group in (0, 1):
            for stat in GAIN_STATS:
                assert f"gain/group{group}/{stat}" in entry, (entry["step"], stat)
    first = logs[0]  # step 2: before the first boundary, every gain is 1
    for group in (0, 1):
        assert first[f"gain/group{group}/min"] == first[f"gain/group{group}/max"] == 1.0
        assert first[f"gain/group{group}/grew"] == first[f"gain/group{group}/shrank"] == 0.0
    last = logs[-1]
    for group in (0, 1):
        low, median, mean, high = (last[f"gain/group{group}/{s}"]
                                   for s in ("min", "median", "mean", "max"))
        assert low <= median <= high and low <= mean <= high
        assert low < 1.0 < high  # gains grew (same sign) and shrank (flipped sign)
        assert 0.0 < last[f"gain/group{group}/grew"] < 1.0
        assert 0.0 < last[f"gain/group{group}/shrank"] < 1.0
    # the figures are the optimizer's
    stats = active_optimizer(trainer).gain_stats()
    assert last["gain/group0/median"] == round(stats[0]["median"], 6)
    # evaluation-style logs (no "loss") get no gain entries; the summary neither
    summary = trainer.state.log_history[-1]
    assert "train_loss" in summary and not any(k.startswith("gain/") for k in summary)


def test_console_shows_one_median_per_group_and_a_table_at_the_end(tmp_path, capsys):
    """The full gain/... set goes to log_history and report_to; the printed log lines carry one
    ``gain_median`` field instead, and the end of training prints the gains as a table."""
    from hf_activelr.integrations.callbacks import ActivePrinterCallback, gain_table

    trainer = make_trainer(tmp_path, n=8, trainer_cls=ActiveTrainer, num_train_epochs=3,
                           logging_steps=4, disable_tqdm=True)
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert ActivePrinterCallback in kinds and PrinterCallback not in kinds
    trainer.train()
    out = capsys.readouterr().out
    printed = [line for line in out.splitlines() if "'loss'" in line]
    assert printed and all("gain_median" in line and "gain/" not in line for line in printed)
    stats = active_optimizer(trainer).gain_stats()
    assert f"'gain_median': '{stats[0]['median']:.3g} {stats[1]['median']:.3g}'" in printed[-1]
    table = gain_table(trainer.optimizer)
    assert f"ActiveLR gains at step {trainer.state.global_step}:\n{table}" in out
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == 2 and rows[0].startswith(f"| 0 | {stats[0]['elements']} |")
    # the full set is still logged
    assert "gain/group1/shrank" in [h for h in trainer.state.log_history if "loss" in h][-1]


def test_layer_type_stars_block_indices():
    from hf_activelr.integrations.callbacks import layer_type

    assert layer_type("transformer.h.3.attn.c_attn.weight") == "transformer.h.*.attn.c_attn.weight"
    assert layer_type("layers.10.0.weight") == "layers.*.*.weight"
    assert layer_type("lm_head.weight") == "lm_head.weight"


def test_stock_trainer_does_not_add_gain_logs(tmp_path):
    trainer = make_trainer(tmp_path, n=8, num_train_epochs=2, logging_steps=4)
    trainer.train()
    assert not any(k.startswith("gain/") for h in trainer.state.log_history for k in h)


def test_active_trainer_keeps_parameter_names_in_groups(tmp_path):
    trainer = make_trainer(tmp_path, n=4, trainer_cls=ActiveTrainer)
    optimizer = trainer.create_optimizer()
    names = dict(trainer.model.named_parameters())
    for group in optimizer.param_groups:
        assert [names[n] for n in group["param_names"]] == group["params"]


# --- 5. guard on the transformers internals ------------------------------------------------


def test_transformers_internals_are_where_the_integration_expects():
    trainer_module, trainer_optimizer, OptimizerNames = transformers_patch._internals()
    assert trainer_module is transformers.trainer
    assert isinstance(trainer_optimizer._OPTIMIZER_HANDLERS, dict)
    assert isinstance(trainer_module.DEFAULT_CALLBACKS, list)
    transformers_patch.install()  # idempotent
    transformers_patch.install()
    assert trainer_module.DEFAULT_CALLBACKS.count(ActivePeriodCallback) == 1
    for name in hf_activelr.available_optimizers():
        member = OptimizerNames(name)
        assert member.value == name and isinstance(member, str)
        assert trainer_optimizer._OPTIMIZER_HANDLERS[member] is transformers_patch._handler
    assert registry._LISTENERS.count(transformers_patch._on_register) == 1


@pytest.mark.parametrize(
    "module, attribute, named",
    [
        ("transformers.trainer_optimizer", "_OPTIMIZER_HANDLERS",
         "transformers.trainer_optimizer._OPTIMIZER_HANDLERS"),
        ("transformers.trainer_optimizer", "OptimizerContext",
         "transformers.trainer_optimizer.OptimizerContext"),
        ("transformers.trainer", "DEFAULT_CALLBACKS", "transformers.trainer.DEFAULT_CALLBACKS"),
        ("transformers.training_args", "OptimizerNames", "OptimizerNames"),
    ],
)
def test_moved_internals_fail_loudly(monkeypatch, module, attribute, named):
    import importlib

    monkeypatch.delattr(importlib.import_module(module), attribute)
    for call in (transformers_patch._internals, transformers_patch.install):
        with pytest.raises(transformers_patch.IntegrationError) as info:
            call()
        message = str(info.value)
        assert named in message
        assert "transformers" in message and transformers_patch.SUPPORTED in message
    # import hf_activelr turns the error into a warning (the optimizers still work)
    with pytest.warns(UserWarning, match=attribute):
        hf_activelr._install_transformers_integration()


def test_a_changed_type_also_fails_loudly(monkeypatch):
    from transformers import trainer_optimizer

    monkeypatch.setattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", tuple())
    with pytest.raises(transformers_patch.IntegrationError, match="_OPTIMIZER_HANDLERS"):
        transformers_patch.install()


# --- 7. resume inside a period -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("trainer_cls", [Trainer, ActiveTrainer], ids=["Trainer", "ActiveTrainer"])
def test_resume_inside_a_period_matches_the_uninterrupted_run(tmp_path, trainer_cls):
    # 16 examples, batch 2: 8 updates per epoch; 12 steps; period 4; checkpoint at step 6:
    # mid-epoch and mid-period (running sums not empty).
    common = dict(n=16, trainer_cls=trainer_cls, max_steps=12, optim_args="period=4," + FAST,
                  save_strategy="steps", save_steps=6, lr_scheduler_type="linear")
    full = make_trainer(tmp_path / "full", model=tiny_model(seed=0), **common)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-6"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert [g["active_step"] for g in saved["param_groups"]] == [6, 6]
    assert [g["period"] for g in saved["param_groups"]] == [4, 4]
    assert any(s["grad_sum"].abs().sum() > 0 for s in saved["state"].values())

    # another initialisation: everything must come from the checkpoint
    resumed = make_trainer(tmp_path / "resumed", model=tiny_model(seed=1), **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 12
    exact = dict(rtol=0.0, atol=0.0)
    torch.testing.assert_close(named_params(resumed.model), named_params(full.model), **exact)
    torch.testing.assert_close(raw_gain_state(resumed), raw_gain_state(full), **exact)
    a, b = active_optimizer(resumed), active_optimizer(full)
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert (ga["active_step"], ga["period"]) == (gb["active_step"], gb["period"]) == (12, 4)
    sums_a = [a.state[p]["grad_sum"] for g in a.param_groups for p in g["params"]]
    sums_b = [b.state[p]["grad_sum"] for g in b.param_groups for p in g["params"]]
    torch.testing.assert_close(sums_a, sums_b, **exact)
    gains = torch.cat([g.flatten() for g in named_gains(full).values()])
    assert (gains != 1).any()


def test_resume_keeps_the_epoch_period_from_the_checkpoint(tmp_path):
    # period not given: set to 5 at the first start; resumed with a different dataloader
    # length (batch 1), the saved period stays.
    common = dict(n=10, max_steps=8, save_strategy="steps", save_steps=3)
    full = make_trainer(tmp_path / "full", **common)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", **{**common, "save_strategy": "no"},
                           per_device_train_batch_size=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert [g["period"] for g in active_optimizer(resumed).param_groups] == [5, 5]


# --- 9. LoRA, bf16, checkpointing, torch.compile, fused ------------------------------------


def test_lora_model_has_state_only_for_trainable_params(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                             fan_in_fan_out=True)
    model = peft.get_peft_model(tiny_model(), config)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    trainer = make_trainer(tmp_path, model=model, trainer_cls=ActiveTrainer, n=8,
                           optim_args="period=2," + FAST, max_steps=4, learning_rate=1e-2)
    trainer.train()
    active = active_optimizer(trainer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    in_groups = {id(p) for g in active.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        state = active.state.get(param, {})
        if param.requires_grad:
            assert id(param) in in_groups and "gain" in state and "exp_avg" in state, name
        else:
            assert id(param) not in in_groups and "gain" not in state, name
    assert set(named_gains(trainer)) == trainable
    gains = torch.cat([g.flatten() for g in named_gains(trainer).values()])
    assert (gains != 1).any()
    for name, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert sum(s["elements"] for s in active.gain_stats()) == sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad
    )


def test_bf16_mixed_precision(tmp_path):
    trainer = make_trainer(tmp_path, n=8, bf16=True, optim_args="period=2," + FAST, max_steps=4)
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    active = active_optimizer(trainer)
    for group in active.param_groups:
        for param in group["params"]:
            assert param.dtype == torch.float32
            assert active.state[param]["gain"].dtype == torch.float32
    gains = torch.cat([g.flatten() for g in named_gains(trainer).values()])
    assert (gains != 1).any()


def test_bf16_weights_keep_float32_gains(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    trainer = make_trainer(tmp_path, model=model, n=8, optim_args="period=2," + FAST,
                           max_steps=4, learning_rate=1e-2)
    trainer.train()
    active = active_optimizer(trainer)
    for group in active.param_groups:
        for param in group["params"]:
            state = active.state[param]
            assert param.dtype == state["exp_avg"].dtype == torch.bfloat16
            assert state["gain"].dtype == state["grad_sum"].dtype == torch.float32
    gains = torch.cat([g.flatten() for g in named_gains(trainer).values()])
    assert gains.isfinite().all() and (gains != 1).any()
    assert all(p.isfinite().all() for p in trainer.model.parameters())


def run_tiny(output_dir, model=None, **overrides):
    overrides.setdefault("optim_args", "period=2," + FAST)
    trainer = make_trainer(output_dir, model=model, n=8, max_steps=4, **overrides)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_activation_checkpointing(tmp_path):
    plain = run_tiny(tmp_path / "plain")
    checkpointed = run_tiny(tmp_path / "ckpt", activation_checkpointing=True)
    assert checkpointed.model.is_activation_checkpointing
    assert_close_masked(named_params(checkpointed.model), named_params(plain.model),
                        atol=1e-6, what="params")
    assert_close_masked(named_gains(checkpointed), named_gains(plain), atol=0.0, what="gains")


@pytest.mark.slow
def test_torch_compiled_model(tmp_path, monkeypatch):
    # TrainingArguments(torch_compile=True) sets ACCELERATE_DYNAMO_BACKEND in os.environ, which
    # would compile every later Trainer's model in this process: restore it afterwards.
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    plain = run_tiny(tmp_path / "plain")
    compiled = run_tiny(tmp_path / "compiled", torch_compile=True,
                        torch_compile_backend="aot_eager")
    assert isinstance(compiled.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert_close_masked(named_params(compiled.model), named_params(plain.model), atol=1e-5,
                        what="params")
    assert_close_masked(named_gains(compiled), named_gains(plain), atol=0.0, what="gains")


def test_model_compiled_by_hand_with_active_trainer(tmp_path):
    model = torch.compile(tiny_model(), backend="aot_eager")
    trainer = make_trainer(tmp_path, model=model, trainer_cls=ActiveTrainer, n=8,
                           optim_args="period=2," + FAST, max_steps=4,
                           remove_unused_columns=False)  # forward(*args, **kwargs) once compiled
    trainer.train()
    names = [n for g in active_optimizer(trainer).param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    gains = torch.cat([g.flatten() for g in named_gains(trainer).values()])
    assert (gains != 1).any()


@pytest.mark.slow
def test_fused_step_through_the_trainer_trains_like_the_single_tensor_step(tmp_path):
    """On CPU the Trainer names leave the path to the class, which takes the multi-tensor step
    for a small model (hf_activelr.optim.base.auto_fused); ``fused=true`` in optim_args runs
    the compiled step."""
    from hf_activelr.optim import _fused
    from hf_activelr.optim.adamw import adamw_delta

    default = transformers_patch.optimizer_kwargs(
        TrainingArguments(str(tmp_path / "d"), optim="active_adamw", use_cpu=True,
                          report_to=[]), {})[1]
    assert default.get("fused") is None  # the class decides: foreach for this tiny model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = run_tiny(tmp_path / "fused", optim_args="period=2,fused=true")
    assert all(g["fused"] is True for g in active_optimizer(fused).param_groups)
    assert any(key[0] is adamw_delta for key in _fused._COMPILED)
    single = run_tiny(tmp_path / "single")
    assert all(g["fused"] is False for g in active_optimizer(single).param_groups)
    assert_close_masked(named_params(fused.model), named_params(single.model), atol=1e-5,
                        what="params")
    assert_close_masked(named_gains(fused), named_gains(single), atol=0.0, what="gains")
