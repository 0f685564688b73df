"""Make the figures in the README from trained models, so every picture there comes from a command anyone can rerun.

    python docs/figures.py recon --vqgan runs/vqgan-emoji-f8/vqgan --data data/emoji            # docs/vqgan-recon.png
    python docs/figures.py generate --model DIR                      # docs/generated.png: 16 prompts x 4 seeds
    python docs/figures.py superres --model DIR                      # docs/superres.png: bicubic 64 px vs super-res
                                                                     # and docs/superres-real.png on real images;
                                                                     # --scorer DIR: a judge for its prompt scores
    python docs/figures.py edit --model DIR                          # docs/inpaint.png, docs/outpaint.png
    python docs/figures.py curves --run runs/transformer-emoji-base  # docs/transformer-emoji-base-val.png

`--model` is a pipeline directory (`muse assemble`), or omitted for the bundled default model.

Each command prints the numbers it measured as JSON (and writes them beside the figure), e.g. the held-out PSNR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

DOCS = Path(__file__).resolve().parent


def heldout_rows(data: Path, limit: int | None = None, unique: bool = True) -> list[dict]:
    """Rows of the emoji metadata in the held-out split (exact duplicates of other images left out)."""
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == "heldout" and not (unique and r.get("duplicate_of"))]
    return rows[:limit] if limit else rows


def load_images(data: Path, rows: list[dict], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [-1, 1]."""
    arrays = [np.asarray(Image.open(data / r["files"][str(size)]).convert("RGB")) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded as the pipeline rounds."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of uint8 images, averaged over images (each image's own MSE)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return float(np.mean([10 * math.log10(255.0**2 / max(m, 1e-10)) for m in mse]))


def grid(rows: list[list[np.ndarray]], labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Rows of equally sized (H, W, 3) uint8 images -> one picture, with an optional label left of each row."""
    h, w = rows[0][0].shape[:2]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 0 if not labels else int(max(measure.textlength(s) for s in labels)) + 12
    canvas = Image.new("RGB", (label_w + len(rows[0]) * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        y = pad + i * (h + pad)
        if labels:
            draw.text((4, y + h // 2 - 6), labels[i], fill="black")
        for j, image in enumerate(row):
            canvas.paste(Image.fromarray(image), (label_w + pad + j * (w + pad), y))
    return canvas


@torch.inference_mode()
def recon(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(DOCS.parent))
    from vqgan.model import VQGAN

    vqgan = VQGAN.from_pretrained(args.vqgan).eval()
    size = vqgan.config.resolution
    rows = heldout_rows(args.data)
    real, recon_all, used = [], [], torch.zeros(vqgan.config.codebook_size, dtype=torch.bool)
    for start in range(0, len(rows), 64):
        x = load_images(args.data, rows[start : start + 64], size)
        ids = vqgan.encode(x)  # (B, h, w)
        used[ids.flatten().unique()] = True
        real.append(to_uint8(x))
        recon_all.append(to_uint8(vqgan.decode(ids)))
    real, rec = np.concatenate(real), np.concatenate(recon_all)
    # The grid: the first `--columns` held-out images of each style, originals above reconstructions.
    picks = []
    for style in ("noto", "twemoji", "fluent"):
        picks += [i for i, r in enumerate(rows) if r["style"] == style][: args.columns]
    figure_rows = []
    for s in range(3):
        chosen = picks[s * args.columns : (s + 1) * args.columns]
        figure_rows += [[real[i] for i in chosen], [rec[i] for i in chosen]]
    image = grid(figure_rows)
    scale = args.scale
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    out = args.out or DOCS / "vqgan-recon.png"
    result = {
        "vqgan": str(args.vqgan),
        "split": "heldout",
        "images": len(rows),
        "resolution": size,
        "tokens_per_image": f"{ids.shape[1]}x{ids.shape[2]}",
        "psnr_db": psnr(real, rec),
        "codebook_used_on_heldout": int(used.sum()),
        "codebook_size": vqgan.config.codebook_size,
    }
    return save(image, out, result)


# Prompts for the generation figure: six (concept, style) pairs of the training split, six held out (the concept
# was seen in training only in its other styles), and four training concepts in other words (the phrasings of
# EVAL_TEMPLATES, which no training caption uses). `muse data emoji` fixes the split (a stable hash of concept and
# style), so this is stable; every pair here is in the same split of data/emoji and data/emoji2.
TRAIN_PROMPTS = ["cat face, twemoji style", "fire, noto style", "pizza, fluent style", "rainbow, twemoji style",
                 "rocket, emojione style", "red apple, blob style"]
HELDOUT_PROMPTS = ["red apple, fluent style", "grinning face, noto style", "banana, twemoji style",
                   "unicorn, noto style", "crown, fluent style", "penguin, fluent style"]
OTHER_WORDS_PROMPTS = ["the noto fire", "pizza icon, fluent", "an emoji of a rainbow drawn in twemoji style",
                       "twemoji: cat face"]


def load_pipeline(model: str | None):
    sys.path.insert(0, str(DOCS.parent))
    from muse.pipeline import MusePipeline

    return MusePipeline.from_pretrained(model)


def label(prompt: str) -> str:
    split = ("held-out" if prompt in HELDOUT_PROMPTS else "other words" if prompt in OTHER_WORDS_PROMPTS
             else "train")
    return f"{prompt} ({split})"


def pil_rows(images: list[Image.Image], per_row: int) -> list[list[np.ndarray]]:
    arrays = [np.asarray(image.convert("RGB")) for image in images]
    return [arrays[i : i + per_row] for i in range(0, len(arrays), per_row)]


def save(image: Image.Image, out: Path, result: dict) -> dict:
    """Write the figure and, beside it, the numbers measured for it (paths relative to the repository)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    result["figure"] = os.path.relpath(out, DOCS.parent)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@torch.inference_mode()
def generate(args: argparse.Namespace) -> dict:
    pipe = load_pipeline(args.model)
    prompts = TRAIN_PROMPTS + HELDOUT_PROMPTS + OTHER_WORDS_PROMPTS
    start = time.perf_counter()
    # One call per prompt: 16 prompts x 4 seeds x 8 candidates would pass limits.max_images in one call.
    outs = [pipe(prompt, num_images=args.seeds, seed=args.seed, stages=args.stages) for prompt in prompts]
    seconds = time.perf_counter() - start
    images = [image for out in outs for image in out.images]
    figure = grid(pil_rows(images, args.seeds), [label(p) for p in prompts])
    return save(figure, args.out or DOCS / "generated.png", {
        "command": f"pipe(prompt, num_images={args.seeds}, seed={args.seed}, stages={args.stages}) per prompt",
        "model": args.model or "bundled default", "prompts": prompts, "seeds": outs[0].seeds,
        "resolution": images[0].size[0], "seconds": seconds, "images": len(images),
        "seconds_per_image": seconds / len(images), "threads": torch.get_num_threads(),
    })


@torch.inference_mode()
def superres(args: argparse.Namespace) -> dict:
    pipe = load_pipeline(args.model)
    if pipe.superres is None:
        raise SystemExit("this pipeline has no super-resolution stage")
    if args.scorer:
        from muse.scorer import PromptScorer  # after load_pipeline put the repository on the path

        scorer = PromptScorer.load(args.scorer)
    else:
        scorer = pipe.scorer
    prompts = HELDOUT_PROMPTS
    out = pipe(prompts, seed=args.seed, stages=2)
    high = out.images[0].size[0]
    low = pipe.vqgan.decode(out.low_res_tokens)  # (B, 3, 64, 64): the base stage's own image
    bicubic = [Image.fromarray(a).resize((high, high), Image.BICUBIC) for a in to_uint8(low)]
    rows = [[np.asarray(b), np.asarray(s)] for b, s in zip(bicubic, out.images)]
    # Columns: bicubic | super-res, one pair per prompt, laid out in one row of pairs.
    figure = grid([[a for pair in rows for a in pair]])
    return save(figure, args.out or DOCS / "superres.png", {
        "command": f"pipe(prompts, seed={args.seed}, stages=2)", "model": args.model or "bundled default",
        "prompts": prompts, "layout": "for each prompt: base 64 px upscaled bicubic, then super-res output",
        "low_resolution": int(low.shape[-1]), "high_resolution": high, "scorer": args.scorer or "the model's scorer",
        "generated": superres_on_generated(pipe, args, scorer), "real": superres_on_real(pipe, args, scorer),
    })


def superres_on_generated(pipe, args: argparse.Namespace, scorer) -> dict | None:
    """The cascade's own question on held-out captions: given the base stage's 64 px image, does the super-res stage
    beat bicubic upscaling? One candidate per prompt (no best-of-N pick), the same base tokens for both, scored against
    the caption: mean score, and the fraction of prompts where super-res scores higher (a paired comparison)."""
    if scorer is None:
        return None
    captions = list(dict.fromkeys(r["caption"] for r in heldout_rows(args.data)))[: args.num_generated]
    high = pipe.resolution(2)
    bicubic_scores, superres_scores = [], []
    for k in range(0, len(captions), 16):
        batch = captions[k : k + 16]
        out = pipe(batch, seed=args.seed + k, stages=2, num_candidates=1)
        low = to_uint8(pipe.vqgan.decode(out.low_res_tokens))  # (B, 64, 64, 3): the base stage's image
        bicubic = [Image.fromarray(a).resize((high, high), Image.BICUBIC) for a in low]
        bicubic_scores.append(scorer.score(bicubic, batch))
        superres_scores.append(scorer.score(out.images, batch))
    b, s = torch.cat(bicubic_scores), torch.cat(superres_scores)
    return {"prompts": len(captions), "split": "heldout", "seed": args.seed, "num_candidates": 1,
            "bicubic of the base image": {"prompt_score": float(b.mean())},
            "super-res of the base tokens": {"prompt_score": float(s.mean())},
            "super-res scores higher": float((s > b).float().mean())}


def superres_on_real(pipe, args: argparse.Namespace, scorer) -> dict:
    """The super-res stage alone on real held-out images, free of the base stage's mistakes: each 64 px image is
    tokenized and upscaled (`pipe.upscale`), against bicubic upscaling of the same 64 px image and of its VQGAN
    reconstruction (what bicubic gets from the same tokens). Measured against the real 128 px image: PSNR, and prompt
    fidelity by `scorer` (mean score of the caption; the real 128 px image's is the reference)."""
    rows = heldout_rows(args.data, limit=args.num_real)
    low_size, high_size = pipe.resolution(1), pipe.resolution(2)
    real_low, real_high = load_images(args.data, rows, low_size), load_images(args.data, rows, high_size)
    captions = [r["caption"] for r in rows]
    bicubic = lambda x: F.interpolate(x, size=(high_size, high_size), mode="bicubic", align_corners=False)  # noqa: E731
    variants = {
        "bicubic of the real 64 px image": bicubic(real_low),
        "bicubic of its 64 px VQGAN reconstruction": bicubic(pipe.vqgan.decode(pipe.vqgan.encode(real_low))),
        "super-res of its 64 px tokens": torch.cat([
            torch.from_numpy(np.stack([np.asarray(i) for i in pipe.upscale(
                captions[k : k + 32], image=real_low[k : k + 32], seed=args.seed + k).images]))
            .permute(0, 3, 1, 2).float().div(127.5).sub(1.0) for k in range(0, len(rows), 32)]),
        "128 px VQGAN reconstruction (the ceiling of any token upscaler)": pipe.high_vqgan.decode(
            pipe.high_vqgan.encode(real_high)),
    }
    truth = to_uint8(real_high)
    measured = {}
    for name, x in variants.items():
        pixels = to_uint8(x)
        measured[name] = {"psnr_db": psnr(pixels, truth)}
        if scorer is not None:
            images = [Image.fromarray(a) for a in pixels]
            measured[name]["prompt_score"] = float(scorer.score(images, captions).mean())
    if scorer is not None:
        measured["real 128 px image"] = {"prompt_score": float(
            scorer.score([Image.fromarray(a) for a in truth], captions).mean())}
    # Figure: the first eight images, one column each; rows: real | bicubic of real 64 px | super-res | VQGAN ceiling.
    names = list(variants)
    figure = grid([list(truth[:8]), list(to_uint8(variants[names[0]][:8])), list(to_uint8(variants[names[2]][:8])),
                   list(to_uint8(variants[names[3]][:8]))])
    out = (args.out or DOCS / "superres.png").with_name("superres-real.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out)
    return {"images": len(rows), "split": "heldout", "captions_from": "the dataset (the scorer's training split "
            "excludes these pairs)", "seed": args.seed, "measured": measured, "figure": os.path.relpath(out, DOCS.parent),
            "figure_layout": "columns: 8 held-out images; rows: real 128 px, bicubic of the real 64 px, super-res of "
                             "its tokens, 128 px VQGAN reconstruction"}


@torch.inference_mode()
def edit(args: argparse.Namespace) -> dict:
    pipe = load_pipeline(args.model)
    size = pipe.resolution(args.stages)
    source = Image.open(args.data / args.image.format(size=size)).convert("RGB")
    if source.size != (size, size):
        source = source.resize((size, size), Image.BICUBIC)
    # Inpainting: regenerate the right half under new prompts; the left half must come back bit-identical.
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2 :] = 255
    results = {}
    inpainted = pipe.inpaint(args.inpaint_prompts, image=source, mask=mask, seed=args.seed, stages=args.stages)
    keep = np.zeros((size, size), bool)
    keep[:, : size // 2 - 2 * pipe.stride(args.stages)] = True  # outside the dilated mask and the seam
    identical = [bool((np.asarray(i)[keep] == np.asarray(source)[keep]).all()) for i in inpainted.images]
    mask_rgb = np.repeat(mask[..., None], 3, axis=2)
    figure = grid([[np.asarray(source), mask_rgb, *[np.asarray(i) for i in inpainted.images]]])
    results["inpaint"] = save(figure, DOCS / "inpaint.png", {
        "command": f"pipe.inpaint(prompts, image, mask=right half, seed={args.seed})", "image": args.image,
        "prompts": args.inpaint_prompts, "layout": "input | mask (white = regenerate) | one result per prompt",
        "left_part_bit_identical": identical})
    # Outpainting: extend the canvas by half its width on both sides.
    pad = (size // 2, 0, size // 2, 0)
    outpainted = pipe.outpaint(args.outpaint_prompt, image=source, pad=pad, num_images=2, seed=args.seed,
                               stages=args.stages)
    figure = grid([[np.asarray(i) for i in outpainted.images]])
    results["outpaint"] = save(figure, DOCS / "outpaint.png", {
        "command": f"pipe.outpaint(prompt, image, pad={pad}, num_images=2, seed={args.seed})", "image": args.image,
        "prompt": args.outpaint_prompt, "size": list(outpainted.images[0].size)})
    return results


COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, ylabel: str, size=(720, 420)) -> Image.Image:
    """A plain line chart of named (x, y) series with PIL alone (no plotting dependency for one figure)."""
    W, H = size
    left, right, top, bottom = 56, 170, 36, 44
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    y0, y1 = y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0 or 1) * (W - left - right),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):  # ticks: 5 on each axis
        y = y0 + (y1 - y0) * i / 4
        draw.text((6, at(x0, y)[1] - 6), f"{y:.4g}", fill="black")
        draw.line([left - 4, at(x0, y)[1], left, at(x0, y)[1]], fill="black")
        x = x0 + (x1 - x0) * i / 4
        draw.text((at(x, y0)[0] - 12, H - bottom + 6), f"{x:.0f}", fill="black")
    draw.text((left, 10), f"{title}; y: {ylabel}", fill="black")
    draw.text((W - right - 30, H - 18), "step", fill="black")
    for i, (name, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        draw.line([at(x, y) for x, y in points], fill=colour, width=2)
        draw.line([W - right + 12, top + 16 * i + 6, W - right + 32, top + 16 * i + 6], fill=colour, width=2)
        draw.text((W - right + 38, top + 16 * i), name, fill="black")
    return image


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """A run's scalars as {name: [(step, value), ...]}: logs/scalars.csv (train.logger=csv) or else its TensorBoard
    event files (the default logger; one file per launch of a resumed run, a later launch's value winning a step)."""
    import csv

    file = run / "logs" / "scalars.csv"
    by_name: dict[str, dict[int, float]] = {}
    if file.is_file():
        with open(file, newline="") as f:
            for row in csv.DictReader(f):
                by_name.setdefault(row["name"], {})[int(row["step"])] = float(row["value"])
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = sorted((run / "logs").glob("**/events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
        if not events:
            raise SystemExit(f"{run / 'logs'} holds neither scalars.csv nor TensorBoard event files")
        for path in events:
            accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
            accumulator.Reload()
            for name in accumulator.Tags()["scalars"]:
                for event in accumulator.Scalars(name):
                    by_name.setdefault(name, {})[event.step] = event.value
    return {name: sorted(steps.items()) for name, steps in by_name.items()}


def curves(args: argparse.Namespace) -> dict:
    scalars = read_scalars(args.run)
    names = sorted(n for n in scalars if n.startswith("val/loss@"))
    if not names:
        raise SystemExit(f"{args.run} has no fixed-ratio validation losses yet")
    series = {name.removeprefix("val/").replace("loss@", "mask ratio "): scalars[name] for name in names}
    figure = line_plot(series, f"{args.run.name}: held-out loss at fixed mask ratios (fixed masks)",
                       "cross-entropy")
    last = {name: scalars[name][-1] for name in names + sorted(n for n in scalars if n.startswith("val/acc@"))}
    rates = [v for _, v in scalars.get("train/tokens_per_s", [])]
    return save(figure, args.out or DOCS / f"{args.run.name}-val.png", {
        "run": os.path.relpath(args.run), "final": {k: {"step": s, "value": v} for k, (s, v) in last.items()},
        "train_tokens_per_s_median": float(np.median(rates)) if rates else None,
        "curves": {k: v for k, v in scalars.items() if k.startswith("val/")},
    })


@torch.inference_mode()
def borders(args: argparse.Namespace) -> dict:
    """The same tokens decoded by two VQGAN decoders (`--before`, `--after`): generated images of the training and
    held-out prompts, rows before / after, and the border statistics and held-out PSNR of each."""
    sys.path.insert(0, str(DOCS.parent))
    from muse.evaluate import border_statistics
    from vqgan.model import VQGAN

    pipe = load_pipeline(args.model)
    prompts = TRAIN_PROMPTS + HELDOUT_PROMPTS
    tokens = pipe(prompts, seed=args.seed, num_candidates=1, output_type="tokens").tokens  # (B, h, w)
    result: dict = {"model": args.model or "bundled default", "prompts": prompts, "seed": args.seed}
    rows = []
    for name, path in (("before", args.before), ("after", args.after)):
        vqgan = VQGAN.from_pretrained(path).eval()
        images = [Image.fromarray(a) for a in to_uint8(vqgan.decode(tokens))]
        rows.append([np.asarray(image) for image in images])
        heldout = heldout_rows(args.data)
        real, rec = [], []
        for start in range(0, len(heldout), 64):
            x = load_images(args.data, heldout[start : start + 64], vqgan.config.resolution)
            real.append(to_uint8(x))
            rec.append(to_uint8(vqgan.decode(vqgan.encode(x))))
        result[name] = {"vqgan": str(path), "borders": border_statistics(images),
                        "heldout_psnr_db": psnr(np.concatenate(real), np.concatenate(rec)), "heldout_images": len(heldout)}
    image = grid(rows)
    image = image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST)
    return save(image, args.out or DOCS / "vqgan-borders.png", result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("recon", help="held-out VQGAN reconstructions (originals above) and PSNR")
    p.add_argument("--vqgan", type=Path, required=True)
    p.add_argument("--data", type=Path, default=Path("data/emoji"))
    p.add_argument("--columns", type=int, default=12)
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the figure, for viewing")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(make=recon)
    for name, run, help_ in (("generate", generate, "generated emoji: 6 training, 6 held-out, 4 other-words prompts"),
                             ("superres", superres, "held-out prompts: base 64 px upscaled bicubic vs super-res"),
                             ("edit", edit, "inpainting and outpainting examples")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", default=None, help="pipeline directory (default: the bundled model)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", type=Path, default=None)
        if name == "generate":
            p.add_argument("--seeds", type=int, default=4, help="images per prompt")
        if name in ("generate", "edit"):
            p.add_argument("--stages", type=int, default=None, help="1 = base stage only (default: all)")
        if name in ("superres", "edit"):
            p.add_argument("--data", type=Path, default=Path("data/emoji"))
        if name == "superres":
            p.add_argument("--num-real", type=int, default=128, help="held-out images for the real-image comparison")
            p.add_argument("--num-generated", type=int, default=64,
                           help="held-out captions for the cascade's bicubic vs super-res comparison")
            p.add_argument("--scorer", default=None,
                           help="prompt scorer directory for both comparisons (default: the model's own)")
        if name == "edit":
            p.add_argument("--image", default="{size}/noto/red-apple.png", help="an emoji of the dataset")
            p.add_argument("--inpaint-prompts", nargs="+",
                           default=["green apple, noto style", "red heart, noto style", "banana, noto style"])
            p.add_argument("--outpaint-prompt", default="red apple, noto style")
        p.set_defaults(make=run)
    p = sub.add_parser("borders", help="one set of generated tokens through two VQGAN decoders: borders and PSNR")
    p.add_argument("--before", type=Path, required=True, help="the first VQGAN directory")
    p.add_argument("--after", type=Path, required=True, help="the second VQGAN directory")
    p.add_argument("--model", default=None, help="pipeline directory whose tokens are decoded (default: bundled)")
    p.add_argument("--data", type=Path, default=Path("data/emoji"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling of the figure, for viewing")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(make=borders)
    p = sub.add_parser("curves", help="fixed-ratio validation curves of a masked-token training run")
    p.add_argument("--run", type=Path, required=True, help="run directory (CSV or TensorBoard logs)")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(make=curves)
    args = parser.parse_args(argv)
    print(json.dumps(args.make(args), indent=2))


if __name__ == "__main__":
    main()
