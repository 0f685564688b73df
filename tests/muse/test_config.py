from dataclasses import dataclass, field

import pytest

from muse.config import ConfigError, config_to_dict, from_dict, load_config, save_config


@dataclass(frozen=True)
class Inner:
    lr: float
    betas: tuple[float, float] = (0.9, 0.99)
    ratios: tuple[float, ...] = (0.5,)
    ema: float | None = None


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    flag: bool = False
    extra: Inner = field(default_factory=lambda: Inner(lr=1.0))


def test_round_trip():
    cfg = from_dict(Outer, {"name": "x", "inner": {"lr": "2e-4", "betas": [0.8, 0.9], "ratios": [0.1, 0.2]}})
    assert cfg.inner.lr == 2e-4 and cfg.inner.betas == (0.8, 0.9) and cfg.inner.ratios == (0.1, 0.2)
    assert from_dict(Outer, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "inner": {"lr": 1.0, "lrr": 2}}, "unknown config key 'inner.lrr'"),
        ({"name": "x", "inner": {"lr": 1.0}, "extra": {"lr": 1, "emaa": 0.9}}, "'extra.emaa' (did you mean 'extra.ema'?)"),
        ({"name": "x"}, "missing required config key 'inner'"),
        ({"name": "x", "inner": {"lr": "fast"}}, "inner.lr: expected a number"),
        ({"name": "x", "inner": {"lr": 1.0, "betas": [1.0]}}, "inner.betas: expected 2 items"),
        ({"name": "x", "inner": {"lr": 1.0}, "flag": 1}, "flag: expected true or false"),
    ],
)
def test_bad_keys_name_their_dotted_path(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        from_dict(Outer, data)


PRESET = """
stage: vqgan
model: {resolution: 16, base_channels: 16, channel_mult: [1, 2, 2], num_res_blocks: 1, codebook_size: 16, norm_groups: 8}
data: {path: data/emoji}
train: {out_dir: runs/x, steps: 10, batch_size: 2}
"""


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(PRESET)
    cfg = load_config(path, overrides=["train.lr=2e-4", "model.codebook_size=32"])
    assert cfg.train.lr == 2e-4 and cfg.model.codebook_size == 32
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(path, overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(path, overrides=["train.lr"])


def test_load_config_rejects_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("stage: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "nostage.yaml").write_text("model: {}")
    with pytest.raises(ConfigError, match="'stage' must be one of"):
        load_config(tmp_path / "nostage.yaml")
