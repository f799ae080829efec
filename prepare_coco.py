"""
COCO captions (the official 2014 or 2017 layout) -> the repository's on-disk format (see README, "Data format"):
    data/coco/<split>_images.u8       uint8 (N, R, R, 3), np.memmap-able
    data/coco/<split>_captions.jsonl  line i: {"id": coco image id, "file_name": ..., "captions": [...]}
    data/coco/<split>_skipped.txt     one line per image left out: file_name<TAB>reason
    data/coco/meta.json               {"version", "source", "splits": {split: {N, H, W}}}
Images go in order of image id, each converted to RGB, center-cropped to a square and resized to R
with LANCZOS. A missing or unreadable image is skipped and listed, never written as a wrong row.
An interrupted run continues where it stopped when rerun with the same settings (<split>_progress.json);
the final files appear only when all is done. resolution=0 writes the captions of every listed image
and no images file, without reading the images folder (e.g. the prompts of an FID set). prompts=N writes
only <split>_prompts_<N>_seed<seed>.txt, N captions drawn by a fixed rule (draw_prompts), and its sha256.

    python prepare_coco.py --annotations=/data/coco/annotations/captions_train2017.json --images=/data/coco/train2017
    python prepare_coco.py --annotations=/data/coco/annotations/captions_val2017.json --images=/data/coco/val2017 \\
        --split=val --resolution=256 --limit=5000
    python prepare_coco.py --annotations=/data/coco/annotations/captions_val2014.json --out=data/coco2014val-256 \\
        --split=val --prompts=30000   # config/coco30k_gigagan_eval.py's captions
"""
import hashlib
import json
import os
import sys
from functools import partial
from multiprocessing import Pool

import numpy as np
from PIL import Image
from tqdm import tqdm

# -----------------------------------------------------------------------------
annotations = "/data/coco/annotations/captions_train2017.json"  # COCO captions_<split>.json
images = "/data/coco/train2017"  # folder with that split's *.jpg (not read when resolution=0)
out = "data/coco"  # output folder
split = "train"  # split name written: <split>_images.u8, <split>_captions.jsonl, meta.json
resolution = 512  # side of the square images, a multiple of 8; 0 = captions only
workers = 8  # processes decoding and resizing images
limit = 0  # 0 = all images; else the first N by image id (an FID-5k subset, a quick test)
prompts = 0  # > 0: only write this many captions, one per image, to <out>/<split>_prompts_<N>_seed<seed>.txt
seed = 0  # of the prompts draw
# -----------------------------------------------------------------------------

PROGRESS_EVERY = 1000  # images between two saves of <split>_progress.json


def load_coco(path, limit):
    """[(image id, file_name, [captions])] of the captioned images, sorted by id, the first `limit` if > 0."""
    if not os.path.isfile(path):
        raise SystemExit(f"prepare_coco: annotations file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except ValueError as e:
        raise SystemExit(f"prepare_coco: {path} is not valid JSON ({e})")
    if not (isinstance(coco, dict) and all(isinstance(coco.get(k), list) for k in ("images", "annotations"))):
        raise SystemExit(f"prepare_coco: {path} is not a COCO captions file (needs 'images' and 'annotations' lists)")
    caps = {}
    try:
        for a in coco["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
        items = sorted((im["id"], im["file_name"]) for im in coco["images"])
    except (KeyError, TypeError, AttributeError):
        raise SystemExit(f"prepare_coco: {path} is not a COCO captions file (images need 'id' and 'file_name', "
                         "annotations 'image_id' and 'caption')")
    items = [(i, name, caps[i]) for i, name in items if i in caps]
    if len(items) < len(coco["images"]):
        print(f"{len(coco['images']) - len(items)} images without captions left out")
    return items[:limit] if limit else items


def draw_prompts(items, n, seed):
    """n captions for an FID set, by a rule anyone can redo. rng = numpy's RandomState(seed) (a stream numpy keeps
    fixed across versions); rng.choice(N, n, replace=False) picks n of the N captioned images (listed in order of
    image id); they are kept in order of id, and for each in turn rng.randint(k) picks one of its k captions (in
    the annotation file's order); runs of whitespace, newlines too, become one space."""
    if not 0 < n <= len(items):
        raise SystemExit(f"prepare_coco: prompts={n}, but there are {len(items)} captioned images")
    rng = np.random.RandomState(seed)
    chosen = sorted(rng.choice(len(items), n, replace=False).tolist())
    return [" ".join(items[k][2][rng.randint(len(items[k][2]))].split()) for k in chosen]


def load_image(path, resolution):
    """(uint8 (R, R, 3), None) for one image, or (None, reason). Runs in the pool: a bad file is
    reported, never raised, so one file cannot stop a run of hours."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # decodes the whole file: a truncated one fails here
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8), None
    except FileNotFoundError:
        return None, "missing"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        return None, " ".join(f"unreadable ({type(e).__name__}: {e})".split())


def already_done(items, out, split, r, paths):
    """Whether the final files hold exactly these items (kept or skipped) at this resolution."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            m = json.load(f)["splits"][split]
        with open(paths["captions"]) as f:
            kept = [json.loads(line)["file_name"] for line in f]
        with open(paths["skipped"]) as f:
            skipped = [line.split("\t")[0] for line in f]
    except (OSError, ValueError, KeyError):
        return False
    size = os.path.getsize(paths["images"]) if os.path.exists(paths["images"]) else None
    return ((m["N"], m["H"], m["W"]) == (len(kept), r, r) and size == (len(kept) * r * r * 3 if r else None)
            and sorted(kept + skipped) == sorted(name for _, name, _ in items)
            and not os.path.exists(paths["progress"]))


def convert_images(items, cfg, tmp, progress, save_json):
    """Images into the rows of the file `tmp`, the k-th kept one at row k; continues from `progress`
    when it is from the same settings. Returns the skipped [(index, file_name, reason)]."""
    r, n, row = cfg["resolution"], len(items), cfg["resolution"] ** 2 * 3
    settings = {"annotations": os.path.abspath(cfg["annotations"]), "images": os.path.abspath(cfg["images"]),
                "resolution": r, "limit": cfg["limit"], "candidates": n}
    done, skipped = 0, []
    if os.path.exists(progress):
        with open(progress) as f:
            state = json.load(f)
        if state["settings"] != settings:
            raise SystemExit(f"prepare_coco: {progress} is from an unfinished run with other settings "
                             f"({state['settings']}); rerun with those, or delete it to start over")
        if os.path.exists(tmp) and os.path.getsize(tmp) == n * row:
            done, skipped = state["done"], [tuple(s) for s in state["skipped"]]
            print(f"resuming at image {done} of {n} ({len(skipped)} skipped so far)")
    if done == 0:
        with open(tmp, "wb") as f:
            f.truncate(n * row)  # sparse: the unwritten rows take no disk
    mm = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=(n, r, r, 3))

    def save():
        mm.flush()  # the rows reach the file before the progress that counts them
        save_json({"settings": settings, "done": done, "skipped": skipped}, progress)

    files = [os.path.join(cfg["images"], name) for _, name, _ in items[done:]]
    try:
        with Pool(cfg["workers"]) as pool:
            results = pool.imap(partial(load_image, resolution=r), files, chunksize=8)
            for i, (arr, reason) in enumerate(tqdm(results, total=n, initial=done, desc=cfg["split"]), start=done):
                if arr is None:
                    skipped.append((i, items[i][1], reason))
                else:
                    mm[i - len(skipped)] = arr
                done = i + 1
                if done % PROGRESS_EVERY == 0:
                    save()
    finally:
        save()  # also on Ctrl-C or an error: a rerun goes on from here
    del mm
    return skipped


def main(argv):
    from common import save_json, update_meta, write_jsonl  # here: common imports torch, which pool workers don't need
    from configurator import configure
    cfg = configure(globals(), argv)
    out, split, r = cfg["out"], cfg["split"], cfg["resolution"]
    if r < 0 or r % 8:
        raise SystemExit(f"prepare_coco: resolution={r} is not a multiple of 8 (the VAE downsamples by 8); "
                         "0 = captions only")
    if cfg["workers"] < 1 or cfg["limit"] < 0:
        raise SystemExit(f"prepare_coco: workers must be >= 1 and limit >= 0 (got {cfg['workers']}, {cfg['limit']})")
    if cfg["prompts"]:  # an FID set's captions only: the images folder is not read
        lines = draw_prompts(load_coco(cfg["annotations"], cfg["limit"]), cfg["prompts"], cfg["seed"])
        path = os.path.join(out, f"{split}_prompts_{cfg['prompts']}_seed{cfg['seed']}.txt")
        os.makedirs(out, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(path + ".tmp", path)
        with open(cfg["annotations"], "rb") as f:
            source = hashlib.sha256(f.read()).hexdigest()
        with open(path, "rb") as f:
            print(f"{path}: {len(lines)} captions, sha256 {hashlib.sha256(f.read()).hexdigest()} "
                  f"(from {cfg['annotations']}, sha256 {source}, seed {cfg['seed']})")
        return
    if r and not os.path.isdir(cfg["images"]):
        raise SystemExit(f"prepare_coco: images folder {cfg['images']} not found")
    items = load_coco(cfg["annotations"], cfg["limit"])
    if not items:
        raise SystemExit(f"prepare_coco: {cfg['annotations']} lists no captioned images")
    paths = {k: os.path.join(out, f"{split}_{name}") for k, name in (("images", "images.u8"), ("captions", "captions.jsonl"),
             ("skipped", "skipped.txt"), ("progress", "progress.json"))}
    tmp = paths["images"] + ".partial"
    if already_done(items, out, split, r, paths):
        print(f"{split}: already done in {out} with these settings; nothing to do")
        return
    os.makedirs(out, exist_ok=True)
    skipped = convert_images(items, cfg, tmp, paths["progress"], save_json) if r else []

    with open(paths["skipped"] + ".tmp", "w") as f:
        f.writelines(f"{name}\t{reason}\n" for _, name, reason in skipped)
    os.replace(paths["skipped"] + ".tmp", paths["skipped"])
    n = len(items) - len(skipped)
    if n == 0:
        for p in (tmp, paths["progress"]):
            os.remove(p)
        raise SystemExit(f"prepare_coco: none of the {len(items)} images could be read (see {paths['skipped']}); "
                         f"is {cfg['images']} the folder of {os.path.basename(cfg['annotations'])}?")
    if r:
        os.truncate(tmp, n * r * r * 3)
        os.replace(tmp, paths["images"])
    elif os.path.exists(paths["images"]):
        os.remove(paths["images"])  # from an earlier run at a resolution; meta.json will say 0 now
    left_out = {i for i, _, _ in skipped}
    write_jsonl([{"id": i, "file_name": name, "captions": caps}
                 for k, (i, name, caps) in enumerate(items) if k not in left_out], paths["captions"])
    update_meta(out, split, n, r, r, source=f"coco:{os.path.basename(cfg['annotations'])}")
    if os.path.exists(paths["progress"]):
        os.remove(paths["progress"])

    print(f"{split}: kept {n} of {len(items)} images, skipped {len(skipped)} (see {paths['skipped']})")
    print(f"  {paths['images']} ({n}, {r}, {r}, 3) uint8" if r else "  no images (resolution=0)")
    print(f"  {paths['captions']}\n  {os.path.join(out, 'meta.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
