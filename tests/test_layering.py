"""The layering, read from the code: imports point down (core → HF glue → run layer, harnesses → CLI), and the
concepts with a registry are looked up in it, not compared as strings."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpi_hf"


def _modules(under: Path = PACKAGE):
    return sorted(p for p in under.rglob("*.py") if "metrics" not in p.relative_to(PACKAGE).parts)


def _imported(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved), plus importlib strings."""
    package = ["dpi_hf", *path.relative_to(PACKAGE).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"dpi_hf(\.\w+)+",
                                                                                             node.value):
            names.add(node.value)  # importlib.import_module("dpi_hf.cli.x") and lazy tables
    return names


def test_nothing_below_the_cli_imports_it():
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imported(p) if n.startswith("dpi_hf.cli"))
                 for p in _modules() if "cli" not in p.relative_to(PACKAGE).parts}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_core_is_torch_only():
    heavy = ("transformers", "trl", "accelerate", "peft", "datasets")
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imported(p) if n.split(".")[0] in heavy)
                 for p in _modules(PACKAGE / "core")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_signals_are_looked_up_in_the_registry():
    compared = re.compile(r"(core_signal|self\.signal)\s*(==|!=|in|not in)\s*(\"|'|\(|GRADIENT_SIGNALS)")
    offenders = [f"{p.relative_to(PACKAGE)}:{i}" for p in _modules() for i, line in
                 enumerate(p.read_text().splitlines(), 1) if compared.search(line)]
    assert offenders == []
