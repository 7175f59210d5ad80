"""The package's import structure: no import circle (scripts/check_imports.py, read from the
source), leaf modules that load neither torch nor Ray, and no module-level `__getattr__`."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from check_imports import PACKAGES, import_cycles, import_graph, modules  # noqa: E402

# Modules the driver, a Ray Tune trial and the CLI read without loading torch or Ray.
LEAVES = ("engine.config", "engine.train_spec", "engine.synth.errors", "engine.synth.config", "engine.eval_jobs",
          "engine.head_scores", "engine.evaluate", "engine.pipeline")


def test_no_import_circle_among_the_packages():
    assert import_cycles(import_graph()) == []


def test_the_check_finds_a_circle_closed_inside_a_function(tmp_path):
    """The same check on a package built to hold one circle (b imports a where it runs) and one
    relative import: it must report exactly that circle."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import helper\n")
    (package / "b.py").write_text(textwrap.dedent("""
        def helper():
            from . import a
            return a
    """))
    (package / "c.py").write_text("import pkg.a\n")  # imports into the circle, not part of it
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]


@pytest.mark.parametrize("module", LEAVES)
def test_leaf_modules_load_neither_torch_nor_ray(module):
    code = (f"import sys, {module}; heavy = sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules); "
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_no_module_defines_a_module_level_getattr():
    defining = []
    for name, path in modules(ROOT, PACKAGES).items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in tree.body):
            defining.append(name)
    assert defining == []
