"""FSDP2 training on the CPU: two processes under torchrun with gloo (one launch runs every multi-process case, the
tests below check its results), switching between ddp and fsdp at a resume (also from a legacy `last.pt`), and
resuming the two-process run's checkpoint on one process."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from muse.config import load_config
from muse.data.sources import save_unconditional
from muse.data.tokens import TokenShardWriter
from muse.train import masked
from muse.train.checkpoint import LAST, LEGACY_LAST, TRAINER_FILE, load_checkpoint
from muse.train.optim import decay_and_no_decay
from transformer.model import MaskedTransformer
from transformer.text import TextEmbedding

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "transformer" / "tiny.yaml"
K, GRID, TEXT_DIM = 32, 4, 384  # the tiny preset: 4x4 grid, 32 codes, MiniLM-width text states

# Every rank runs this. Part 1 compares one sharded step with the same step in one process; part 2 trains the tiny
# preset through `masked.train` seven times, in one process group (teardown keeps the group for the next run).
WORKER = textwrap.dedent(
    """
    import copy, functools, json, os, shutil, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from muse.config import config_to_dict, load_config
    from muse.data.sources import TokenBatch
    from muse.train import checkpoint, masked, optim, runtime
    import persist
    from superres.config import SuperResConfig
    from superres.model import SuperResTransformer
    from transformer.config import TransformerConfig
    from transformer.model import MaskedTransformer
    from transformer.text import TextEmbedding

    out, shards, preset = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rt = runtime.Runtime(torch.device("cpu"), dist.get_rank(), dist.get_world_size(), dist.get_rank())
    train_cfg = load_config(preset, ["train.parallel=fsdp", "train.lr=1e-2", "train.grad_clip=0.05",
                                     "train.out_dir=unused"]).train

    # Part 1: the same three steps sharded (each rank its half of the batch) and in one process (the whole batch).
    def build(kind, seed):
        torch.manual_seed(seed)
        high = TransformerConfig(32, 4, width=32, depth=2, num_heads=2, mlp_ratio=2.0, text_dim=16)
        if kind == "transformer":
            return MaskedTransformer(high)
        return SuperResTransformer(SuperResConfig(high=high, low_codebook_size=16, low_grid_size=2, low_depth=1,
                                                  aligned_low=True))

    parity = {}
    for kind in ("transformer", "superres"):
        reference = build(kind, 100)                # rank 0's init
        model = build(kind, 100 + rt.rank)          # each rank's own init: parallelize must broadcast rank 0's
        net = runtime.parallelize(masked.StageNet(model), masked.fsdp_units(model), rt, train_cfg)
        ref_net = masked.StageNet(reference)
        opt, ref_opt = (optim.build_optimizer(m, train_cfg) for m in (model, reference))
        sched, ref_sched = (optim.build_scheduler(o, train_cfg) for o in (opt, ref_opt))
        g = torch.Generator().manual_seed(7)
        losses, ref_losses = [], []
        for step in range(3):
            halves = []
            for _ in range(2):
                halves.append((TokenBatch(torch.randint(0, 32, (3, 16), generator=g),
                                          torch.randn(3, 5, 16, generator=g), torch.rand(3, 5, generator=g) < 0.8,
                                          torch.randint(0, 16, (3, 4), generator=g)),
                               torch.rand(3, 16, generator=g) < 0.5))
            batch, mask = halves[rt.rank]
            loss = masked.masked_loss(net, batch, mask, 32).loss
            optim.step_optimizer(loss, opt, sched, train_cfg.grad_clip)
            losses.append(float(loss))
            parts = [masked.masked_loss(ref_net, b, m, 32).loss for b, m in halves]
            optim.step_optimizer((parts[0] + parts[1]) / 2, ref_opt, ref_sched, train_cfg.grad_clip)
            ref_losses.append(float(parts[rt.rank]))
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        init = build(kind, 100).state_dict()
        parity[kind] = {
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "weight_diff": max(float((full[k] - v).abs().max()) for k, v in reference.state_dict().items()),
            "moved": max(float((full[k] - v).abs().max()) for k, v in init.items()),
            "sharded": all(runtime.is_sharded(p) for p in model.parameters()),
            "local_fraction": sum(p.to_local().numel() for p in model.parameters()) /
                              sum(p.numel() for p in model.parameters()),
        }
    if rt.is_main:
        (out / "parity.json").write_text(json.dumps(parity))

    # Part 2: training runs of the tiny preset from token shards.
    masked.teardown = lambda rt: dist.barrier()

    def cfg(name, *extra):
        return load_config(preset, ["data.format=tokens", f"data.path={shards}", "vqgan=none", "train.steps=4",
                                    "train.save_every=2", "train.batch_size=2", "train.log_every=1",
                                    "train.parallel=fsdp", f"train.out_dir={out / name}", *extra])

    class Preempted(Exception):
        pass

    real_save = masked.save_checkpoint

    def save_then_crash(run_dir, step, *args):
        real_save(run_dir, step, *args)
        if step == 2:
            raise Preempted

    masked.train(cfg("straight"))
    # Compiled blocks under FSDP2's hooks. aot_eager: Dynamo traces each block and AOTAutograd builds its forward and
    # backward graphs, as with the default backend, but the graphs run as aten ops (no C++ code generation on a CPU).
    real_compile = torch.compile
    torch.compile = functools.partial(real_compile, backend="aot_eager")
    masked.train(cfg("compiled", "train.compile=true"))
    torch.compile = real_compile
    masked.save_checkpoint = save_then_crash
    try:
        masked.train(cfg("resumed"), keep_every=2)
    except Preempted:
        pass
    masked.save_checkpoint = real_save
    dist.barrier()
    if rt.is_main:
        shutil.copytree(out / "resumed", out / "onto-one")  # step 2, for the test to resume on one process
    dist.barrier()
    masked.train(cfg("resumed"), resume=True, keep_every=2)

    # A ddp run, which also writes its checkpoints as musegen up to d178d65 did under ddp (`last.pt`: the whole state
    # by rank 0, optimizers keyed by position; that version's collect_state and write_checkpoint) into legacy/.
    def save_both(run_dir, step, components, batches, cfg_, rt_, keep_every):
        real_save(run_dir, step, components, batches, cfg_, rt_, keep_every)
        rngs, positions = runtime.gather(checkpoint.rng_state(), rt_), runtime.gather(batches.state_dict(), rt_)
        if rt_.is_main:
            state = {"step": step, "components": {n: o.state_dict() for n, o in components.items()}, "rng": rngs,
                     "data": positions, "world_size": rt_.world_size, "config": config_to_dict(cfg_)}
            (out / "legacy" / "checkpoints").mkdir(parents=True, exist_ok=True)
            persist.atomic_write(out / "legacy" / "checkpoints" / "last.pt", lambda file: torch.save(state, file))

    masked.save_checkpoint = save_both
    masked.train(cfg("ddp", "train.parallel=ddp"))
    masked.save_checkpoint = real_save

    # Both continued under FSDP: what `restore` put into the sharded model, EMA and optimizer, gathered.
    real_restore = masked.restore

    def restore_and_dump(dump_name):
        def restore(saved, components, batches, cfg_, rt_):
            step = real_restore(saved, components, batches, cfg_, rt_)
            whole = lambda t: t.full_tensor() if runtime.is_sharded(t) else t
            dump = {name: {k: whole(v) for k, v in components[name].state_dict().items()}
                    for name in ("transformer", "ema")}
            dump["optimizer"] = {i: {k: whole(v) for k, v in s.items()}
                                 for i, s in components["optimizer"].state_dict()["state"].items()}
            dump["sharded"] = all(runtime.is_sharded(p) for p in components["transformer"].parameters())
            if rt_.is_main:
                torch.save(dump, out / dump_name)
            return step
        return restore

    if rt.is_main:
        shutil.copytree(out / "ddp", out / "ddp-to-fsdp")  # ddp/ stays at step 4 for the tests
        shutil.copy(out / "legacy" / "checkpoints" / "last.pt", out / "legacy-step4.pt")  # the resume replaces it
    dist.barrier()
    masked.restore = restore_and_dump("switched.pt")
    masked.train(cfg("ddp-to-fsdp", "train.steps=5"), resume=True)
    masked.restore = restore_and_dump("switched-legacy.pt")
    masked.train(cfg("legacy", "train.steps=5"), resume=True)
    dist.destroy_process_group()
    # Rarely (twice in ~30 launches here, every output already written) a gloo process aborted while the interpreter
    # shut down ("terminate called without an active exception"); what is tested is in the files, so skip that phase.
    sys.stdout.flush()
    os._exit(0)
    """
)


def write_shards(directory: Path, n_train: int, n_val: int) -> Path:
    """Token shards as `muse data tokenize` writes them for the tiny preset, with random grids and text states."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("heldout", n_val)):
        with TokenShardWriter(directory / split, items_per_shard=4) as writer:
            writer.add(keys=[f"{split}/{i}" for i in range(n)], captions=[f"{split} {i}" for i in range(n)],
                       tokens=rng.integers(0, K, (n, GRID, GRID)),
                       text_states=torch.from_numpy(rng.standard_normal((n, 5, TEXT_DIM)).astype(np.float32)),
                       text_mask=torch.ones(n, 5, dtype=torch.bool))
    text = load_config(PRESET).text
    save_unconditional(directory, TextEmbedding(torch.zeros(1, 1, TEXT_DIM), torch.ones(1, 1, dtype=torch.bool)), text)
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The worker's outputs: parity.json, switched*.pt and the run directories straight / compiled / resumed /
    onto-one / ddp / ddp-to-fsdp / legacy."""
    root = tmp_path_factory.mktemp("fsdp")
    shards = write_shards(root / "tokens", n_train=11, n_val=3)
    (root / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(root / "worker.py"), str(root), str(shards), str(PRESET)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return root


def sharded_checkpoint(run: Path, step: int) -> dict:
    """A sharded checkpoint directory read back whole in this (single, non-distributed) process."""
    whole = run.parent / f"{run.name}-step-{step}.pt"  # outside the run directory, whose listing is checked
    dcp_to_torch_save(run / "checkpoints" / f"step-{step:07d}", whole)
    return torch.load(whole, weights_only=False)


def assert_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):  # the numpy RNG state
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def losses(run: Path) -> list[float]:
    rows = [row.split(",") for row in (run / "logs" / "scalars.csv").read_text().splitlines()[1:]]
    return [float(value) for _, name, value in rows if name == "train/loss"]


def test_a_sharded_step_equals_the_same_step_in_one_process(runs):
    parity = json.loads((runs / "parity.json").read_text())
    for kind in ("transformer", "superres"):
        result = parity[kind]
        assert result["sharded"] and result["local_fraction"] < 0.6  # each rank holds about half the weights
        assert result["moved"] > 1e-3  # three AdamW steps at lr 1e-2 moved the weights...
        assert result["loss_diff"] < 1e-5, kind  # ...and each rank's loss is the reference's on its half
        assert result["weight_diff"] < 1e-5, kind  # clipped at the global norm, stepped: the same weights


def test_sharded_resume_reproduces_the_uninterrupted_run_exactly(runs):
    straight, resumed = (sharded_checkpoint(runs / run, 4) for run in ("straight", "resumed"))
    assert_equal(straight, resumed)
    a, b = (load_checkpoint(runs / run / "checkpoints" / "step-0000004" / TRAINER_FILE) for run in ("straight",
                                                                                                     "resumed"))
    assert a["step"] == b["step"] == 4 and a["world_size"] == 2
    assert_equal(a["rng"], b["rng"])
    assert a["data"] == b["data"] and a["components"]["scheduler"] == b["components"]["scheduler"]
    # The pointer names the newest checkpoint; the previous one was deleted, the kept one (--keep-every 2) was not.
    assert json.loads((runs / "resumed" / "checkpoints" / LAST).read_text())["dir"] == "step-0000004"
    assert sorted(p.name for p in (runs / "straight" / "checkpoints").iterdir()) == [LAST, "step-0000004"]
    assert (runs / "resumed" / "checkpoints" / "step-0000002").is_dir()
    exported = [(runs / run / "transformer" / "model.safetensors").read_bytes() for run in ("straight", "resumed")]
    assert exported[0] == exported[1]  # the EMA weights, gathered to rank 0


def test_compiled_blocks_train_like_eager_ones_under_fsdp(runs):
    np.testing.assert_allclose(losses(runs / "compiled"), losses(runs / "straight"), rtol=1e-5)
    compiled, eager = (sharded_checkpoint(runs / run, 4) for run in ("compiled", "straight"))
    for key, value in eager["transformer"].items():
        torch.testing.assert_close(compiled["transformer"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp_trains_like_ddp(runs):
    fsdp, ddp = losses(runs / "straight"), losses(runs / "ddp")
    assert len(fsdp) == 4 and ddp[:4] == losses(runs / "ddp")[:4]
    np.testing.assert_allclose(fsdp, ddp[:4], rtol=1e-5, atol=1e-6)  # the same masks, data and init on each rank
    sharded, whole = (sharded_checkpoint(runs / run, 4) for run in ("straight", "ddp"))
    # Reduce-scatter and all-reduce round the averaged gradients differently; AdamW turns that into weight
    # differences of ~1e-6 at most (the key bias, whose true gradient is 0, is pure rounding), against steps of 1e-3.
    for name in ("transformer", "ema"):
        assert sharded[name].keys() == whole[name].keys()
        for key, value in whole[name].items():
            torch.testing.assert_close(sharded[name][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}.{key}")


def test_a_ddp_checkpoint_resumes_under_fsdp(runs):
    # Each rank took its shard of every tensor the ddp run wrote: gathered again, they are those tensors, bit for bit.
    switched = torch.load(runs / "switched.pt", weights_only=False)
    whole = sharded_checkpoint(runs / "ddp", 4)
    assert switched["sharded"]
    assert_equal(switched["transformer"], whole["transformer"])
    assert_equal(switched["ema"], whole["ema"])
    # `state_dict` numbers the parameters in the optimizer's order (decayed first); the checkpoint keys them by name.
    model = MaskedTransformer(load_config(PRESET).model)
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in decay_and_no_decay(model) for p in group]
    assert_equal(switched["optimizer"], {i: whole["optimizer"]["state"][name] for i, name in enumerate(order)})
    assert json.loads((runs / "ddp-to-fsdp" / "checkpoints" / LAST).read_text())["step"] == 5


def test_a_legacy_last_pt_resumes_under_fsdp_and_is_replaced(runs):
    # The legacy last.pt holds the same state as the ddp run's checkpoint (one run, written both ways)...
    legacy = load_checkpoint(runs / "legacy-step4.pt")["components"]
    current = sharded_checkpoint(runs / "ddp", 4)
    assert_equal(legacy["transformer"], current["transformer"])
    # ...and each rank took its shard of every tensor of it: gathered again, they are last.pt's, bit for bit.
    switched = torch.load(runs / "switched-legacy.pt", weights_only=False)
    assert switched["sharded"]
    assert_equal(switched["transformer"], legacy["transformer"])
    assert_equal(switched["ema"], legacy["ema"])
    assert_equal(switched["optimizer"], legacy["optimizer"]["state"])
    # The continued run saves in the current format and drops last.pt, so a later --resume cannot pick the old one.
    checkpoints = runs / "legacy" / "checkpoints"
    assert not (checkpoints / LEGACY_LAST).exists()
    assert json.loads((checkpoints / LAST).read_text())["step"] == 5


@pytest.mark.filterwarnings("ignore:resuming .* with a changed config")  # the run was copied: out_dir changed
def test_a_two_process_sharded_checkpoint_resumes_on_one_process(runs, monkeypatch):
    run = runs / "onto-one"
    cfg = load_config(PRESET, ["data.format=tokens", f"data.path={runs / 'tokens'}", "vqgan=none", "train.steps=4",
                               "train.save_every=2", "train.batch_size=2", "train.log_every=1",
                               "train.parallel=fsdp", f"train.out_dir={run}"])
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    restored = {}
    real = masked.restore

    def restore_and_capture(saved, components, batches, cfg_, rt):
        step = real(saved, components, batches, cfg_, rt)
        restored.update({name: {k: v.clone() for k, v in components[name].state_dict().items()}
                         for name in ("transformer", "ema")})
        optimizer = get_optimizer_state_dict(components["transformer"], components["optimizer"])
        restored["optimizer"] = copy.deepcopy(optimizer)  # the live tensors move on with training
        restored["data"] = batches.state_dict()
        return step

    monkeypatch.setattr(masked, "restore", restore_and_capture)
    saved = sharded_checkpoint(run, 2)  # what the two processes wrote at step 2, read whole
    with pytest.warns(UserWarning, match="saved by 2 process.*on 1.*reseeded"):
        masked.train(cfg, resume=True)
    # The weights, the EMA and every AdamW moment are the two processes' shards put together, exactly.
    assert_equal(restored["transformer"], saved["transformer"])
    assert_equal(restored["ema"], saved["ema"])
    assert_equal(restored["optimizer"]["state"], saved["optimizer"]["state"])
    # Two steps of 2 ranks x 2 items: the single process continues at item 8 of epoch 0's order.
    assert restored["data"] == {"epoch": 0, "batch": 0, "samples": 0, "consumed": 8}
    trainer = load_checkpoint(run / "checkpoints" / "step-0000004" / TRAINER_FILE)
    assert trainer["step"] == 4 and trainer["world_size"] == 1
    assert (run / "transformer" / "model.safetensors").is_file()
    assert losses(run)[:2] == losses(runs / "resumed")[:2]  # the CSV kept the first two steps' rows
