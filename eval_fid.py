"""
Evaluate folders of generated images (sample.py's out_dir) against a reference set, in one table:
  FID       Frechet distance of feature statistics: Inception-v3 pool features (the TorchScript network of
            StyleGAN2-ADA / EDM / clean-fid), or, offline on Fashion-MNIST, the features of a small classifier
            (assets/fmnist_classifier.safetensors, the same in every clone): 'fid_fmnist_classifier', never
            comparable with Inception FID;
  IS        the Inception Score, or on Fashion-MNIST 'caption_accuracy': the share of images the classifier
            puts in the class their prompt names (the CLIP score's offline analogue);
  CLIP      (clip_model set) mean cosine of the CLIP embeddings of image and prompt, a fraction (0.31, not 31);
  hf_ratio  the share of spectral power above half-Nyquist over the reference's: 1 = as much fine detail as real
            images (one-step samples tend to be below 1); the radial power spectra go to <out>_spectrum.png.
Reference statistics are cached in cache_dir. Under torchrun the ranks share the feature extraction.

    python eval_fid.py --gen=out/hipa-fmnist/samples,out/base-fmnist/samples   # vs data/fmnist test, offline
    torchrun --nproc_per_node=8 eval_fid.py config/coco30k_eval.py --gen=out/coco30k-hipa,out/coco30k-base
"""
import hashlib
import json
import os
import re
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.special import rel_entr
from tqdm import tqdm

from common import fetch, finite_or_null, images_to_tensor, load_split, save_json, setup_ddp
from prepare_fmnist import CLASSES

# -----------------------------------------------------------------------------
gen = None  # generated images: a folder; several: 'a,b' on the command line, a tuple in a config file
ref = "data/fmnist"  # a prepared data dir (prepare_*.py), a folder of images, or a reference-statistics .npz
ref_split = "test"  # split of a prepared data dir
features = "auto"  # 'inception', 'fmnist' (the classifier trained here) or 'auto' (fmnist for Fashion-MNIST data)
inception = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"  # TorchScript Inception: URL (fetched once into cache_dir) or path
clip_model = None  # CLIP score model: a transformers hub id or folder; None = no CLIP score
resolution_eval = 0  # side all images are resized to (PIL bicubic on uint8) before every metric; 0 = as is
batch_size = 100  # images per forward pass
is_splits = 10  # Inception Score: mean and std over this many splits
workers = 4  # threads decoding image files
cache_dir = "out/eval_cache"  # reference statistics, the Fashion-MNIST classifier, the downloaded Inception
out = None  # metrics.json path; None = <first gen folder>/metrics.json
paired = None  # a folder with the same file names (e.g. the teacher's images from the same noise and prompts): adds each set's mean per-image RMSE to it
spectrum = True  # also plot the radial power spectra of every set and the reference: <out>_spectrum.png
device = "auto"
# -----------------------------------------------------------------------------

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NOT_SAMPLES = {"grid.png", "compare.png", "metrics_spectrum.png"}  # sample.py's and our own pictures
CLF = {"widths": [16, 32, 64, 128], "epochs": 3, "batch_size": 256, "lr": 3e-3, "seed": 0}  # classifier recipe
# The recipe's weights depend on the machine and the thread count (FIDs move by a few tenths), so the repo ships one
# training of it, used wherever the data and recipe match (its metadata 'key'): FID(fmnist-clf) then means the same
# in every clone. Made with one thread on the 2-core CPU machine: with this file moved away, `OMP_NUM_THREADS=1
# python eval_fid.py --gen=<any folder>` trains out/eval_cache/fmnist_classifier_<key>.safetensors (its metadata
# carries the key), copied here.
SHIPPED_CLASSIFIER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "fmnist_classifier.safetensors")

Source = namedtuple("Source", "name n paths array prompts")  # image files (paths) or a (N, H, W, 3) uint8 array


# ----------------------------------------------------------------------------- inputs


def folder_source(folder, need_prompts=None, what="gen"):
    """A folder of images: with sample.py's metadata.jsonl, its files in its order and their prompts; without,
    every image file but the grids (an error if `need_prompts` names a metric that needs the prompts)."""
    if not os.path.isdir(folder):
        raise SystemExit(f"eval error: {what} folder {folder} not found")
    meta, prompts = os.path.join(folder, "metadata.jsonl"), None
    if os.path.exists(meta):
        try:
            with open(meta) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            paths, prompts = [os.path.join(folder, r["file_name"]) for r in rows], [r["prompt"] for r in rows]
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"eval error: {meta} is not sample.py's metadata (JSON lines with file_name, prompt)")
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise SystemExit(f"eval error: {meta} lists {len(missing)} missing images, e.g. {missing[0]}")
        unlisted = sorted(set(f for f in os.listdir(folder) if re.fullmatch(r"\d{6}\.png", f))
                          - set(os.path.basename(p) for p in paths))
        if unlisted:  # images of another run (or of one stopped early) beside this metadata
            raise SystemExit(f"eval error: {folder} holds {len(unlisted)} images that {meta} does not list, e.g. "
                             f"{unlisted[0]}: its images and metadata disagree")
    elif os.path.exists(os.path.join(folder, "settings.json")):  # sample.py writes metadata.jsonl last
        raise SystemExit(f"eval error: {folder} is a sample.py folder without metadata.jsonl: its run did not "
                         "finish (stopped early?); run sample.py again")
    else:
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                       if f.lower().endswith(IMAGE_EXTS) and f not in NOT_SAMPLES)
    if not paths:
        raise SystemExit(f"eval error: {what} folder {folder} has no images")
    if need_prompts and prompts is None:
        raise SystemExit(f"eval error: {folder} has no metadata.jsonl, and {need_prompts} needs each image's prompt")
    return Source(folder, len(paths), paths, None, prompts)


def read_image(path):
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))  # convert decodes the whole file: a truncated one fails here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise SystemExit(" ".join(f"eval error: cannot read image {path} ({type(e).__name__}: {e})".split()))


def resize(batch, side):
    """Clean resizing (clean-fid's point): PIL bicubic on the uint8 images antialiases, a tensor resize aliases,
    and FID moves by whole points with the resizer."""
    if not side or batch.shape[1:3] == (side, side):
        return batch
    return np.stack([np.asarray(Image.fromarray(a).resize((side, side), Image.BICUBIC)) for a in batch])


def prompt_class(prompt):
    """The Fashion-MNIST class a prompt names: the longest class name in it ('a t-shirt' is a t-shirt, not a shirt)."""
    found = [c for c in CLASSES if re.search(r"\b" + re.escape(c), prompt.lower())]
    return CLASSES.index(max(found, key=len)) if found else None


# ----------------------------------------------------------------------------- networks


def load_inception(spec, cache_dir, d):
    """The TorchScript Inception-v3 (inception-2015-12-05.pt) of StyleGAN2-ADA, EDM and clean-fid, a direct
    translation of the TF network behind published FIDs. torch.jit.load runs TorchScript code, not arbitrary
    pickled Python, and this one file is what makes an FID comparable with the literature."""
    path = spec
    if spec.startswith(("http://", "https://")):
        path = os.path.join(cache_dir, os.path.basename(spec))
        if d.master:  # the other ranks wait at the barrier, then read the same file
            try:
                fetch(spec, cache_dir)
            except OSError as e:
                raise SystemExit(f"eval error: cannot download {spec} ({e}); put the file at {path} "
                                 "or pass --inception=<path>")
        if d.ddp:
            dist.barrier()
    if not os.path.isfile(path):
        raise SystemExit(f"eval error: Inception network {path} not found")
    try:
        return torch.jit.load(path, map_location=d.device).eval()
    except RuntimeError as e:
        raise SystemExit(f"eval error: {path} is not a TorchScript file ({str(e).splitlines()[0]})")


class FmnistNet(nn.Module):
    """A small CNN on 32x32 gray images. Its features, the global average pool of the last conv block
    (as Inception's pool3), are what 'FID (fmnist-classifier)' compares."""

    def __init__(self):
        super().__init__()
        layers, prev = [], 1
        for i, w in enumerate(CLF["widths"]):  # 32 -> 16 -> 8 -> 4 pixels
            layers += [nn.Conv2d(prev, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i < len(CLF["widths"]) - 1 else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            prev = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(prev, len(CLASSES))

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def fmnist_input(batch):
    """uint8 RGB (B, H, W, 3) -> the classifier's input, gray (B, 1, 32, 32) in [-1, 1]."""
    return images_to_tensor(resize(batch, 32)).mean(1, keepdim=True)


def train_classifier(images, labels):
    """A FmnistNet after CLF['epochs'] of Adam, one-cycle schedule, seeded (the caller keeps the global RNG)."""
    torch.manual_seed(CLF["seed"])
    net = FmnistNet().train()
    opt = torch.optim.Adam(net.parameters(), CLF["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, CLF["lr"], total_steps=CLF["epochs"] * -(-len(labels) // CLF["batch_size"]))
    for _ in range(CLF["epochs"]):
        perm = torch.randperm(len(labels)).numpy()
        for s in range(0, len(labels), CLF["batch_size"]):
            idx = np.sort(perm[s: s + CLF["batch_size"]])  # sorted: the memmap is read in file order
            loss = F.cross_entropy(net(fmnist_input(images[idx]))[1], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def fmnist_classifier(data_dir, cache_dir):
    """(classifier in eval mode, its test accuracy) for a prepared Fashion-MNIST dir: the shipped one
    (SHIPPED_CLASSIFIER) where it was trained on the same data with the same recipe, else trained once on the train
    split, then loaded from cache_dir (safetensors, keyed by the data's meta.json and the recipe)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with open(os.path.join(data_dir, "meta.json")) as f:
        key = hashlib.sha1(json.dumps([json.load(f), CLF], sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"fmnist_classifier_{key}.safetensors")
    for p in (SHIPPED_CLASSIFIER, path):
        if os.path.exists(p):
            with safe_open(p, "pt") as f:
                meta = f.metadata()
            if p == path or meta.get("key") == key:
                net = FmnistNet()
                net.load_state_dict(load_file(p))
                return net.eval(), float(meta["test_accuracy"])
    t0 = time.time()
    images, rows = load_split(data_dir, "train")
    with torch.random.fork_rng():
        net = train_classifier(images, torch.tensor([r["label"] for r in rows]))
    images, rows = load_split(data_dir, "test")
    with torch.no_grad():
        preds = torch.cat([net(fmnist_input(images[s: s + 1000]))[1].argmax(1) for s in range(0, len(rows), 1000)])
    acc = (preds == torch.tensor([r["label"] for r in rows])).float().mean().item()
    os.makedirs(cache_dir, exist_ok=True)
    save_file(net.state_dict(), path + ".tmp", metadata={"test_accuracy": str(acc), "key": key})
    os.replace(path + ".tmp", path)
    print(f"fmnist classifier: test accuracy {acc:.2%} after {time.time() - t0:.0f}s of training -> {path}")
    return net, acc


def make_extractor(kind, net, device, probs):
    """batch uint8 (B, H, W, 3) -> {'feat': FID features, 'probs' (Inception, if asked) or 'pred' (classifier)}."""
    @torch.no_grad()
    def extract(batch):
        if kind == "fmnist":
            f, logits = net(fmnist_input(batch).to(device))
            return {"feat": f.double().cpu().numpy(), "pred": logits.argmax(1).cpu().numpy()}
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device, torch.float32)  # 0..255: the net normalises
        res = {"feat": net(x, return_features=True).double().cpu().numpy()}  # the 2048-d pool3 features
        if probs:  # softmax without the output bias, as the original IS code (and StyleGAN's) has it
            res["probs"] = net(x, no_output_bias=True).double().cpu().numpy()
        return res
    return extract


def load_clip(spec, device):
    from transformers import CLIPModel, CLIPProcessor
    try:
        return CLIPModel.from_pretrained(spec).eval().to(device), CLIPProcessor.from_pretrained(spec)
    except OSError as e:
        raise SystemExit(f"eval error: cannot load CLIP model '{spec}': {str(e).splitlines()[0]}")


@torch.no_grad()
def clip_cosines(clip, images, prompts, device):
    """Cosine similarity of each image's CLIP embedding and its prompt's."""
    model, processor = clip
    inputs = processor(text=prompts, images=[Image.fromarray(a) for a in images], return_tensors="pt",
                       padding=True, truncation=True).to(device)
    out = model(**inputs)
    return (F.normalize(out.image_embeds, dim=-1) * F.normalize(out.text_embeds, dim=-1)).sum(-1).double().cpu().numpy()


# ----------------------------------------------------------------------------- metrics


def power_spectrum(batch):
    """Summed 2D power spectrum (H, W) of the gray images of a uint8 batch, mean removed and Hann-windowed
    (so that the jump at the image border adds no cross of high frequencies)."""
    g = batch.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    g = (g - g.mean(axis=(1, 2), keepdims=True)) * np.outer(np.hanning(g.shape[1]), np.hanning(g.shape[2]))
    return (np.abs(np.fft.fft2(g)) ** 2).sum(0)


def radius(h, w):
    """Radial frequency of each FFT bin, 1 = Nyquist."""
    fy, fx = np.meshgrid(np.fft.fftfreq(h) / 0.5, np.fft.fftfreq(w) / 0.5, indexing="ij")
    return np.hypot(fy, fx)


def hf_share(power):
    """The share of the (non-DC) power above half-Nyquist."""
    r = radius(*power.shape)
    return float(power[r > 0.5].sum() / power[r > 0].sum())


def radial_profile(power, n):
    """(frequencies, mean power per image and pixel) in min(H, W) / 2 rings up to Nyquist (not the corners)."""
    h, w = power.shape
    bins = min(h, w) // 2
    ring = np.minimum((radius(h, w) * bins).astype(int), bins).ravel()
    total, count = np.bincount(ring, power.ravel(), bins + 1), np.bincount(ring, None, bins + 1)
    return (np.arange(bins) + 0.5) / bins, total[:bins] / np.maximum(count[:bins], 1) / (n * h * w)


def feature_stats(feat):
    return feat.mean(0), np.cov(feat, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2); the square root's tiny imaginary part is numerical noise."""
    covmean = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs, splits):
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's mean prediction."""
    scores = [np.exp(rel_entr(p, p.mean(0, keepdims=True)).sum(1).mean())
              for p in np.array_split(probs, min(splits, len(probs)))]
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- one set through the networks


def scan(src, extract, clip, o, d, pool, paired=None):
    """Rank r takes images r::world of a set; returns, on every rank, all ranks' per-image outputs in the set's
    order, the summed power spectrum and the image size. An error on any rank is raised on all, after the
    gather, so that no rank waits forever."""
    mine = list(range(d.rank, src.n, d.world_size))
    local = {"index": np.array(mine, dtype=np.int64), "out": {}, "power": 0.0, "size": None, "error": None}
    batches = [mine[s: s + o.batch_size] for s in range(0, len(mine), o.batch_size)]

    def start_reading(k):
        """Batch k's files (and their paired twins), handed to the pool now: decoded while the networks run on the
        batch before (pool.map submits at once; its results wait in the futures)."""
        if src.array is not None or k == len(batches):
            return None, None
        names = [src.paths[i] for i in batches[k]]
        twins = [os.path.join(paired, os.path.basename(n)) for n in names] if paired else []
        return pool.map(read_image, names), pool.map(read_image, twins)
    try:
        reading = start_reading(0)
        for k, idx in enumerate(tqdm(batches, desc=src.name, disable=not d.master, leave=False)):
            names = [src.paths[i] for i in idx] if src.array is None else idx
            images = list(reading[0]) if src.array is None else list(src.array[idx])
            twin_images = list(reading[1]) if paired else None
            reading = start_reading(k + 1)  # one batch ahead: memory holds two batches at most
            for a, name in zip(images, names):
                if local["size"] is None:
                    local["size"], local["first"] = a.shape[:2], name
                elif a.shape[:2] != local["size"]:
                    raise SystemExit(f"eval error: images of different sizes in {src.name}: {local['first']} is "
                                     f"{local['size'][1]}x{local['size'][0]}, {name} is {a.shape[1]}x{a.shape[0]}")
            raw = np.stack(images)
            x = resize(raw, o.resolution_eval)
            res = extract(x)
            if clip is not None:  # on the images as generated: CLIP's processor resizes them itself
                res["clip"] = clip_cosines(clip, raw, [src.prompts[i] for i in idx], d.device)
            if paired:  # the same images made another way, e.g. by the teacher: how far is each from its twin
                twins = np.stack(twin_images)
                if twins.shape != raw.shape:
                    raise SystemExit(f"eval error: {paired} has images of another size than {src.name}")
                res["paired_rmse"] = np.sqrt(((raw / 255.0 - twins / 255.0) ** 2).mean(axis=(1, 2, 3)))
            for k, v in res.items():
                local["out"].setdefault(k, []).append(v)
            local["power"] = local["power"] + power_spectrum(x)
    except SystemExit as e:
        local["error"] = str(e)
    parts = [local]
    if d.ddp:
        parts = [None] * d.world_size
        dist.all_gather_object(parts, local)
    for p in parts:
        if p["error"]:
            raise SystemExit(p["error"])
    parts = [p for p in parts if p["size"] is not None]  # not the ranks left without images
    for p in parts[1:]:
        if p["size"] != parts[0]["size"]:
            raise SystemExit(f"eval error: images of different sizes in {src.name}: {parts[0]['first']} and {p['first']}")
    order = np.argsort(np.concatenate([p["index"] for p in parts]))
    result = {k: np.concatenate([np.concatenate(p["out"][k]) for p in parts])[order] for k in parts[0]["out"]}
    return {**result, "n": src.n, "size": list(parts[0]["size"]), "power": sum(p["power"] for p in parts)}


# ----------------------------------------------------------------------------- the reference


def reference_kind(ref, split, features):
    """('data' | 'folder' | 'npz', feature kind) of a reference, checked to exist."""
    if features not in ("auto", "inception", "fmnist"):
        raise SystemExit(f"eval error: features must be 'auto', 'inception' or 'fmnist', not '{features}'")
    if os.path.isfile(os.path.join(ref, "meta.json")):
        load_split(ref, split, need_images=False)  # the split is there
        with open(os.path.join(ref, "meta.json")) as f:
            fmnist = json.load(f).get("source") == "fashion-mnist"
        return "data", features if features != "auto" else ("fmnist" if fmnist else "inception")
    if not (os.path.isdir(ref) or ref.endswith(".npz") and os.path.isfile(ref)):
        raise SystemExit(f"eval error: reference {ref} not found (a prepared data dir, a folder of images or a .npz)")
    if features == "fmnist":
        raise SystemExit(f"eval error: features='fmnist' needs ref = a prepared Fashion-MNIST dir (the classifier "
                         f"trains on its train split), not {ref}")
    return ("npz" if ref.endswith(".npz") else "folder"), "inception"


def reference_stats(o, what, kind, net_id, extract, d, pool):
    """{mu, sigma, n, hf_share, freqs, profile} of the reference: a given .npz (EDM's and clean-fid's hold just
    mu and sigma), or computed once and cached, keyed by the reference, split, features and resolution."""
    if what == "npz":
        with np.load(o.ref) as z:
            stats = {k: z[k] for k in z.files}
        if str(stats.get("features", "inception")) != kind:
            raise SystemExit(f"eval error: {o.ref} holds {stats['features']} statistics, not {kind}")
        return stats
    if what == "data":
        images = load_split(o.ref, o.ref_split)[0]
        src = Source(f"{o.ref}:{o.ref_split}", len(images), None, images, None)
        stamp = os.path.getmtime(os.path.join(o.ref, f"{o.ref_split}_images.u8"))
    else:
        src = folder_source(o.ref, what="reference")
        stamp = [src.n, max(os.path.getmtime(p) for p in src.paths)]
    key = json.dumps([os.path.abspath(o.ref), o.ref_split, stamp, kind, net_id, o.resolution_eval])
    path = os.path.join(o.cache_dir, f"ref_{kind}_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
    if os.path.exists(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    res = scan(src, extract, None, o, d, pool)
    mu, sigma = feature_stats(res["feat"])
    freqs, profile = radial_profile(res["power"], res["n"])
    stats = {"mu": mu, "sigma": sigma, "n": res["n"], "features": kind, "resolution_eval": o.resolution_eval,
             "hf_share": hf_share(res["power"]), "freqs": freqs, "profile": profile}
    if d.master:
        os.makedirs(o.cache_dir, exist_ok=True)
        np.savez(path + ".tmp.npz", **stats)
        os.replace(path + ".tmp.npz", path)
    return stats


# ----------------------------------------------------------------------------- evaluate, report


def evaluate(gen_dirs, ref, d=None, **options):
    """Evaluate folders of generated images (a list, or 'a,b') against `ref`. options: this script's config keys,
    defaults as above; d: common.setup_ddp's result (None: set up here). Rank 0 prints the table, writes
    metrics.json (and the spectrum plot) and returns one dict per folder; the other ranks return []."""
    from configurator import config_keys, unknown
    keys = config_keys(__file__)
    for k in options:
        if k not in keys:
            raise unknown(k, keys)
    o = SimpleNamespace(**{**{k: v for k, (v, _) in keys.items()}, **options, "ref": ref})
    gen_dirs = [str(g) for g in (gen_dirs.split(",") if isinstance(gen_dirs, str) else gen_dirs or []) if g]
    if not gen_dirs:
        raise SystemExit("eval error: no generated images given (--gen=<folder> or --gen=<folder>,<folder>)")
    d = d or setup_ddp(o.device)
    t0 = time.time()

    # the cheap checks first: bad input fails in seconds, before a network loads or anything is written
    what, kind = reference_kind(ref, o.ref_split, o.features)
    sets = [folder_source(g, "caption accuracy" if kind == "fmnist" else "CLIP score" if o.clip_model else None)
            for g in gen_dirs]
    classes = [np.array([prompt_class(p) for p in s.prompts]) for s in sets] if kind == "fmnist" else []
    for s, c in zip(sets, classes):  # the class each prompt names, for caption accuracy
        for path, p, k in zip(s.paths, s.prompts, c):
            if k is None:
                raise SystemExit(f"eval error: the prompt of {path} ('{p}') names no Fashion-MNIST class")

    if kind == "fmnist":
        if d.ddp:  # rank 0 trains it once (where it is not shipped or cached) while the other ranks wait
            if d.master:
                fmnist_classifier(ref, o.cache_dir)
            dist.barrier()
        net, acc = fmnist_classifier(ref, o.cache_dir)
        net, net_id = net.to(d.device), {"classifier": CLF, "test_accuracy": acc}
    else:
        net = load_inception(o.inception, o.cache_dir, d)
        net_id = o.inception if "://" in o.inception else os.path.abspath(o.inception)
    clip = load_clip(o.clip_model, d.device) if o.clip_model else None
    with ThreadPoolExecutor(o.workers) as pool:
        scans = [scan(s, make_extractor(kind, net, d.device, probs=True), clip, o, d, pool, o.paired) for s in sets]
        r = reference_stats(o, what, kind, net_id, make_extractor(kind, net, d.device, probs=False), d, pool)
    if not d.master:
        return []

    rows = []
    curves = [(f"reference {os.path.basename(os.path.normpath(ref))}", r["freqs"], r["profile"])] if "profile" in r else []
    for i, (s, res) in enumerate(zip(sets, scans)):
        row = {"gen": s.name, "n": s.n, "size": res["size"]}
        fid = frechet_distance(*feature_stats(res["feat"]), r["mu"], r["sigma"]) if s.n > 1 else None
        if kind == "inception":
            row["fid"] = fid
            row["inception_score"], row["inception_score_std"] = inception_score(res["probs"], o.is_splits)
        else:
            row["fid_fmnist_classifier"] = fid
            row["caption_accuracy"] = float((res["pred"] == classes[i]).mean())
        if clip is not None:
            row["clip_score"] = float(res["clip"].mean())
        if o.paired:
            row["rmse_to_paired"] = float(res["paired_rmse"].mean())
        timing = os.path.join(s.name, "timing.json")  # written by sample.py
        if os.path.exists(timing):
            with open(timing) as f:
                row["seconds_per_image"] = json.load(f)["seconds_per_image"]
        row["hf_share"] = hf_share(res["power"])
        row["hf_ratio"] = row["hf_share"] / float(r["hf_share"]) if "hf_share" in r else None
        rows.append(row)
        curves.append((s.name, *radial_profile(res["power"], s.n)))

    bad = [row["gen"] for row in rows if finite_or_null(row) != row]
    rows = [finite_or_null(row) for row in rows]  # (valid JSON: null, not a bare NaN)
    out_path = o.out or os.path.join(gen_dirs[0], "metrics.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    plot = os.path.splitext(out_path)[0] + "_spectrum.png" if o.spectrum else None
    if plot:
        plot_spectra(curves, plot)
    feature_label = "inception" if kind == "inception" else "fmnist-classifier (NOT Inception FID)"
    ref_n = int(r["n"]) if "n" in r else None  # EDM's and clean-fid's .npz don't say
    save_json({"ref": ref, "ref_split": o.ref_split if what == "data" else None, "ref_n": ref_n,
               "features": feature_label, "feature_network": net_id,
               "resolution_eval": o.resolution_eval, "clip_model": o.clip_model, "paired": o.paired,
               "ref_hf_share": float(r["hf_share"]) if "hf_share" in r else None, "spectrum": plot,
               "results": rows}, out_path)
    print_table(rows, kind, net_id, f"{ref} ({ref_n or '?'} images)")
    print(f"wrote {out_path}" + (f" and {plot}" if plot else "") + f" ({time.time() - t0:.0f}s)")
    if bad:
        raise SystemExit(f"eval error: non-finite metrics (written as null) for {', '.join(bad)}: constant images "
                         "(all black: a NaN model?) or non-finite features")
    return rows


def print_table(rows, kind, net_id, ref):
    if kind == "fmnist":
        print(f"FID on the features of the small Fashion-MNIST classifier (test accuracy {net_id['test_accuracy']:.2%}): "
              f"comparable only with other fmnist-classifier FIDs, never with Inception FID. Reference: {ref}")
        cols = [("FID(fmnist-clf)", "fid_fmnist_classifier", "{:.3f}"), ("caption acc", "caption_accuracy", "{:.1%}")]
    else:
        print(f"FID on Inception-v3 features ({os.path.basename(net_id)}). Reference: {ref}")
        cols = [("FID(Inception)", "fid", "{:.2f}"), ("IS", "inception_score", "{:.2f}")]
    cols += [("CLIP score", "clip_score", "{:.4f}")] if "clip_score" in rows[0] else []
    cols += [("hf_ratio", "hf_ratio", "{:.3f}")]
    cols += [("RMSE to paired", "rmse_to_paired", "{:.4f}")] if "rmse_to_paired" in rows[0] else []
    cols += [("s / image", "seconds_per_image", "{:.2e}")] if any("seconds_per_image" in r for r in rows) else []
    width = max(3, *(len(r["gen"]) for r in rows))
    print(f"{'set':<{width}} {'n':>7}" + "".join(f" {h:>15}" for h, _, _ in cols))
    for r in rows:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "-" for _, k, fmt in cols]
        print(f"{r['gen']:<{width}} {r['n']:>7}" + "".join(f" {c:>15}" for c in cells))


def plot_spectra(curves, path):
    """[(label, frequencies, profile)] -> one PNG of log power against frequency, the reference in black."""
    from matplotlib.figure import Figure  # not pyplot: no global state, no display needed
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for label, x, p in curves:
        ax.semilogy(x, p, label=label, **({"color": "k", "lw": 2} if label.startswith("reference") else {"lw": 1.2}))
    ax.axvline(0.5, color="gray", ls=":", lw=1)  # hf_ratio compares the power right of this line
    ax.set(xlabel="radial frequency (1 = Nyquist)", ylabel="power (mean per image and pixel)",
           title="radial power spectrum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)


def main(argv):
    from configurator import configure
    cfg = configure(globals(), argv, print_config=int(os.environ.get("RANK", 0)) == 0)
    d = setup_ddp(cfg["device"])
    try:
        evaluate(cfg.pop("gen"), cfg.pop("ref"), d=d, **cfg)
    finally:
        if d.ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
