"""`muse train` under `torchrun --nproc_per_node 2` (gloo on CPU): it trains and the two replicas stay identical."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

# Runs on every rank: trains through the real CLI, and additionally saves this rank's copy of every component each
# time the loop saves a checkpoint, so the test can compare the replicas (the real checkpoint holds each tensor once).
WORKER = textwrap.dedent(
    """
    import os, sys, torch
    import muse.train.vqgan as trainer
    from muse.cli import main

    real = trainer.save_checkpoint

    def save_and_dump(run_dir, step, components, batches, cfg, rt, keep_every):
        real(run_dir, step, components, batches, cfg, rt, keep_every)
        dump = {name: obj.state_dict() for name, obj in components.items()}
        torch.save({"step": step, "components": dump, "data": batches.state_dict()},
                   os.path.join(sys.argv[1], f"rank{rt.rank}.pt"))

    trainer.save_checkpoint = save_and_dump
    main(sys.argv[2:])
    """
)


def write_image_folder(root: Path, n: int = 8) -> Path:
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (20, 20), ((i * 67) % 256, (i * 131) % 256, (i * 29) % 256)).save(root / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "caption": f"square {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def assert_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"replicas differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"replicas differ at {where}"


def test_two_process_torchrun_training_keeps_replicas_identical(tmp_path):
    data = write_image_folder(tmp_path / "data")
    (tmp_path / "worker.py").write_text(WORKER)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(tmp_path / "worker.py"), str(tmp_path),
        "train", str(REPO / "configs" / "vqgan" / "tiny.yaml"), "--out-dir", str(out),
        "--set", f"data.path={data}", "--set", "data.split=null", "--set", "data.val_split=null",
        "--set", "train.steps=3", "--set", "train.batch_size=2", "--set", "loss.disc_start_step=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "exported vqgan model" in result.stdout

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["step"] == rank1["step"] == 3
    # Model (with its EMA codebook), EMA copy, discriminator (averaged by hand) and optimizer states all agree.
    assert_equal(rank0["components"], rank1["components"])
    # The ranks read different halves of each epoch: 8 images / 2 ranks / batch 2 = 2 batches per epoch each.
    assert rank0["data"] == rank1["data"] == {"epoch": 1, "batch": 1, "samples": 2, "consumed": 4}
    # One checkpoint, each rank wrote its part (the ranks hold the same tensors: each is written once).
    checkpoint = out / "checkpoints" / json.loads((out / "checkpoints" / "last.json").read_text())["dir"]
    assert checkpoint.name == "step-0000003" and len(list(checkpoint.glob("*.distcp"))) == 2
    assert (out / "vqgan" / "model.safetensors").is_file()
