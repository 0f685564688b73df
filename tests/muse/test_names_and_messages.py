"""One name per concept across the commands (old spellings kept a version, with a warning), one device default, and
messages that point the right way: the differing setting of a refused rerun, the hub's `hf` command, warnings as
one clean line, one statement of the --stages default."""

import importlib.metadata
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from muse import cli
from muse.generate import read_manifest

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str):
    argv = [str(a) for a in argv]
    return cli.build_parser(argv).parse_args(argv)


def run(*argv) -> None:
    cli.main([str(a) for a in argv])


# --------------------------------------------------------------------------------------------------------------------
# One name per concept


@pytest.mark.parametrize("argv, old, dest, value", [
    (("generate", "x", "--candidates", "3"), "--candidates", "option_num_candidates", 3),
    (("generate", "x", "--dtype", "float16"), "--dtype", "dtype", "float16"),
    (("eval", "--out", "o", "--best-of", "3"), "--best-of", "best_of", 3),
    (("eval", "--out", "o", "--candidates", "50"), "--candidates", "candidates", 50),
    (("convert", "a/b", "--out", "o", "--dtype", "float16"), "--dtype", "dtype", "float16"),
])
def test_old_spellings_still_work_with_a_warning_naming_the_new_one(argv, old, dest, value):
    new = {"--candidates": "--retrieval-captions" if argv[0] == "eval" else "--num-candidates", "--best-of":
           "--num-candidates", "--dtype": "--precision" if argv[0] == "generate" else "--weights-dtype"}[old]
    with pytest.warns(FutureWarning, match=f"{old} is deprecated .* use {new}"):
        args = parse(*argv)
    assert getattr(args, dest) == value
    new_argv = [new if a == old else a for a in argv]
    if old == "--dtype" and argv[0] == "generate":
        new_argv[-1] = "bfloat16"  # --precision is the arithmetic: float32, bfloat16 or auto
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse(*new_argv)  # the new spelling, silently


@pytest.mark.parametrize("command", ["generate", "eval", "convert"])
def test_help_shows_one_name_per_concept(command, capsys):
    with pytest.raises(SystemExit):
        parse(command, "--help")
    shown = capsys.readouterr().out
    assert "--dtype" not in shown and "--best-of" not in shown and "--candidates " not in shown
    if command != "convert":
        assert "--precision" in shown and "--num-candidates" in shown
    if command == "eval":
        assert "--retrieval-captions" in shown


def test_stages_help_states_one_default(capsys):
    with pytest.raises(SystemExit):
        parse("generate", "--help")
    shown = " ".join(capsys.readouterr().out.split())
    stages = shown[shown.index("--stages {1,2} "):shown.index("--num-candidates NUM_CANDIDATES ")]
    assert stages.count("default") == 1, stages


def test_one_device_default_everywhere(monkeypatch):
    import torch

    from muse.options import default_device
    from muse.server.app import add_arguments as serve_arguments

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() == "cuda:1"  # this torchrun rank's GPU
    # No command fixes a device of its own: each leaves --device unset, and default_device() decides.
    for argv in (("generate", "x"), ("inpaint", "x", "--image", "i.png", "--mask", "m.png"), ("eval", "--out", "o"),
                 ("serve",)):
        assert parse(*argv).device is None, argv
    import argparse

    serve = argparse.ArgumentParser()
    serve_arguments(serve)
    assert serve.parse_args([]).device is None


# --------------------------------------------------------------------------------------------------------------------
# Messages


def test_a_refused_rerun_names_the_setting_that_differs(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "run"
    run("generate", "a red apple", "--seed", 1, "--steps", 2, "--num-candidates", 1, "--out", out,
        "--model", tiny_pipeline_dir)
    assert len(read_manifest(out)) == 1
    with pytest.raises(SystemExit) as refused:
        run("generate", "a red apple", "--seed", 1, "--steps", 2, "--num-candidates", 2, "--out", out,
            "--model", tiny_pipeline_dir)
    message = str(refused.value)
    assert "000000.png: num_candidates 1 there, 2 now" in message, message
    assert "prompt" not in message.split("000000.png:")[1]  # the prompt is the same: not named
    with pytest.raises(SystemExit, match="prompt 'a red apple' there, 'a dog' now"):
        run("generate", "a dog", "--seed", 1, "--steps", 2, "--num-candidates", 1, "--out", out,
            "--model", tiny_pipeline_dir)


def test_the_hub_hint_names_the_command_huggingface_hub_installs(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from muse.loading import _hub_download

    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")
               if e.value.startswith("huggingface_hub")}
    assert "hf" in scripts

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError) as error:
        _hub_download("amused/amused-256")
    assert "`hf download amused/amused-256`" in str(error.value) and "huggingface-cli" not in str(error.value)


def test_warnings_on_the_command_line_are_one_clean_line(tiny_pipeline_dir, tmp_path):
    """A warning (here a deprecated flag's; a resumed run's changed config is another) shows as "muse: warning: ...",
    without the file, line and source line of the code that raised it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "muse.cli", "generate", "a red apple", "--dtype", "float32",
                           "--steps", "1", "--num-candidates", "1", "--out", str(tmp_path / "a.png"), "--model",
                           str(tiny_pipeline_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "warning" in line.lower() or "action(" in line]
    assert lines == ["muse: warning: --dtype is deprecated and will be removed in the next version; use "
                     "--precision"], done.stderr


def test_the_warning_format_is_one_line():
    assert cli._format_warning("resuming run/ckpt with a changed config:\n  train.steps", UserWarning, "x.py", 3,
                               "warnings.warn(...)") == ("muse: warning: resuming run/ckpt with a changed config: "
                                                         "train.steps\n")
