"""Imports run one way: nodes -> lora_core, and inside lora_core from the upper wings down to the base.

The layers are the house plan of docs/ARCHITECTURE.md: a module may import from its own layer or a
lower one, never from a higher one, and nothing in lora_core reaches outside the package.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "lora_core"

# Lower number = lower layer. Keys are the first path part under lora_core/ (file stem or wing folder).
LAYERS = {
    "errors": 0,
    "atomic": 0,
    "adapters": 1,
    "data": 1,
    "memory": 2,
    "training": 3,
    "lorafile": 4,
    "plotting": 5,
    "toy": 5,
    "demo": 6,
    "__main__": 7,
    "__init__": 7,
}
WINGS = ("adapters", "memory", "training", "lorafile", "data")
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "errors.py", "atomic.py", "plotting.py", "toy.py", "demo.py"}


def _part_of(module_parts: list[str]) -> str:
    return module_parts[0] if module_parts else "__init__"


def _imports(path: Path):
    """(line, absolute parts under lora_core or None when the import leaves it) for each relative import."""
    rel = path.relative_to(CORE).with_suffix("")
    package = list(rel.parts[:-1])
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level - 1 > len(package):
                yield node.lineno, None
                continue
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            if not node.module:  # `from . import x`: each x is a module or a name of the package
                for alias in node.names:
                    yield node.lineno, target + [alias.name]
            else:
                yield node.lineno, target


def test_lora_core_top_level_holds_only_the_wings_and_the_named_files():
    files = {p.name for p in CORE.iterdir() if p.is_file() and p.suffix == ".py"}
    folders = {p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert files == TOP_LEVEL_FILES
    assert folders == set(WINGS)


def test_each_wing_says_what_it_is():
    for wing in WINGS:
        doc = ast.get_docstring(ast.parse((CORE / wing / "__init__.py").read_text()))
        assert doc and "Entry points" in doc or wing == "data", wing


def test_no_import_climbs_back_up():
    wrong = []
    for path in sorted(CORE.rglob("*.py")):
        own = _part_of(list(path.relative_to(CORE).with_suffix("").parts))
        for line, target in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if target is None:
                wrong.append(f"{where} imports from outside lora_core")
                continue
            other = _part_of(target)
            if other not in LAYERS:
                wrong.append(f"{where} imports unknown part {other}")
            elif other != own and LAYERS[other] > LAYERS[own]:
                wrong.append(f"{where}: {own} (layer {LAYERS[own]}) imports {other} (layer {LAYERS[other]})")
    assert wrong == []


def test_nodes_import_lora_core_never_the_reverse():
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert (node.module or "").split(".")[0] == "lora_core", f"{path}:{node.lineno}"
