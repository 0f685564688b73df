"""`muse generate`, `muse inpaint`, `muse outpaint`, `muse edit`, `muse upscale`: the pipeline from the command line.

    muse generate "a red apple" --num-images 4 --seed 0 --steps 24 --guidance 4 --out out/ [--model PATH]
    muse generate --prompts prompts.txt --batch-size 16 --out out/          # one prompt per line
    muse generate "a red apple" --num-candidates 8 --out apple.png          # best of 8 by the prompt scorer
    torchrun --nproc_per_node 4 -m muse.cli generate --prompts prompts.txt --out out/
    muse inpaint "a dog face" --image in.png --mask mask.png                # white = regenerate
    muse outpaint "a sunny sky" --image in.png --pad 0,0,64,0               # left,top,right,bottom pixels
    muse edit "a green apple" --image in.png --strength 0.5
    muse upscale "a red apple" --image apple-64.png                         # the super-res stage alone: 2x

Options carry the Python API's names (`--num-steps`, `--guidance-scale`, ...; `--steps` and `--guidance` are short
forms). `muse generate` treats `--out` as one run: image k (prompt k // num_images, seed `--seed` + k) is written to
`DIR/{k:06d}.png` and recorded in `DIR/manifest.jsonl` as {"index", "prompt", "seed", "file", "parameters"}
(with best-of-N also "candidate_seed" and "score"). A rerun skips every image whose record matches and whose file
exists, so an interrupted run resumes where it stopped. Under torchrun each rank takes the prompts whose index is its
rank modulo the world size and appends to its own `manifest.part{rank}.jsonl`; at the end rank 0 merges the parts into
`manifest.jsonl` (`read_manifest` reads either).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from PIL import Image

from muse.bundled import bundled_sampling_defaults
from muse.options import add_option_arguments, given_options

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.part*.jsonl"
DTYPES = ("float32", "bfloat16", "float16")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Item:
    """One image of a `muse generate` run."""

    index: int
    prompt: str
    seed: int | None  # None: drawn at generation time and recorded in the manifest

    @property
    def file(self) -> str:
        return f"{self.index:06d}.png"


# --------------------------------------------------------------------------------------------------------------------
# Arguments


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="saved pipeline directory or bundled preset name (default: the bundled model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: this rank's GPU, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of every component")
    parser.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR|FILE",
                        help="output directory (default: outputs), or an image file name (.png, .jpg, .webp) for a "
                             "single prompt: with --num-images N > 1, NAME-0.png ... NAME-{N-1}.png")


def _add_call_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """A task's per-call arguments and one flag per sampling option (but `exclude`: upscale runs the super-res stage
    alone, so no base-stage steps or stages)."""
    parser.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default: 1)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the first image; image k gets seed + k (default: random, recorded)")
    parser.add_argument("--negative-prompt", default=None, help="prompt for guidance's unconditional branch")
    add_option_arguments(parser, defaults=bundled_sampling_defaults(), exclude=exclude)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt (or use --prompts FILE)")
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help="text file with one prompt per line (blank lines are skipped)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="images per pipeline call (default: 16)")
    _add_call_arguments(parser)
    _add_model_arguments(parser)


def add_inpaint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--mask", required=True, type=Path, help="same size as the image; white = regenerate")
    _add_call_arguments(parser)
    _add_model_arguments(parser)


def add_outpaint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--pad", required=True, type=_parse_pad, metavar="LEFT,TOP,RIGHT,BOTTOM",
                        help="pixels to add on each side, multiples of the model's token size")
    _add_call_arguments(parser)
    _add_model_arguments(parser)


def add_upscale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--image", required=True, type=Path, help="an image at the base stage's resolution (64 px "
                        "for the bundled model; larger sides in multiples of its token size are decoded in windows)")
    _add_call_arguments(parser, exclude=("num_steps", "stages"))
    _add_model_arguments(parser)


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--strength", required=True, type=float,
                        help="fraction of the image's tokens to resample, in [0, 1]")
    parser.add_argument("--iterations", type=int, default=1, help="re-mask and resample this many times")
    parser.add_argument("--mode", default="random", choices=("random", "confidence"),
                        help="which tokens to re-mask: random, or the least likely under the new prompt")
    _add_call_arguments(parser)
    _add_model_arguments(parser)


def _parse_pad(text: str) -> tuple[int, int, int, int]:
    try:
        pad = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pad must be four integers LEFT,TOP,RIGHT,BOTTOM, got {text!r}") from None
    if len(pad) != 4:
        raise argparse.ArgumentTypeError(f"--pad must be four integers LEFT,TOP,RIGHT,BOTTOM, got {text!r}")
    return pad


# --------------------------------------------------------------------------------------------------------------------
# Manifest


def read_manifest(out: str | os.PathLike) -> dict[int, dict]:
    """Every record of a `muse generate` run in `out` by image index: manifest.jsonl and any per-rank parts, later
    lines winning. A line cut short by a crash is skipped (its image is simply made again)."""
    out = Path(out)
    records: dict[int, dict] = {}
    for file in [out / MANIFEST, *sorted(out.glob(PART_GLOB))]:
        if not file.is_file():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("index"), int):
                records[record["index"]] = record
    return records


def _is_done(item: Item, record: dict | None, parameters: dict, out: Path) -> bool:
    return (
        record is not None
        and record.get("prompt") == item.prompt
        and record.get("parameters") == parameters
        and (item.seed is None or record.get("seed") == item.seed)
        and (out / item.file).is_file()
    )


def _merge_manifest(out: Path) -> None:
    """Rewrite manifest.jsonl as one record per image, in index order, and remove the per-rank parts."""
    records = read_manifest(out)
    parts = sorted(out.glob(PART_GLOB))
    tmp = out / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for index in sorted(records):
            f.write(json.dumps(records[index], ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)
    for part in parts:
        part.unlink()


def _append(file: Path, records: list[dict]) -> None:
    """Append one JSON line per record and fsync. A line left unfinished by a crash is closed first, so it costs only
    its own record, not the next one too."""
    with open(file, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    with open(file, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _save_png(image, path: Path) -> None:
    """Atomic, so a crash never leaves a truncated image under the final name. The format follows the suffix."""
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# Commands


def _fail(command: str, error: Exception) -> SystemExit:
    return SystemExit(f"muse {command}: {error}")


def _load_pipeline(args: argparse.Namespace, command: str, local_rank: int = 0):
    import torch

    from muse.pipeline import MusePipeline

    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        pipe = MusePipeline.from_pretrained(args.model)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise _fail(command, e) from None
    return pipe.to(device, getattr(torch, args.dtype))


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if (args.prompt is None) == (args.prompts is None):
        raise SystemExit("muse generate: give either a prompt or --prompts FILE, not both")
    if args.prompt is not None:
        return [args.prompt]
    try:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"muse generate: cannot read --prompts {args.prompts}: {e}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SystemExit(f"muse generate: {args.prompts} holds no prompts")
    return prompts


def _items(prompts: list[str], num_images: int, seed: int | None, rank: int, world: int) -> Iterator[Item]:
    """This rank's images: those of the prompts whose index is rank modulo world."""
    for p in range(rank, len(prompts), world):
        for i in range(num_images):
            index = p * num_images + i
            yield Item(index, prompts[p], None if seed is None else seed + index)


def _file_targets(out: Path, n: int) -> list[Path] | None:
    """`--out` naming an image file: the n files to write (NAME.png, or NAME-0.png ... when n > 1); else None."""
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(n)]


def _save_files(result, targets: list[Path], command: str) -> None:
    for k, (image, seed, path) in enumerate(zip(result.images, result.seeds, targets)):
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_png(image, path)
        chosen = ""
        if result.scores is not None:
            chosen = (f"; best of N: candidate seed {result.candidate_seeds[k]}, score {result.scores[k]:.3f}, "
                      f"remade alone by --seed {result.candidate_seeds[k]} --num-candidates 1")
        print(f"muse {command}: saved {path} (seed {seed}{chosen})")


def _checked_options(args: argparse.Namespace, command: str) -> dict:
    """The sampling options given on the command line, checked before any model is loaded."""
    from muse.options import SamplingOptions

    options = given_options(args)
    try:
        SamplingOptions().with_overrides(options)
    except (ValueError, TypeError) as e:
        raise _fail(command, e) from None
    if args.num_images < 1:
        raise SystemExit(f"muse {command}: --num-images must be >= 1, got {args.num_images}")
    return options


def generate_main(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    prompts = _read_prompts(args)
    if args.batch_size < 1:
        raise SystemExit(f"muse generate: --batch-size must be >= 1, got {args.batch_size}")
    options = _checked_options(args, "generate")
    targets = _file_targets(args.out, args.num_images)
    if targets is not None:  # one prompt straight to image files: no manifest, nothing to resume
        if len(prompts) != 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit(f"muse generate: --out {args.out} names one image file; give a directory for a "
                             "prompts file or a torchrun job")
        pipe = _load_pipeline(args, "generate")
        try:
            result = pipe(prompts[0], num_images=args.num_images, seed=args.seed,
                          negative_prompt=args.negative_prompt, **options)
        except (ValueError, TypeError) as e:
            raise _fail("generate", e) from None
        _save_files(result, targets, "generate")
        return
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        # Only for the final barrier; a long timeout because shards can be unbalanced by images already done.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    pipe = _load_pipeline(args, "generate", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        resolved = pipe.options(**options)
    except (ValueError, TypeError) as e:
        raise _fail("generate", e) from None
    # The settings an image depends on, defaults resolved, so that a rerun with other settings regenerates.
    parameters = {
        **dataclasses.asdict(resolved),
        "negative_prompt": args.negative_prompt,
        "model": str(Path(args.model).resolve()) if args.model and Path(args.model).exists() else args.model,
    }
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / (MANIFEST if world == 1 else f"manifest.part{rank:03d}.jsonl")
    done = read_manifest(out)
    mine = list(_items(prompts, args.num_images, args.seed, rank, world))
    todo = [item for item in mine if not _is_done(item, done.get(item.index), parameters, out)]
    stale = sum(1 for item in todo if item.index in done and (out / item.file).is_file())
    if stale:
        print(f"muse generate: {out} holds {stale} images of this rank made with another prompt or settings; "
              "they are replaced", file=sys.stderr)

    start = time.perf_counter()
    with tqdm(total=len(todo), unit="img", desc=f"rank {rank}" if world > 1 else "generate",
              disable=rank != 0 or not todo) as bar:
        for b in range(0, len(todo), args.batch_size):
            batch = todo[b : b + args.batch_size]
            seeds = None if args.seed is None else [item.seed for item in batch]
            try:
                result = pipe([item.prompt for item in batch], seed=seeds, negative_prompt=args.negative_prompt,
                              options=resolved)
            except (ValueError, TypeError) as e:
                raise _fail("generate", e) from None
            records = []
            for k, (item, image, seed) in enumerate(zip(batch, result.images, result.seeds)):
                _save_png(image, out / item.file)
                # The image's own seed (what a rerun with these parameters asks for); with best-of-N also the chosen
                # candidate's seed, which remakes the image alone with --num-candidates 1.
                record = {"index": item.index, "prompt": item.prompt, "seed": seed, "file": item.file,
                          "parameters": parameters}
                if result.scores is not None:
                    record["candidate_seed"], record["score"] = result.candidate_seeds[k], result.scores[k]
                records.append(record)
            _append(manifest, records)
            bar.update(len(batch))

    if world > 1:
        dist.barrier()  # every rank has written its part before rank 0 merges them
    if rank == 0:
        _merge_manifest(out)
    if world > 1:
        dist.destroy_process_group()
    elapsed = time.perf_counter() - start
    rate = f" ({len(todo) / elapsed:.2f} images/s)" if todo and elapsed > 0 else ""
    print(f"muse generate: rank {rank}: {len(todo)} new, {len(mine) - len(todo)} already done{rate}; "
          f"images in {out}, manifest {out / MANIFEST}", file=sys.stderr if rank else sys.stdout)


def _run_image_task(args: argparse.Namespace, command: str, task_options: dict) -> None:
    options = _checked_options(args, command)
    pipe = _load_pipeline(args, command)
    try:
        result = getattr(pipe, command)(args.prompt, image=args.image, num_images=args.num_images, seed=args.seed,
                                        negative_prompt=args.negative_prompt, **task_options, **options)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise _fail(command, e) from None
    targets = _file_targets(args.out, len(result.images)) or [
        args.out / f"{args.image.stem}-{command}-{seed}.png" for seed in result.seeds]
    _save_files(result, targets, command)


def inpaint_main(args: argparse.Namespace) -> None:
    _run_image_task(args, "inpaint", {"mask": args.mask})


def outpaint_main(args: argparse.Namespace) -> None:
    _run_image_task(args, "outpaint", {"pad": args.pad})


def upscale_main(args: argparse.Namespace) -> None:
    _run_image_task(args, "upscale", {})


def edit_main(args: argparse.Namespace) -> None:
    _run_image_task(args, "edit", {"strength": args.strength, "iterations": args.iterations,
                                          "mode": args.mode})
