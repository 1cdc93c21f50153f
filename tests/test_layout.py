"""The layers (docs/layout.md): optim imports torch only; integrations never imports
experiments; ``import hf_activelr`` registers the Trainer names without importing
transformers, whichever is imported first."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_activelr"
# What each layer may import from the package (besides itself).
ALLOWED = {"optim": set(), "integrations": {"optim"},
           "experiments": {"optim", "integrations", "<root>"}}  # <root>: the public API


def _package_imports(path: Path, layer: str) -> set[str]:
    """The hf_activelr layers a module imports (absolute or relative, at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            elif node.level == 1:
                names = [f"hf_activelr.{layer}.{node.module or ''}"]
            else:
                names = [f"hf_activelr.{node.module or ''}"]
                names += [f"hf_activelr.{alias.name}" for alias in node.names if not node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "hf_activelr":
                found.add(parts[1] if len(parts) > 1 and parts[1] else "<root>")
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    for path in sorted((PACKAGE / layer).glob("*.py")):
        used = _package_imports(path, layer) - {layer}
        assert used <= ALLOWED[layer], f"{path.name} imports {sorted(used - ALLOWED[layer])}"


def test_the_core_imports_torch_only():
    third_party = set()
    for path in (PACKAGE / "optim").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                third_party |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                third_party.add((node.module or "").split(".")[0])
    assert third_party - set(sys.stdlib_module_names) == {"torch"}


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


HEAVY = "sorted(m for m in sys.modules if m.split('.')[0] in " \
        "('transformers', 'peft', 'accelerate', 'datasets'))"


@pytest.mark.slow
@pytest.mark.parametrize("module", ["hf_activelr.optim", "hf_activelr"])
def test_importing_the_package_does_not_import_transformers(module):
    assert _python(f"import sys, {module}; print({HEAVY})") == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("first", ["hf_activelr", "transformers.trainer",
                                   "transformers.training_args"])
def test_trainer_names_are_registered_whichever_is_imported_first(first):
    """The stock TrainingArguments and Trainer know the names, and every Trainer gets the
    epoch-period callback, whether transformers was imported before hf_activelr or after."""
    second = "hf_activelr" if first != "hf_activelr" else "transformers.trainer"
    code = f"""
import sys, importlib
importlib.import_module({first!r}); importlib.import_module({second!r})
from transformers import TrainingArguments
from transformers import trainer, trainer_optimizer
from transformers.training_args import OptimizerNames
import hf_activelr
from hf_activelr.integrations import transformers_patch
args = TrainingArguments("/tmp/unused", optim="active_adamw", report_to="none")
member = OptimizerNames("active_adamw_paper")
assert trainer_optimizer._OPTIMIZER_HANDLERS[member] is transformers_patch._handler
assert hf_activelr.ActivePeriodCallback in trainer.DEFAULT_CALLBACKS
assert not any(type(f).__name__ == "_PatchAfterImport" for f in sys.meta_path)
print(args.optim.value)
"""
    assert _python(code) == "active_adamw"


@pytest.mark.slow
def test_a_name_registered_after_transformers_is_a_trainer_name():
    code = """
import torch, hf_activelr
from transformers import TrainingArguments
hf_activelr.register("my_active_sgd", hf_activelr.ActiveSGD, lr_high=0.5, lr_low=0.5)
print(TrainingArguments("/tmp/unused", optim="my_active_sgd", report_to="none").optim.value)
"""
    assert _python(code) == "my_active_sgd"


def test_no_layer_imports_another_layers_private_modules():
    """Other layers use ``optim``'s public names (``optim.unwrap_active``,
    ``optim.config.EPOCH``), never ``optim._mixin`` or ``optim._validation``."""
    offenders = []
    for layer in ("integrations", "experiments"):
        for path in sorted((PACKAGE / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level and node.module and any(
                        part.startswith("_") for part in node.module.split(".")):
                    offenders.append(f"{layer}/{path.name}: {node.module}")
    assert offenders == []
