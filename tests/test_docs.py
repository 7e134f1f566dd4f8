"""The documentation stays true to the tree: the module map of docs/architecture.md lists every module of
the package and nothing else, every relative link and image resolves, the `byol-ray` commands, their
flags and the `section.key` overrides the docs show exist, and no document names a path outside the
repository.

Everything is read from the files (nothing is imported but the config's defaults and the command
table), so the checks take a second. Each checker is also run on a small synthetic input that breaks its
rule, to show it can fail.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from conftest import command_flags, command_problems, config_keys, key_problems

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "byol_ray"
ARCHITECTURE = REPO / "docs" / "architecture.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300


# ---- the module map -----------------------------------------------------------------------------
def section(text: str, heading: str) -> str:
    """The body of the Markdown section `## <heading>`, up to the next heading of level 1 or 2."""
    m = re.search(rf"^## {re.escape(heading)}[ \t]*\n(.*?)(?=^#{{1,2}} |\Z)", text, flags=re.M | re.S)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def listed_modules(text: str) -> list[str]:
    """The module paths of the map: the backticked `byol_ray/...py` opening each table row."""
    return re.findall(r"^\|\s*`(byol_ray/[\w/]+\.py)`\s*\|", section(text, "Module map"), flags=re.M)


def defines_code(path: Path) -> bool:
    """Whether a file defines a function or class at top level (a package's `__init__.py` that only
    holds a docstring and re-exports is not a module of its own in the map)."""
    tree = ast.parse(path.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for n in tree.body)


def tree_modules(root: Path) -> list[str]:
    """Every module of the package at `root` as a repository path (byol_ray/core/engine.py)."""
    return sorted(
        str(f.relative_to(root.parent)) for f in root.rglob("*.py") if f.name != "__init__.py" or defines_code(f)
    )


def map_problems(listed: list[str], tree: list[str]) -> list[str]:
    dupes = sorted({m for m in listed if listed.count(m) > 1})
    return (
        [f"{m}: listed twice in the module map" for m in dupes]
        + [f"{m}: in the tree, missing from the module map" for m in sorted(set(tree) - set(listed))]
        + [f"{m}: in the module map, not in the tree" for m in sorted(set(listed) - set(tree))]
    )


def test_the_module_map_matches_the_tree():
    assert map_problems(listed_modules(ARCHITECTURE.read_text()), tree_modules(PACKAGE)) == []


def test_the_module_map_check_can_fail(tmp_path):
    pkg = tmp_path / "byol_ray"
    for rel, text in {
        "__init__.py": '"""docstring only"""\n__version__ = "0"\n',
        "cli/__init__.py": "def main():\n    return 0\n",
        "core/__init__.py": "from .engine import Pretrainer\n",
        "core/engine.py": "class Pretrainer: ...\n",
        "core/loss.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert tree_modules(pkg) == ["byol_ray/cli/__init__.py", "byol_ray/core/engine.py", "byol_ray/core/loss.py"]
    doc = (
        "# Architecture\n\n## Module map\n\n| module | holds |\n|---|---|\n"
        "| `byol_ray/cli/__init__.py` | the entry point |\n"
        "| `byol_ray/core/engine.py` | the replica |\n"
        "| `byol_ray/core/old.py` | a module since removed |\n"
        "| `byol_ray/core/engine.py` | again |\n\n"
        "## Imports run one way\n\n| `byol_ray/core/loss.py` | outside the map's section |\n"
    )
    assert map_problems(listed_modules(doc), tree_modules(pkg)) == [
        "byol_ray/core/engine.py: listed twice in the module map",
        "byol_ray/core/loss.py: in the tree, missing from the module map",
        "byol_ray/core/old.py: in the module map, not in the tree",
    ]


# ---- links and images ---------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    body = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # a '# comment' in a code block is no heading
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", body, flags=re.M)}


def link_problems(doc: Path, root: Path) -> list[str]:
    """Relative links and images of a Markdown file whose file (or #anchor) does not exist."""
    bad = []
    text = doc.read_text()
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{doc.name}: {target} does not exist")
        elif root not in dest.parents:
            bad.append(f"{doc.name}: {target} leaves the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            bad.append(f"{doc.name}: {target} names no heading of {dest.name}")
    return bad


def test_links_and_images_resolve():
    assert [p for doc in DOCS for p in link_problems(doc, REPO)] == []


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "shot.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Other\n\n## The `make main` output\n")
    doc = tmp_path / "README.md"
    doc.write_text(
        "# Title\n\n## The MLflow UI\n\n```bash\n# not a heading\n```\n\n"
        "[up](#the-mlflow-ui) [out](other.md#the-make-main-output) ![ok](img/shot.png) [web](https://x.org)\n"
        "[gone](#not-a-heading) [moved](docs/old.md) ![lost](img/missing.png) [bad](other.md#nowhere)\n"
    )
    assert link_problems(doc, tmp_path) == [
        "README.md: #not-a-heading names no heading of README.md",
        "README.md: docs/old.md does not exist",
        "README.md: img/missing.png does not exist",
        "README.md: other.md#nowhere names no heading of other.md",
    ]


# ---- commands, flags and config keys the docs show -------------------------------------------------
def snippets(text: str) -> list[str]:
    """What a reader would type: each logical line of a fenced code block (backslash continuations
    joined), and each inline code span."""
    out = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        out += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    out += re.findall(r"`([^`\n]+)`", prose)
    return out


def test_documented_commands_and_flags_exist():
    flags = command_flags(PACKAGE / "cli")
    assert [p for doc in DOCS for p in command_problems(snippets(doc.read_text()), flags)] == []


def test_documented_config_keys_exist():
    keys = config_keys()
    assert [p for doc in DOCS for p in key_problems(snippets(doc.read_text()), keys, PACKAGE)] == []


def test_the_command_and_key_checks_can_fail():
    text = (
        "Run `byol-ray train --config x.yaml optim.epochs=2` or `byol-ray evaluate`, then\n\n"
        "```bash\nbyol-ray sweep tau --fresh --seeds 3 \\\n    optim.epoch=2   # --not-a-flag in a comment\n"
        "ray job submit --working-dir . -- python -m byol_ray.train --config c.yaml --resume\n```\n\n"
        "Set `eval.collapse_std`, `eval.collapse`, `eval.scoring.evaluate_encoders`, `model.py` and `run.name=x`.\n"
    )
    snips = snippets(text)
    assert command_problems(snips, command_flags(PACKAGE / "cli")) == [
        "`byol-ray sweep tau --fresh --seeds 3      optim.epoch=2`: byol-ray sweep has no --seeds",
        "`ray job submit --working-dir . -- python -m byol_ray.train --config c.yaml --resume`: "
        "byol-ray train has no --resume",
        "`byol-ray evaluate`: no command byol-ray evaluate",
    ]
    assert key_problems(snips, config_keys(), PACKAGE) == [
        "`byol-ray sweep tau --fresh --seeds 3      optim.epoch=2   # --not-a-flag in a comment`: "
        "no config key optim.epoch",
        "`eval.collapse`: no config key eval.collapse",
    ]


# ---- the repository names nothing outside itself ------------------------------------------------
# Spelled in pieces, so that this file does not name such a path itself and needs no exception.
OUTSIDE = re.compile("|".join(re.escape(p) for p in ("../" + "shared", "/" + "work" + "/")))


def test_no_tracked_file_names_a_path_outside_the_repository():
    """A user's clone has only the repository: no file may point into a folder beside it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = [REPO / f for f in tracked.splitlines()]
    bad = [
        f"{f.relative_to(REPO)}:{i}: {line.strip()}"
        for f in files
        if f.suffix not in {".png", ".jpg"} and f.is_file()
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert bad == []


def test_the_readme_stays_a_guide():
    """The README is the user guide; measurements go to docs/benchmarks.md and docs/ablations.md."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
