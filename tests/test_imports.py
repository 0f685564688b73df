"""Imports flow one way: persist (files, configs, weights on disk) imports none of our packages; vqgan, transformer and
sampling import only persist; superres imports only transformer and persist; nothing imports muse. Inside muse: the data code and the config loader never import the training code;
nothing outside muse/train imports it (the CLI loads it by module name); each training loop imports only the shared
training modules, never another stage's loop, and those import no loop."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"muse", "vqgan", "transformer", "superres", "sampling", "persist"}
ALLOWED = {
    "persist": set(),
    "vqgan": {"persist"},
    "transformer": {"persist"},
    "sampling": {"persist"},
    "superres": {"transformer", "persist"},
    "muse": OURS - {"muse"},
}
# muse modules (a file or a folder, dotted) -> the muse modules they may import; prefixes match submodules.
MUSE_ALLOWED = {
    "muse.config": set(),
    "muse.options": set(),
    "muse.progress": set(),
    "muse.data": {"muse.config", "muse.data", "muse.progress"},
    # What the training loops share, bottom up: processes and devices, then what builds on them.
    "muse.train.runtime": {"muse.config", "muse.options"},
    "muse.train.optim": {"muse.config", "muse.train.runtime"},
    "muse.train.ema": {"muse.train.runtime"},
    "muse.train.batches": {"muse.train.runtime"},
    "muse.train.checkpoint": {"muse.config", "muse.train.runtime", "muse.train.ema", "muse.train.batches"},
    "muse.train.logger": set(),
    # The pipeline's parts never import the pipeline: requests and inputs hold values and checks, loading reads and
    # writes directories through the component registry, which imports the architectures by name.
    "muse.components": set(),
    "muse.inputs": {"muse.data", "muse.options"},
    "muse.requests": {"muse.options", "muse.inputs"},
    "muse.loading": {"muse.bundled", "muse.components", "muse.options", "muse.scorer"},
}
TRAIN_SHARED = {"muse.train.runtime", "muse.train.optim", "muse.train.ema", "muse.train.batches",
                "muse.train.checkpoint", "muse.train.logger"}
TRAIN_LOOPS = {"muse.train.vqgan", "muse.train.masked", "muse.train.scorer"}
TRAIN_ENTRY = {"muse.train", "muse.train.run"}  # the package and `muse train`, which picks a loop by name


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


def test_each_training_loop_imports_only_the_shared_training_modules():
    modules = muse_modules()
    train = {name for name in modules if within(name, "muse.train")}
    # Every module of muse/train is classified, so a new one gets a rule here rather than slipping through.
    assert train == TRAIN_LOOPS | TRAIN_SHARED | TRAIN_ENTRY, sorted(train ^ (TRAIN_LOOPS | TRAIN_SHARED | TRAIN_ENTRY))
    bad = [f"{name} imports {other}" for name in sorted(TRAIN_LOOPS) for other in sorted(modules[name])
           if within(other, "muse.train") and other not in TRAIN_SHARED]
    assert not bad, "\n".join(bad)
