"""The `muse` dispatcher: every listed command has a module that builds its arguments and runs it."""

import importlib

import pytest

from muse import cli


@pytest.mark.parametrize("name, module", [(n, m) for n, (m, _) in {**cli.COMMANDS, **cli.DATA_COMMANDS}.items()])
def test_every_command_has_its_module(name, module):
    mod = importlib.import_module(module)
    add = getattr(mod, f"add_{name}_arguments", None) or getattr(mod, "add_arguments", None)
    run = getattr(mod, f"{name}_main", None) or getattr(mod, "main", None)
    assert callable(add) and callable(run), f"{module} lacks the add_arguments / main pair for `muse {name}`"


@pytest.mark.parametrize("argv", [["assemble", "--help"], ["scorer", "--help"], ["eval", "--help"]])
def test_new_commands_parse(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0 and "usage: muse" in capsys.readouterr().out


def test_assemble_refuses_a_missing_run_clearly(tmp_path):
    with pytest.raises(SystemExit, match="muse assemble: .* is not a training run directory"):
        cli.main(["assemble", "--transformer-run", str(tmp_path / "nope"), "--out", str(tmp_path / "p")])


@pytest.mark.parametrize("argv, shown", [
    (["scorer", "--help"], "training steps (default: 1000)"),
    (["eval", "--help"], "(default: heldout)"),
    (["serve", "--help"], "most /edit iterations (default: 8)"),
    (["data", "tokenize", "--help"], "images encoded per forward pass (default: 64)"),
])
def test_help_shows_the_defaults(argv, shown, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert shown in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", [[], *([name] for name in cli.COMMANDS), *(["data", name] for name in
                                                                               cli.DATA_COMMANDS)])
def test_help_imports_no_torch(command):
    """`muse X --help` must start at once (bench/startup.py measures it): building the flags imports no torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom muse import cli\ntry:\n    cli.main(sys.argv[1:] + ['--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False", f"muse {' '.join(command)} --help imported torch"
