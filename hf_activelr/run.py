"""Zero-code use: run an unmodified training script with the Active optimizers registered.

    python -m hf_activelr.run SCRIPT.py --optim active_adamw [script args...]
    accelerate launch -m hf_activelr.run SCRIPT.py --optim active_adamw [script args...]

``import hf_activelr`` extends transformers' optimizer names before the script builds its
``HfArgumentParser``, so ``--optim active_adamw`` parses and the stock Trainer builds it, with
the paper's one-epoch period unless ``--optim_args period=N`` says otherwise.
"""

from __future__ import annotations

import os
import runpy
import sys
import zipfile

import hf_activelr  # noqa: F401  (registers the optimizers with transformers)


def run_script(script: str, script_args: list[str]) -> None:
    """Run ``script`` as ``__main__`` with ``script_args`` as its command line and, as
    ``python dir/script.py`` would, ``dir`` (symlinks resolved) as ``sys.path[0]``, so that the
    script imports its sibling modules (``run_qa.py`` imports ``utils_qa``)."""
    sys.argv = [script, *script_args]
    # sys.path[0] is the entry python prepended for *this* process (the working directory for
    # ``-m``, the bin folder for the console script): python would have put the script's folder
    # there instead. Under -P / PYTHONSAFEPATH python prepends nothing, so neither do we; a
    # folder or zip file is put first by runpy itself (it runs its __main__.py).
    if not sys.flags.safe_path and os.path.isfile(script) and not zipfile.is_zipfile(script):
        folder = os.path.dirname(os.path.realpath(script))
        if sys.path:
            sys.path[0] = folder
        else:
            sys.path.insert(0, folder)
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
