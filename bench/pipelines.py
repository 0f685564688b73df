"""A real `MusePipeline` around random-weight token models, for benchmarks that time the code that ships.

Only the two ends are stand-ins: the text encoder returns fixed random states per prompt (a T5 or CLIP forward is not
what these benchmarks measure, and its weights cannot be downloaded here), and the VQ "decodes" to a 1x1 black image
(each library has its own VQ; decoding is outside the timed region). Everything between -- option resolution, the
task builder, the text context, the engine's batched, guided, chunked forwards and the decoder -- is the pipeline's.

Imported as `pipelines` by the scripts in bench/.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from muse.pipeline import MusePipeline, PipelineConfig
from transformer.config import TextEncoderConfig
from transformer.text import TextEmbedding


class RandomTextEncoder:
    """A fixed random (S, D) state per prompt, all S tokens real; the empty prompt has one real token (the
    end-of-sequence token of a padded encoder) -- the costliest text for cross-attention, and its cheapest branch.
    With `pooled_dim`, also a pooled (P,) vector per prompt and every position real, as aMUSEd's CLIP encoder gives."""

    def __init__(self, dim: int, length: int, seed: int = 0, pooled_dim: int | None = None) -> None:
        self.dim = dim
        self.length = length
        self.pooled_dim = pooled_dim
        self.config = TextEncoderConfig("random", kind="clip" if pooled_dim else "auto", max_length=length)
        self._seed = seed
        self._rows: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}

    def to(self, device=None, dtype=None) -> RandomTextEncoder:
        return self

    def __call__(self, prompts: list[str]) -> TextEmbedding:
        for prompt in prompts:
            if prompt not in self._rows:
                g = torch.Generator().manual_seed(self._seed + len(self._rows))
                mask = torch.ones(self.length, dtype=torch.bool)
                if prompt == "" and self.pooled_dim is None:
                    mask[1:] = False
                pooled = None if self.pooled_dim is None else torch.randn(self.pooled_dim, generator=g)
                self._rows[prompt] = (torch.randn(self.length, self.dim, generator=g), mask, pooled)
        rows = [self._rows[p] for p in prompts]
        pooled = None if self.pooled_dim is None else torch.stack([r[2] for r in rows])
        return TextEmbedding(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), pooled)


@dataclass(frozen=True)
class _VQConfig:
    codebook_size: int
    downsample_factor: int


class TokensOnlyVQ(nn.Module):
    """Stands in for the VQGAN at the end of a call: every image decodes to one black pixel."""

    def __init__(self, codebook_size: int, downsample_factor: int = 16) -> None:
        super().__init__()
        self.config = _VQConfig(codebook_size, downsample_factor)

    def save_pretrained(self, path, dtype=None) -> None:
        raise NotImplementedError("a benchmark stand-in is not saved")
        self.anchor = nn.Parameter(torch.zeros(1))  # so that the pipeline can ask its device

    def decode(self, ids: Tensor) -> Tensor:
        return torch.zeros(ids.shape[0], 3, 1, 1)


def bench_pipeline(transformer: nn.Module, superres: nn.Module | None = None, *, text_length: int,
                   config: PipelineConfig | None = None) -> MusePipeline:
    """A pipeline of these token models with the stand-in text encoder and VQ."""
    text = RandomTextEncoder(transformer.config.text_dim, text_length,
                             pooled_dim=getattr(transformer.config, "pooled_dim", None))
    vq = TokensOnlyVQ(transformer.config.codebook_size)
    return MusePipeline(vq, text, transformer, superres=superres, config=config)
