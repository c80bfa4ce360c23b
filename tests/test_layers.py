"""The package's layout holds: the folders are the flow, nothing imports upward (the
import-linter contract in pyproject.toml), no import circle, torch only in interop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cka_jax"


def test_no_module_imports_a_layer_above_its_own():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_no_two_modules_import_each_other_even_indirectly():
    graph = grimp.build_graph("cka_jax")
    circles = [
        (a, b)
        for a in sorted(graph.modules)
        for b in graph.find_modules_directly_imported_by(a)
        if graph.chain_exists(importer=b, imported=a)
    ]
    assert circles == []


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_torch_is_imported_at_module_top_only_in_interop():
    offenders = [
        str(p.relative_to(REPO))
        for p in PACKAGE.rglob("*.py")
        if "interop" not in p.parts and {"torch", "torchvision"} & top_level_imports(p)
    ]
    assert offenders == []
    # `import cka_jax.interop.port` in a process without torch must work too (the extra).
    assert not {"torch", "torchvision"} & top_level_imports(PACKAGE / "interop" / "port.py")


def test_the_top_of_the_package_holds_at_most_eight_modules():
    assert len(list(PACKAGE.glob("*.py"))) <= 8


def test_no_function_is_longer_than_eighty_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.end_lineno - node.lineno + 1 > 80:
                    long.append(f"{path.relative_to(REPO)}:{node.name}")
    assert long == []
