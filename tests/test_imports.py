"""Imports flow one way: vqgan, transformer and sampling import none of our packages; superres imports only
transformer; nothing imports muse. Inside muse: the data code and the config loader never import the training code;
nothing outside muse/train imports it (the CLI loads it by module name); each training loop imports only the shared
runtime, never another stage's loop."""

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
# muse modules (a file or a folder, dotted) -> the muse modules they may import; prefixes match submodules.
MUSE_ALLOWED = {
    "muse.config": set(),
    "muse.options": set(),
    "muse.data": {"muse.config", "muse.data"},
    "muse.train.runtime": {"muse.config", "muse.options"},
    # The pipeline's parts never import the pipeline: requests and inputs hold values and checks, loading reads and
    # writes directories through the component registry, which imports the architectures by name.
    "muse.components": set(),
    "muse.inputs": {"muse.data"},
    "muse.requests": {"muse.options", "muse.inputs"},
    "muse.loading": {"muse.bundled", "muse.components", "muse.options", "muse.scorer"},
}
TRAIN_LOOPS = {"muse.train.vqgan", "muse.train.masked", "muse.train.scorer"}


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module `path` imports (anywhere in the file, relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from muse import train`
    return names


def imported_packages(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)} & OURS


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def muse_modules() -> dict[str, set[str]]:
    """Every muse module -> the muse modules it imports, counting only those that exist (not `muse.data.X` names
    that are attributes)."""
    files = {module_name(p): p for p in (ROOT / "muse").rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in files and m != name} for name, path in files.items()}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_direction(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for other in imported_packages(path) - ALLOWED[package] - {package}:
            bad.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("prefix", sorted(MUSE_ALLOWED))
def test_import_direction_inside_muse(prefix):
    bad = []
    for name, imports in sorted(muse_modules().items()):
        if not within(name, prefix):
            continue
        for other in sorted(imports):
            if not any(within(other, allowed) for allowed in MUSE_ALLOWED[prefix]):
                bad.append(f"{name} imports {other}")
    assert not bad, "\n".join(bad)


def test_the_component_registry_declares_the_architectures_it_loads():
    """Its classes are imported by name (not by string), so this test and a reader see pipeline -> architecture."""
    imports = imported_modules(ROOT / "muse" / "components.py")
    assert {"vqgan.model", "vqgan.vqmodel", "transformer.model", "transformer.uvit", "superres.model"} <= imports


def test_only_the_training_code_imports_the_training_code():
    bad = [f"{name} imports {other}" for name, imports in sorted(muse_modules().items())
           for other in sorted(imports) if within(other, "muse.train") and not within(name, "muse.train")]
    assert not bad, "\n".join(bad)


def test_each_training_loop_imports_only_the_runtime_of_muse_train():
    modules = muse_modules()
    assert TRAIN_LOOPS <= set(modules)
    bad = [f"{name} imports {other}" for name in sorted(TRAIN_LOOPS) for other in sorted(modules[name])
           if within(other, "muse.train") and other != "muse.train.runtime"]
    assert not bad, "\n".join(bad)
