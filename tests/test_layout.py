"""docs/layout.md stays true: imports run the one way it states, no script is imported, nothing patches sys.path."""

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_MODULES = {"errors", "utils", "losses", "predictor"}  # the top-level .py files that are not scripts
SKIPPED = {"tests", ".venv", ".git", "docs", "deploy_assets"}


def stated_tiers() -> list[set[str]]:
    """The dependency sentence of docs/layout.md, lowest tier first (a name may import any name left of it)."""
    text = " ".join((ROOT / "docs" / "layout.md").read_text(encoding="utf-8").split())
    sentence = re.search(r"Dependencies run one way: (.+?)\. ", text).group(1)
    return [set(re.findall(r"`([\w/]+?)/?`", tier)) | ({"scripts"} if "scripts" in tier else set())
            for tier in sentence.split("<-")]


def sources() -> dict[Path, str]:
    """Every project Python file outside tests/, with its unit: a package, a library module or ``scripts``."""
    units = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in SKIPPED or any(part.startswith(".") for part in parts):
            continue
        name = parts[0] if len(parts) > 1 else path.stem
        units[path] = name if len(parts) > 1 or name in LIBRARY_MODULES else "scripts"
    return units


@cache
def nodes(path: Path) -> list[ast.AST]:
    return list(ast.walk(ast.parse(path.read_text(encoding="utf-8"))))


def imported(path: Path) -> set[str]:
    """Top-level names of the absolute imports in ``path`` (also those inside functions)."""
    names = set()
    for node in nodes(path):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imports_run_the_way_docs_layout_states():
    tiers = stated_tiers()
    tier_of = {name: i for i, tier in enumerate(tiers) for name in tier}
    units = sources()
    scripts = {path.stem for path, unit in units.items() if unit == "scripts"}
    project = set(tier_of) | scripts
    assert set(units.values()) <= set(tier_of), f"not placed in docs/layout.md: {set(units.values()) - set(tier_of)}"
    wrong = []
    for path, unit in units.items():
        for name in imported(path) & project:
            target = "scripts" if name in scripts else name
            if name in scripts or (target != unit and tier_of[target] >= tier_of[unit]):
                wrong.append(f"{path.relative_to(ROOT)} ({unit}) imports {name}")
    assert not wrong, "\n".join(wrong)


def test_nothing_patches_sys_path():
    patched = []
    for path in sources():
        for node in nodes(path):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                patched.append(str(path.relative_to(ROOT)))
    assert not patched, f"sys.path used outside tests/: {sorted(set(patched))}"
