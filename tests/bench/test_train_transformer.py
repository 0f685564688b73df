"""bench/train_transformer.py: its FLOP count equals torch's FlopCounterMode on a real training step, the bf16 peaks
are looked up by device name, and a CPU run reports throughput, FLOP/s and which attention kernel ran."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from muse.data.sources import TokenBatch
from muse.options import fast_bfloat16
from muse.train import masked
from superres.config import SuperResConfig
from superres.model import SuperResTransformer
from transformer.config import TransformerConfig
from transformer.model import MaskedTransformer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))  # the script imports bench/machine.py as `machine`
    spec = importlib.util.spec_from_file_location("bench_train_transformer", REPO / "bench" / "train_transformer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


HIGH = TransformerConfig(32, 4, width=32, depth=3, num_heads=2, mlp_ratio=2.0, text_dim=24)
CONFIGS = {
    "base": HIGH,
    "superres": SuperResConfig(high=HIGH, low_codebook_size=16, low_grid_size=2, low_depth=2, aligned_low=True,
                               aligned_subpositions=True),
    "superres-plain": SuperResConfig(high=HIGH, low_codebook_size=16, low_grid_size=2, low_depth=1,
                                     aligned_low=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_flops_equal_torchs_count_of_a_training_step(bench, name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = SuperResTransformer(config) if isinstance(config, SuperResConfig) else MaskedTransformer(config)
    B, S, L = 3, 5, 16
    batch = TokenBatch(torch.randint(0, 32, (B, L)), torch.randn(B, S, 24), torch.ones(B, S, dtype=torch.bool),
                       torch.randint(0, 16, (B, 4)))
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, :7], mask[1, 3] = True, True  # M = 7 of 16 positions reach the head
    # The math backend: the CPU flash kernel has no FLOP formula registered, the math one is plain matmuls.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = masked.masked_loss(masked.StageNet(model), batch, mask, 32)
        out.loss.backward()
    assert out.queried == 7
    assert bench.train_flops(config, B, S, out.queried) == counter.get_total_flops()


def test_peaks_are_looked_up_by_device_name(bench, monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench.peak_tflops(cuda, None) == peak, name
    assert bench.peak_tflops(cuda, 500.0) == 500.0
    assert bench.peak_tflops(torch.device("cpu"), None) is None


def test_a_cpu_run_reports_throughput_flops_and_the_attention_kernel(bench):
    result = bench.run_preset(str(REPO / "configs" / "transformer" / "tiny.yaml"), steps=2, warmup=1, batch_size=4,
                              device=torch.device("cpu"), compile_=False, fp32=False, peak=0.5)
    # bf16 autocast only on CPUs that multiply bf16 fast (AMX / AVX512-BF16); float32 on AVX2-only ones.
    expected = "bf16 autocast" if fast_bfloat16(torch.device("cpu")) else "float32"
    assert result["tokens_per_s"] > 0 and result["precision"] == expected
    assert result["achieved_tflops"] > 0 and result["mfu"] == pytest.approx(result["achieved_tflops"] / 0.5)
    # The step's FLOPs are those of its own mask: between the smallest (M = 1) and the largest (M = L) count.
    cfg = bench.load_config(REPO / "configs" / "transformer" / "tiny.yaml")
    low, high = (bench.train_flops(cfg.model, 4, cfg.text.max_length, M) / 1e12 for M in (1, 16))
    assert low <= result["model_tflop_per_step_mean"] <= high
    assert any("scaled_dot_product" in name for name in result["attention_kernels"])
