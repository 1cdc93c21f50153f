"""Run one recipe with several optimizers on the same data and seed; print a side-by-side table.

    hf-activelr compare recipes/gpt2_wikitext/run_gpt2_wikitext.py \
        --optims active_adamw adamw_torch --output_dir out/compare -- --num_train_epochs 4

Each run is a subprocess (``accelerate launch`` when ``--accelerate_config`` is given) writing
``results.json`` to ``OUTPUT_DIR/<optim>``; runs already finished there are not redone. Writes
``comparison.md``, ``comparison.json`` and ``comparison.png`` (loss curves and gains).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from ..integrations.model_card import redact_command
from . import reporting

COLUMNS = (
    ("eval_loss", "final eval loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("eval_accuracy", "eval accuracy", "{:.4f}"),
    ("train_wall_time_s", "wall time (s)", "{:.1f}"),
    ("train_samples_per_second", "train samples/s", "{:.1f}"),
)


def run_command(script, optim, output_dir, script_args, accelerate_config=None) -> list[str]:
    if accelerate_config:
        launcher = [sys.executable, "-m", "accelerate.commands.launch",
                    "--config_file", str(accelerate_config)]
    else:
        launcher = [sys.executable]
    return [*launcher, str(script), *script_args, "--optim", optim, "--output_dir",
            str(output_dir)]


def run_key(optim, shown_command) -> dict:
    """What a stored run must match to be reused: the (redacted) command, the settings the
    optimizer name stands for now (a preset can change between versions) and the package
    version. A run from other settings is redone, never shown as this one."""
    import hf_activelr

    from .sweep import resolved_settings

    # None for a name the registry does not hold (adamw_torch, a peer)
    return {"command": shown_command, "settings": resolved_settings(optim),
            "hf_activelr": hf_activelr.__version__}


def run_one(script, optim, output_dir, script_args, accelerate_config=None, force=False) -> dict:
    results_path = pathlib.Path(output_dir) / "results.json"
    key_path = pathlib.Path(output_dir) / "compare_run.json"
    command = run_command(script, optim, output_dir, script_args, accelerate_config)
    shown = redact_command(command)  # never print a --hub_token
    key = run_key(optim, shown)
    if results_path.exists() and not force:
        stored = json.loads(key_path.read_text()) if key_path.exists() else None
        if stored == key:
            print(f"[compare] {optim}: reusing {results_path}", flush=True)
            return json.loads(results_path.read_text())
        print(f"[compare] {optim}: {results_path} is from another command, settings or "
              "version: running again", flush=True)
    print(f"[compare] {optim}: {shown}", flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(command, check=False, env=env)
    if completed.returncode != 0:
        # Not CalledProcessError: its message and .cmd would carry the raw command line.
        raise RuntimeError(f"[compare] {optim}: the run exited with status "
                           f"{completed.returncode}: {shown}")
    key_path.write_text(json.dumps(key, indent=1) + "\n")
    return json.loads(results_path.read_text())


def table(results: dict[str, dict]) -> str:
    present = [c for c in COLUMNS if any(c[0] in r["metrics"] for r in results.values())]
    lines = ["| optimizer | " + " | ".join(c[1] for c in present) + " |",
             "|---|" + "---|" * len(present)]
    for optim, result in results.items():
        cells = []
        for key, _, fmt in present:
            value = result["metrics"].get(key)
            cells.append("n/a" if value is None else fmt.format(value))
        lines.append(f"| {optim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(script, optims, output_dir, script_args, accelerate_config=None, force=False) -> str:
    output_dir = pathlib.Path(output_dir)
    results = {
        optim: run_one(script, optim, output_dir / optim, script_args, accelerate_config, force)
        for optim in optims
    }
    text = table(results)
    (output_dir / "comparison.md").write_text(text + "\n")
    summary = {optim: {"metrics": r["metrics"], "command": r.get("command")}
               for optim, r in results.items()}
    (output_dir / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    try:
        reporting.plot_runs({optim: r["log_history"] for optim, r in results.items()},
                            output_dir / "comparison.png",
                            title=f"{pathlib.Path(script).stem}: same data and seed")
        print(f"[compare] plot: {output_dir / 'comparison.png'}")
    except ImportError:
        print("[compare] matplotlib not installed: no plot (pip install matplotlib)")
    print(text)
    return text
