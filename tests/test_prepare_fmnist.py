"""prepare_fmnist.py: IDX files -> the repository's data format, readable by every trainer."""
import gzip
import json

import numpy as np
import pytest

import prepare_fmnist
from common import load_split


def write_idx(path, arr):
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_src(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(src / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return src


def test_prepares_both_splits_as_padded_rgb_with_class_captions(fake_src, tmp_path):
    out = tmp_path / "out"
    prepare_fmnist.main([f"--src={fake_src}", f"--out={out}"])
    gray = prepare_fmnist.read_idx(fake_src / "train-images-idx3-ubyte.gz")
    images, rows = load_split(str(out), "train")
    assert images.shape == (12, 32, 32, 3)
    assert (images[:, 2:30, 2:30, 0] == gray).all() and (images[..., 0] == images[..., 2]).all()
    assert images[:, :2].max() == 0 and images[:, :, 30:].max() == 0  # 2 px black padding
    assert [r["label"] for r in rows] == [i % 10 for i in range(12)]
    assert rows[7]["captions"][0] == "a photo of a sneaker" and "an ankle boot" in rows[9]["captions"]
    test_images, _ = load_split(str(out), "test")
    assert test_images.shape == (5, 32, 32, 3)
    assert json.loads((out / "meta.json").read_text())["splits"]["test"] == {"N": 5, "H": 32, "W": 32}


def test_truncated_file_is_a_clear_error(fake_src, tmp_path):
    path = fake_src / "train-images-idx3-ubyte.gz"
    with gzip.open(path) as f:
        data = f.read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(SystemExit, match="truncated"):
        prepare_fmnist.main([f"--src={fake_src}", f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out" / "train_images.u8").exists()
