"""The codebase's own rules, checked on the source: layering, privacy across modules, long functions.

``lint-imports`` (import-linter, contracts in pyproject.toml) checks the layers and cycles in CI; the
tests here walk the source with :mod:`ast` so that the rules also hold when only pytest runs.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "prune_callbacks"
#: Lowest layer first: a module may import its own layer and the layers before it.
LAYERS = ["layers", "graph", "measure", "pruning", "integrations", "app"]
#: Third-party packages the core layers must never import.
NOT_IN_CORE = {
    "lightning",
    "pytorch_lightning",
    "hydra",
    "omegaconf",
    "wandb",
    "sklearn",
    "torchmetrics",
    "rich",
}
LONG_FUNCTION = 60


def _modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append((path, ".".join(parts)))
    return out


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import of a file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names], node.lineno))
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "prune_callbacks" and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return None


def test_layers_import_downwards_only() -> None:
    bad = []
    for path, module in _modules():
        own = _layer(module)
        if own is None:
            continue
        for target, names, line in _imports(path, module):
            targets = [target] + [f"{target}.{n}" for n in names]
            for t in targets:
                other = _layer(t)
                if other is not None and other > own:
                    bad.append(f"{module}:{line} imports {t} (a higher layer)")
                    break
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer", ["layers", "graph", "measure", "pruning"])
def test_core_layers_import_no_framework(layer: str) -> None:
    bad = [
        f"{module}:{line} imports {target}"
        for path, module in _modules()
        if module.split(".")[1:2] == [layer]
        for target, _, line in _imports(path, module)
        if target.split(".")[0] in NOT_IN_CORE
    ]
    assert not bad, "\n".join(bad)


def test_no_private_names_imported_across_modules() -> None:
    bad = []
    for path, module in _modules():
        for target, names, line in _imports(path, module):
            if not target.startswith("prune_callbacks"):
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{module}:{line} imports {name} from {target}")
    assert not bad, "\n".join(bad)


def test_no_private_functions_of_imported_modules_called() -> None:
    """``mod._helper(...)``, ``mod`` one of our modules imported by name: another module's private."""
    bad = []
    for path, module in _modules():
        tree = ast.parse(path.read_text(), str(path))
        aliases = set()
        for target, names, _ in _imports(path, module):
            if target.startswith("prune_callbacks"):
                aliases.update(names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update(
                    (a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("prune")
                )
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("prune")):
                aliases.update(a.asname or a.name for a in node.names)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_long_functions_have_docstrings() -> None:
    """A function over ~60 lines must at least have a docstring (saying what it does and why it is long)."""
    bad = []
    for path, module in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > LONG_FUNCTION and ast.get_docstring(node) is None:
                    bad.append(f"{module}:{node.lineno} {node.name} ({length} lines) has no docstring")
    assert not bad, "\n".join(bad)


LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which(
    "lint-imports"
)


@pytest.mark.skipif(LINT_IMPORTS is None, reason="import-linter not installed")
def test_import_contracts() -> None:
    proc = subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
