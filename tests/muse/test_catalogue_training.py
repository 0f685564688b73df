"""The bad-input catalogue, training part: configs, data folders, checkpoints and init_from, each a one-line error
from `muse train` naming the problem (a SystemExit, never a traceback), and nothing of an earlier run lost."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from muse import cli
from muse.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY_VQGAN = REPO / "configs" / "vqgan" / "tiny.yaml"


def images(root: Path, n: int = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (24, 24), ((i * 67) % 256, 90, 30)).save(root / f"img{i}.png")
        rows.append({"file": f"img{i}.png", "caption": f"colour {i}", "split": "train" if i < n - 2 else "heldout"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def train(*sets, config=TINY_VQGAN, extra=()):
    cli.main(["train", str(config), *extra, *[a for s in sets for a in ("--set", s)]])


@pytest.fixture
def data(tmp_path):
    return images(tmp_path / "data")


def base(tmp_path, data):
    return [f"data.path={data}", f"train.out_dir={tmp_path / 'run'}", "train.steps=3", "train.save_every=3",
            "train.val_every=3", "train.sample_every=3"]


def metadata_line(data, row):
    with open(data / "metadata.jsonl", "a") as f:
        f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


CASES = {
    "lr NaN": (lambda d: None, ["train.lr=nan"], "lr must be a finite number >= 0"),
    "lr negative": (lambda d: None, ["train.lr=-1"], "lr must be a finite number >= 0"),
    "betas out of range": (lambda d: None, ["train.betas=[0.9, 1.5]"], "betas must be two numbers in [0, 1)"),
    "grad_clip NaN": (lambda d: None, ["train.grad_clip=nan"], "grad_clip must be a finite number"),
    "ema_decay 1": (lambda d: None, ["train.ema_decay=1.0"], "ema_decay must be in (0, 1)"),
    "save_every 0": (lambda d: None, ["train.save_every=0"], "save_every must be >= 1"),
    "misspelt key": (lambda d: None, ["train.lrr=1e-3"], "unknown config key 'train.lrr'"),
    "wrong type": (lambda d: None, ["model.base_channels=wide"], "model.base_channels"),
    "missing data.path": (lambda d: shutil.rmtree(d), [], "image folder not found"),
    "empty dataset": (lambda d: (d / "metadata.jsonl").write_text(""), [], "no captioned images"),
    "every image corrupt": (lambda d: [p.write_bytes(b"nope") for p in d.glob("*.png")], [],
                            "none of the 4 images could be read"),
    "bad metadata line": (lambda d: metadata_line(d, "{oops"), [], "metadata.jsonl:7 is not valid JSON"),
    "metadata line without a file": (lambda d: metadata_line(d, {"caption": "x"}), [],
                                     "metadata.jsonl:7: each line needs 'caption' and 'file'"),
    "file outside the dataset": (lambda d: metadata_line(d, {"file": "../../x.png", "caption": "x"}), [],
                                 "points outside the dataset folder"),
    "absolute file path": (lambda d: metadata_line(d, {"file": "/etc/passwd", "caption": "x"}), [],
                           "is an absolute path"),
    "caption not a string": (lambda d: metadata_line(d, {"file": "img0.png", "caption": 3}), [],
                             "'caption' must be a string"),
    "init_from missing": (lambda d: None, ["train.init_from=/nowhere/at/all"], "init_from /nowhere/at/all is not a"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_training_inputs_are_one_line_errors(tmp_path, data, name):
    damage, sets, message = CASES[name]
    damage(data)
    with pytest.raises(SystemExit) as exit_info:
        train(*base(tmp_path, data), *sets)
    assert message in str(exit_info.value), str(exit_info.value)


def test_missing_or_broken_config_files_are_named(tmp_path):
    with pytest.raises(SystemExit, match="nowhere.yaml"):
        cli.main(["train", str(tmp_path / "nowhere.yaml")])
    (tmp_path / "bad.yaml").write_text("stage: vqgan\nmodel: [unclosed")
    with pytest.raises(SystemExit, match="bad.yaml"):
        cli.main(["train", str(tmp_path / "bad.yaml")])
    with pytest.raises(SystemExit, match="--keep-every must be >= 1"):
        cli.main(["train", str(TINY_VQGAN), "--keep-every", "0"])


def laughs(key):
    """A 1 KB config whose `key` stands for 9**9 values through YAML aliases (the "billion laughs")."""
    levels = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    section, leaf = key.split(".")
    return TINY_VQGAN.read_text() + f"\n{section}:\n  {leaf}: [{', '.join(levels)}]\n"


CONFIG_BOMBS = {
    "billion laughs in train.steps": (lambda f: f.write_text(laughs("train.steps")), "YAML aliases (*name) are not"),
    "billion laughs in train.lr": (lambda f: f.write_text(laughs("train.lr")), "YAML aliases (*name) are not"),
    "billion laughs in model.channel_mult": (lambda f: f.write_text(laughs("model.channel_mult")),
                                             "YAML aliases (*name) are not allowed"),
    "50000 [": (lambda f: f.write_text("stage: vqgan\nmodel: " + "[" * 50000), "nested more than 32 levels deep"),
    # 1400 levels by indentation (under the size limit) would exhaust the composer's recursion.
    "deep block nesting": (lambda f: f.write_text("stage: vqgan\n" + "".join(" " * i + f"k{i}:\n" for i in range(
        1400))), "nested more than 32 levels deep"),
    "a 2 MiB config": (lambda f: f.write_text("# padding\n" * 200000 + TINY_VQGAN.read_text()),
                       "more than the 1048576"),
    "a FIFO as config": (lambda f: os.mkfifo(f), "is not a regular file"),
    "a 20000-character value": (lambda f: f.write_text(
        "stage: vqgan\nmodel: {}\ndata: {path: x}\ntrain: {out_dir: x, steps: 1, batch_size: 1, lr: " + "x" * 20000
        + "}\n"), "train.lr: expected a number, got 'xxxxxxx"),
}


@pytest.mark.parametrize("name", list(CONFIG_BOMBS))
def test_config_bombs_are_quick_one_line_errors_naming_the_file(tmp_path, name):
    make, message = CONFIG_BOMBS[name]
    config = tmp_path / "bomb.yaml"
    make(config)
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(config)])
    text = str(exit_info.value)
    assert time.perf_counter() - start < 1.0
    assert message in text and "bomb.yaml" in text and "\n" not in text and len(text) < 400, text


def test_aliases_in_an_override_are_refused_too(tmp_path):
    with pytest.raises(SystemExit, match=r"override 'train.steps=\*a'.*YAML aliases"):
        train(f"train.out_dir={tmp_path}", "train.steps=*a")


def test_an_existing_run_is_not_restarted_without_resume_and_init_from_takes_a_run_directory(tmp_path, data):
    train(*base(tmp_path, data))
    run = tmp_path / "run"
    last = (latest_checkpoint(run) / "trainer.pt").read_bytes()
    with pytest.raises(SystemExit, match="holds a run already .*--resume"):
        train(*base(tmp_path, data))
    assert (latest_checkpoint(run) / "trainer.pt").read_bytes() == last  # nothing of the earlier run touched
    # A run directory as init_from: its exported model is found.
    train(*base(tmp_path, data)[:-5], f"train.out_dir={tmp_path / 'again'}", "train.steps=1",
          f"train.init_from={run}")
    assert (tmp_path / "again" / "vqgan" / "model.safetensors").is_file()
    # Weights of another size: named.
    with pytest.raises(SystemExit, match="does not fit this run's model"):
        train(*base(tmp_path, data)[:-5], f"train.out_dir={tmp_path / 'other'}", "train.steps=1",
              f"train.init_from={run}", "model.base_channels=8", "model.norm_groups=8")


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(f.read_bytes()[:100]), "corrupt or truncated"),
    (lambda f: f.write_bytes(b"garbage" * 10), "corrupt or truncated"),
])
def test_a_damaged_checkpoint_is_named_on_resume(tmp_path, data, damage, message):
    train(*base(tmp_path, data))
    damage(latest_checkpoint(tmp_path / "run") / "trainer.pt")
    with pytest.raises(SystemExit, match=message):
        train(*base(tmp_path, data), extra=["--resume"])
