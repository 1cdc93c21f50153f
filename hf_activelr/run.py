"""Zero-code use: run an unmodified training script with the Active optimizers registered.

    python -m hf_activelr.run SCRIPT.py --optim active_adamw [script args...]
    accelerate launch -m hf_activelr.run SCRIPT.py --optim active_adamw [script args...]

``import hf_activelr`` extends transformers' optimizer names before the script builds its
``HfArgumentParser``, so ``--optim active_adamw`` parses and the stock Trainer builds it, with
the paper's one-epoch period unless ``--optim_args period=N`` says otherwise.
"""

from __future__ import annotations

import runpy
import sys

import hf_activelr  # noqa: F401  (registers the optimizers with transformers)


def run_script(script: str, script_args: list[str]) -> None:
    """Run ``script`` as ``__main__`` with ``script_args`` as its command line."""
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    run_script(argv[0], argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
