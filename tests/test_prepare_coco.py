"""prepare_coco.py: a COCO layout -> the repository's data format, with bad files skipped and resumable runs."""
import json
import os

import numpy as np
import pytest
from PIL import Image

import prepare_coco
from common import load_split

# image id -> (file name, size, PIL mode); listed in the JSON out of id order
GOOD = {42: ("wide.jpg", (40, 24), "RGB"), 7: ("tall.jpg", (24, 40), "RGB"), 300: ("gray.jpg", (30, 17), "L"),
        13: ("square.jpg", (32, 32), "RGB"), 99: ("odd.jpg", (17, 33), "RGB"), 250: ("big.jpg", (64, 48), "RGB")}
BAD = {20: ("corrupt.jpg", "unreadable"), 150: ("truncated.jpg", "unreadable"), 5: ("absent.jpg", "missing")}
ORDER = sorted(GOOD)  # the kept ids, in the order the rows must come


@pytest.fixture
def coco(tmp_path):
    """(annotations path, images folder) of a small fake COCO split."""
    rng = np.random.default_rng(0)
    img_dir = tmp_path / "train2017"
    img_dir.mkdir()
    for name, (w, h), mode in GOOD.values():
        shape = (h, w) if mode == "L" else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(img_dir / name, quality=90)
    (img_dir / "corrupt.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    full = (img_dir / "big.jpg").read_bytes()
    (img_dir / "truncated.jpg").write_bytes(full[: len(full) // 2])
    ids = list(GOOD) + list(BAD)
    listed = {**{i: v[0] for i, v in GOOD.items()}, **{i: v[0] for i, v in BAD.items()}}
    anns = [{"id": 1000 * k + i, "image_id": i, "caption": f"caption {k} of image {i} "}
            for k in range(3) for i in ids]
    ann = tmp_path / "annotations" / "captions_train2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"info": {}, "images": [{"id": i, "file_name": listed[i], "width": 1, "height": 1}
                                                      for i in ids], "annotations": anns}))
    return ann, img_dir


def run(ann, img_dir, out, **kw):
    # every key every time: configure() sets module globals, which would carry over between calls
    cfg = {"annotations": ann, "images": img_dir, "out": out, "split": "train", "resolution": 16, "workers": 2,
           "limit": 0, **kw}
    prepare_coco.main([f"--{k}={v}" for k, v in cfg.items()])


def expected(path, r):
    """Center crop and LANCZOS resize, done independently of prepare_coco."""
    a = np.asarray(Image.open(path).convert("RGB"))
    h, w = a.shape[:2]
    s = min(h, w)
    a = a[(h - s) // 2: (h - s) // 2 + s, (w - s) // 2: (w - s) // 2 + s]
    return np.asarray(Image.fromarray(a).resize((r, r), Image.LANCZOS))


def outputs(out):
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out))}


def test_valid_images_become_rows_matching_their_captions(coco, tmp_path):
    ann, img_dir = coco
    out = tmp_path / "out"
    run(ann, img_dir, out)
    images, rows = load_split(str(out), "train")
    assert images.shape == (len(GOOD), 16, 16, 3)
    assert [r["id"] for r in rows] == ORDER
    for img, row in zip(images, rows):
        assert row["file_name"] == GOOD[row["id"]][0]
        assert row["captions"] == [f"caption {k} of image {row['id']}" for k in range(3)]
        assert np.array_equal(img, expected(img_dir / row["file_name"], 16))
    assert (images[ORDER.index(300)][..., 0] == images[ORDER.index(300)][..., 2]).all()  # gray -> equal channels
    skipped = dict(line.split("\t") for line in (out / "train_skipped.txt").read_text().splitlines())
    assert set(skipped) == {name for name, _ in BAD.values()}
    assert all(skipped[name].startswith(why) for name, why in BAD.values())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"] == {"N": len(GOOD), "H": 16, "W": 16}
    assert meta["source"] == "coco:captions_train2017.json"
    assert sorted(os.listdir(out)) == ["meta.json", "train_captions.jsonl", "train_images.u8", "train_skipped.txt"]


def test_rerun_after_completion_does_nothing(coco, tmp_path, capsys):
    ann, img_dir = coco
    out = tmp_path / "out"
    run(ann, img_dir, out)
    before = outputs(out)
    mtime = os.path.getmtime(out / "train_images.u8")
    run(ann, img_dir, out)
    assert "already done" in capsys.readouterr().out
    assert outputs(out) == before and os.path.getmtime(out / "train_images.u8") == mtime


def test_limit_takes_the_first_images_by_id(coco, tmp_path):
    ann, img_dir = coco
    run(ann, img_dir, tmp_path / "out", limit=4)  # ids 5 (absent), 7, 13, 20 (corrupt)
    images, rows = load_split(str(tmp_path / "out"), "train")
    assert [r["id"] for r in rows] == [7, 13] and len(images) == 2


def crash_after(k, on_crash=lambda: None):
    """A stand-in for tqdm that lets k images through, then fails like a killed run."""
    def fake(it, **kw):
        for j, x in enumerate(it):
            if j == k:
                on_crash()
                raise RuntimeError("simulated crash")
            yield x
    return fake


def test_interrupted_run_resumes_to_the_same_output(coco, tmp_path, monkeypatch):
    ann, img_dir = coco
    run(ann, img_dir, tmp_path / "clean")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(prepare_coco, "tqdm", crash_after(5))  # ids 5, 7, 13, 20, 42 done: 2 skipped, 3 kept
        with pytest.raises(RuntimeError, match="simulated"):
            run(ann, img_dir, out)
    assert sorted(os.listdir(out)) == ["train_images.u8.partial", "train_progress.json"]  # no final names yet
    state = json.loads((out / "train_progress.json").read_text())
    assert state["done"] == 5 and [s[1] for s in state["skipped"]] == ["absent.jpg", "corrupt.jpg"]
    with pytest.raises(SystemExit, match="other settings"):
        run(ann, img_dir, out, resolution=24)
    run(ann, img_dir, out, workers=1)  # the pool size may change
    assert outputs(out) == outputs(tmp_path / "clean")


def test_hard_kill_between_progress_saves_resumes_to_the_same_output(coco, tmp_path, monkeypatch):
    ann, img_dir = coco
    run(ann, img_dir, tmp_path / "clean")
    out = tmp_path / "out"
    progress = out / "train_progress.json"
    saved = {}
    with monkeypatch.context() as m:
        m.setattr(prepare_coco, "PROGRESS_EVERY", 2)
        m.setattr(prepare_coco, "tqdm", crash_after(5, lambda: saved.update(text=progress.read_text())))
        with pytest.raises(RuntimeError):
            run(ann, img_dir, out)
    progress.write_text(saved["text"])  # as if killed before the final save: rows past "done" unrecorded
    assert json.loads(saved["text"])["done"] == 4
    run(ann, img_dir, out)
    assert outputs(out) == outputs(tmp_path / "clean")


BAD_INPUT = [
    ("no_annotations", "annotations file .* not found"),
    ("not_json", ".* is not valid JSON"),
    ("not_captions", ".* is not a COCO captions file \\(needs 'images' and 'annotations'"),
    ("instances", ".* is not a COCO captions file .*'caption'"),
    ("no_images_dir", "images folder .* not found"),
    ("resolution", "resolution=20 is not a multiple of 8"),
]


@pytest.mark.parametrize("case, match", BAD_INPUT, ids=[case for case, _ in BAD_INPUT])
def test_bad_input_is_a_clear_error_and_writes_nothing(coco, tmp_path, case, match):
    ann, img_dir = coco
    kw = {}
    if case == "no_annotations":
        ann = tmp_path / "nope.json"
    elif case == "not_json":
        ann.write_text("{not json")
    elif case == "not_captions":
        ann.write_text(json.dumps({"images": []}))
    elif case == "instances":  # the other COCO annotation file: annotations without captions
        ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    elif case == "no_images_dir":
        img_dir = tmp_path / "nope"
    else:
        kw["resolution"] = 20
    with pytest.raises(SystemExit, match=f"^prepare_coco: {match}"):
        run(ann, img_dir, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_resolution_zero_writes_captions_only(coco, tmp_path):
    ann, img_dir = coco
    out = tmp_path / "out"
    run(ann, img_dir, out)
    run(ann, tmp_path / "no_images_needed", out, resolution=0)
    images, rows = load_split(str(out), "train", need_images=False)
    assert images is None and [r["id"] for r in rows] == sorted(list(GOOD) + list(BAD))  # images are not read
    assert json.loads((out / "meta.json").read_text())["splits"]["train"] == {"N": len(rows), "H": 0, "W": 0}
    assert not (out / "train_images.u8").exists() and (out / "train_skipped.txt").read_text() == ""


def test_fid_prompts_are_drawn_by_a_fixed_rule_one_caption_per_image(coco, tmp_path, capsys):
    import hashlib
    ann, _ = coco
    out = tmp_path / "out"
    run(ann, tmp_path / "no_images_needed", out, prompts=5)  # the images folder is not read
    path = out / "train_prompts_5_seed0.txt"
    lines = path.read_text().splitlines()
    assert os.listdir(out) == [path.name]  # nothing else written
    assert f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}" in capsys.readouterr().out
    ids = [int(line.rsplit(" ", 1)[1]) for line in lines]  # 'caption k of image i'
    assert len(lines) == 5 and ids == sorted(set(ids)) and set(ids) <= set(GOOD) | set(BAD)  # 5 images, id order
    rng = np.random.RandomState(0)  # the rule as written down, redone by hand
    every = sorted(set(GOOD) | set(BAD))
    assert lines == [f"caption {rng.randint(3)} of image {every[k]}"
                     for k in sorted(rng.choice(len(every), 5, replace=False))]
    first = path.read_bytes()
    run(ann, tmp_path / "no_images_needed", out, prompts=5)
    assert path.read_bytes() == first  # the same file every time
    run(ann, tmp_path / "no_images_needed", out, prompts=5, seed=1)
    assert (out / "train_prompts_5_seed1.txt").read_text().splitlines() != lines  # the seed is the draw
    with pytest.raises(SystemExit, match="prompts=10, but there are 9 captioned images"):
        run(ann, tmp_path / "no_images_needed", tmp_path / "none", prompts=10)
    assert not (tmp_path / "none").exists()
