"""persist: atomic writes, bounded JSON, strict dataclasses with bounded messages, strict state-dict loads and the
integrity rule for weights files."""

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from persist import (
    ConfigError,
    atomic_write,
    atomic_write_dir,
    atomic_write_json,
    atomic_write_text,
    bounded_repr,
    dataclass_from_dict,
    dataclass_to_dict,
    read_json,
    read_json_object,
)
from persist.weights import (
    WEIGHTS_HASH,
    load_component_weights,
    load_safetensors,
    load_state_dict_strict,
    read_component_config,
    read_component_dataclass,
    save_component,
    save_safetensors,
)
from tests.amused_fixture import VQVAE
from vqgan.vqmodel import VQModel, VQModelConfig


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name or p.name.startswith("."))


# --------------------------------------------------------------------------------------------------------------------
# Atomic writes


def test_a_write_that_raises_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"v": 1}
    assert leftovers(tmp_path) == []


def test_every_write_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.isdir(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd)))
    atomic_write_text(tmp_path / "t.txt", "hello")
    assert (tmp_path / "t.txt").read_text() == "hello"
    assert synced == [False, True]  # the file, then the directory holding its new name
    assert leftovers(tmp_path) == []


def test_a_directory_is_swapped_in_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    atomic_write_dir(target, lambda d: [(d / "a").write_text("1"), (d / "b").write_text("1")])
    atomic_write_dir(target, lambda d: (d / "a").write_text("2"))
    assert sorted(p.name for p in target.iterdir()) == ["a"] and (target / "a").read_text() == "2"  # nothing old kept

    def fail(d):
        (d / "a").write_text("3")
        raise OSError("interrupted")

    with pytest.raises(OSError, match="interrupted"):
        atomic_write_dir(target, fail)
    assert (target / "a").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left


# --------------------------------------------------------------------------------------------------------------------
# JSON, one wording


@pytest.mark.parametrize("content, error, message", [
    (None, FileNotFoundError, r"c\.json not found"),
    ("{oops", ValueError, r"c\.json is not valid JSON"),
    ("[1, 2]", ValueError, r"c\.json must hold a JSON object, got list"),
    ("[" * 100000, ValueError, r"c\.json is not valid JSON: nested too deeply"),
    ('{"seed": ' + "9" * 5000 + "}", ValueError, r"c\.json is not valid JSON"),
    (b"\xff\xfe\x00garbage", ValueError, r"c\.json is not valid JSON"),
])
def test_json_errors_have_one_wording(tmp_path, content, error, message):
    file = tmp_path / "c.json"
    if content is not None:
        file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(error, match=message):
        read_json_object(file)


def test_json_reads_are_bounded_and_only_of_regular_files(tmp_path):
    (tmp_path / "big.json").write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(ValueError, match=r"big\.json is \d+ bytes, more than the 1000"):
        read_json(tmp_path / "big.json", max_bytes=1000)
    os.mkfifo(tmp_path / "fifo.json")  # would block a plain open() forever
    with pytest.raises(ValueError, match=r"fifo\.json is not a regular file"):
        read_json_object(tmp_path / "fifo.json")
    with pytest.raises(ValueError, match="is not a regular file"):
        read_json_object(tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Strict dataclasses


@dataclass(frozen=True)
class Train:
    steps: int
    lr: float = 1e-4
    channel_mult: tuple[int, ...] = (1, 2)
    name: str = "run"

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r} for run {self.name!r}")


@dataclass(frozen=True)
class Run:
    train: Train
    extra: Train = field(default_factory=lambda: Train(steps=1))


def test_unknown_keys_name_the_dotted_path_and_the_nearest_field():
    with pytest.raises(ConfigError, match=r"^run\.yaml: unknown config key 'train\.lrr' \(did you mean 'train\.lr'\?\)$"):
        dataclass_from_dict(Run, {"train": {"steps": 1, "lrr": 2}}, source="run.yaml")
    with pytest.raises(ConfigError, match=r"missing required config key 'train\.steps'"):
        dataclass_from_dict(Run, {"train": {}})
    with pytest.raises(ConfigError, match=r"train\.channel_mult\[1\]: expected an integer, got 'x'"):
        dataclass_from_dict(Run, {"train": {"steps": 1, "channel_mult": [1, "x"]}})
    cfg = dataclass_from_dict(Run, {"train": {"steps": 3, "lr": "2e-4", "channel_mult": [1, 2, 4]}})
    assert cfg.train == Train(steps=3, lr=2e-4, channel_mult=(1, 2, 4))
    assert dataclass_from_dict(Run, dataclass_to_dict(cfg)) == cfg


def laughs(levels=9, width=9):
    """A billion laughs in memory: `width`**`levels` leaves through shared lists, as YAML aliases build them."""
    value = ["lol"]
    for _ in range(levels):
        value = [value] * width
    return value


@pytest.mark.parametrize("key", ["steps", "lr", "channel_mult", "name"])
def test_error_messages_show_values_with_a_bounded_repr(key):
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        dataclass_from_dict(Run, {"train": {"steps": 1, key: laughs()}})
    assert time.perf_counter() - start < 0.5
    message = str(error.value)
    assert message.startswith(f"train.{key}") and len(message) < 300 and "\n" not in message, message


def test_a_dataclass_own_message_is_bounded_too():
    with pytest.raises(ConfigError) as error:
        dataclass_from_dict(Run, {"train": {"steps": 0, "name": "n" * 100000}})
    assert "steps must be >= 1" in str(error.value) and len(str(error.value)) < 500


def test_bounded_repr():
    assert bounded_repr([1, 2]) == "[1, 2]"
    assert len(bounded_repr("x" * 10**6)) <= 80
    assert len(bounded_repr(laughs())) <= 80


# --------------------------------------------------------------------------------------------------------------------
# State dicts and hashed weights


def test_strict_state_dict_load_names_missing_unexpected_and_wrongly_shaped_keys():
    model = nn.Linear(3, 2)
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"src does not match the config: missing keys \['bias'\], unexpected keys "
                                         r"\['extra'\]"):
        load_state_dict_strict(model, {"weight": state["weight"], "extra": torch.zeros(1)}, "src")
    with pytest.raises(ValueError, match=r"tensor 'weight' has shape \(2, 4\), the config needs \(2, 3\)"):
        load_state_dict_strict(model, {**state, "weight": torch.zeros(2, 4)}, "src")
    load_state_dict_strict(model, {k: v.double() for k, v in state.items()}, "src")  # cast, as torch does
    assert model.weight.dtype == torch.float32


def test_hashed_safetensors_round_trip_and_refuse_other_bytes(tmp_path):
    file = tmp_path / "w.safetensors"
    digest = save_safetensors(file, {"a": torch.arange(6.0)})
    assert digest == hashlib.sha256(file.read_bytes()).hexdigest()
    assert torch.equal(load_safetensors(file, digest, recorded_in="cfg")["a"], torch.arange(6.0))
    data = bytearray(file.read_bytes())
    data[-3] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"w\.safetensors does not match the SHA-256 recorded in cfg"):
        load_safetensors(file, digest, recorded_in="cfg")


def flip_a_bit(file):
    data = bytearray(file.read_bytes())
    data[-5] ^= 1  # inside the last tensor: still a valid safetensors file, silently other weights
    file.write_bytes(bytes(data))


def drop_hash(directory):
    config = json.loads((directory / "config.json").read_text())
    del config[WEIGHTS_HASH]
    (directory / "config.json").write_text(json.dumps(config))


def test_our_components_require_their_hash(tmp_path):
    model = nn.Linear(3, 2)
    save_component(tmp_path / "m", Train(steps=2), model)
    config, digest = read_component_dataclass(tmp_path / "m", Train)
    assert config == Train(steps=2) and len(digest) == 64
    flip_a_bit(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_component_weights(tmp_path / "m", nn.Linear(3, 2), digest)
    drop_hash(tmp_path / "m")  # a flipped bit and the hash deleted: still refused, saying how to fix it
    with pytest.raises(ValueError, match=r"config\.json records no weights_sha256 for model\.safetensors, .* re-save "
                                         r"the model with save_pretrained .* add \"weights_sha256\""):
        read_component_dataclass(tmp_path / "m", Train)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"steps": 2, WEIGHTS_HASH: "not a hash"}))
    with pytest.raises(ValueError, match="weights_sha256 must be 64 lowercase hex digits"):
        read_component_config(tmp_path / "m")


def test_diffusers_layout_needs_a_hash_inside_a_pipeline_directory_only(tmp_path):
    """A foreign download carries no hash of ours and loads (safetensors: no code runs); the same folder inside a
    musegen pipeline directory (pipeline.json beside it) is ours and must carry one."""
    model = VQModel(VQModelConfig(**VQVAE))
    for directory in (tmp_path / "download" / "vqvae", tmp_path / "ours" / "vqgan"):
        model.save_pretrained(directory)
        drop_hash(directory)
    (tmp_path / "ours" / "pipeline.json").write_text("{}")
    loaded = VQModel.from_pretrained(tmp_path / "download" / "vqvae")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="records no weights_sha256 for diffusion_pytorch_model.safetensors"):
        VQModel.from_pretrained(tmp_path / "ours" / "vqgan")


def test_the_bundled_model_carries_and_matches_its_hashes():
    from muse.bundled import ASSETS

    components = sorted(p.parent for p in ASSETS.glob("*/*/config.json"))
    assert components, "no bundled model"
    for directory in components:
        _, digest = read_component_config(directory)  # raises without a hash
        assert digest == hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest(), directory
