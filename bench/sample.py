"""Sampling throughput of the token-generation loop: musegen vs diffusers' aMUSEd vs muse-maskgit-pytorch.

Reports images/s for the "bench-256" config (16x16 tokens, K=8192, width 512, 8 layers, 8 heads, 77 text tokens,
24 steps), with classifier-free guidance on and off, at batch 1 and 8, fp32 on the CPU with a fixed thread count; the
fraction of this machine's fp32 matmul peak reached (the peak is measured in the same run); and the ratio of our
images/s to each competitor's. All three models have random weights and are built at matched width / depth / heads /
tokens / codebook / text length; nothing is downloaded. bench/README.md documents every matching decision.

Timed region, identical in kind for the three: precomputed text encoder states in, token ids out. The text encoder is
NOT run (random states stand in for its output); each model's own text projection / cross-attention keys and values
ARE inside the timing; VQ decoding is not (each library has its own VQ).

    python bench/sample.py                              # full run, quiet machine only (~20 min on 2 cores)
    python bench/sample.py --quick                      # smoke run: fewer steps, reps and images
    python bench/sample.py --quick --skip-competitors   # < 60 s
    python bench/sample.py --quick --skip-competitors --profile   # where our time goes (torch.profiler)

The JSON result goes to stdout and, for full runs (or with --out), to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import dataclasses
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

# muse-maskgit-pytorch wraps its decoding loop in tqdm; the bar would interleave with our report. tqdm reads TQDM_*
# environment overrides when it is imported, so this must come before any import that pulls tqdm in.
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The checkout first: `python bench/X.py` puts bench/ itself first on the path, where superres.py would shadow
# the superres package (also when PYTHONPATH already names the checkout, further down).
sys.path.insert(0, str(REPO))

from machine import machine_info, measure_matmul_peak, write_report  # noqa: E402  (bench/machine.py)
from pipelines import bench_pipeline  # noqa: E402  (bench/pipelines.py)
from sampling.schedule import num_masked  # noqa: E402
from transformer.config import TransformerConfig  # noqa: E402
from transformer.model import MaskedTransformer  # noqa: E402

SCHEMA_VERSION = 1
OURS, DIFFUSERS, MASKGIT = "musegen", "diffusers", "muse-maskgit-pytorch"
TARGETS = {DIFFUSERS: 3.0, MASKGIT: 4.0}  # ours / theirs images/s, guidance on, at TARGET_BATCH
TARGET_BATCH = 8


@dataclass(frozen=True)
class BenchConfig:
    """The "bench-256" shapes, shared by all three libraries."""

    grid_size: int = 16         # h == w: a 256 px image through a stride-16 VQ
    codebook_size: int = 8192   # K
    width: int = 512            # D
    depth: int = 8
    num_heads: int = 8
    mlp_ratio: float = 4.0      # ours: GELU MLP D -> 4D -> D. Theirs use GEGLU at the same FLOPs (README).
    text_length: int = 77       # S
    text_dim: int = 768         # T5-base / CLIP-L width of the (random) text encoder states
    num_steps: int = 24
    guidance_scale: float = 3.0  # any value > 1 turns guidance on; the value does not change the cost

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size  # L

    @property
    def geglu_hidden(self) -> int:
        """GEGLU width with the parameters and FLOPs of our D -> rD -> D GELU MLP: 3 * D * I == 2 * r * D * D.

        int(D * r * 2 / 3) is muse-maskgit-pytorch's own formula for its FeedForward; diffusers gets the same value.
        """
        return int(self.width * self.mlp_ratio * 2 / 3)


@dataclass(frozen=True)
class Case:
    library: str
    guidance: bool
    batch: int


@dataclass
class CaseResult:
    library: str
    guidance: bool
    batch: int
    num_steps: int
    seconds: list[float]            # wall time of each timed run (one run = `batch` images)
    seconds_per_run: float          # median of `seconds`
    images_per_s: float
    seconds_per_image: float
    gflop_per_image: float          # this library's own analytic matmul FLOPs (see *_flops)
    achieved_gflops: float
    fraction_of_peak: float
    ratio_vs: dict[str, float]      # ours: ours / theirs images/s for the same (guidance, batch); others: empty


# ---------------------------------------------------------------------------------------------------------------------
# Analytic FLOPs: matmuls only (2 per multiply-add), including attention scores and attention-weighted values.
# Norms, softmax, activations, embeddings and sampling are left out; they are a few percent and memory-bound anyway.


def steps_positions(cfg: BenchConfig, num_steps: int) -> list[int]:
    """Masked positions M our decode asks logits for at each step it runs (steps with nothing masked are skipped)."""
    counts = num_masked(torch.tensor([cfg.num_tokens]), num_steps)[0]  # (T + 1,)
    return [int(c) for c in counts[:-1] if c > 0]


def ours_flops(cfg: BenchConfig, guidance: bool, num_steps: int, batch: int) -> float:
    """Per image: text context once, then per step the trunk over all L tokens, except that the last layer computes
    its queries, cross-attention and MLP at the M masked positions only, and the head at those M.

    The first step's grids are all masked, so rows with the same prompt compute the same logits and run once: the
    `batch` distinct prompts and, with guidance, one shared empty prompt (the engine's first-step sharing).
    """
    L, D, S, K, Dt = cfg.num_tokens, cfg.width, cfg.text_length, cfg.codebook_size, cfg.text_dim
    hidden = int(D * cfg.mlp_ratio)

    def layer(rows: int) -> int:
        """One layer whose output is computed at `rows` of the L tokens (keys and values at all L)."""
        return (
            2 * L * D * 2 * D + 2 * rows * D * D + 2 * 2 * rows * L * D + 2 * rows * D * D  # self: k/v; q, attn, out
            + 2 * rows * D * D + 2 * 2 * rows * S * D + 2 * rows * D * D  # cross: q, scores + values, out (k/v cached)
            + 2 * 2 * rows * D * hidden  # MLP
        )

    branches = 2 if guidance else 1
    steps = [(cfg.depth - 1) * layer(L) + layer(M) + 2 * M * D * K for M in steps_positions(cfg, num_steps)]
    first_rows = (batch + 1 if guidance else batch) / batch  # forward rows per image at the first step
    text = 2 * S * Dt * D + cfg.depth * 2 * S * D * 2 * D  # projection + every layer's cross k/v, once per call
    return branches * text + first_rows * steps[0] + branches * sum(steps[1:])


def diffusers_flops(cfg: BenchConfig, guidance: bool, num_steps: int) -> float:
    """UVit2DModel with num_res_blocks=0: every step re-projects the text and its cross k/v; head at all L tokens."""
    L, D, S, K, Dt, I = cfg.num_tokens, cfg.width, cfg.text_length, cfg.codebook_size, cfg.text_dim, cfg.geglu_hidden
    layer = (
        3 * 2 * 2 * D * 2 * D  # three AdaLayerNormContinuous: scale/shift from the pooled embedding (one row)
        + 4 * 2 * L * D * D + 2 * 2 * L * L * D  # self-attention q, k, v, out + scores, values
        + 2 * 2 * L * D * D + 2 * 2 * S * D * D + 2 * 2 * L * S * D  # cross q, out; k, v of the text; scores, values
        + 2 * L * D * 2 * I + 2 * L * I * D  # GEGLU feed-forward
    )
    per_step = (
        2 * S * Dt * D  # encoder_proj
        + 2 * (1280 + cfg.text_dim) * D + 2 * D * D  # cond_embed (pooled text + micro-conditioning)
        + 3 * 2 * L * D * D  # 1x1 conv embed, project_to_hidden, project_from_hidden
        + cfg.depth * layer
        + 2 * L * D * D + 2 * L * D * K  # ConvMlmLayer: 1x1 conv, then the head at every position
    )
    return (2 if guidance else 1) * num_steps * per_step


def maskgit_flops(cfg: BenchConfig, guidance: bool, num_steps: int) -> float:
    """MaskGitTransformer: a learned null key/value in each attention; text projection and cross k/v every step;
    head at all L tokens; guidance = a second, separate forward."""
    L, D, S, K, Dt, I = cfg.num_tokens, cfg.width, cfg.text_length, cfg.codebook_size, cfg.text_dim, cfg.geglu_hidden
    layer = (
        2 * L * D * D + 2 * L * D * 2 * D + 2 * L * D * D + 2 * 2 * L * (L + 1) * D  # self: q, kv, out, attention
        + 2 * L * D * D + 2 * S * D * 2 * D + 2 * L * D * D + 2 * 2 * L * (S + 1) * D  # cross: q, kv, out, attention
        + 2 * L * D * 2 * I + 2 * L * I * D  # GEGLU feed-forward
    )
    per_step = 2 * S * Dt * D + cfg.depth * layer + 2 * L * D * K
    return (2 if guidance else 1) * num_steps * per_step


# ---------------------------------------------------------------------------------------------------------------------
# Runners: build once, then `run(batch, guidance, num_steps)` generates `batch` token grids from random text states.


class OursRunner:
    """`MusePipeline.__call__` -- options, task builder, text context, the decoding engine -- over a random
    MaskedTransformer, with the pipeline's defaults; only the text encoder (random states) and the VQ (no pixels) are
    stand-ins (bench/pipelines.py)."""

    name = OURS

    def __init__(self, cfg: BenchConfig, max_batch: int) -> None:
        self.cfg = cfg
        self.model = MaskedTransformer(
            TransformerConfig(
                codebook_size=cfg.codebook_size, grid_size=cfg.grid_size, width=cfg.width, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, text_dim=cfg.text_dim,
            )
        ).eval()
        self.pipe = bench_pipeline(self.model, text_length=cfg.text_length)
        self.prompts = [f"prompt {i}" for i in range(max_batch)]  # `batch` different prompts per run

    def run(self, batch: int, guidance: bool, num_steps: int) -> Tensor:
        out = self.pipe(self.prompts[:batch], seed=list(range(batch)), num_steps=num_steps, num_candidates=1,
                        guidance_scale=self.cfg.guidance_scale if guidance else 1.0)
        return out.tokens

    def flops_per_image(self, guidance: bool, num_steps: int, batch: int) -> float:
        return ours_flops(self.cfg, guidance, num_steps, batch)


class DiffusersRunner:
    """diffusers' AmusedPipeline.__call__ (its own denoising loop over AmusedScheduler driving UVit2DModel), fed
    precomputed embeddings through prompt_embeds / encoder_hidden_states (+ the negative pair), output_type="latent"."""

    name = DIFFUSERS

    def __init__(self, cfg: BenchConfig, max_batch: int) -> None:
        from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel

        self.cfg = cfg
        transformer = UVit2DModel(
            hidden_size=cfg.width,
            use_bias=False,
            cond_embed_dim=cfg.text_dim,
            encoder_hidden_size=cfg.text_dim,
            vocab_size=cfg.codebook_size + 1,  # + the mask token, as for ours (aMUSEd rounds up to 8256)
            codebook_size=cfg.codebook_size,
            in_channels=cfg.width,
            block_out_channels=cfg.width,
            num_res_blocks=0,  # no ConvNeXt/attention blocks around the trunk: depth matched to our 8 layers
            block_num_heads=cfg.num_heads,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.geglu_hidden,
            sample_size=cfg.grid_size,
        ).eval()
        scheduler = AmusedScheduler(mask_token_id=cfg.codebook_size)
        # Text is given as embeddings and the output as latents, so no tokenizer, text encoder or VQ is needed.
        self.pipe = AmusedPipeline(vqvae=None, tokenizer=None, text_encoder=None, transformer=transformer,
                                   scheduler=scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        S = cfg.text_length
        self.pooled = torch.randn(max_batch, cfg.text_dim)  # prompt_embeds: CLIP's pooled, projected vector
        self.states = torch.randn(max_batch, S, cfg.text_dim)  # encoder_hidden_states
        self.null_pooled = torch.randn(1, cfg.text_dim)
        self.null_states = torch.randn(1, S, cfg.text_dim)

    def run(self, batch: int, guidance: bool, num_steps: int) -> Tensor:
        # Without a VQ the pipeline assumes a stride of 8; asking for 8 * grid pixels gives our 16 x 16 token grid.
        pixels = self.cfg.grid_size * self.pipe.vae_scale_factor
        negative = {}
        if guidance:
            negative = {"negative_prompt_embeds": self.null_pooled.expand(batch, -1),
                        "negative_encoder_hidden_states": self.null_states.expand(batch, -1, -1)}
        out = self.pipe(
            prompt_embeds=self.pooled[:batch], encoder_hidden_states=self.states[:batch], **negative,
            guidance_scale=self.cfg.guidance_scale if guidance else 1.0, num_inference_steps=num_steps,
            height=pixels, width=pixels, output_type="latent", generator=torch.Generator().manual_seed(0),
        )
        return out.images

    def flops_per_image(self, guidance: bool, num_steps: int, batch: int) -> float:
        return diffusers_flops(self.cfg, guidance, num_steps)


class _TokensOnlyVAE(torch.nn.Module):
    """Stands in for MaskGit's VQGanVAE so that generate() returns token ids: VQ decoding is outside the timing.

    generate() reads the grid size from the VAE even when fmap_size is passed, and decodes with it at the end.
    """

    def __init__(self, grid_size: int) -> None:
        super().__init__()
        self.grid_size = grid_size

    def get_encoded_fmap_size(self, image_size: int) -> int:
        return self.grid_size

    def decode_from_ids(self, ids: Tensor) -> Tensor:
        return ids


class MaskGitRunner:
    """muse-maskgit-pytorch's MaskGit.generate (its own loop) with its T5 bypassed: the T5 config cache is pre-seeded
    so no config is fetched, and the transformer's encode_text returns precomputed random states."""

    name = MASKGIT

    def __init__(self, cfg: BenchConfig, max_batch: int) -> None:
        from transformers import T5Config
        import muse_maskgit_pytorch.muse_maskgit_pytorch as maskgit_module
        import muse_maskgit_pytorch.t5 as maskgit_t5
        from muse_maskgit_pytorch import MaskGit, MaskGitTransformer, VQGanVAE

        # Its loop is wrapped in tqdm; TQDM_DISABLE only works if tqdm was not imported before this script ran.
        maskgit_module.tqdm = lambda iterable, **options: iterable

        self.cfg = cfg
        # get_encoded_dim() would call T5Config.from_pretrained (a download) unless the name is already cached.
        t5_name = "bench-random-t5"
        maskgit_t5.T5_CONFIGS[t5_name] = {"config": T5Config(d_model=cfg.text_dim)}
        transformer = MaskGitTransformer(
            num_tokens=cfg.codebook_size, seq_len=cfg.num_tokens, dim=cfg.width, depth=cfg.depth,
            heads=cfg.num_heads, dim_head=cfg.width // cfg.num_heads, ff_mult=cfg.mlp_ratio, t5_name=t5_name,
        )
        states = torch.randn(max_batch, cfg.text_length, cfg.text_dim)  # no exact zeros: every token is "real"
        # generate(texts) calls transformer.encode_text(texts); it is an instance attribute, so it can be replaced.
        transformer.encode_text = lambda texts: states[: len(texts)]
        # MaskGit's constructor checks codebook sizes against a VQGanVAE; a tiny one (no VGG, no discriminator) passes
        # the check and is then swapped for the tokens-only stand-in.
        vae = VQGanVAE(dim=16, codebook_size=cfg.codebook_size, use_vgg_and_gan=False)
        self.maskgit = MaskGit(image_size=cfg.grid_size * 16, transformer=transformer, vae=vae)
        self.maskgit.vae = self.maskgit.cond_vae = _TokensOnlyVAE(cfg.grid_size)
        self.maskgit.eval()

    def run(self, batch: int, guidance: bool, num_steps: int) -> Tensor:
        torch.manual_seed(0)
        return self.maskgit.generate(
            texts=[""] * batch, fmap_size=self.cfg.grid_size, timesteps=num_steps,
            cond_scale=self.cfg.guidance_scale if guidance else 1,  # 1 -> one forward per step, no null pass
        )

    def flops_per_image(self, guidance: bool, num_steps: int, batch: int) -> float:
        return maskgit_flops(self.cfg, guidance, num_steps)


RUNNERS = {OURS: OursRunner, DIFFUSERS: DiffusersRunner, MASKGIT: MaskGitRunner}


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def time_run(runner, case: Case, num_steps: int) -> float:
    """Wall seconds of one run of `case`; its output is checked so that a loop that skipped work cannot win."""
    start = time.perf_counter()
    tokens = runner.run(case.batch, case.guidance, num_steps)
    seconds = time.perf_counter() - start
    grid = tokens.reshape(case.batch, -1)
    if not bool(((grid >= 0) & (grid < runner.cfg.codebook_size)).all()):
        raise RuntimeError(f"{case.library} left mask tokens or out-of-codebook ids in its output")
    return seconds


def time_cases(runners: dict, guidance: bool, batch: int, num_steps: int, reps: int, warmup_steps: int) -> dict:
    """{library: [seconds of each rep]} for one (guidance, batch).

    Every library first gets a short warm-up run (thread pool, allocator, kernel selection). The timed reps are
    interleaved, library by library, with the order rotated each rep, so that a change in machine load or clock
    speed during the benchmark is shared between the libraries instead of landing on whichever ran last.
    """
    for library, runner in runners.items():
        runner.run(batch, guidance, min(warmup_steps, num_steps))
    seconds = {library: [] for library in runners}
    order = list(runners)
    for rep in range(reps):
        for library in order[rep % len(order):] + order[: rep % len(order)]:
            seconds[library].append(time_run(runners[library], Case(library, guidance, batch), num_steps))
    return seconds


def summarise(runner, case: Case, seconds: list[float], num_steps: int, peak_gflops: float) -> CaseResult:
    per_run = statistics.median(seconds)
    images_per_s = case.batch / per_run
    gflop = runner.flops_per_image(case.guidance, num_steps, case.batch) / 1e9
    return CaseResult(
        library=case.library, guidance=case.guidance, batch=case.batch, num_steps=num_steps, seconds=seconds,
        seconds_per_run=per_run, images_per_s=images_per_s, seconds_per_image=per_run / case.batch,
        gflop_per_image=gflop, achieved_gflops=gflop * images_per_s,
        fraction_of_peak=gflop * images_per_s / peak_gflops, ratio_vs={},
    )


def add_ratios(results: list[CaseResult]) -> None:
    by_key = {(r.library, r.guidance, r.batch): r for r in results}
    for r in results:
        if r.library != OURS:
            continue
        for other in (DIFFUSERS, MASKGIT):
            theirs = by_key.get((other, r.guidance, r.batch))
            if theirs is not None:
                r.ratio_vs[other] = r.images_per_s / theirs.images_per_s


def target_report(results: list[CaseResult], batch: int) -> dict:
    ours = next((r for r in results if r.library == OURS and r.guidance and r.batch == batch), None)
    report = {}
    for other, target in TARGETS.items():
        ratio = ours.ratio_vs.get(other) if ours is not None else None
        report[other] = {"guidance": True, "batch": batch, "target": target, "ratio": ratio,
                         "met": None if ratio is None else ratio >= target}
    return report


def library_versions() -> dict:
    versions = {}
    for dist in ("musegen", "torch", "diffusers", "muse-maskgit-pytorch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


# ---------------------------------------------------------------------------------------------------------------------
# aMUSEd on identical weights


# UVit2DModel's defaults are amused-256's architecture (1024 wide, 22 layers, 768-wide ConvNeXt stages, 8192 codes,
# CLIP-L text of 77 tokens), but for the grid: a 256 px image through the stride-16 VQ is 16 x 16 tokens.
AMUSED_256 = {"sample_size": 16}
AMUSED_TEXT = (77, 768, 768)  # text length, CLIP-L state width, pooled width


def amused_comparison(batches: tuple[int, ...], reps: int, num_steps: int, guidance_scale: float, log) -> dict:
    """musegen's pipeline vs diffusers' AmusedPipeline, both on ONE random amused-256 state dict, at the same steps
    and guidance, fp32, same precomputed text in; and the logits of one forward compared at full size."""
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel

    from muse.options import amused_options
    from muse.pipeline import PipelineConfig
    from transformer.uvit import UVit2D, UVit2DConfig

    torch.manual_seed(0)
    reference = UVit2DModel(**AMUSED_256).eval()
    config = UVit2DConfig.from_diffusers_json(dict(reference.config))
    ours = UVit2D(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # the same weights, bit for bit
    params = sum(p.numel() for p in ours.parameters())
    log(f"amused-256 shapes: {params / 1e6:.0f}M parameters, {config.grid_size}x{config.grid_size} tokens")
    sampling = dataclasses.replace(amused_options(), num_steps=num_steps, guidance_scale=guidance_scale)
    pipe = bench_pipeline(ours, text_length=AMUSED_TEXT[0], config=PipelineConfig(sampling=sampling))
    scheduler = AmusedScheduler(mask_token_id=config.mask_token_id)
    theirs = AmusedPipeline(vqvae=None, tokenizer=None, text_encoder=None, transformer=reference, scheduler=scheduler)
    theirs.set_progress_bar_config(disable=True)
    prompts = [f"prompt {i}" for i in range(max(batches))]
    text, null = pipe.text_encoder(prompts), pipe.text_encoder([""])

    # Parity at full size: one forward of each on the same grid and text.
    with torch.inference_mode():
        tokens = torch.randint(0, config.codebook_size, (1, config.grid_size ** 2))
        tokens[:, ::3] = config.mask_token_id
        micro = torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]])
        expected = reference(tokens.view(1, config.grid_size, config.grid_size), micro_conds=micro,
                             pooled_text_emb=text.pooled[:1], encoder_hidden_states=text.states[:1])
        got = ours(tokens, ours.text_context(text.states[:1], text.mask[:1], text.pooled[:1]))
        expected = expected.flatten(2).transpose(1, 2)
        parity = {"max_abs_diff": float((got - expected).abs().max()), "max_abs_logit": float(expected.abs().max())}
    log(f"logits parity at full size: max |ours - diffusers| = {parity['max_abs_diff']:.2e} "
        f"(max |logit| {parity['max_abs_logit']:.1f})")

    def run_ours(batch: int) -> Tensor:
        return pipe(prompts[:batch], seed=list(range(batch))).tokens

    def run_theirs(batch: int) -> Tensor:
        pixels = config.grid_size * theirs.vae_scale_factor  # without a VQ it assumes a stride of 8
        return theirs(prompt_embeds=text.pooled[:batch], encoder_hidden_states=text.states[:batch],
                      negative_prompt_embeds=null.pooled.expand(batch, -1),
                      negative_encoder_hidden_states=null.states.expand(batch, -1, -1),
                      guidance_scale=guidance_scale, num_inference_steps=num_steps, height=pixels, width=pixels,
                      output_type="latent", generator=torch.Generator().manual_seed(0)).images

    results = []
    for batch in batches:
        run_ours(batch), run_theirs(batch)  # warm-up
        seconds = {OURS: [], DIFFUSERS: []}
        for rep in range(reps):  # interleaved, the order alternating
            order = [(OURS, run_ours), (DIFFUSERS, run_theirs)]
            for name, run in order if rep % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                out = run(batch)
                seconds[name].append(time.perf_counter() - start)
                if not bool((out.reshape(batch, -1) < config.codebook_size).all()):
                    raise RuntimeError(f"{name} left mask tokens in its output")
        rate = {name: batch / statistics.median(times) for name, times in seconds.items()}
        log(f"  amused-256 batch={batch}: musegen {rate[OURS]:.3f} images/s, diffusers {rate[DIFFUSERS]:.3f}: "
            f"{rate[OURS] / rate[DIFFUSERS]:.2f}x")
        results.append({"batch": batch, "seconds": seconds, "images_per_s": rate,
                        "ratio_vs_diffusers": rate[OURS] / rate[DIFFUSERS]})
    return {"model": "amused-256 shapes (UVit2DModel defaults, sample_size 16), random weights shared by both",
            "parameters": params, "num_steps": num_steps, "guidance_scale": guidance_scale,
            "sampling": dataclasses.asdict(sampling), "parity": parity, "results": results,
            "target": {"ratio": 1.5, "met": all(r["ratio_vs_diffusers"] >= 1.5 for r in results)}}


# ---------------------------------------------------------------------------------------------------------------------
# Profiling


def profile_ours(runner: OursRunner, batch: int, guidance: bool, num_steps: int, rows: int) -> str:
    """torch.profiler table of one run, plus the split between the model's forwards and everything else."""
    from torch.profiler import ProfilerActivity, profile, record_function

    runner.run(batch, guidance, min(2, num_steps))
    model = runner.model
    original = model.forward

    def labelled(*args, **kwargs):
        with record_function("bench::forward"):
            return original(*args, **kwargs)

    model.forward = labelled
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            with record_function("bench::run"):
                start = time.perf_counter()
                runner.run(batch, guidance, num_steps)
                wall = time.perf_counter() - start
    finally:
        del model.forward
    events = {e.key: e for e in prof.key_averages()}
    total = events["bench::run"].cpu_time_total
    forward = events["bench::forward"].cpu_time_total
    lines = [
        f"profile: musegen batch={batch} guidance={guidance} steps={num_steps}, wall {wall:.2f} s (profiled)",
        f"  model forwards: {forward / total:6.1%}   everything else (engine, decoder, text context): "
        f"{1 - forward / total:6.1%}",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows),
        prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 steps, batches 1 and 2, 1 rep, a smaller peak measurement")
    parser.add_argument("--skip-competitors", action="store_true", help="time musegen only")
    parser.add_argument("--libraries", nargs="+", choices=list(RUNNERS), help="time only these libraries")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8; quick 1 2)")
    parser.add_argument("--steps", type=int, help="decoding steps (default 24; quick 6)")
    parser.add_argument("--reps", type=int, help="timed runs per case, the median is reported (default 3; quick 1)")
    parser.add_argument("--guidance", choices=["on", "off", "both"], default="both")
    parser.add_argument("--out", type=Path, help="also write the JSON here (full runs default to bench/results/)")
    parser.add_argument("--amused", action="store_true",
                        help="only the aMUSEd comparison: musegen vs AmusedPipeline on one random amused-256 state "
                             "dict, 12 steps, guidance on, batches 1 and 4 (default), fp32, with full-size parity")
    parser.add_argument("--profile", action="store_true",
                        help="print a torch.profiler table of our loop (largest batch, guidance on) to stderr")
    parser.add_argument("--profile-rows", type=int, default=25)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = BenchConfig()
    num_steps = args.steps or (4 if args.quick else cfg.num_steps)
    batches = tuple(args.batches or ((1, 2) if args.quick else (1, 8)))
    reps = args.reps or (1 if args.quick else 3)
    guidance = {"on": (True,), "off": (False,), "both": (True, False)}[args.guidance]
    libraries = args.libraries or ([OURS] if args.skip_competitors else list(RUNNERS))
    custom = bool(args.quick or args.steps or args.batches or args.reps or args.libraries or args.skip_competitors
                  or args.threads != 2 or args.guidance != "both")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    machine = machine_info(args.threads)
    log(f"machine: {machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, torch {machine['torch_version']}, "
        f"{machine['threads']} threads, load {machine['load_average']}")
    if args.amused:
        report = {"benchmark": "bench/sample.py --amused", "created": datetime.now(timezone.utc).isoformat(
                      timespec="seconds"), "machine": machine, "versions": library_versions(),
                  "amused": amused_comparison(tuple(args.batches or (1, 4)), args.reps or 2, args.steps or 12,
                                              10.0, log)}
        write_report(report, "sample-amused", args.out, default_run=not (args.batches or args.reps or args.steps))
        return report
    peak_sizes, peak_reps = ((1024, 2048), 3) if args.quick else ((1024, 2048, 4096), 5)
    peak_start = measure_matmul_peak(peak_sizes, peak_reps)
    log(f"fp32 matmul peak (start): {peak_start['gflops']:.1f} GFLOP/s  {peak_start['gflops_by_size']}")

    runners = {}
    for library in libraries:
        start = time.perf_counter()
        try:
            runners[library] = RUNNERS[library](cfg, max(batches))
        except ModuleNotFoundError as error:
            if library == OURS:
                raise
            sys.exit(f"{library} is not installed ({error}); install the competitors with "
                     f"`.venv/bin/pip install -r bench/requirements.txt`, or pass --skip-competitors")
        log(f"{library}: built in {time.perf_counter() - start:.1f} s")
    timings = {}
    for batch in batches:
        for guided in guidance:
            timings[guided, batch] = time_cases(runners, guided, batch, num_steps, reps, 1 if args.quick else 2)
            for library, seconds in timings[guided, batch].items():
                log(f"  guidance={'on ' if guided else 'off'} batch={batch} {library:>20}: "
                    f"{batch / statistics.median(seconds):.3f} images/s")

    # Measured again at the end, and the better of the two used: the peak is what the machine can do at best.
    peak_end = measure_matmul_peak(peak_sizes, peak_reps)
    log(f"fp32 matmul peak (end): {peak_end['gflops']:.1f} GFLOP/s  {peak_end['gflops_by_size']}")
    peak = {"gflops": max(peak_start["gflops"], peak_end["gflops"]), "start": peak_start, "end": peak_end}
    results: list[CaseResult] = []
    for (guided, batch), by_library in timings.items():
        for library, seconds in by_library.items():
            results.append(summarise(runners[library], Case(library, guided, batch), seconds, num_steps,
                                     peak["gflops"]))
    add_ratios(results)
    for r in results:
        ratios = "".join(f", {k} {v:.2f}x" for k, v in r.ratio_vs.items())
        log(f"guidance={'on ' if r.guidance else 'off'} batch={r.batch} {r.library:>20}: "
            f"{r.images_per_s:.3f} images/s, {r.seconds_per_image:.2f} s/image, {r.achieved_gflops:.1f} GFLOP/s "
            f"= {r.fraction_of_peak:.1%} of peak{ratios}")
    profile_text = None
    if args.profile and OURS in runners:
        profile_text = profile_ours(runners[OURS], max(batches), True, num_steps, args.profile_rows)

    report = {
        "benchmark": "bench/sample.py",
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "note": "non-default settings (quick/smoke or overridden): not comparable with full runs" if custom else None,
        "machine": machine | {"load_average_end": list(os.getloadavg())},
        "versions": library_versions(),
        "config": asdict(replace(cfg, num_steps=num_steps)) | {
            "num_tokens": cfg.num_tokens, "geglu_hidden": cfg.geglu_hidden, "batches": list(batches), "reps": reps,
            "dtype": "float32", "device": "cpu",
        },
        "timed_region": "precomputed random text-encoder states -> token ids; text encoder excluded, each model's "
                        "text projection and cross-attention keys/values included, VQ decode excluded",
        "flops": "analytic matmul FLOPs per image (2 per multiply-add), each library counted for its own loop; "
                 "ours counts the head only at the masked positions of each step",
        "peak": peak,
        "results": [asdict(r) for r in results],
        "targets": target_report(results, TARGET_BATCH),  # ratio and met are null when batch 8 was not run
    }
    if profile_text is not None:
        log(profile_text)
    write_report(report, "sample", args.out, default_run=not custom)
    return report


if __name__ == "__main__":
    main()
