"""The `muse generate / inpaint / outpaint / edit` commands on the tiny saved pipeline: files, manifest, resume,
sharding over ranks, and clean errors."""

import json

import numpy as np
import pytest
from PIL import Image

from muse import cli
from muse.generate import MANIFEST, Item, _items, _merge_manifest, read_manifest
from muse.pipeline import MusePipeline


def run(*argv):
    cli.main(list(map(str, argv)))


def made(capsys) -> str:
    """What the last runs said they made: "N new, M already done" (their summary line)."""
    return " | ".join(line.split(": rank 0: ")[1].split(";")[0].split(" (")[0]
                      for line in capsys.readouterr().out.splitlines() if ": rank 0: " in line)


def test_batch_generation_writes_a_manifest_and_resumes(tiny_pipeline_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na dog\nblue sky\n")
    out = tmp_path / "out"
    args = ["generate", "--prompts", prompts, "--num-images", 2, "--batch-size", 4, "--seed", 10, "--steps", 3,
            "--guidance", 2.5, "--out", out, "--model", tiny_pipeline_dir]
    run(*args)
    assert str(out) in capsys.readouterr().out
    records = read_manifest(out)
    assert sorted(records) == list(range(6))
    assert records[3] == {"index": 3, "prompt": "a dog", "seed": 13, "file": "000003.png",
                          "parameters": records[3]["parameters"]}
    assert records[3]["parameters"]["num_steps"] == 3 and records[3]["parameters"]["guidance_scale"] == 2.5
    first = {i: np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(6)}

    # An interrupted run: one image lost, and the manifest cut in the middle of its last line.
    (out / "000001.png").unlink()
    text = (out / MANIFEST).read_text()
    (out / MANIFEST).write_text(text[: len(text) - 40])
    run(*args)
    assert made(capsys) == "2 new, 4 already done"  # image 1 and image 5, nothing else
    assert sorted(read_manifest(out)) == list(range(6))
    assert len((out / MANIFEST).read_text().splitlines()) == 6  # merged: one line per image
    for i in range(6):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), first[i])

    run(*args)
    assert made(capsys) == "0 new, 6 already done"

    # Other settings are other images: refused, the earlier ones intact; replaced with --overwrite.
    with pytest.raises(SystemExit, match="already holds 6 of these images made with another prompt, seed or "
                                         "settings.*--overwrite"):
        run(*args[:-4], "--guidance", 3.0, "--out", out, "--model", tiny_pipeline_dir)
    assert all(np.array_equal(np.asarray(Image.open(out / f"{i:06d}.png")), first[i]) for i in range(6))
    run(*args[:-4], "--guidance", 3.0, "--out", out, "--model", tiny_pipeline_dir, "--overwrite")
    assert made(capsys) == "6 new, 0 already done"
    # A truncated image is made again on resume, not counted as done.
    data = (out / "000002.png").read_bytes()
    (out / "000002.png").write_bytes(data[: len(data) // 2])
    run(*args[:-4], "--guidance", 3.0, "--out", out, "--model", tiny_pipeline_dir)
    assert made(capsys) == "1 new, 5 already done"  # image 2: the second prompt's first
    Image.open(out / "000002.png").load()


def test_single_prompt_without_seed_records_random_seeds(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "one"
    run("generate", "a green tree", "--num-images", 2, "--num-steps", 2, "--out", out, "--model", tiny_pipeline_dir)
    records = read_manifest(out)
    assert [records[i]["prompt"] for i in (0, 1)] == ["a green tree"] * 2
    seed = records[0]["seed"]
    again = MusePipeline.from_pretrained(tiny_pipeline_dir)("a green tree", seed=seed, num_steps=2)
    assert np.array_equal(np.asarray(Image.open(out / "000000.png")), np.asarray(again.images[0]))


def test_a_record_appended_after_a_cut_line_survives(tmp_path):
    from muse.generate import _append

    (tmp_path / MANIFEST).write_text('{"index": 0, "prompt": "a"}\n{"index": 1, "pro')
    _append(tmp_path / MANIFEST, [{"index": 2, "prompt": "c"}])
    assert sorted(read_manifest(tmp_path)) == [0, 2]


def test_ranks_share_the_prompts_without_overlap_and_parts_merge(tmp_path):
    prompts = [f"p{i}" for i in range(7)]
    shards = [list(_items(prompts, 3, 0, rank, 3)) for rank in range(3)]
    indices = sorted(item.index for shard in shards for item in shard)
    assert indices == list(range(21))
    assert {item.prompt for item in shards[1]} == {"p1", "p4"}
    assert shards[1][0] == Item(3, "p1", 3)

    out = tmp_path / "run"
    out.mkdir()
    for rank, shard in enumerate(shards):
        lines = [json.dumps({"index": it.index, "prompt": it.prompt, "seed": it.seed, "file": it.file}) for it in shard]
        (out / f"manifest.part{rank:03d}.jsonl").write_text("\n".join(lines) + "\n")
    assert sorted(read_manifest(out)) == list(range(21))
    _merge_manifest(out)
    assert not list(out.glob("manifest.part*"))
    lines = (out / MANIFEST).read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(21))


def test_inpaint_outpaint_edit_commands(tiny_pipeline_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:8, :8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--steps", 2, "--seed", 4, "--out", tmp_path / "o", "--model", tiny_pipeline_dir]
    run("inpaint", "a dog", "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", *common)
    run("outpaint", "a sky", "--image", tmp_path / "in.png", "--pad", "0,0,8,4", *common)
    run("edit", "a cat", "--image", tmp_path / "in.png", "--strength", 0.5, "--mode", "confidence", *common)
    printed = capsys.readouterr().out
    for name, size in [("in-inpaint-4.png", (16, 16)), ("in-outpaint-4.png", (24, 20)), ("in-edit-4.png", (16, 16))]:
        assert Image.open(tmp_path / "o" / name).size == size
        assert name in printed


def test_upscale_command_doubles_an_image_with_the_cascade(tiny_cascade, tiny_pipeline_dir, tmp_path, capsys):
    tiny_cascade.save_pretrained(tmp_path / "cascade")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "s.png")
    run("upscale", "a dog", "--image", tmp_path / "s.png", "--seed", 2, "--superres-steps", 2, "--out",
        tmp_path / "big.png", "--model", tmp_path / "cascade")
    expected = tiny_cascade.upscale("a dog", image=tmp_path / "s.png", seed=2, superres_steps=2).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "big.png")), np.asarray(expected))
    assert expected.size == (48, 32) and "big.png" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="muse upscale: this pipeline has no super-resolution stage"):
        run("upscale", "a dog", "--image", tmp_path / "s.png", "--out", tmp_path / "x.png", "--model",
            tiny_pipeline_dir)
    with pytest.raises(SystemExit):  # the base stage does not run: no --steps
        run("upscale", "a dog", "--image", tmp_path / "s.png", "--steps", 3, "--model", tmp_path / "cascade")


@pytest.mark.parametrize("argv, message", [
    (["outpaint", "x", "--image", "IMG", "--pad", "0,0,6,0"], "muse outpaint: pad (0, 0, 6, 0) must be multiples of 4"),
    (["edit", "x", "--image", "IMG", "--strength", "2"], "muse edit: --strength must be a number in [0, 1]"),
    (["edit", "x", "--image", "NOTES", "--strength", "0.5"], "notes.png is not an image file"),
    (["generate", "--num-images", "0", "x"], "--num-images must be >= 1, got 0"),
    (["generate"], "give either a prompt or --prompts FILE"),
])
def test_command_errors_exit_with_a_message(tiny_pipeline_dir, tmp_path, argv, message):
    Image.new("RGB", (16, 16)).save(tmp_path / "img.png")
    (tmp_path / "notes.png").write_text("hello")
    argv = [str(tmp_path / "img.png") if a == "IMG" else str(tmp_path / "notes.png") if a == "NOTES" else a
            for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        run(*argv, "--out", tmp_path / "o", "--model", tiny_pipeline_dir)
    assert message in str(exit_info.value)


def test_missing_model_is_a_clean_exit(tmp_path):
    with pytest.raises(SystemExit, match="muse generate: no pipeline directory"):
        run("generate", "x", "--model", tmp_path / "absent", "--out", tmp_path / "o")


def test_out_naming_an_image_file_writes_exactly_that_file(tiny_pipeline_dir, tmp_path):
    run("generate", "a red apple", "--seed", 3, "--steps", 2, "--out", tmp_path / "apple.png", "--model",
        tiny_pipeline_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["apple.png"]  # no manifest for a one-off
    expected = MusePipeline.from_pretrained(tiny_pipeline_dir)("a red apple", seed=3, num_steps=2).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "apple.png")), np.asarray(expected))

    run("generate", "a red apple", "--num-images", 2, "--steps", 2, "--out", tmp_path / "more" / "apple.webp",
        "--model", tiny_pipeline_dir)
    assert sorted(p.name for p in (tmp_path / "more").iterdir()) == ["apple-0.webp", "apple-1.webp"]
    assert Image.open(tmp_path / "more" / "apple-0.webp").format == "WEBP"

    (tmp_path / "prompts.txt").write_text("a\nb\n")
    with pytest.raises(SystemExit, match="names one image file"):
        run("generate", "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "x.png", "--model",
            tiny_pipeline_dir)


def test_num_candidates_picks_the_best_of_n_and_records_its_score(tiny_pipeline_dir, tmp_path, capsys):
    run("generate", "a red apple", "--num-candidates", 3, "--seed", 5, "--steps", 2, "--out", tmp_path / "a.png",
        "--model", tiny_pipeline_dir)
    expected = MusePipeline.from_pretrained(tiny_pipeline_dir)("a red apple", seed=5, num_steps=2, num_candidates=3)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(expected.images[0]))
    printed = capsys.readouterr().out
    assert "(seed 5;" in printed and f"candidate seed {expected.candidate_seeds[0]}, score {expected.scores[0]:.3f}" \
        in printed

    (tmp_path / "prompts.txt").write_text("a red apple\na dog\n")
    run("generate", "--prompts", tmp_path / "prompts.txt", "--num-candidates", 3, "--seed", 5, "--steps", 2,
        "--out", tmp_path / "out", "--model", tiny_pipeline_dir)
    records = read_manifest(tmp_path / "out")
    assert records[0]["score"] == pytest.approx(expected.scores[0])
    assert records[0]["seed"] == 5 and records[0]["candidate_seed"] == expected.candidate_seeds[0]
    assert records[1]["parameters"]["num_candidates"] == 3
    alone = MusePipeline.from_pretrained(tiny_pipeline_dir)("a red apple", seed=expected.candidate_seeds[0], num_steps=2)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "000000.png")), np.asarray(alone.images[0]))
    run("generate", "--prompts", tmp_path / "prompts.txt", "--num-candidates", 3, "--seed", 5, "--steps", 2,
        "--out", tmp_path / "out", "--model", tiny_pipeline_dir)
    assert "0 new, 2 already done" in capsys.readouterr().out  # best-of-N runs resume too

    with pytest.raises(SystemExit, match="num_candidates must be >= 1"):
        run("generate", "x", "--num-candidates", 0, "--out", tmp_path / "o", "--model", tiny_pipeline_dir)
