"""
Fashion-MNIST -> the repository's on-disk format (see README, "Data format"):
    data/fmnist/{train,test}_images.u8      uint8 (N, 32, 32, 3), np.memmap-able
    data/fmnist/{train,test}_captions.jsonl  line i: {"id": i, "label": k, "captions": [...]}
    data/fmnist/meta.json                    {"version", "source", "splits": {split: {N, H, W}}}
Images are padded 28 -> 32 (2 px of black each side) and the gray channel replicated to RGB.
Captions are the class name in several templates, so a text-to-image model learns from text.

Reads the gz files of Debian's `dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist)
or of `src=`; downloads the official files only when neither has them.

    python prepare_fmnist.py                        # -> data/fmnist
    python prepare_fmnist.py --out=data/fm --src=/path/to/gz/files
"""
import gzip
import os
import sys

import numpy as np

# The class names and caption templates (CLASSES, captions_for) live in common.py, since export_split uses
# them too; eval_fid.py and the tests import them from here.
from common import CLASSES, captions_for, fetch, write_split  # noqa: F401

# -----------------------------------------------------------------------------
out = "data/fmnist"  # output folder
src = "/usr/share/datasets/fashion-mnist"  # folder with the four *-ubyte.gz files
url = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # official mirror, used only if src lacks the files
# -----------------------------------------------------------------------------

FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path):
    """IDX format: magic (2 zero bytes, dtype code, ndim), ndim big-endian uint32 sizes, then the data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise SystemExit(f"prepare_fmnist: {path} is not an IDX uint8 file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise SystemExit(f"prepare_fmnist: {path} is truncated ({arr.size} of {int(np.prod(shape))} values)")
    return arr.reshape(shape)


def find(name, src, cache):
    """Path of one gz file: from src if there, else downloaded (once) into cache."""
    local = os.path.join(src, name)
    if os.path.exists(local):
        return local
    try:
        return fetch(url + name, cache)
    except OSError as e:
        raise SystemExit(f"prepare_fmnist: {name} is neither in {src} nor downloadable ({e}); "
                         "on Debian: apt-get install dataset-fashion-mnist")


def to_rgb32(images):
    """(N, 28, 28) gray -> (N, 32, 32, 3): pad 2 px, replicate the channel."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)


def main(argv):
    from configurator import configure
    cfg = configure(globals(), argv)
    for split, (img_name, lab_name) in FILES.items():
        images = read_idx(find(img_name, cfg["src"], os.path.join(cfg["out"], "raw")))
        labels = read_idx(find(lab_name, cfg["src"], os.path.join(cfg["out"], "raw")))
        if len(images) != len(labels):
            raise SystemExit(f"prepare_fmnist: {len(images)} images but {len(labels)} labels in {split}")
        rows = [{"id": i, "label": int(k), "captions": captions_for(int(k))} for i, k in enumerate(labels)]
        write_split(cfg["out"], split, to_rgb32(images), rows, source="fashion-mnist")
        print(f"{split}: {len(images)} images -> {cfg['out']}/{split}_images.u8")


if __name__ == "__main__":
    main(sys.argv[1:])
