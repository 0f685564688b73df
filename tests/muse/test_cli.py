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
