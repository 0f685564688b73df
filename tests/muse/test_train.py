"""The shared trainer machinery and the VQGAN loop: exact resume, damaged checkpoints, config errors, data order."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from muse.config import load_config
from muse.train import vqgan as vqgan_trainer
from muse.train.run import add_arguments, main
from muse.train.batches import BatchStream, EpochBatchSampler
from muse.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, read_checkpoint
from muse.train.logger import TrainLogger
from muse.train.optim import build_optimizer, decay_and_no_decay, lr_factor

REPO = Path(__file__).resolve().parents[2]
TINY_VQGAN = REPO / "configs" / "vqgan" / "tiny.yaml"


def write_image_folder(root: Path, n_train: int = 9, n_heldout: int = 3) -> Path:
    """Solid-colour 24 px squares with a grey bar at a per-image place, captions in metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train + n_heldout):
        colour = ((i * 67) % 256, (i * 131 + 40) % 256, (i * 29 + 90) % 256)
        image = Image.new("RGB", (24, 24), colour)
        for x in range(24):
            image.putpixel((x, (i * 5) % 24), (128, 128, 128))
        image.save(root / f"img{i}.png")
        split = "train" if i < n_train else "heldout"
        rows.append({"file": f"img{i}.png", "caption": f"colour {i} square", "split": split})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


class Preempted(Exception):
    pass


def crash_after_saving(monkeypatch, module, at_step: int) -> None:
    """Make `module`'s loop die right after it writes the checkpoint of `at_step`, like a preempted job."""
    real = module.save_checkpoint

    def save_then_crash(run_dir, step, *args):
        real(run_dir, step, *args)
        if step == at_step:
            raise Preempted

    monkeypatch.setattr(module, "save_checkpoint", save_then_crash)


def assert_same_state(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def tiny_vqgan_cfg(data: Path, out: Path, *extra: str):
    return load_config(TINY_VQGAN, [f"data.path={data}", f"train.out_dir={out}", *extra])


def test_vqgan_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, monkeypatch):
    data = write_image_folder(tmp_path / "data")
    # 9 training images in batches of 4: 2 batches per epoch, so 5 steps cross two epoch boundaries, the crash at
    # step 3 is mid-epoch, and the discriminator (from step 2) and EMA are live across it.
    extra = ("train.steps=5", "train.save_every=3", "train.val_every=100", "train.sample_every=100")
    vqgan_trainer.train(tiny_vqgan_cfg(data, tmp_path / "straight", *extra))

    crash_after_saving(monkeypatch, vqgan_trainer, at_step=3)
    with pytest.raises(Preempted):
        vqgan_trainer.train(tiny_vqgan_cfg(data, tmp_path / "resumed", *extra))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000003"
    vqgan_trainer.train(tiny_vqgan_cfg(data, tmp_path / "resumed", *extra), resume=True)

    straight, resumed = (read_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("straight", "resumed"))
    assert straight["step"] == resumed["step"] == 5
    assert_same_state(straight["components"], resumed["components"])
    assert straight["data"] == resumed["data"]
    # The exported model (EMA weights) is identical too, and it is what later stages load.
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "straight" / "vqgan" / name).read_bytes() == (tmp_path / "resumed" / "vqgan" / name).read_bytes()


def test_a_checkpoint_before_the_discriminator_starts_changes_nothing_and_resumes_exactly(tmp_path, monkeypatch):
    # The discriminator's optimizer has no state until `disc_start_step`; saving it then must not create any (a
    # zero-gradient step would shift its AdamW step count), so a run checkpointed at step 1 equals one that never was.
    data = write_image_folder(tmp_path / "data")
    extra = ("train.steps=4", "loss.disc_start_step=2", "train.val_every=100", "train.sample_every=100")
    vqgan_trainer.train(tiny_vqgan_cfg(data, tmp_path / "once", *extra, "train.save_every=100"))  # saves at 4 only
    crash_after_saving(monkeypatch, vqgan_trainer, at_step=1)
    with pytest.raises(Preempted):
        vqgan_trainer.train(tiny_vqgan_cfg(data, tmp_path / "often", *extra, "train.save_every=1"))
    monkeypatch.undo()
    assert "opt_disc" in load_checkpoint(latest_checkpoint(tmp_path / "often") / "trainer.pt")["components"]
    vqgan_trainer.train(tiny_vqgan_cfg(data, tmp_path / "often", *extra, "train.save_every=1"), resume=True)
    once, often = (read_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("once", "often"))
    assert once["step"] == often["step"] == 4
    assert_same_state(once["components"], often["components"])


def test_vqgan_init_from_starts_from_the_saved_weights(tmp_path):
    from vqgan.model import VQGAN

    data = write_image_folder(tmp_path / "data")
    first = vqgan_trainer.train(tiny_vqgan_cfg(data, tmp_path / "first", "train.steps=1"))
    # lr 0: the optimiser cannot move the parameters, so they must be those the run started from. (The codebook is a
    # buffer updated by EMA, not by the optimiser, so it moves even at lr 0.)
    second = vqgan_trainer.train(tiny_vqgan_cfg(data, tmp_path / "second", "train.steps=1", "train.lr=0",
                                                f"train.init_from={first}"))
    a = dict(VQGAN.from_pretrained(first).named_parameters())
    b = dict(VQGAN.from_pretrained(second).named_parameters())
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_truncated_checkpoint_raises_a_clear_error(tmp_path):
    data = write_image_folder(tmp_path / "data")
    cfg = tiny_vqgan_cfg(data, tmp_path / "run", "train.steps=1")
    vqgan_trainer.train(cfg)
    last = latest_checkpoint(tmp_path / "run") / "trainer.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{last}.*corrupt or truncated"):
        load_checkpoint(last)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        vqgan_trainer.train(cfg, resume=True)
    last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(last)


def test_a_damaged_shard_or_pointer_is_named_on_resume(tmp_path):
    data = write_image_folder(tmp_path / "data")
    cfg = tiny_vqgan_cfg(data, tmp_path / "run", "train.steps=1")
    vqgan_trainer.train(cfg)
    checkpoint = latest_checkpoint(tmp_path / "run")
    for shard in checkpoint.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"cannot load the checkpoint {checkpoint}"):
        vqgan_trainer.train(cfg, resume=True)
    (tmp_path / "run" / "checkpoints" / "last.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="last.json is corrupt"):
        vqgan_trainer.train(cfg, resume=True)


def parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_unknown_config_key_via_set_names_the_key(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key 'train.lrr'"):
        main(parse([str(TINY_VQGAN), "--set", "train.lrr=1e-3", "--out-dir", str(tmp_path / "run")]))
    with pytest.raises(SystemExit, match="unknown config key 'model.codebook_sise'"):
        main(parse([str(TINY_VQGAN), "--set", "model.codebook_sise=8"]))
    assert not (tmp_path / "run").exists()


def test_cli_run_writes_config_logs_grids_and_model_and_is_not_overwritten(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    argv = [str(TINY_VQGAN), "--set", f"data.path={data}", "--set", "train.steps=2", "--set", "train.log_every=1",
            "--set", "train.val_every=2", "--set", "train.sample_every=2", "--out-dir", str(tmp_path / "run")]
    main(parse(argv))
    assert "exported vqgan model" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "vqgan" / "model.safetensors").is_file() and (run / "vqgan" / "config.json").is_file()
    rows = (run / "logs" / "scalars.csv").read_text().splitlines()
    names = {row.split(",")[1] for row in rows[1:]}
    assert {"train/l1", "train/lr", "train/images_per_s", "val/psnr", "val/codebook_used"} <= names
    assert (run / "samples" / "step-0000002.png").is_file()
    assert load_config(run / "config.yaml").train.steps == 2
    assert load_checkpoint(latest_checkpoint(run) / "trainer.pt")["config"]["train"]["steps"] == 2
    # Without --resume an existing run is refused rather than overwritten.
    with pytest.raises(SystemExit, match="--resume"):
        main(parse(argv))


def test_only_linear_and_conv_weights_are_decayed():
    model = torch.nn.ModuleDict({
        "embed": torch.nn.Embedding(10, 4),
        "linear": torch.nn.Linear(4, 4),
        "conv": torch.nn.Conv2d(4, 4, 3),
        "norm": torch.nn.LayerNorm(4),
    })
    model.register_parameter("pos", torch.nn.Parameter(torch.zeros(3, 4)))
    decay, no_decay = decay_and_no_decay(model)
    assert {id(p) for p in decay} == {id(model["linear"].weight), id(model["conv"].weight)}
    assert len(no_decay) == 6  # embedding, 2 biases, norm weight + bias, positional
    cfg = load_config(TINY_VQGAN).train
    groups = build_optimizer(model, cfg).param_groups
    assert [g["weight_decay"] for g in groups] == [cfg.weight_decay, 0.0]


def test_warmup_then_cosine_to_min_lr():
    cfg = load_config(TINY_VQGAN, ["train.steps=110", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]).train
    factors = [lr_factor(s, cfg) for s in range(cfg.steps + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.55)
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_batch_order_is_a_per_epoch_permutation_split_over_ranks():
    def epoch(rank, e, start=0, n=12):
        sampler = EpochBatchSampler(n, 2, seed=3, epoch=e, rank=rank, world_size=2, shuffle=True, start=start)
        return list(sampler)

    both = epoch(0, 0) + epoch(1, 0)
    assert sorted(i for batch in both for i in batch) == list(range(12))  # a partition: 6 items per rank
    # 11 items: 6 per rank after repeating one, 3 full batches each; every item is seen.
    assert len(epoch(0, 0, n=11)) == len(epoch(1, 0, n=11)) == 3
    assert {i for batch in epoch(0, 0, n=11) + epoch(1, 0, n=11) for i in batch} == set(range(11))
    # 10 items in batches of 2 over 2 ranks: 5 per rank, the incomplete last batch is dropped.
    assert len(epoch(0, 0, n=10)) == 2
    assert epoch(0, 0) != epoch(0, 1)  # a new permutation each epoch
    assert epoch(0, 1, start=4) == epoch(0, 1)[1:]  # `start` counts items of the epoch consumed by all ranks
    # A dataset smaller than one global batch is repeated so every rank still gets a batch.
    assert len(list(EpochBatchSampler(3, 2, seed=0, epoch=0, rank=1, world_size=2, shuffle=True))) == 1


def test_batch_stream_resumes_on_the_exact_next_batch():
    dataset = list(range(7))
    stream = BatchStream(dataset, 2, seed=1, rank=0, world_size=1)
    straight = [next(stream).tolist() for _ in range(8)]  # 3 batches per epoch: crosses two epoch boundaries
    stream = BatchStream(dataset, 2, seed=1, rank=0, world_size=1)
    first = [next(stream).tolist() for _ in range(4)]
    position = stream.state_dict()
    resumed = BatchStream(dataset, 2, seed=1, rank=0, world_size=1)
    resumed.load_state_dict(position)
    assert first + [next(resumed).tolist() for _ in range(4)] == straight
    assert position == {"epoch": 1, "batch": 1, "samples": 2, "consumed": 2}


def test_batch_stream_resumed_on_another_world_size_continues_from_the_same_item():
    dataset = list(range(24))

    def take(stream, count):
        return [i for _ in range(count) for i in next(stream).tolist()]

    # Two ranks take two batches of 3 each: 12 items of epoch 0, then the run is resumed on one process.
    pair = [BatchStream(dataset, 3, seed=4, rank=r, world_size=2) for r in (0, 1)]
    first = [take(stream, 2) for stream in pair]
    saved = [stream.state_dict() for stream in pair]
    assert saved[0]["consumed"] == saved[1]["consumed"] == 12
    alone = BatchStream(dataset, 3, seed=4, rank=0, world_size=1)
    alone.resume_from(saved)
    rest = take(alone, 4)  # the 12 items of epoch 0 the pair had not read, then epoch 1 starts
    assert sorted(first[0] + first[1] + rest) == list(range(24))
    assert alone.state_dict()["consumed"] == 24 and alone.epoch == 0
    next(alone)
    assert alone.epoch == 1 and alone.state_dict()["consumed"] == 3
    # The single process reads the epoch's order exactly where the pair's prefix ended.
    single = BatchStream(dataset, 3, seed=4, rank=0, world_size=1)
    assert take(single, 8)[12:] == rest
    # Positions saved before "consumed" existed (samples per rank) map the same way.
    legacy = [{k: v for k, v in state.items() if k != "consumed"} for state in saved]
    again = BatchStream(dataset, 3, seed=4, rank=0, world_size=1)
    again.resume_from(legacy)
    assert take(again, 4) == rest


def test_resumed_csv_log_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    # An interrupted run logs past its last checkpoint; resuming must not leave those steps in the curve twice.
    log = TrainLogger(tmp_path, "csv", is_main=True, total_steps=4, start_step=0)
    for step in (1, 2, 3):
        log.scalars(step, {"train/loss": float(step)})
    log.close()
    log = TrainLogger(tmp_path, "csv", is_main=True, total_steps=4, start_step=2)   # the checkpoint was at step 2
    log.scalars(3, {"train/loss": 30.0})
    log.close()
    rows = (tmp_path / "logs" / "scalars.csv").read_text().splitlines()
    assert rows == ["step,name,value", "1,train/loss,1", "2,train/loss,2", "3,train/loss,30"]
