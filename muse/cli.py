"""The `muse` command: one subcommand per job, each implemented by a module with `add_arguments` and `main`.

Only the chosen subcommand's module is imported, so `muse --help` is instant and one job's heavy imports never slow
another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Sequence

# name -> (module, one-line help). `data` has its own sub-subcommands.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("muse.generate", "generate images from prompts (one prompt, or a prompts file in batches)"),
    "inpaint": ("muse.generate", "regenerate the white part of a mask in an image"),
    "outpaint": ("muse.generate", "extend an image by pixels on any side"),
    "edit": ("muse.generate", "re-mask part of an image's tokens and resample under a new prompt"),
    "upscale": ("muse.generate", "super-resolve an image with the super-res stage alone"),
    "train": ("muse.train.run", "train a stage from a YAML preset (vqgan, transformer, superres or scorer)"),
    "assemble": ("muse.assemble", "write a pipeline directory from a transformer run and an optional super-res run"),
    "convert": ("muse.convert", "write a musegen pipeline directory from a diffusers aMUSEd directory or hub id"),
    "eval": ("muse.evaluate", "evaluate a model: reconstruction, prompt fidelity, Frechet distance, inpainting"),
    "scorer": ("muse.train.run", "train the in-house prompt scorer (best-of-N and muse eval's prompt fidelity)"),
    "serve": ("muse.server", "serve generation and editing over HTTP"),
}
DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "emoji": ("muse.data.emoji", "build the offline emoji image-caption dataset"),
    "tokenize": ("muse.data.tokenize", "pre-encode a dataset into token + text-state shards"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or action.required or default is None
                or default is False or default == [] or default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _load(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            sys.exit(f"muse: the '{name}' command is not available in this version")
        raise


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muse", description="Muse-style text-to-image generation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv else None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if name == chosen:
            mod = _load(module, name)
            (getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments)(p)
            p.set_defaults(_main=getattr(mod, f"{name}_main", None) or mod.main)
    data = sub.add_parser("data", help="build and pre-encode datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    data_chosen = argv[1] if chosen == "data" and len(argv) > 1 else None
    for name, (module, help_) in DATA_COMMANDS.items():
        p = data_sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if name == data_chosen:
            mod = _load(module, f"data {name}")
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """A warning as one line a user can read: "muse: warning: MESSAGE", without the file, line number and source
    line of the code that raised it (which Python's default format shows, and which say nothing to a user)."""
    text = " ".join(str(message).split())  # one line, even for a message written over several
    return f"muse: warning: {text}\n"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    library_format, warnings.formatwarning = warnings.formatwarning, _format_warning  # the command's own, only here
    try:
        args = build_parser(argv).parse_args(argv)
        result = args._main(args)
    finally:
        warnings.formatwarning = library_format
    if isinstance(result, int):
        sys.exit(result)


if __name__ == "__main__":
    main()
