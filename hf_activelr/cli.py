"""The ``hf-activelr`` command: ``list`` the optimizers, ``run`` a training script with them,
``compare`` optimizers on a recipe."""

from __future__ import annotations

import argparse
import sys


def _list(args) -> int:
    from . import registry

    for name in registry.available_optimizers():
        entry = registry.get(name)
        defaults = ", ".join(f"{k}={v}" for k, v in entry.defaults.items())
        cls = entry.optimizer_cls.__name__
        print(f"{name:18s} {cls}{f'({defaults})' if defaults else ''}: {entry.description}")
    return 0


def _run(args) -> int:
    from .run import run_script

    run_script(args.script, args.script_args)
    return 0


def _compare(args) -> int:
    from .compare import compare

    compare(args.script, args.optims, args.output_dir, args.script_args,
            args.accelerate_config, args.force)
    return 0


def _card(args) -> int:
    from .model_card import card_from_checkpoint

    sweep = open(args.sweep_table).read() if args.sweep_table else None
    card, folder = card_from_checkpoint(args.checkpoint_dir, repo_id=args.repo_id,
                                        sweep_table=sweep)
    output = args.output or str(folder / "README.md")
    card.save(output)
    print(f"wrote {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-activelr", description="ActiveLR optimizers for the Hugging Face Trainer."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the registered optimizer names").set_defaults(
        func=_list
    )
    run = commands.add_parser(
        "run", help="run a training script with --optim active_* available",
        description="Run SCRIPT with the Active optimizers registered with transformers.",
    )
    run.add_argument("script", help="a training script (HfArgumentParser + Trainer)")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's arguments")
    run.set_defaults(func=_run)
    compare = commands.add_parser(
        "compare", help="run a recipe with several optimizers, same data and seed, and compare",
        description="Run SCRIPT once per optimizer; print a side-by-side table; plot. "
        "Arguments after -- go to every run.",
    )
    compare.add_argument("script", help="a recipe script (writes results.json)")
    compare.add_argument("--optims", nargs="+", default=["active_adamw", "adamw_torch"])
    compare.add_argument("--output_dir", default="outputs/compare")
    compare.add_argument("--accelerate_config", help="launch each run with accelerate")
    compare.add_argument("--force", action="store_true", help="redo finished runs")
    compare.set_defaults(func=_compare, script_args=[])
    card = commands.add_parser(
        "card", help="render or refresh the model card of a saved checkpoint",
        description="Write README.md (a Hub model card) from CHECKPOINT_DIR: trainer_state.json, "
        "optimizer.pt, training_args.bin and activelr_run.json; no re-training.",
    )
    card.add_argument("checkpoint_dir", help="a checkpoint folder (or an output_dir holding them)")
    card.add_argument("--output", help="where to write the card (default: CHECKPOINT/README.md)")
    card.add_argument("--repo_id", help="the Hub repository name used in the card")
    card.add_argument("--sweep_table", help="a markdown LR-sweep table to include")
    card.set_defaults(func=_card)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    script_args = []
    if argv[:1] == ["compare"] and "--" in argv:  # compare ... -- ARGS FOR EVERY RUN
        split = argv.index("--")
        argv, script_args = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        args.script_args = script_args
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
