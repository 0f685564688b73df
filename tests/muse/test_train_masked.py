"""Masked-token training (base and super-res stages): masking, the loss, fixed-ratio validation, exact resume."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from muse.config import load_config
from muse.data.sources import TokenBatch, save_unconditional, trim_text
from muse.data.tokens import TokenShardWriter
from muse.train import masked
from muse.train.masked import FixedRatioValidation, masked_loss, masked_positions, text_dropout, training_mask
from muse.train.checkpoint import LEGACY_LAST, latest_checkpoint, load_checkpoint, read_checkpoint
from transformer.config import TextEncoderConfig
from transformer.text import TextEmbedding, TextEncoder
from vqgan.model import VQGAN

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
K, GRID, TEXT_DIM = 32, 4, 32


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> TextEncoderConfig:
    """A tiny random T5 encoder with the byte-level ByT5 tokenizer (no vocabulary file, no download)."""
    path = tmp_path_factory.mktemp("tiny-t5")
    torch.manual_seed(0)
    tokenizer = ByT5Tokenizer()
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return TextEncoderConfig(str(path), kind="t5", max_length=16)


def write_shards(directory: Path, encoder: TextEncoder, config: TextEncoderConfig, n_train: int, n_val: int,
                 low_grid: int | None = None) -> Path:
    """Token shards as `muse data tokenize` writes them, with random grids: train/ and heldout/ splits."""
    rng = np.random.default_rng(0)
    high = GRID * 2 if low_grid else GRID
    for split, n in (("train", n_train), ("heldout", n_val)):
        captions = [f"{split} item {i}" for i in range(n)]
        text = encoder(captions)
        states, mask = trim_text(text.states, text.mask)
        with TokenShardWriter(directory / split, items_per_shard=5) as writer:
            writer.add(keys=[f"{split}/{i}" for i in range(n)], captions=captions,
                       tokens=rng.integers(0, K, (n, high, high)), text_states=states, text_mask=mask,
                       low_res_tokens=None if low_grid is None else rng.integers(0, K, (n, low_grid, low_grid)))
    uncond = encoder.unconditional(1)
    save_unconditional(directory, TextEmbedding(*trim_text(uncond.states, uncond.mask)), config)
    return directory


def tiny_vqgan(path: Path) -> Path:
    torch.manual_seed(0)
    VQGAN(load_config(CONFIGS / "vqgan" / "tiny.yaml").model).save_pretrained(path)
    return path


def stub_forward(seed: int = 0):
    """A stage forward whose logits depend only on the positions asked for, never on the input tokens."""
    table = torch.randn(GRID * GRID, K, generator=torch.Generator().manual_seed(seed))
    seen = []

    def forward(tokens, positions, batch):
        seen.append(tokens.clone())
        return table[positions]  # (B, M, K)

    return forward, seen


def random_batch(B=6, seed=0) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    return TokenBatch(tokens=torch.randint(0, K, (B, GRID * GRID), generator=g),
                      text_states=torch.randn(B, 5, TEXT_DIM, generator=g),
                      text_mask=torch.ones(B, 5, dtype=torch.bool), low_tokens=None)


def test_loss_reads_targets_only_at_masked_positions():
    batch = random_batch()
    mask = training_mask(batch, load_config(CONFIGS / "transformer" / "tiny.yaml").masking)
    assert (mask.sum(dim=1) >= 1).all()
    forward, seen = stub_forward()
    loss = masked_loss(forward, batch, mask, mask_token_id=K).loss
    # The network sees the mask token exactly at the masked positions and the true tokens elsewhere.
    assert torch.equal(seen[0] == K, mask) and torch.equal(seen[0][~mask], batch.tokens[~mask])

    changed = batch.tokens.clone()
    changed[~mask] = (changed[~mask] + 1) % K
    assert torch.equal(masked_loss(forward, TokenBatch(changed, batch.text_states, batch.text_mask, None), mask,
                                   mask_token_id=K).loss, loss)
    changed = batch.tokens.clone()
    changed[mask] = (changed[mask] + 1) % K
    assert not torch.equal(masked_loss(forward, TokenBatch(changed, batch.text_states, batch.text_mask, None), mask,
                                       mask_token_id=K).loss, loss)


def test_loss_equals_cross_entropy_over_masked_tokens_of_the_full_logits():
    from transformer.config import TransformerConfig
    from transformer.model import MaskedTransformer

    torch.manual_seed(0)
    net = masked.StageNet(MaskedTransformer(TransformerConfig(K, GRID, width=32, depth=1, num_heads=2,
                                                           text_dim=TEXT_DIM))).eval()
    batch = random_batch()
    mask = torch.zeros(6, GRID * GRID, dtype=torch.bool)
    for row, count in enumerate([1, 3, 16, 5, 2, 8]):  # ragged counts: rows padded to M = 16
        mask[row, torch.randperm(GRID * GRID)[:count]] = True
    positions, valid = masked_positions(mask)
    assert positions.shape == (6, 16) and torch.equal(valid.sum(1), mask.sum(1))
    out = masked_loss(net, batch, mask, mask_token_id=K)
    full = net(batch.tokens.masked_fill(mask, K), torch.arange(GRID * GRID).expand(6, -1), batch)  # (B, L, K)
    expected = torch.nn.functional.cross_entropy(full[mask], batch.tokens[mask])
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.num_masked == int(mask.sum())


def test_fixed_ratio_validation_is_deterministic_and_exact_in_its_mask_counts():
    batch = random_batch(B=10)
    make = lambda: FixedRatioValidation(batch, (0.3, 0.9), mask_token_id=K, seed=5, batch_size=4)  # noqa: E731
    first, second = make(), make()
    for ratio, mask in first.masks.items():
        assert (mask.sum(dim=1) == math.ceil(ratio * GRID * GRID)).all()
        assert torch.equal(mask, second.masks[ratio])
    forward, _ = stub_forward()
    results = first.evaluate(forward, torch.device("cpu"))
    assert results == first.evaluate(forward, torch.device("cpu")) == second.evaluate(forward, torch.device("cpu"))
    assert set(results) == {"val/loss@0.3", "val/acc@0.3", "val/loss@0.9", "val/acc@0.9", "val/loss"}
    other, _ = stub_forward(seed=1)
    assert first.evaluate(other, torch.device("cpu")) != results


def test_text_dropout_swaps_in_the_unconditional_states():
    batch = random_batch(B=200)
    null = TextEmbedding(torch.full((1, 2, TEXT_DIM), 7.0), torch.tensor([[True, False]]))
    torch.manual_seed(0)
    dropped = text_dropout(batch, null, 0.25)
    is_null = (dropped.text_states[:, 0] == 7.0).all(dim=1)
    assert 25 < int(is_null.sum()) < 75
    assert (dropped.text_mask[is_null].sum(dim=1) == 1).all()
    assert torch.equal(dropped.text_states[~is_null], batch.text_states[~is_null])


class Preempted(Exception):
    pass


def run_interrupted_and_straight(cfg_path, tmp_path, monkeypatch, overrides, crash_at):
    load = lambda out: load_config(cfg_path, [*overrides, f"train.out_dir={out}"])  # noqa: E731
    masked.train(load(tmp_path / "straight"))
    real = masked.save_checkpoint

    def save_then_crash(run_dir, step, *args):
        real(run_dir, step, *args)
        if step == crash_at:
            raise Preempted

    monkeypatch.setattr(masked, "save_checkpoint", save_then_crash)
    with pytest.raises(Preempted):
        masked.train(load(tmp_path / "resumed"))
    monkeypatch.undo()
    masked.train(load(tmp_path / "resumed"), resume=True)
    return [read_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("straight", "resumed")]


def assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_transformer_resume_from_shards_is_exact_and_writes_validation_and_samples(tmp_path, monkeypatch, t5):
    shards = write_shards(tmp_path / "tokens", TextEncoder(t5), t5, n_train=11, n_val=5)
    vqgan = tiny_vqgan(tmp_path / "vqgan")
    overrides = [f"text.name_or_path={t5.name_or_path}", "text.kind=t5", f"model.text_dim={TEXT_DIM}",
                 f"vqgan={vqgan}", "data.format=tokens", f"data.path={shards}", "masking.text_dropout=0.3",
                 "masking.label_smoothing=0.1", "train.steps=5", "train.save_every=2", "train.batch_size=3"]
    straight, resumed = run_interrupted_and_straight(CONFIGS / "transformer" / "tiny.yaml",
                                                     tmp_path, monkeypatch, overrides, crash_at=2)
    assert straight["step"] == resumed["step"] == 5
    assert_same(straight["components"], resumed["components"])

    run = tmp_path / "straight"
    names = {row.split(",")[1] for row in (run / "logs" / "scalars.csv").read_text().splitlines()[1:]}
    assert {"train/loss", "train/tokens_per_s", "val/loss@0.5", "val/loss@0.9", "val/acc@0.5"} <= names
    assert (run / "samples" / "step-0000003.png").is_file()  # decoded through sampling.decode and the VQGAN
    from transformer.model import MaskedTransformer

    exported = MaskedTransformer.from_pretrained(run / "transformer")
    assert torch.equal(exported.head.weight, straight["components"]["ema"]["head.weight"])


def legacy_save(run_dir, step, components, batches, cfg, rt, keep_every):
    """checkpoints/last.pt exactly as musegen wrote it before the sharded format (commit 2ed806e's collect_state and
    write_checkpoint): one process's RNG and data position, the position without "consumed", the EMA as the state dict
    of its model copy (the same names and tensors as `EMA.state_dict`), optimizers keyed by position."""
    from muse.config import config_to_dict
    from muse.train.checkpoint import rng_state
    from persist import atomic_write

    state = {
        "step": step,
        "components": {name: obj.state_dict() for name, obj in components.items()},
        "rng": [rng_state()],
        "data": [{"epoch": batches.epoch, "batch": batches.batch, "samples": batches.batch * batches.batch_size}],
        "world_size": 1,
        "config": config_to_dict(cfg),
    }
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "checkpoints" / "last.pt", lambda file: torch.save(state, file))
    if step == 2:
        raise Preempted


def test_a_last_pt_of_the_previous_format_resumes_exactly(tmp_path, monkeypatch, t5):
    # The same run straight, and interrupted after a step-2 checkpoint in the old format, then resumed by this code.
    shards = write_shards(tmp_path / "tokens", TextEncoder(t5), t5, n_train=7, n_val=2)
    load = lambda out: load_config(CONFIGS / "transformer" / "tiny.yaml", [  # noqa: E731
        f"text.name_or_path={t5.name_or_path}", "text.kind=t5", f"model.text_dim={TEXT_DIM}", "vqgan=none",
        "data.format=tokens", f"data.path={shards}", "masking.text_dropout=0.3", "train.steps=4",
        "train.save_every=2", "train.batch_size=3", f"train.out_dir={out}"])
    masked.train(load(tmp_path / "straight"))
    monkeypatch.setattr(masked, "save_checkpoint", legacy_save)
    with pytest.raises(Preempted):
        masked.train(load(tmp_path / "old"))
    monkeypatch.undo()
    legacy = tmp_path / "old" / "checkpoints" / LEGACY_LAST
    assert latest_checkpoint(tmp_path / "old") == legacy
    assert "consumed" not in load_checkpoint(legacy)["data"][0]
    masked.train(load(tmp_path / "old"), resume=True)
    straight, resumed = (read_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("straight", "old"))
    assert straight["step"] == resumed["step"] == 4
    assert_same(straight["components"], resumed["components"])
    assert straight["data"] == resumed["data"]
    # Read once: the resumed run's first save (step 4, the current format) replaced it.
    assert not legacy.exists() and latest_checkpoint(tmp_path / "old").name == "step-0000004"


def test_superres_resume_from_shards_is_exact(tmp_path, monkeypatch, t5):
    shards = write_shards(tmp_path / "tokens", TextEncoder(t5), t5, n_train=7, n_val=3, low_grid=GRID)
    vqgan = tiny_vqgan(tmp_path / "vqgan")
    overrides = [f"text.name_or_path={t5.name_or_path}", "text.kind=t5", f"model.high.text_dim={TEXT_DIM}",
                 f"vqgan_low={vqgan}", f"vqgan_high={vqgan}", "data.format=tokens", f"data.path={shards}",
                 "masking.lowres_corruption=0.2", "train.steps=4", "train.save_every=2", "train.batch_size=3",
                 "train.sample_every=4"]
    straight, resumed = run_interrupted_and_straight(CONFIGS / "superres" / "tiny.yaml",
                                                     tmp_path, monkeypatch, overrides, crash_at=2)
    assert straight["step"] == resumed["step"] == 4
    assert_same(straight["components"], resumed["components"])
    assert (tmp_path / "straight" / "samples" / "step-0000004.png").is_file()
    assert (tmp_path / "straight" / "superres" / "model.safetensors").is_file()


def test_assemble_turns_the_runs_into_a_two_stage_pipeline(tmp_path, t5):
    from muse.assemble import assemble
    from muse.config import ConfigError
    from muse.pipeline import MusePipeline

    vqgan = tiny_vqgan(tmp_path / "vqgan")
    text = [f"text.name_or_path={t5.name_or_path}", "text.kind=t5", "train.steps=2", "train.batch_size=3"]
    base_shards = write_shards(tmp_path / "base-tokens", TextEncoder(t5), t5, n_train=5, n_val=2)
    masked.train(load_config(CONFIGS / "transformer" / "tiny.yaml", [
        *text, f"model.text_dim={TEXT_DIM}", f"vqgan={vqgan}", "data.format=tokens", f"data.path={base_shards}",
        f"train.out_dir={tmp_path / 'base'}"]))
    sr_shards = write_shards(tmp_path / "sr-tokens", TextEncoder(t5), t5, n_train=5, n_val=2, low_grid=GRID)
    masked.train(load_config(CONFIGS / "superres" / "tiny.yaml", [
        *text, f"model.high.text_dim={TEXT_DIM}", f"vqgan_low={vqgan}", f"vqgan_high={vqgan}", "data.format=tokens",
        f"data.path={sr_shards}", f"train.out_dir={tmp_path / 'sr'}"]))

    assemble(tmp_path / "base", tmp_path / "sr").save_pretrained(tmp_path / "pipe")
    pipe = MusePipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.superres is not None and pipe.superres_vqgan is None  # one fully convolutional VQGAN serves both
    out = pipe("a prompt", num_steps=2, superres_steps=2, seed=0)
    assert out.images[0].size == (pipe.resolution(), pipe.resolution()) == (2 * 16, 2 * 16)
    pipe.save_pretrained(tmp_path / "half", dtype=torch.float16)  # what the bundled model ships with
    half = MusePipeline.from_pretrained(tmp_path / "half")
    file = tmp_path / "half" / "transformer" / "model.safetensors"
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(file).values() if v.is_floating_point())
    assert half.transformer.head.weight.dtype == torch.float32  # cast back on load
    assert torch.equal(half.transformer.head.weight, pipe.transformer.head.weight.half().float())
    # A saved pipeline's super-res stage kept under a (re)trained base stage, as the bundled model's v0.4 was made.
    kept = assemble(tmp_path / "base", tmp_path / "half")
    assert torch.equal(kept.superres.low_embedding.weight, half.superres.low_embedding.weight)
    torch.manual_seed(1)
    other_vqgan = VQGAN(load_config(CONFIGS / "vqgan" / "tiny.yaml").model)
    other = MusePipeline(other_vqgan, pipe.text_encoder, pipe.transformer, pipe.superres)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="reads the tokens of that pipeline's VQGAN, which is not the base run's"):
        assemble(tmp_path / "base", tmp_path / "other")
    # ... and one whose text encoder computes other states (another random T5 of the same size).
    torch.manual_seed(1)
    T5EncoderModel(T5Config(vocab_size=len(ByT5Tokenizer()), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4)).save_pretrained(tmp_path / "other-t5")
    ByT5Tokenizer().save_pretrained(tmp_path / "other-t5")
    other_text = TextEncoder(replace(t5, name_or_path=str(tmp_path / "other-t5")))
    MusePipeline(pipe.vqgan, other_text, pipe.transformer, pipe.superres).save_pretrained(tmp_path / "other-text")
    with pytest.raises(ConfigError, match="super-res stage was trained on other text states"):
        assemble(tmp_path / "base", tmp_path / "other-text")
    # `muse assemble --precision bfloat16` still writes the weights as trained (bf16 is what pipeline.json asks for
    # at run time), and a pipeline loaded with precision="float32" holds its stored weights exactly.
    from muse import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["assemble", "--transformer-run", str(tmp_path / "base"), "--superres-run", str(tmp_path / "half"),
                  "--precision", "bfloat16", "--out", str(tmp_path / "bf16")])
    assert done.value.code == 0
    trained = load_file(tmp_path / "base" / "transformer" / "model.safetensors")
    assert all(torch.equal(v, trained[k]) for k, v in
               load_file(tmp_path / "bf16" / "transformer" / "model.safetensors").items())
    assert json.loads((tmp_path / "bf16" / "pipeline.json").read_text())["config"]["precision"] == "bfloat16"
    exact = MusePipeline.from_pretrained(tmp_path / "bf16", precision="float32")
    assert torch.equal(exact.superres.low_embedding.weight, half.superres.low_embedding.weight)
    assert MusePipeline.from_pretrained(tmp_path / "bf16").transformer.head.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="is a transformer run, expected a superres run"):
        assemble(tmp_path / "base", tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="not a training run directory"):
        assemble(tmp_path / "nowhere")


def test_init_from_starts_a_fresh_run_from_saved_weights_and_refuses_other_shapes(tmp_path, t5):
    from transformer.model import MaskedTransformer

    shards = write_shards(tmp_path / "tokens", TextEncoder(t5), t5, n_train=5, n_val=2)
    common = [f"text.name_or_path={t5.name_or_path}", "text.kind=t5", f"model.text_dim={TEXT_DIM}",
              f"vqgan={tiny_vqgan(tmp_path / 'vqgan')}", "data.format=tokens", f"data.path={shards}",
              "train.batch_size=3", "train.sample_every=100"]
    load = lambda *extra: load_config(CONFIGS / "transformer" / "tiny.yaml", [*common, *extra])  # noqa: E731
    first = masked.train(load("train.steps=2", f"train.out_dir={tmp_path / 'first'}"))

    # lr 0: the optimiser cannot move the weights, so the export must be exactly the weights it started from.
    second = masked.train(load("train.steps=1", "train.lr=0", f"train.init_from={first}",
                                            f"train.out_dir={tmp_path / 'second'}"))
    assert_same(MaskedTransformer.from_pretrained(first).state_dict(),
                MaskedTransformer.from_pretrained(second).state_dict())

    with pytest.raises(ValueError, match="shape"):
        masked.train(load("train.steps=1", "model.width=48", f"train.init_from={first}",
                                       f"train.out_dir={tmp_path / 'wider'}"))


def test_data_that_does_not_fit_the_model_is_refused_with_the_numbers():
    base = load_config(CONFIGS / "transformer" / "tiny.yaml", [f"model.text_dim={TEXT_DIM}"])
    batch = random_batch()  # 4x4 grids of ids below K = 32, 32-d text: what the config expects
    masked.check_batch(batch, base)
    with pytest.raises(ValueError, match="has 9 tokens per image, model.grid_size=4 expects 16"):
        masked.check_batch(replace(batch, tokens=batch.tokens[:, :9]), base)
    with pytest.raises(ValueError, match="token id 40 but model.codebook_size is 32"):
        masked.check_batch(replace(batch, tokens=batch.tokens.index_fill(1, torch.tensor([0]), 40)), base)
    with pytest.raises(ValueError, match="text states are 7-d but model.text_dim is 32"):
        masked.check_batch(replace(batch, text_states=batch.text_states[..., :7]), base)
    superres = load_config(CONFIGS / "superres" / "tiny.yaml", [f"model.high.text_dim={TEXT_DIM}"])
    with pytest.raises(ValueError, match="hold no low-res tokens"):
        masked.check_batch(batch, superres)
