"""The package's layering, from its imports: who may import what (docs/ARCHITECTURE.md).

Every import statement of `rwkvx_jax` and `pallas_kernels` is read from the source (module level
and inside functions alike), so a lazy import that breaks a rule is caught too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("rwkvx_jax", "pallas_kernels")

# The layers of rwkvx_jax, lowest first: a module imports modules of its own layer or below.
# Inside one layer the wings stay apart (`SAME_LAYER_OK` lists the pairs that may meet).
# docs/ARCHITECTURE.md draws the same picture; keep the two together.
LAYERS = (
    ("base", ("config", "layers", "sharding", "tokenizer", "atomic_files")),
    ("kernel dispatch", ("ops", "context_parallel")),
    ("blocks", ("rwkv7", "sparse")),
    ("model", ("model",)),
    ("formats", ("checkpoints", "data")),
    ("inference", ("decoding", "api", "serving")),
    ("training", ("training",)),
    ("command-line helpers", ("cli",)),
    ("commands", ("generate", "train", "convert", "convert_demo", "evals", "serve", "__init__")),
)
# Wings of one layer that may import each other (one way: importer -> imported).
SAME_LAYER_OK = {
    ("sparse", "rwkv7"),
    ("api", "decoding"),
    ("serving", "decoding"),
    ("convert", "convert_demo"),
    ("ops", "context_parallel"),
}
# Modules run as programs: nothing imports them, and nothing but the evals imports the evals'
# shared helpers.
COMMANDS = ("rwkvx_jax.generate", "rwkvx_jax.train", "rwkvx_jax.convert", "rwkvx_jax.serve")
EVAL_HELPERS = ("rwkvx_jax.evals", "rwkvx_jax.evals.common")
# The library modules that import the kernel package: the model's dispatch, the config (backend
# names, the WKV chunk default) and the cached attention built on the top-k family's plan.
KERNEL_DOORS = (
    "rwkvx_jax.ops",
    "rwkvx_jax.config",
    "rwkvx_jax.sparse.cached_attention",
    "rwkvx_jax.sparse.chunk_sources",
)


def is_command(module: str) -> bool:
    """A command line or an evaluation (the evals are command lines with their own reports)."""
    if module in COMMANDS:
        return True
    return module.startswith("rwkvx_jax.evals.") and module not in EVAL_HELPERS


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_modules() -> dict[str, pathlib.Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in a module's source.

    `from a.b import c` counts as importing module `a.b.c` when that is a module, else as
    importing the name `c` from `a.b`."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([module] if module else []))
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                if submodule in known:
                    found.append((submodule, "", node.lineno))
                else:
                    found.append((module, alias.name, node.lineno))
    return found


def wing(module: str) -> str:
    """The wing of a rwkvx_jax module: its first name under the package ("__init__" for it)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(module: str) -> int:
    for index, (_, wings) in enumerate(LAYERS):
        if wing(module) in wings:
            return index
    raise KeyError(module)


def violations(graph: dict[str, list[tuple[str, str, int]]]) -> list[str]:
    """Every broken rule in an import graph {module: imports_of(module)}."""
    found = []
    for importer, imports in sorted(graph.items()):
        for imported, name, line in imports:
            where = f"{importer}:{line} imports {imported}{'.' + name if name else ''}"
            top = imported.split(".")[0]
            if top not in PACKAGES:
                continue
            if name.startswith("_") and not name.startswith("__") and imported != importer:
                found.append(f"{where}: a private name of another module")
            if importer.startswith("pallas_kernels"):
                if top == "rwkvx_jax":
                    found.append(f"{where}: the kernel package never imports the library")
                continue
            if top == "pallas_kernels" and importer not in KERNEL_DOORS:
                found.append(f"{where}: kernels are reached through rwkvx_jax.ops")
                continue
            if top != "rwkvx_jax" or imported == importer:
                continue
            if is_command(imported):
                found.append(f"{where}: a command line (or an eval) is imported by nothing")
                continue
            if imported == "rwkvx_jax" and importer != "rwkvx_jax":
                found.append(
                    f"{where}: library code imports the package facade (import the module)"
                )
                continue
            mine, theirs = layer_of(importer), layer_of(imported)
            if theirs > mine:
                found.append(
                    f"{where}: layer '{LAYERS[mine][0]}' reaches up to '{LAYERS[theirs][0]}'"
                )
            elif theirs == mine and wing(importer) != wing(imported):
                if (wing(importer), wing(imported)) not in SAME_LAYER_OK:
                    found.append(f"{where}: wings of layer '{LAYERS[mine][0]}' stay apart")
    return found


def package_graph() -> dict[str, list[tuple[str, str, int]]]:
    modules = source_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in source_modules() if m.startswith("rwkvx_jax") and _unplaced(m)]
    assert not unplaced, f"modules with no layer in LAYERS: {unplaced}"


def _unplaced(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return True
    return False


def test_imports_follow_the_layers():
    found = violations(package_graph())
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("importer", "imported", "name", "rule"),
    [
        ("rwkvx_jax.data.synthetic", "rwkvx_jax.evals.passkey", "", "command line"),
        ("rwkvx_jax.model", "rwkvx_jax.generate", "", "command line"),
        ("rwkvx_jax.decoding.decoder", "rwkvx_jax.training.losses", "", "reaches up"),
        ("rwkvx_jax.checkpoints.directory", "rwkvx_jax.data.corpora", "", "stay apart"),
        ("pallas_kernels.wkv7.ops", "rwkvx_jax.config", "", "never imports the library"),
        ("rwkvx_jax.sparse.block", "rwkvx_jax.layers", "_helper", "private name"),
        ("rwkvx_jax.training.loop", "rwkvx_jax", "Decoder", "package facade"),
        ("rwkvx_jax.rwkv7", "pallas_kernels.wkv7.ops", "", "through rwkvx_jax.ops"),
    ],
)
def test_a_planted_bad_import_is_caught(importer, imported, name, rule):
    """The checker is not vacuous: each kind of broken rule, planted into the real graph."""
    graph = package_graph()
    graph[importer] = [*graph[importer], (imported, name, 999)]
    found = [v for v in violations(graph) if ":999 " in v]
    assert len(found) == 1 and rule in found[0], found


def test_the_architecture_map_names_every_room():
    """docs/ARCHITECTURE.md is the map: it names every module by its path inside its package
    (`decoding/state_files.py`, `wkv7/ops.py`) and every package folder (`sparse/`)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = []
    for path in source_modules().values():
        inside = path.relative_to(ROOT).parts[1:]
        if path.name == "__init__.py":
            room = "/".join(inside[:-1]) + "/" if len(inside) > 1 else path.parent.name + "/"
        else:
            room = "/".join(inside)
        if room not in text:
            missing.append(room)
    assert not missing, f"docs/ARCHITECTURE.md does not mention: {missing}"
