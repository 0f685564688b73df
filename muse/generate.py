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
forms). Nothing the user made is overwritten without `--overwrite`:

* `--out NAME.png` (.jpg, .jpeg, .webp) writes exactly that file (NAME-0.png ... with --num-images N > 1) and refuses
  if it exists; any other suffix is refused rather than taken for a folder name.
* `muse generate` treats `--out DIR` as one run: image k (prompt k // num_images, seed `--seed` + k) is written to
  `DIR/{k:06d}.png` and recorded in `DIR/manifest.jsonl` as {"index", "prompt", "seed", "file", "parameters"} (with
  best-of-N also "candidate_seed" and "score"). A rerun with the same prompts and settings skips every image whose
  record matches and whose file is an intact image, so an interrupted run resumes where it stopped; a rerun whose
  prompts or settings differ for images the folder already holds is refused (use another --out, or --overwrite to
  replace them). Without `--out`, each run gets a new numbered folder `outputs/NNNN`.
* The editing commands write `DIR/{image stem}-{command}-{seed}.png` (`--out` default: outputs) and refuse to replace
  an existing file.

Under torchrun each rank takes the prompts whose index is its rank modulo the world size and appends to its own
`manifest.part{rank}.jsonl`; at the end rank 0 merges the parts into `manifest.jsonl` (`read_manifest` reads either).
Every argument is checked, and the output location made, before the model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator

from PIL import Image

from muse.bundled import bundled_sampling_defaults
from muse.options import PRECISIONS, add_option_arguments, deprecated_alias, given_options
from muse.requests import (REQUESTS, EditRequest, GenerateRequest, InpaintRequest, OutpaintRequest, Request,
                           UpscaleRequest, add_request_arguments, given_request)
from persist import atomic_write, atomic_write_text, read_bytes_bounded

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.part*.jsonl"
DTYPES = ("float32", "bfloat16", "float16")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Bounds of a --prompts file, checked before the model loads: a larger file is refused from its size, unread (a 50 MB
# line once ran for 85 s), then its line count (each line becomes images to make) and each line's length
# (`Limits.max_prompt_chars`). A longer batch is a few files, or a few runs into the same --out.
MAX_PROMPT_FILE_BYTES = 16 << 20
MAX_PROMPT_LINES = 200_000


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


def _add_model_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="saved pipeline directory or bundled preset name (default: the bundled model)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:1, mps, ... (default: the GPU when there is one, this rank's under "
                             "torchrun; else cpu)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="arithmetic of the token models (auto: bfloat16 where the device runs it fast; default: "
                             "the model's config.precision)")
    # The old spelling: every component cast to DTYPE, float16 included. Kept, with a warning, for one version.
    deprecated_alias(parser, "--dtype", "--precision", dest="dtype", default=None, choices=DTYPES)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR|FILE",
                        help=f"output directory (default: {default_out}), or an image file name (.png, .jpg, .jpeg, "
                             ".webp) for a single prompt: with --num-images N > 1, NAME-0.png ... NAME-{N-1}.png")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing images (default: refuse to, naming them)")


def _add_task_arguments(parser: argparse.ArgumentParser, request: type[Request], prompt_required: bool = True) -> None:
    """A task's arguments, from its request's fields (`muse.requests`), and one flag per sampling option it takes."""
    add_request_arguments(parser, request, prompt_required)
    add_option_arguments(parser, defaults=bundled_sampling_defaults(), exclude=request.excluded_options)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    _add_task_arguments(parser, GenerateRequest, prompt_required=False)
    parser.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                        help=f"text file with one prompt per line (blank lines are skipped; at most "
                             f"{MAX_PROMPT_FILE_BYTES >> 20} MiB and {MAX_PROMPT_LINES} lines)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="images per pipeline call (default: 16)")
    _add_model_arguments(parser, "a new numbered folder outputs/NNNN")


def add_inpaint_arguments(parser: argparse.ArgumentParser) -> None:
    _add_task_arguments(parser, InpaintRequest)
    _add_model_arguments(parser, "outputs")


def add_outpaint_arguments(parser: argparse.ArgumentParser) -> None:
    # "-8,0,0,0" would otherwise be read as an unknown option, not as a (negative, refused with a reason) --pad.
    parser._negative_number_matcher = re.compile(r"^-\d+(,-?\d+)*$|^-\d*\.\d+$")
    _add_task_arguments(parser, OutpaintRequest)
    _add_model_arguments(parser, "outputs")


def add_upscale_arguments(parser: argparse.ArgumentParser) -> None:
    _add_task_arguments(parser, UpscaleRequest)
    _add_model_arguments(parser, "outputs")


def add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    _add_task_arguments(parser, EditRequest)
    _add_model_arguments(parser, "outputs")


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


def _same_image(item: Item, record: dict, parameters: dict) -> bool:
    """Whether a manifest record describes the image `item` would make with `parameters`."""
    return (record.get("prompt") == item.prompt and record.get("parameters") == parameters
            and (item.seed is None or record.get("seed") == item.seed))


def _difference(item: Item, record: dict, parameters: dict) -> str:
    """What makes a manifest record another image than `item` with `parameters`, each field with the folder's value
    and this run's: "num_candidates 8 there, 3 now". The first three differences, then how many more."""
    there, now = {"prompt": record.get("prompt")}, {"prompt": item.prompt}
    if item.seed is not None:
        there["seed"], now["seed"] = record.get("seed"), item.seed
    saved = record.get("parameters")
    saved = saved if isinstance(saved, dict) else {}
    for name in sorted(set(saved) | set(parameters)):
        there[name], now[name] = saved.get(name, "unset"), parameters.get(name, "unset")
    differing = [f"{name} {there[name]!r} there, {now[name]!r} now" for name in there if there[name] != now[name]]
    shown = "; ".join(differing[:3]) + (f" and {len(differing) - 3} more" if len(differing) > 3 else "")
    return shown or "its record"


def _is_done(item: Item, record: dict | None, parameters: dict, out: Path) -> bool:
    """Made already: its record matches, and its file is an intact image (a truncated one is made again)."""
    from muse.data.folder import readable

    return record is not None and _same_image(item, record, parameters) and readable(out / item.file)


def _merge_manifest(out: Path) -> None:
    """Rewrite manifest.jsonl as one record per image, in index order, and remove the per-rank parts."""
    records = read_manifest(out)
    parts = sorted(out.glob(PART_GLOB))
    atomic_write_text(out / MANIFEST,
                      "".join(json.dumps(records[index], ensure_ascii=False) + "\n" for index in sorted(records)))
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
    atomic_write(path, lambda tmp: image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG")))


# --------------------------------------------------------------------------------------------------------------------
# Commands


def _fail(command: str, error: Exception) -> SystemExit:
    return SystemExit(f"muse {command}: {error}")


def _load_pipeline(args: argparse.Namespace, command: str):
    import torch

    from muse.options import default_device
    from muse.pipeline import MusePipeline

    device = args.device or default_device()
    try:
        pipe = MusePipeline.from_pretrained(args.model, precision=args.precision)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise _fail(command, e) from None
    return pipe.to(device, None if args.dtype is None else getattr(torch, args.dtype))


def _check_device(device: str | None, command: str) -> None:
    """Refuse a device this machine does not have, before any model is loaded."""
    if device is None:
        return
    import torch

    try:
        where = torch.device(device)
    except RuntimeError as e:
        raise SystemExit(f"muse {command}: --device {device!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"muse {command}: --device {device} needs a CUDA GPU, and torch finds none here "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if where.index is not None and where.index >= torch.cuda.device_count():
            raise SystemExit(f"muse {command}: --device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"muse {command}: --device mps is not available on this machine; use --device cpu")


def _output_dir(path: Path, command: str) -> Path:
    """Make the output folder (and its parents) now, so an impossible --out fails before the model loads."""
    if path.exists() and not path.is_dir():
        raise SystemExit(f"muse {command}: --out {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"muse {command}: cannot create the output folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SystemExit(f"muse {command}: cannot write into {path} (permission denied)")
    return path


def _new_run_dir(root: Path, command: str) -> Path:
    """The next free numbered folder root/0001, root/0002, ..., made (two runs never share one)."""
    _output_dir(root, command)
    taken = [int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    number = max(taken, default=0) + 1
    while True:
        candidate = root / f"{number:04d}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            number += 1


def _file_targets(out: Path | None, n: int, command: str, overwrite: bool) -> list[Path] | None:
    """`--out` naming an image file: the n files to write (NAME.png, or NAME-0.png ... when n > 1), checked; None for
    a folder. An existing folder is a folder whatever its name; any other suffix is refused."""
    if out is None or out.is_dir() or not out.suffix:
        return None
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise SystemExit(f"muse {command}: --out {out}: {out.suffix} is not a format musegen writes; name a "
                         f"{', '.join(IMAGE_SUFFIXES)} file, or a folder (no suffix)")
    targets = [out] if n == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(n)]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise SystemExit(f"muse {command}: {existing[0]} exists; use --overwrite to replace it, or another --out")
    _output_dir(out.parent if str(out.parent) else Path("."), command)
    return targets


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if (args.prompt is None) == (args.prompts is None):
        raise SystemExit("muse generate: give either a prompt or --prompts FILE, not both")
    if args.prompt is not None:
        return [args.prompt]
    from muse.inputs import file_problem
    from muse.options import Limits

    problem = file_problem(args.prompts, "a text file")
    if problem not in (None, "does not exist"):  # only a regular file: a FIFO would block, /dev/zero never end
        raise SystemExit(f"muse generate: cannot read --prompts {args.prompts}: it {problem}")
    try:
        data = read_bytes_bounded(args.prompts, MAX_PROMPT_FILE_BYTES)
    except (OSError, ValueError) as e:
        raise SystemExit(f"muse generate: cannot read --prompts {args.prompts}: {e}") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SystemExit(f"muse generate: cannot read --prompts {args.prompts}: {e}") from None
    if len(lines) > MAX_PROMPT_LINES:
        raise SystemExit(f"muse generate: --prompts {args.prompts} has {len(lines)} lines, more than the "
                         f"{MAX_PROMPT_LINES} one run reads (split it; runs into the same --out resume)")
    # Each line's length before the model loads, against the library's limit (the model's own is checked again when
    # its task is made): one line number to fix, not a failure at that line's batch hours later.
    max_chars = Limits().max_prompt_chars
    for number, line in enumerate(lines, start=1):
        if len(line.strip()) > max_chars:
            raise SystemExit(f"muse generate: {args.prompts}:{number}: the prompt is {len(line.strip())} characters, "
                             f"over the limit max_prompt_chars={max_chars}")
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


def _save_files(result, targets: list[Path], command: str) -> None:
    for k, (image, seed, path) in enumerate(zip(result.images, result.seeds, targets)):
        _save_png(image, path)
        chosen = ""
        if result.scores is not None:
            chosen = (f"; best of N: candidate seed {result.candidate_seeds[k]}, score {result.scores[k]:.3f}, "
                      f"remade alone by --seed {result.candidate_seeds[k]} --num-candidates 1")
        print(f"muse {command}: saved {path} (seed {seed}{chosen})")


def _free_name(path: Path) -> Path:
    """`path`, or NAME-2.png, NAME-3.png, ... when it is taken: a result made with a random seed is never lost to
    a name clash, and never overwrites."""
    candidate, k = path, 2
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
        k += 1
    return candidate


def _checked_request(args: argparse.Namespace, command: str, prompts: list[str]) -> dict:
    """The sampling options given on the command line, checked with the rest of the call's request before any model
    is loaded (against the library's option defaults; the model's own are checked again once it is loaded). An error
    names the flag where the request names its field: "--num-images must be >= 1", not "num_images ..."."""
    from muse.options import SamplingOptions

    options = given_options(args)
    request = REQUESTS[command]
    try:
        request(prompts, options=SamplingOptions().with_overrides(options), **given_request(args, request))
    except (ValueError, TypeError) as e:
        message = str(e)
        for name in given_request(args, request):
            flag = "--" + name.replace("_", "-")
            if message.startswith(f"{name} "):
                message = flag + message[len(name):]
        raise SystemExit(f"muse {command}: {message}") from None
    return options


def generate_main(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    prompts = _read_prompts(args)
    if args.batch_size < 1:
        raise SystemExit(f"muse generate: --batch-size must be >= 1, got {args.batch_size}")
    options = _checked_request(args, "generate", prompts)
    _check_device(args.device, "generate")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    targets = _file_targets(args.out, args.num_images, "generate", args.overwrite)
    if targets is not None:  # one prompt straight to image files: no manifest, nothing to resume
        if len(prompts) != 1 or world > 1:
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
    if args.out is None and world > 1:
        raise SystemExit("muse generate: a torchrun job needs --out DIR, the one folder every rank writes into")
    out = _new_run_dir(Path("outputs"), "generate") if args.out is None else _output_dir(args.out, "generate")
    if world > 1:
        import torch.distributed as dist

        # Only for the final barrier; a long timeout because shards can be unbalanced by images already done.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    pipe = _load_pipeline(args, "generate")
    pipe.set_progress_bar_config(disable=True)  # the run's own bar counts images; one bar per call would nest in it
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
    manifest = out / (MANIFEST if world == 1 else f"manifest.part{rank:03d}.jsonl")
    done = read_manifest(out)
    mine = list(_items(prompts, args.num_images, args.seed, rank, world))
    others = [item for item in mine if item.index in done and not _same_image(item, done[item.index], parameters)]
    if others and not args.overwrite:
        first = others[0]
        raise SystemExit(f"muse generate: {out} already holds {len(others)} of these images made with another "
                         f"prompt, seed or settings ({first.file}: {_difference(first, done[first.index], parameters)})"
                         "; use another --out, or --overwrite to replace them")
    todo = [item for item in mine if not _is_done(item, done.get(item.index), parameters, out)]

    start = time.perf_counter()
    # On a terminal only (disable=None): in a log, where the bar's carriage returns become lines, it would repeat its
    # last line at close, and the summary below says the same.
    with tqdm(total=len(todo), unit="img", desc=f"rank {rank}" if world > 1 else "generate",
              disable=True if rank != 0 or not todo else None) as bar:
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


def _run_image_task(args: argparse.Namespace, command: str) -> None:
    """`muse inpaint / outpaint / edit / upscale`: the request from the flags, its task run, its images saved."""
    from muse.inputs import file_problem, image_size

    options = _checked_request(args, command, [args.prompt])
    _check_device(args.device, command)
    for name in ("image", "mask"):
        path = getattr(args, name, None)
        if path is None:
            continue
        problem = file_problem(path)
        if problem is not None:  # only regular files: a FIFO would block, /dev/zero never end
            raise SystemExit(f"muse {command}: --{name} {path} {problem}")
        try:
            image_size(path, f"--{name}")  # the header: a PNG, JPEG or WebP image (its size is checked on load)
        except ValueError as e:
            raise _fail(command, e) from None
    targets = _file_targets(args.out, args.num_images, command, args.overwrite)
    folder = None if targets is not None else _output_dir(args.out or Path("outputs"), command)
    if folder is not None and args.seed is not None and not args.overwrite:
        for k in range(args.num_images):  # known names: refuse now, before any work
            name = folder / f"{args.image.stem}-{command}-{args.seed + k}.png"
            if name.exists():
                raise SystemExit(f"muse {command}: {name} exists; use --overwrite to replace it, or another --out")
    pipe = _load_pipeline(args, command)
    try:
        request = pipe.request(command, args.prompt, **given_request(args, REQUESTS[command]), **options)
        result = pipe.engine.run(pipe.task(request))
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise _fail(command, e) from None
    if targets is None:
        names = [folder / f"{args.image.stem}-{command}-{seed}.png" for seed in result.seeds]
        targets = names if args.overwrite else [_free_name(name) for name in names]
    _save_files(result, targets, command)


def inpaint_main(args: argparse.Namespace) -> None:
    _run_image_task(args, "inpaint")


def outpaint_main(args: argparse.Namespace) -> None:
    _run_image_task(args, "outpaint")


def upscale_main(args: argparse.Namespace) -> None:
    _run_image_task(args, "upscale")


def edit_main(args: argparse.Namespace) -> None:
    _run_image_task(args, "edit")
