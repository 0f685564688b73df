import dataclasses

import pytest
import torch

from vqgan.config import VQGANConfig

# 16 px images, factor 4 -> 4x4 tokens, 32 codes: trains in seconds on one CPU core.
TINY = VQGANConfig(
    resolution=16,
    base_channels=16,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    codebook_size=32,
    codebook_dim=4,
    latent_channels=16,
    norm_groups=8,
    dead_code_threshold=0.25,
)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The test machine's 2 cores are shared by several processes; two threads per process then run ~10x slower
    # than one on small convolutions.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_config() -> VQGANConfig:
    return TINY


@pytest.fixture
def make_config():
    """The tiny config with some fields changed."""
    return lambda **changes: dataclasses.replace(TINY, **changes)


@pytest.fixture
def make_images():
    """Structured test images in [-1, 1]: bilinear upsampling of a random 4x4 grid."""

    def make(batch: int, size: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        grid = torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1
        return torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)

    return make
