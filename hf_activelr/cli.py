"""The ``hf-activelr`` command: ``list`` the optimizers, ``run`` a training script with them."""

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
