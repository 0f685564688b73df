"""Image folders, transforms, streaming tar shards and token shards (CPU, tiny images)."""

import io
import json
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from muse.data.folder import ImageCaptionDataset
from muse.data.images import ImageTransform
from muse.data.streaming import WebDatasetImages, write_webdataset_shards
from muse.data.tokens import TokenShardDataset, TokenShardWriter


def noise_image(seed: int, size: tuple[int, int] = (24, 24)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_folder_skips_corrupt_images_with_one_warning(tmp_path):
    rows = []
    for i in range(3):
        noise_image(i).save(tmp_path / f"good{i}.png")
        rows.append({"file": f"good{i}.png", "caption": f"good {i}"})
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    (tmp_path / "truncated.png").write_bytes(png_bytes(noise_image(9))[:150])
    rows += [{"file": "garbage.png", "caption": "bad"}, {"file": "truncated.png", "caption": "bad"},
             {"file": "missing.png", "caption": "bad"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageCaptionDataset(tmp_path, ImageTransform(16))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "skipped 3 of 6" in messages[0], messages
    assert len(data) == 3
    items = [data[i] for i in range(len(data))]
    assert [item["caption"] for item in items] == ["good 0", "good 1", "good 2"]
    assert [item["key"] for item in items] == ["good0", "good1", "good2"]
    assert all(item["image"].shape == (3, 16, 16) for item in items)


def test_folder_image_broken_after_scan_is_replaced_not_raised(tmp_path):
    for i in range(2):
        noise_image(i).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    data = ImageCaptionDataset(tmp_path, ImageTransform(16))
    (tmp_path / "0.png").write_bytes(b"broken later")
    with pytest.warns(UserWarning, match="unreadable"):
        item = data[0]
    assert item["caption"] == "caption 1"


def test_sidecar_txt_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    noise_image(0).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red apple\n")
    noise_image(1).convert("RGB").save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "sub" / "b.txt").write_text("a blue car")
    noise_image(2).save(tmp_path / "uncaptioned.png")  # no .txt: not a training pair
    data = ImageCaptionDataset(tmp_path, ImageTransform(16))
    assert sorted((data[i]["key"], data[i]["caption"]) for i in range(len(data))) == [
        ("a", "a red apple"), ("sub/b", "a blue car")]


def test_metadata_split_filter_and_size_choice(tmp_path):
    rows = []
    for name, split in [("apple", "train"), ("car", "heldout"), ("dog", "train")]:
        files = {}
        for size in (16, 32):
            (tmp_path / str(size)).mkdir(exist_ok=True)
            Image.new("RGB", (size, size), (size, 0, 0)).save(tmp_path / str(size) / f"{name}.png")
            files[str(size)] = f"{size}/{name}.png"
        rows.append({"id": f"noto/{name}", "caption": f"{name}, noto style", "files": files, "split": split,
                     "duplicate_of": "noto/apple" if name == "dog" else None})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    train = ImageCaptionDataset(tmp_path, ImageTransform(16), split="train")
    assert [train[i]["key"] for i in range(len(train))] == ["noto/apple", "noto/dog"]
    heldout = ImageCaptionDataset(tmp_path, ImageTransform(16), split="heldout")
    assert [heldout[i]["caption"] for i in range(len(heldout))] == ["car, noto style"]
    assert len(ImageCaptionDataset(tmp_path, ImageTransform(16), drop_duplicates=True)) == 2
    # The smallest pre-rendered size that needs no upscaling is read: 16 for 16 px, 32 for 24 px.
    assert [p.parent.name for p in train.paths] == ["16", "16"]
    assert [p.parent.name for p in ImageCaptionDataset(tmp_path, ImageTransform(24)).paths] == ["32"] * 3


def test_random_crop_differs_across_seeds_center_crop_is_deterministic(tmp_path):
    noise_image(0, size=(48, 32)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("noise")
    random_crop = ImageTransform(16, resize=24, crop="random")
    seed0 = ImageCaptionDataset(tmp_path, random_crop, seed=0)[0]["image"]
    seed0_again = ImageCaptionDataset(tmp_path, random_crop, seed=0)[0]["image"]
    seed1 = ImageCaptionDataset(tmp_path, random_crop, seed=1)[0]["image"]
    assert torch.equal(seed0, seed0_again)
    assert not torch.equal(seed0, seed1)

    data = ImageCaptionDataset(tmp_path, random_crop, seed=0)
    data.set_epoch(1)
    assert not torch.equal(data[0]["image"], seed0)

    center = ImageTransform(16, resize=24, crop="center")
    assert torch.equal(ImageCaptionDataset(tmp_path, center, seed=0)[0]["image"],
                       ImageCaptionDataset(tmp_path, center, seed=1)[0]["image"])


def test_value_range_and_transparency_on_white():
    pixels = np.zeros((16, 16, 4), dtype=np.uint8)
    pixels[:, :8] = (0, 0, 0, 255)  # opaque black
    pixels[:, 8:] = (255, 0, 0, 0)  # fully transparent: must come out white, not red or black
    image = ImageTransform(16)(Image.fromarray(pixels, mode="RGBA"))
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert image.min() == -1.0 and image.max() == 1.0
    assert torch.all(image[:, :, :8] == -1.0) and torch.all(image[:, :, 8:] == 1.0)
    noisy = ImageTransform(8, resize=12, crop="random")(noise_image(3, (30, 20)), np.random.default_rng(0))
    assert noisy.shape == (3, 8, 8) and noisy.min() >= -1.0 and noisy.max() <= 1.0


def test_bad_transform_arguments_raise():
    with pytest.raises(ValueError, match="crop"):
        ImageTransform(16, crop="corner")
    with pytest.raises(ValueError, match="size <= resize"):
        ImageTransform(16, resize=8)
    with pytest.raises(ValueError, match="rng"):
        ImageTransform(8, crop="random")(noise_image(0))


def write_samples(directory, count, per_shard):
    samples = [(f"{i:04d}", noise_image(i, (12, 12)), f"caption {i}") for i in range(count)]
    return write_webdataset_shards(samples, directory, samples_per_shard=per_shard)


def keys_seen(shards, rank, world_size, num_workers, **options):
    dataset = WebDatasetImages(shards, ImageTransform(8), rank=rank, world_size=world_size, **options)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [item["key"] for item in loader]


@pytest.mark.parametrize("num_shards", [5, 2])  # 5 >= 4 slots: whole shards per slot; 2 < 4: samples per slot
def test_shards_split_over_2_ranks_and_2_workers_cover_each_sample_once(tmp_path, num_shards):
    shards = write_samples(tmp_path, 20, per_shard=20 // num_shards)
    assert len(shards) == num_shards and not list(tmp_path.glob("*.tmp"))
    per_rank = [keys_seen(tmp_path, rank, 2, num_workers=2, shuffle=True, shuffle_buffer=4) for rank in (0, 1)]
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == [f"{i:04d}" for i in range(20)]  # every sample, none twice
    assert per_rank[0] and per_rank[1]


def test_shard_items_and_corrupt_samples_skipped_with_one_warning(tmp_path):
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w") as tar:
        for key, image, caption in [("a", png_bytes(noise_image(0)), b"first"), ("b", b"not a png", b"broken"),
                                    ("c", None, b"caption without image"), ("d", png_bytes(noise_image(1)), b"last")]:
            for ext, data in (("png", image), ("txt", caption)):
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = list(WebDatasetImages(shard, ImageTransform(8)))
    assert [(item["key"], item["caption"]) for item in items] == [("a", "first"), ("d", "last")]
    assert items[0]["image"].shape == (3, 8, 8) and -1 <= items[0]["image"].min() <= items[0]["image"].max() <= 1
    assert len(caught) == 1 and "skipped 2 corrupt" in str(caught[0].message)


def test_truncated_shard_yields_what_it_can(tmp_path):
    (shard,) = write_samples(tmp_path, 6, per_shard=6)
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[6].offset_data + 10  # inside the image of the fourth sample
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.warns(UserWarning, match="1 unreadable shard"):
        items = list(WebDatasetImages(shard, ImageTransform(8)))
    assert [item["key"] for item in items] == ["0000", "0001", "0002"]


def test_writer_rejects_bad_keys(tmp_path):
    with pytest.raises(ValueError, match="contain no '.'"):
        write_webdataset_shards([("a.b", noise_image(0), "x")], tmp_path)
    with pytest.raises(ValueError, match="duplicate"):
        write_webdataset_shards([("a", noise_image(0), "x"), ("a", noise_image(1), "y")], tmp_path / "dup")
    assert not list((tmp_path / "dup").glob("*"))  # the partial shard was removed


def test_token_shards_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    expected = []
    with TokenShardWriter(tmp_path, items_per_shard=4) as writer:
        for batch, (B, S) in enumerate([(3, 5), (3, 7), (3, 3)]):
            lengths = rng.integers(1, S + 1, B)
            mask = np.arange(S)[None] < lengths[:, None]  # (B, S) True = real token
            states = rng.standard_normal((B, S, 6)).astype(np.float32) * mask[..., None]
            tokens = rng.integers(0, 1000, (B, 2, 3))
            low = rng.integers(0, 1000, (B, 1, 2))
            keys = [f"k{batch}{i}" for i in range(B)]
            captions = [f"caption {batch} {i}" for i in range(B)]
            writer.add(keys=keys, captions=captions, tokens=torch.from_numpy(tokens), text_states=states,
                       text_mask=mask, low_res_tokens=low)
            expected += [(keys[i], captions[i], tokens[i], states[i, :lengths[i]], lengths[i], low[i])
                         for i in range(B)]
    assert [p.name for p in writer.shards] == [f"tokens-00000{i}.safetensors" for i in range(3)]
    assert not list(tmp_path.glob("*.tmp"))

    data = TokenShardDataset(tmp_path)
    assert len(data) == 9
    for i, (key, caption, tokens, states, length, low) in enumerate(expected):
        item = data[i]
        assert item["key"] == key and item["caption"] == caption
        assert item["tokens"].dtype == torch.long and torch.equal(item["tokens"], torch.from_numpy(tokens))
        assert torch.equal(item["low_res_tokens"], torch.from_numpy(low))
        assert item["text_states"].shape == (data.text_length, 6) and item["text_mask"].shape == (data.text_length,)
        assert item["text_mask"].tolist() == [True] * length + [False] * (data.text_length - length)
        stored = states.astype(np.float16).astype(np.float32)  # the format keeps float16
        np.testing.assert_array_equal(item["text_states"][:length].numpy(), stored)
        assert torch.all(item["text_states"][length:] == 0)

    # Items from shards with different stored S collate, also after the dataset crossed into worker processes.
    batch = next(iter(DataLoader(pickle.loads(pickle.dumps(data)), batch_size=9)))
    assert batch["tokens"].shape == (9, 2, 3) and batch["text_states"].shape == (9, data.text_length, 6)


def test_token_shards_keep_large_ids_and_refuse_mixing(tmp_path):
    with TokenShardWriter(tmp_path, items_per_shard=8) as writer:
        writer.add(keys=["a"], captions=["x"], tokens=np.full((1, 2, 2), 40000), text_states=np.zeros((1, 2, 4)),
                   text_mask=np.ones((1, 2), bool))
        with pytest.raises(ValueError, match="differ from earlier batches"):
            writer.add(keys=["b"], captions=["y"], tokens=np.zeros((1, 3, 3)), text_states=np.zeros((1, 2, 4)),
                       text_mask=np.ones((1, 2), bool))
    assert TokenShardDataset(tmp_path)[0]["tokens"].unique().tolist() == [40000]
    with pytest.raises(FileExistsError):
        TokenShardWriter(tmp_path)
    with pytest.raises(FileNotFoundError):
        TokenShardDataset(tmp_path / "empty")


def test_all_captions_makes_one_item_per_phrasing(tmp_path):
    from PIL import Image

    from muse.data.folder import ImageCaptionDataset
    from muse.data.images import ImageTransform

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.png")
    rows = [{"file": "a.png", "caption": "red apple, noto style",
             "captions": ["red apple, noto style", "a red apple, noto style", "noto style red apple"]},
            {"file": "b.png", "caption": "blue sky, noto style"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    canonical = ImageCaptionDataset(tmp_path, ImageTransform(8))
    every = ImageCaptionDataset(tmp_path, ImageTransform(8), all_captions=True)
    assert [item["caption"] for item in canonical] == ["red apple, noto style", "blue sky, noto style"]
    assert [every[i]["caption"] for i in range(len(every))] == [
        "red apple, noto style", "a red apple, noto style", "noto style red apple", "blue sky, noto style"]
    assert len(set(every.keys)) == 4 and every.keys[0] == canonical.keys[0]
    assert torch.equal(every[1]["image"], every[0]["image"])
