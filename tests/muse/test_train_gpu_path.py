"""The GPU branches of the training runtime, built and (where the CPU can) run on the CPU. None of this has run on a
GPU here: these tests check that each branch constructs what it should, not its speed."""

from pathlib import Path

import pytest
import torch

from muse.config import ConfigError, load_config
from muse.options import fast_bfloat16
from muse.train import masked
from muse.train.batches import BatchStream
from muse.train.optim import build_optimizer
from muse.train.runtime import Runtime, autocast, compile_blocks, fsdp_policy, setup
from transformer.model import MaskedTransformer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "transformer" / "tiny.yaml"
CUDA = Runtime(device=torch.device("cuda", 0), rank=0, world_size=1, local_rank=0)
CPU = Runtime(device=torch.device("cpu"), rank=0, world_size=1, local_rank=0)


def tiny_train(*overrides: str):
    return load_config(TINY, ["train.out_dir=unused", *overrides]).train


def test_fsdp_gathers_bf16_weights_and_reduces_float32_gradients_on_cuda():
    policy = fsdp_policy(CUDA, tiny_train())
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert fsdp_policy(CUDA, tiny_train("train.mixed_precision=false")).param_dtype is None
    assert fsdp_policy(CPU, tiny_train()).param_dtype is None  # bf16 matmuls are slow on the CPU


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # built on a machine without CUDA, never entered
def test_autocast_is_bf16_on_cuda_and_on_the_cpu_only_where_bf16_is_fast():
    context = autocast(CUDA, tiny_train())
    assert isinstance(context, torch.autocast) and context.device == "cuda" and context.fast_dtype == torch.bfloat16
    assert not isinstance(autocast(CUDA, tiny_train("train.mixed_precision=false")), torch.autocast)
    # On AVX2-only CPUs bf16 matmuls are emulated (hundreds of times slower); AMX / AVX512-BF16 ones gain ~4x.
    assert isinstance(autocast(CPU, tiny_train()), torch.autocast) == fast_bfloat16(torch.device("cpu"))


def test_fused_adamw_takes_the_same_step_as_the_reference():
    # Fused AdamW also exists on the CPU: what CUDA runs can be compared with the per-tensor reference here.
    torch.manual_seed(0)
    models = [MaskedTransformer(load_config(TINY).model) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(m, tiny_train("train.lr=1e-2"), fused=f) for m, f in zip(models, (False, True))]
    assert [group["fused"] for group in optimizers[1].param_groups] == [True, True]
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            sum(p.square().sum() for p in model.parameters()).backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_blocks_keep_their_names_and_compile_lazily():
    model = MaskedTransformer(load_config(TINY).model)
    names = list(model.state_dict())
    blocks = masked.transformer_blocks(model)
    compile_blocks(blocks)  # nothing compiles until a forward runs (not here: inductor on the CPU takes minutes)
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") for block in blocks)
    assert list(model.state_dict()) == names  # checkpoints and exports see the same parameters


def test_setup_on_cuda_allows_tf32_and_picks_the_local_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("LOCAL_RANK", "0")
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        rt = setup(tiny_train())
        assert rt.device == torch.device("cuda", 0)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("highest")
        setup(tiny_train("train.tf32=false"))
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_pinned_batches_come_out_the_same(recwarn):
    data = [torch.tensor([i]) for i in range(6)]
    pinned = BatchStream(data, 2, seed=0, rank=0, world_size=1, pin_memory=True)  # no accelerator: unpinned
    plain = BatchStream(data, 2, seed=0, rank=0, world_size=1)
    assert [next(pinned).tolist() for _ in range(4)] == [next(plain).tolist() for _ in range(4)]


def test_the_vqgan_stage_refuses_fsdp():
    from muse.train import vqgan

    cfg = load_config(REPO / "configs" / "vqgan" / "tiny.yaml", ["train.parallel=fsdp", "train.out_dir=unused"])
    with pytest.raises(ConfigError, match="VQGAN stage trains with ddp"):
        vqgan.train(cfg)


def test_an_unknown_parallel_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="parallel must be one of ddp, fsdp"):
        load_config(TINY, ["train.parallel=zero3"])
