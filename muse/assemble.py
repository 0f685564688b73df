"""`muse assemble`: turn training runs into one pipeline directory that `MusePipeline.from_pretrained` loads.

    muse assemble --transformer-run runs/transformer-emoji-base --superres-run runs/superres-emoji-sr --out my-model

Each run directory holds the resolved `config.yaml` it was trained with and its exported model (`transformer/`,
`superres/`); the config names the VQGAN(s) and the text encoder, so nothing else needs to be given. A super-res run
whose high-res VQGAN is not the base VQGAN adds it as the pipeline's `superres_vqgan`. `--superres-run` may also be a
pipeline directory: its super-res stage (and high-res VQGAN) is kept as it is, under a newly trained base stage,
if its base VQGAN has the new base stage's weights. Sampling defaults can be set
here too (`--num-steps`, `--guidance-scale`, ...) and are saved in `pipeline.json`; `--scorer DIR` ships a trained
prompt scorer as the pipeline's best-of-N default, and `--weights-dtype float16` halves the files on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from muse.bundled import PIPELINE_FILE
from muse.config import ConfigError, SuperResRun, TransformerRun, load_config
from muse.options import PRECISIONS, SamplingOptions, add_option_arguments, given_options

# The models are imported where they are used, so that `muse assemble --help` starts at once.
if TYPE_CHECKING:
    import torch

    from muse.pipeline import MusePipeline, PipelineConfig
    from superres.model import SuperResTransformer
    from transformer.text import TextEncoder
    from vqgan.model import VQGAN


def _run(path: Path, stage: str) -> TransformerRun | SuperResRun:
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a training run directory: {config_file} not found")
    cfg = load_config(config_file)
    if cfg.stage != stage:
        raise ConfigError(f"{config_file} is a {cfg.stage} run, expected a {stage} run")
    return cfg


def _exported(run: Path, name: str) -> Path:
    directory = run / name
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} not found: the run has not exported a model yet (it does at every "
                                f"checkpoint)")
    return directory


def _same_directory(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def assemble(
    transformer_run: str | os.PathLike,
    superres_run: str | os.PathLike | None = None,
    config: PipelineConfig | None = None,
) -> MusePipeline:
    """A pipeline from a transformer run and, optionally, the super-res run that follows it."""
    from muse.pipeline import MusePipeline
    from superres.model import SuperResTransformer
    from transformer.model import MaskedTransformer
    from transformer.text import TextEncoder
    from vqgan.model import VQGAN

    base_dir = Path(transformer_run)
    base = _run(base_dir, "transformer")
    vqgan = VQGAN.from_pretrained(base.vqgan)
    transformer = MaskedTransformer.from_pretrained(_exported(base_dir, "transformer"))
    text = TextEncoder(base.text)
    superres = superres_vqgan = None
    if superres_run is not None and (Path(superres_run) / PIPELINE_FILE).is_file():
        superres, superres_vqgan = _kept_superres(Path(superres_run), base, vqgan, text)
    elif superres_run is not None:
        sr_dir = Path(superres_run)
        sr = _run(sr_dir, "superres")
        if sr.text != base.text:
            raise ConfigError(f"the super-res run's text encoder {sr.text} differs from the base run's {base.text}")
        if not _same_directory(sr.vqgan_low, base.vqgan):
            raise ConfigError(f"the super-res run was trained on low-res tokens of {sr.vqgan_low}, but the base "
                              f"run's VQGAN is {base.vqgan}")
        superres = SuperResTransformer.from_pretrained(_exported(sr_dir, "superres"))
        if not _same_directory(sr.vqgan_high, base.vqgan):
            superres_vqgan = VQGAN.from_pretrained(sr.vqgan_high)
    return MusePipeline(vqgan, text, transformer, superres, superres_vqgan, config)


def _kept_superres(pipeline_dir: Path, base: TransformerRun, vqgan: VQGAN,
                   text: TextEncoder) -> tuple[SuperResTransformer, VQGAN | None]:
    """The super-res stage of a saved pipeline, to run under a new base stage: it reads the base VQGAN's tokens and
    the text encoder's states, so both must be the ones the new base stage was trained with."""
    import torch

    from muse.pipeline import MusePipeline

    source = MusePipeline.from_pretrained(pipeline_dir, precision="float32")  # its weights as stored, not rounded
    if source.superres is None:
        raise FileNotFoundError(f"{pipeline_dir} is a pipeline without a super-res stage")
    # Compared at float16, the storage of shipped pipelines, so the same model saved at either precision passes. The
    # text encoder is compared by what it computes: a saved pipeline holds a copy of it under another path.
    theirs, ours = source.vqgan.state_dict(), vqgan.state_dict()
    if theirs.keys() != ours.keys() or any(not torch.equal(theirs[k].half(), ours[k].half()) for k in ours):
        raise ConfigError(f"the super-res stage of {pipeline_dir} reads the tokens of that pipeline's VQGAN, which is "
                          f"not the base run's {base.vqgan}")
    probe = ["an apple", ""]
    a, b = source.text_encoder(probe), text(probe)
    if a.states.shape != b.states.shape or not torch.allclose(a.states.float(), b.states.float(), atol=1e-2):
        raise ConfigError(f"the text encoder of {pipeline_dir} is not the base run's {base.text.name_or_path}: the "
                          f"super-res stage was trained on other text states")
    return source.superres, source.superres_vqgan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transformer-run", type=Path, required=True, help="run directory of the base stage")
    parser.add_argument("--superres-run", type=Path, default=None,
                        help="run directory of the super-res stage, or a pipeline directory whose super-res stage "
                             "is kept (default: none, a base-only pipeline)")
    parser.add_argument("--out", type=Path, required=True, help="pipeline directory to write")
    # The pipeline's sampling defaults, saved in pipeline.json: one flag per option, unset ones take the library's.
    add_option_arguments(parser, defaults={f.name: f.default for f in dataclasses.fields(SamplingOptions)},
                         label="default", title="the pipeline's sampling defaults, saved in pipeline.json")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="arithmetic of the token models (auto: bfloat16 where the device runs it fast; set it "
                             "once `muse eval --precision` showed equal quality) (default: float32)")
    parser.add_argument("--weights-dtype", choices=("float32", "float16"), default="float32",
                        help="storage dtype of the weights on disk (float16: half the size; loaded back as float32) "
                             "(default: float32)")
    parser.add_argument("--scorer", type=Path, default=None,
                        help="a trained prompt scorer (muse scorer) to ship as the pipeline's best-of-N default "
                             "(default: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace a pipeline already at --out")


def write_fresh(pipe: MusePipeline, out: Path, dtype: torch.dtype | None, overwrite: bool, command: str) -> None:
    """Save `pipe` as the pipeline directory `out` (a fresh folder, swapped in: see `save_pretrained`); an existing
    pipeline there is replaced only with `overwrite`, and anything else there never."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / "pipeline.json").is_file():
            raise SystemExit(f"muse {command}: --out {out} exists and is not a pipeline directory; give a new folder")
        if not overwrite:
            raise SystemExit(f"muse {command}: --out {out} holds a pipeline already; use --overwrite to replace it")
    try:
        pipe.save_pretrained(out, dtype)
    except OSError as e:
        raise SystemExit(f"muse {command}: cannot write {out}: {e}") from None


def main(args: argparse.Namespace) -> int:
    import torch

    from muse.pipeline import PipelineConfig
    from muse.scorer import PromptScorer

    try:
        config = PipelineConfig(sampling=SamplingOptions().with_overrides(given_options(args)),
                                precision=args.precision)
        # Assembled in float32, so that the weights are written as trained ("auto" would round them to bfloat16 on
        # a CPU with fast bfloat16, and the files would depend on the machine); pipeline.json keeps the precision.
        pipe = assemble(args.transformer_run, args.superres_run, dataclasses.replace(config, precision="float32"))
        pipe.config = config
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        raise SystemExit(f"muse assemble: {e}") from None
    if args.scorer is not None:
        try:
            pipe.scorer = PromptScorer.load(args.scorer)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"muse assemble: {e}") from None
    write_fresh(pipe, args.out, getattr(torch, args.weights_dtype), args.overwrite, "assemble")
    stages = "base + super-res" if pipe.superres is not None else "base only"
    if pipe.superres is not None and config.sampling.stages == 1:
        stages += ", base only unless a call asks for stages=2"
    print(f"wrote {args.out} ({stages}, {pipe.resolution()} px): "
          f"MusePipeline.from_pretrained({str(args.out)!r}) or --model {args.out}")
    return 0
