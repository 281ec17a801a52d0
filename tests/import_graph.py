"""The import graph of the installed package: the walls (import-linter contracts), import
circles, and the size of each floor.

The component folders (``sim/``, ``codegen/``, ...) are installed as subpackages of
``tvm_cim`` (``package_dir`` in setup.py), which import-linter cannot see from the source
tree: it walks one directory per package. This script lays out the tree as it is installed
(copies, in a temporary directory) and points the tools at that copy::

    python tests/import_graph.py check [REPO]    # contracts in pyproject.toml, no circles
    python tests/import_graph.py report [REPO]   # files and lines per floor, circles

``make test`` runs ``check``.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "tvm_cim"


def components(repo: Path = REPO) -> dict[str, str]:
    """Installed subpackage -> source folder, as setup.py's ``COMPONENTS`` says."""
    tree = ast.parse((repo / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMPONENTS":
            return ast.literal_eval(node.value)
    raise SystemExit("setup.py defines no COMPONENTS")


def stage(repo: Path, dest: Path) -> Path:
    """Copy the package into ``dest`` laid out as installed; returns ``dest``.

    A Cython module becomes a Python stub holding its Python imports, so that its
    dependencies are part of the graph too.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.c")
    shutil.copytree(repo / PACKAGE, dest / PACKAGE, ignore=ignore)
    for package, folder in components(repo).items():
        shutil.copytree(repo / folder, dest / package.replace(".", "/"), ignore=ignore)
    for pyx in dest.rglob("*.pyx"):
        imports = [
            line
            for line in pyx.read_text().splitlines()
            if line.startswith(("import ", "from ")) and " cimport " not in line
        ]
        pyx.with_suffix(".py").write_text("\n".join(imports) + "\n")
    return dest


def _modules_in(staged: Path) -> dict[str, Path]:
    """Module name -> source file (the Cython source, not its stub)."""
    out = {}
    for path in sorted((staged / PACKAGE).rglob("*.py")):
        parts = path.relative_to(staged).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        pyx = path.with_suffix(".pyx")
        out[name] = pyx if pyx.exists() else path
    return out


def _graph(staged: Path):
    sys.path.insert(0, str(staged))
    import grimp

    return grimp.build_graph(PACKAGE, cache_dir=None)


def circles(staged: Path) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected), largest first."""
    import networkx as nx

    graph = _graph(staged)
    edges = nx.DiGraph()
    for module in graph.modules:
        edges.add_node(module)
        for imported in graph.find_modules_directly_imported_by(module):
            edges.add_edge(module, imported)
    groups = [sorted(c) for c in nx.strongly_connected_components(edges) if len(c) > 1]
    return sorted(groups, key=len, reverse=True)


def floors(staged: Path) -> dict[str, tuple[int, int]]:
    """``{floor: (files, lines)}``: the subpackages of ``tvm_cim`` and its own modules."""
    out: dict[str, list[int]] = {}
    for name, path in _modules_in(staged).items():
        parts = name.split(".")
        is_package = path.name == "__init__.py"
        floor = (
            ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and is_package) else PACKAGE
        )
        files_lines = out.setdefault(floor, [0, 0])
        files_lines[0] += 1
        files_lines[1] += len(path.read_text().splitlines())
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def check(repo: Path = REPO) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage(repo, Path(tmp))
        lint = subprocess.run(
            [
                str(Path(sys.executable).with_name("lint-imports")),
                "--no-cache",
                "--no-logo",
                str(repo / "pyproject.toml"),
            ],
            cwd=staged,
            env={"PYTHONPATH": str(staged), "PATH": "/usr/bin:/bin"},
        )
        found = circles(staged)
    for group in found:
        print("import circle: " + " <-> ".join(group))
    return 1 if lint.returncode or found else 0


def report(repo: Path = REPO) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage(repo, Path(tmp))
        print(f"{'floor':<24} {'files':>5} {'lines':>6}")
        for floor, (files, lines) in floors(staged).items():
            print(f"{floor:<24} {files:>5} {lines:>6}")
        found = circles(staged)
        print(f"import circles: {len(found)}")
        for group in found:
            print("  " + " <-> ".join(group))
        largest = sorted(
            ((len(p.read_text().splitlines()), n) for n, p in _modules_in(staged).items()),
            reverse=True,
        )[:5]
        print("largest modules: " + ", ".join(f"{n} ({lines})" for lines, n in largest))
    return 0


if __name__ == "__main__":
    verbs = {"check": check, "report": report}
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in verbs:
        raise SystemExit(f"usage: python {Path(__file__).name} {{check|report}} [REPO]")
    sys.exit(verbs[sys.argv[1]](Path(sys.argv[2]).resolve() if len(sys.argv) == 3 else REPO))
