"""The core library depends on torch and safetensors only, and never on the layers above it.

The core is the adapter itself: config, targeting, truncation (with its solvers and
chunked products), truncation cache, layer, model wrapper and adapter files. Training,
data, metrics and the command line are built on top and may import the core, not the
reverse. These tests read the import statements of every core module, so a new
dependency or an upward import fails here before it reaches a user who installed the
core without the extras.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kasa_peft"

CORE = {
    "__init__",
    "_chunked",
    "_krylov",
    "_version",
    "adapter_files",
    "base_match",
    "config",
    "fingerprint",
    "layer",
    "model",
    "modules_to_save",
    "targeting",
    "truncation",
    "truncation_cache",
}
LAYERED = {"cli", "metrics"}  # besides the data and training packages
CORE_DEPENDENCIES = {"torch", "safetensors"}
# Imported inside a function only: tqdm for the progress bar when installed, and
# transformers' Conv1D class only once the caller's model has imported transformers.
OPTIONAL_LAZY = {"tqdm", "transformers"}


def _imports(path: Path) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Return every import statement of a module, each with whether it runs at module level."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_level = {id(node) for node in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If | ast.Try):
            module_level.update(id(child) for child in ast.walk(node))
    return [(node, id(node) in module_level) for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def test_every_top_level_module_is_classified() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    unknown = modules - CORE - LAYERED
    assert not unknown, f"classify {sorted(unknown)} as core or layered in this test"


@pytest.mark.parametrize("name", sorted(CORE))
def test_core_module_imports_only_core_and_torch(name: str) -> None:
    allowed_external = set(sys.stdlib_module_names) | CORE_DEPENDENCIES
    for node, at_module_level in _imports(PACKAGE / f"{name}.py"):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            # "from .config import X" names a module; "from . import _krylov" names modules.
            targets = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
            upward = [target for target in targets if target not in CORE]
            assert not upward, f"{name}.py line {node.lineno} imports {upward}, which are not core modules"
            continue
        roots = [alias.name.split(".")[0] for alias in node.names] if isinstance(node, ast.Import) else [node.module.split(".")[0]]
        permitted = allowed_external if at_module_level else allowed_external | OPTIONAL_LAZY
        extra = [root for root in roots if root not in permitted]
        assert not extra, f"{name}.py line {node.lineno} imports {extra}; the core may use only {sorted(CORE_DEPENDENCIES)}"


def test_checker_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The check must be able to fail: a core module importing the training layer and
    # transformers is rejected.
    (tmp_path / "config.py").write_text("from .training import runner\nimport transformers\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    with pytest.raises(AssertionError, match="not core modules"):
        test_core_module_imports_only_core_and_torch("config")
    (tmp_path / "config.py").write_text("import transformers\n")
    with pytest.raises(AssertionError, match="the core may use only"):
        test_core_module_imports_only_core_and_torch("config")
