"""bench/'s layout: no script shadows a module, every script times through bench/timing.py, and
every bench path the repository names exists.

Running a bench script puts its folder first on sys.path, so a script named like a module of the
project (train.py, wkv7.py, tokenizer.py) or of Python and its packages would be imported in that
module's place.
"""

from __future__ import annotations

import ast
import importlib.machinery
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PACKAGES = ("rwkvx_jax", "pallas_kernels")
# Where the repository names bench files: docs, sources and scripts (not .venv or build output).
NAMING_FILES = (
    [ROOT / "README.md"]
    + sorted((ROOT / "docs").rglob("*.md"))
    + sorted(ROOT.glob("*.py"))
    + [p for folder in (*PACKAGES, "bench", "tests") for p in sorted((ROOT / folder).rglob("*.py"))]
    + sorted(BENCH.rglob("*.sh"))
)
BENCH_PATH = re.compile(r"\bbench/[\w./-]*?\.(?:py|sh)\b")


def _bench_scripts() -> list[Path]:
    return sorted(BENCH.rglob("*.py"))


def _project_module_names() -> dict[str, str]:
    """Every name a project module or package answers to, top-level or nested: {name: path}."""
    names = {p.stem: p.name for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        names[package] = package
        for path in (ROOT / package).rglob("*"):
            if path.suffix == ".py" and path.stem != "__init__":
                names[path.stem] = str(path.relative_to(ROOT))
            elif path.is_dir() and (path / "__init__.py").exists():
                names[path.name] = str(path.relative_to(ROOT))
    return names


def test_no_bench_script_is_named_like_a_project_module():
    names = _project_module_names()
    clashes = {str(p.relative_to(ROOT)): names[p.stem] for p in _bench_scripts() if p.stem in names}
    assert not clashes, f"bench scripts named like project modules (rename them): {clashes}"


def test_no_bench_script_is_named_like_an_importable_module():
    """Not like a module of Python or an installed package either (a script named profile.py
    would shadow the standard library's `profile`)."""
    bench = {BENCH.resolve(), *(p.resolve() for p in BENCH.rglob("*") if p.is_dir())}
    path = [p for p in sys.path if Path(p or ".").resolve() not in bench]
    shadowing = [
        str(p.relative_to(ROOT))
        for p in _bench_scripts()
        if p.stem in sys.builtin_module_names
        or importlib.machinery.PathFinder.find_spec(p.stem, path) is not None
    ]
    assert not shadowing, f"bench scripts named like importable modules: {shadowing}"


def test_bench_script_names_are_unique():
    stems = [p.stem for p in _bench_scripts()]
    assert len(stems) == len(set(stems)), sorted(stems)


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".")[0])
    return modules


def test_bench_scripts_time_through_bench_timing():
    """Only bench/timing.py reads a clock: the others call it (one helper, one way to warm up,
    sync and take the best or median), so no script keeps a timing loop of its own."""
    clocks = {"time", "timeit"}
    own_clocks = {
        str(p.relative_to(ROOT)): sorted(_imported_modules(p) & clocks)
        for p in _bench_scripts()
        if p != BENCH / "timing.py" and _imported_modules(p) & clocks
    }
    assert not own_clocks, f"bench scripts timing without bench/timing.py: {own_clocks}"


def test_every_named_bench_path_exists():
    """Usage lines, docs and session scripts name bench files by path from the repository root
    (the device tool runs commands there); each must exist."""
    missing = sorted(
        f"{source.relative_to(ROOT)}: {name}"
        for source in NAMING_FILES
        for name in set(BENCH_PATH.findall(source.read_text()))
        if not (ROOT / name).is_file()
    )
    assert not missing, "\n".join(missing)
