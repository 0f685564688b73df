"""Imports flow one way: vqgan, transformer and sampling import none of our packages; superres imports only
transformer; nothing imports muse."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"muse", "vqgan", "transformer", "superres", "sampling"}
ALLOWED = {
    "vqgan": set(),
    "transformer": set(),
    "sampling": set(),
    "superres": {"transformer"},
    "muse": OURS - {"muse"},
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_direction(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for other in imported_packages(path) - ALLOWED[package] - {package}:
            bad.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not bad, "\n".join(bad)

