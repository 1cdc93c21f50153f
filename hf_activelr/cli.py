"""The ``hf-activelr`` command: ``list`` the optimizers, ``run`` a training script with them,
``compare`` optimizers on a recipe, ``sweep`` learning rates or batch sizes, render a ``card``."""

from __future__ import annotations

import argparse
import sys


def _list(args) -> int:
    from .integrations import registry

    if args.options:
        from .optim.config import OPTION_TYPES, ActiveConfig

        for key, text in ActiveConfig.help().items():
            print(f"{key:15s} {OPTION_TYPES[key].__name__:6s} {text}")
        return 0
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
    from .experiments.compare import compare

    compare(args.script, args.optims, args.output_dir, args.script_args,
            args.accelerate_config, args.force)
    return 0


def _sweep(args) -> int:
    import sys

    from .experiments import sweep

    if args.protocol:
        from .experiments import protocol
        from .integrations.model_card import redact_command

        def planned(records):
            return protocol.plan(quick=args.quick, seeds=args.protocol_seeds,
                                 candidates=args.candidates or (), only_tasks=args.tasks,
                                 only_schedules=args.schedules, peers=not args.no_peers,
                                 candidates_only=args.candidates_only,
                                 only_lrs=args.protocol_lrs, records=records,
                                 only_batch_sizes=args.protocol_batch_sizes)

        # Two rounds at most: seed 0 everywhere, then the later seeds where seed 0 says
        # they decide something (protocol.decisive_lrs).
        points = planned([])
        records = sweep.finished(points, args.output_dir)
        for _ in range(2):
            points = planned(records)
            print(f"{len(points)} protocol runs (about "
                  f"{protocol.estimate_hours(points, args.jobs):.1f} h on 2 cores in all)",
                  flush=True)
            if args.report_only:
                records = sweep.finished(points, args.output_dir)
                print(f"{len(records)} of them finished: reporting those", flush=True)
            else:
                records = sweep.sweep(points, args.output_dir, jobs=args.jobs,
                                      threads=args.threads, force=args.force,
                                      progress=lambda line: print(line, flush=True))
        text = protocol.report(records, args.output_dir, quick=args.quick,
                               command=redact_command(["hf-activelr", *sys.argv[1:]]),
                               candidates=args.candidates or ())
        print(text)
        print(f"wrote {args.output_dir}/protocol.md, protocol.json and the plots")
        return 0
    if args.quick or args.candidates or args.protocol_seeds or args.schedules:
        raise SystemExit("--quick, --candidates, --schedules and --protocol-seeds go with "
                         "--protocol")
    if args.tasks is None:
        args.tasks = list(sweep.DEFAULT_TASKS)
    points = sweep.plan(
        args.tasks, args.optims or sweep.default_optimizers(), args.lrs, args.seeds,
        batch_sizes=args.batch_sizes, lr=args.lr, lr_scaling=args.lr_scaling,
        epochs=args.epochs,
    )
    print(f"{len(points)} runs: tasks {', '.join(args.tasks)}; "
          f"optimizers {', '.join(dict.fromkeys(p.optim for p in points))}", flush=True)
    records = sweep.sweep(points, args.output_dir, jobs=args.jobs, threads=args.threads,
                          force=args.force, progress=lambda line: print(line, flush=True))
    table = sweep.write_reports(records, args.output_dir,
                                axis="batch_size" if args.batch_sizes else "lr")
    print(table)
    print(f"wrote {args.output_dir}/sweep.md, sweep.json and sweep_<task>.png")
    return 0


def _card(args) -> int:
    from .integrations.model_card import card_from_checkpoint

    sweep = open(args.sweep_table).read() if args.sweep_table else None
    card, folder = card_from_checkpoint(args.checkpoint_dir, repo_id=args.repo_id,
                                        sweep_table=sweep)
    output = args.output or str(folder / "README.md")
    card.save(output)
    print(f"wrote {output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .experiments.sweep import DEFAULT_LRS, DEFAULT_SEEDS

    parser = argparse.ArgumentParser(
        prog="hf-activelr", description="ActiveLR optimizers for the Hugging Face Trainer."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="list the registered optimizer names")
    listing.add_argument("--options", action="store_true",
                         help="list the ActiveLR options (optim_args keys) instead")
    listing.set_defaults(func=_list)
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
    sweep = commands.add_parser(
        "sweep", help="sweep learning rates (or batch sizes) on small offline tasks",
        description="Train each task with each optimizer at each learning rate (or, with "
        "--batch-sizes, each batch size at --lr) and seed; finished runs are kept under "
        "OUTPUT_DIR/runs and not redone. Writes sweep.md, sweep.json and sweep_<task>.png.",
    )
    sweep.add_argument("--tasks", nargs="+", help="sweep tasks (default: vit-digits gpt2-text; "
                       "also resnet-digits, lora-minilm, gpt2-long); with --protocol: keep "
                       "only these tasks")
    sweep.add_argument("--optims", nargs="+", help="optimizer names, each optionally with "
                       "optim_args: 'active_adamw:preset=paper' (default: active_adamw, its "
                       "paper preset, adamw_torch and the installed peers: prodigy, "
                       "dadapt_adam, schedule_free_adamw)")
    sweep.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS),
                       help="initial learning rates (default: 1e-5 ... 1e-1, one per decade)")
    sweep.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    sweep.add_argument("--batch-sizes", "--batch_sizes", dest="batch_sizes", nargs="+",
                       type=int, help="sweep batch sizes at --lr instead of learning rates")
    sweep.add_argument("--lr", type=float, default=1e-3,
                       help="learning rate at the task's own batch size (with --batch-sizes)")
    sweep.add_argument("--lr-scaling", "--lr_scaling", dest="lr_scaling", default="none",
                       choices=["none", "linear", "sqrt"],
                       help="scale --lr with the batch size (with --batch-sizes)")
    sweep.add_argument("--epochs", type=float, help="epochs per run (default: the task's)")
    sweep.add_argument("--output_dir", "--output-dir", dest="output_dir",
                       default="outputs/sweep")
    sweep.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    sweep.add_argument("--threads", type=int, help="torch threads per run "
                       "(default: CPU cores / jobs)")
    sweep.add_argument("--force", action="store_true", help="redo finished runs")
    sweep.add_argument("--protocol", action="store_true",
                       help="run the fixed quality protocol (hf_activelr.experiments.protocol): "
                            "every task, "
                            "both schedules, 3 seeds; writes protocol.md")
    sweep.add_argument("--quick", action="store_true",
                       help="with --protocol: the quick subset (about 5 minutes on 2 cores: "
                            "1 seed, 3 lrs, linear schedule, the short tasks)")
    sweep.add_argument("--candidates", nargs="+",
                       help="with --protocol: extra optimizer specs to screen, e.g. "
                            "'active_adamw:preset=significant,significance=1.5'")
    sweep.add_argument("--protocol-seeds", "--protocol_seeds", dest="protocol_seeds", nargs="+",
                       type=int, help="with --protocol: seeds (default 0 1 2; quick: 0)")
    sweep.add_argument("--candidates-only", "--candidates_only", dest="candidates_only",
                       action="store_true",
                       help="with --protocol: only the candidates and each task's base")
    sweep.add_argument("--report-only", "--report_only", dest="report_only",
                       action="store_true",
                       help="with --protocol: report the finished runs, run nothing")
    sweep.add_argument("--no-peers", "--no_peers", dest="no_peers", action="store_true",
                       help="with --protocol: leave out the installed peer optimizers")
    sweep.add_argument("--protocol-lrs", "--protocol_lrs", dest="protocol_lrs", nargs="+",
                       type=float, help="with --protocol: only the grid's learning rates "
                       "within 1%% of these (screening)")
    sweep.add_argument("--protocol-batch-sizes", "--protocol_batch_sizes",
                       dest="protocol_batch_sizes", nargs="+", type=int,
                       help="with --protocol: only the arms at these batch sizes (screening)")
    sweep.add_argument("--schedules", nargs="+", choices=["linear", "constant"],
                       help="with --protocol: only these schedules (screening)")
    sweep.set_defaults(func=_sweep)
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
