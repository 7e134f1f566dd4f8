"""The package's shape, checked from its source: imports run one way, Ray and MLflow stay at the edges,
no module reaches into another's private names, and every config key is read by the code it configures.

The checks read the source with `ast` (nothing is imported), so lazy imports inside functions count too.
Each checker is also run on a small synthetic package that breaks its rule, to show it can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from byol_ray.config import Config

PACKAGE = Path(__file__).resolve().parents[1] / "byol_ray"
TESTS = Path(__file__).resolve().parent

# What each part of the package may import (besides itself). Read downwards: cli on top; errors and
# seeding are leaves. Shims (`python -m byol_ray.train` / `.bench`) only forward to cli.
ALLOWED = {
    "errors": set(),
    "seeding": set(),
    "config": {"errors"},
    "sweep_spec": {"config", "errors"},
    "data": {"config", "errors", "seeding"},
    "core": {"data", "config", "errors", "seeding"},
    "tracking": {"config", "errors", "sweep_spec"},
    "eval": {"core", "data", "tracking", "config", "errors", "seeding"},
    "training": {"eval", "core", "data", "config", "errors", "seeding"},
    "distributed": {"training", "eval", "core", "data", "tracking", "config", "errors", "seeding", "sweep_spec"},
    "cli": {"distributed", "training", "eval", "core", "data", "tracking", "config", "errors", "seeding", "sweep_spec"},
    "train": {"cli"},
    "bench": {"cli"},
    "__init__": set(),
}
# Third-party packages that only one part may import.
EDGES = {"mlflow": "tracking", "ray": "distributed"}


# ---- reading the source -------------------------------------------------------------------------
def modules(root: Path, name: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package at `root`."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([name, *parts])] = f
    return out


def is_package(mods: dict[str, Path], mod: str) -> bool:
    return mods[mod].name == "__init__.py"


def from_target(mods: dict[str, Path], mod: str, node: ast.ImportFrom) -> str:
    """The absolute module of `from <target> import ...` in `mod` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = (mod if is_package(mods, mod) else mod.rpartition(".")[0]).split(".")
    return ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))


def imports(mods: dict[str, Path], mod: str) -> list[tuple[str, list[str], int]]:
    """(absolute module imported, names taken from it, line) for every import statement of `mod`."""
    out = []
    for node in ast.walk(ast.parse(mods[mod].read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = from_target(mods, mod, node)
            names = [a.name for a in node.names]
            # `from pkg import module` imports the module.
            subs = [n for n in names if f"{target}.{n}" in mods]
            if subs:
                out += [(f"{target}.{n}", [], node.lineno) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def internal_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(mods, m) if t in mods and t != m} for m in mods}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first == last), or [] when the graph has none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (c := visit(n)):
                return c
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return []


def private_imports(mods: dict[str, Path]) -> list[str]:
    """`from other import _name` and `other._name` across modules of the package."""
    bad = []
    for m in mods:
        tree = ast.parse(mods[m].read_text())
        aliases = {}
        for t, names, line in imports(mods, m):
            if t in mods and t != m:
                bad += [f"{m}:{line} imports {t}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in node.names if a.name in mods})
            elif isinstance(node, ast.ImportFrom):  # `from pkg import module [as alias]`
                target = from_target(mods, m, node)
                aliases.update(
                    {a.asname or a.name: f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods}
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return bad


def part(mod: str) -> str:
    """The part of the package a module belongs to: its subpackage, or the top-level module's name."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layering_violations(mods: dict[str, Path], allowed: dict[str, set[str]]) -> list[str]:
    bad = []
    for m in mods:
        for t, _, line in imports(mods, m):
            if t in mods and part(t) != part(m) and part(t) not in allowed[part(m)]:
                bad.append(f"{m}:{line} imports {t} ({part(m)} may not import {part(t)})")
    return bad


def edge_violations(mods: dict[str, Path], edges: dict[str, str]) -> list[str]:
    bad = []
    for m in mods:
        for t, _, line in imports(mods, m):
            top = t.split(".")[0]
            if top in edges and part(m) != edges[top]:
                bad.append(f"{m}:{line} imports {t} (only {edges[top]}/ may import {top})")
    return bad


# ---- the package -------------------------------------------------------------------------------------
MODS = modules(PACKAGE, "byol_ray")


def test_the_package_is_split_into_subpackages():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert top == ["cli", "config", "core", "data", "distributed", "eval", "tracking", "training"]
    loose = sorted(f.stem for f in PACKAGE.glob("*.py"))
    assert loose == ["__init__", "bench", "errors", "seeding", "sweep_spec", "train"]
    assert set(map(part, MODS)) <= set(ALLOWED)


def test_no_import_cycle():
    assert find_cycle(internal_graph(MODS)) == []


def test_no_private_name_crosses_modules():
    assert private_imports(MODS) == []


def test_imports_run_one_way():
    assert layering_violations(MODS, ALLOWED) == []


def test_mlflow_only_in_tracking_and_ray_only_in_distributed():
    assert edge_violations(MODS, EDGES) == []


def test_errors_and_seeding_are_leaves_and_domain_errors_are_user_errors():
    for leaf in ("byol_ray.errors", "byol_ray.seeding"):
        assert not [t for t, _, _ in imports(MODS, leaf) if t.startswith("byol_ray")]
    from byol_ray.config import ConfigError
    from byol_ray.data.readers import DataError
    from byol_ray.errors import UserError
    from byol_ray.sweep_spec import SweepError
    from byol_ray.tracking.uri import TrackingError

    assert all(issubclass(e, UserError) for e in (ConfigError, DataError, SweepError, TrackingError))


def test_no_test_module_imports_another():
    test_mods = modules(TESTS, "tests")
    for m, f in test_mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n.split(".")[0].startswith("test_")], f"{m} imports {names}"


# ---- dead config keys -------------------------------------------------------------------------------
def config_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of the config."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def read_names(files: list[Path]) -> set[str]:
    """Attribute names read in `files` (x.name), and string constants (getattr(x, "name"))."""
    names = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


def unread_fields(fields: list[str], files: list[Path]) -> list[str]:
    names = read_names(files)
    return [f for f in fields if f.rpartition(".")[2] not in names]


# The one module of the config package that uses a key rather than naming or checking it: the GPU recipe
# applies `on_gpu` (the driver calls it).
CONFIG_KEY_USERS = {"byol_ray.config.gpu_recipe"}


def test_every_config_key_is_read_outside_the_config_package():
    # The rest of the config package names and checks every key (schema, validation): that is no use of it.
    readers = [f for m, f in MODS.items() if part(m) != "config" or m in CONFIG_KEY_USERS]
    assert unread_fields(config_fields(), readers) == []


# ---- the checkers can fail ----------------------------------------------------------------------
def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = root / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return modules(root / "pkg", "pkg")


def test_the_checkers_catch_what_they_look_for(tmp_path):
    mods = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/a.py": "from .b import helper\n",
            "core/b.py": "def helper():\n    from . import a\n    from ..tracking.t import _secret\n",
            "tracking/__init__.py": "",
            "tracking/t.py": "import mlflow\n_secret = 1\n",
            "cli/__init__.py": "import mlflow.pytorch\nimport ray\nfrom pkg.core import b\nx = b._private\n",
        },
    )
    cycle = find_cycle(internal_graph(mods))
    assert cycle[0] == cycle[-1] and sorted(cycle[1:]) == ["pkg.core.a", "pkg.core.b"]
    assert sorted(private_imports(mods)) == [
        "pkg.cli:4 uses pkg.core.b._private",
        "pkg.core.b:3 imports pkg.tracking.t._secret",
    ]
    assert edge_violations(mods, {"mlflow": "tracking", "ray": "distributed"}) == [
        "pkg.cli:1 imports mlflow.pytorch (only tracking/ may import mlflow)",
        "pkg.cli:2 imports ray (only distributed/ may import ray)",
    ]
    assert layering_violations(mods, {"core": set(), "tracking": set(), "cli": {"core"}, "__init__": set()}) == [
        "pkg.core.b:3 imports pkg.tracking.t (core may not import tracking)"
    ]
    # A field nobody reads is reported; a read one is not.
    src = tmp_path / "reader.py"
    src.write_text("def f(cfg):\n    return cfg.optim.epochs, getattr(cfg.augment.view1, 'flip_prob')\n")
    assert unread_fields(["optim.epochs", "augment.view1.flip_prob", "optim.max_minutes"], [src]) == [
        "optim.max_minutes"
    ]
