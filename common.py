"""
Plumbing that the trainers, the sampler and the evaluator all need, kept once here:
the prepared-data format, loading an SD-format model, prompt encoding, the x0 formula,
DDIM sampling, DDP set-up, atomic checkpoint I/O, the torch.compile gradient check, image grids.
The methods themselves live in their own files (hipa.py, d2o.py, pretrain.py).
"""
import atexit
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
import urllib.request
import weakref
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

DATA_VERSION = 1

# ----------------------------------------------------------------------------- data format
# data/<name>/<split>_images.u8 (N, H, W, 3) uint8, <split>_captions.jsonl, meta.json


def update_meta(out, split, n, h, w, source):
    """Record one split in out/meta.json (other splits are kept)."""
    path = os.path.join(out, "meta.json")
    meta = {"version": DATA_VERSION, "source": source, "splits": {}}
    if os.path.exists(path):
        with open(path) as f:
            meta = json.load(f)
    meta["splits"][split] = {"N": int(n), "H": int(h), "W": int(w)}
    save_json(meta, path)


def write_split(out, split, images, rows, source):
    """Write a whole split held in memory: images (N, H, W, 3) uint8 and one caption row per image."""
    os.makedirs(out, exist_ok=True)
    n, h, w, c = images.shape
    assert c == 3 and images.dtype == np.uint8 and len(rows) == n
    path = os.path.join(out, f"{split}_images.u8")
    images.tofile(path + ".tmp")
    os.replace(path + ".tmp", path)
    write_jsonl(rows, os.path.join(out, f"{split}_captions.jsonl"))
    update_meta(out, split, n, h, w, source)


def load_split(root, split="train", need_images=True):
    """(images memmap (N, H, W, 3) uint8 or None, caption rows) of a prepared split."""
    meta_path = os.path.join(root, "meta.json")
    if not os.path.exists(meta_path):
        raise SystemExit(f"data error: {meta_path} not found; run prepare_fmnist.py or prepare_coco.py first")
    with open(meta_path) as f:
        meta = json.load(f)
    if split not in meta.get("splits", {}):
        raise SystemExit(f"data error: split '{split}' not in {root} (have {sorted(meta.get('splits', {}))})")
    m = meta["splits"][split]
    with open(os.path.join(root, f"{split}_captions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    if len(rows) != m["N"]:
        raise SystemExit(f"data error: {root}/{split}_captions.jsonl has {len(rows)} rows, meta.json says {m['N']}")
    images = None
    if need_images:
        path = os.path.join(root, f"{split}_images.u8")
        if not os.path.exists(path) or os.path.getsize(path) != m["N"] * m["H"] * m["W"] * 3:
            raise SystemExit(f"data error: {path} is missing or not {m['N']}x{m['H']}x{m['W']}x3 bytes")
        images = np.memmap(path, dtype=np.uint8, mode="r", shape=(m["N"], m["H"], m["W"], 3))
    return images, rows


def images_to_tensor(images_u8):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.array(images_u8)).permute(0, 3, 1, 2).float()  # np.array: a copy, memmaps are read-only
    return x / 127.5 - 1


def write_jsonl(rows, path):
    with open(path + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def save_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- models


# The families this repository loads, from the pipeline class in the model's model_index.json (diffusers'
# save_pretrained writes it; without one, the folders decide). Everything else is refused in one line.
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
            "StableDiffusionInpaintPipeline": "sd", "StableDiffusionUpscalePipeline": "sd",
            "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
            "StableDiffusionXLInpaintPipeline": "sdxl"}
SUPPORTED = ("SD 1.x / 2.x (StableDiffusionPipeline, its inpainting and x4 upscaler) and SDXL "
             "(StableDiffusionXLPipeline, its inpainting)")
PARTS = {"sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
         "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}

# The text side of a model: its tokenizers and text encoders (one of each for SD 1.x/2.x; two for SDXL, CLIP ViT-L
# and OpenCLIP ViT-bigG with projection) and whether guidance's unconditional branch is zeros instead of the
# encoded empty prompt (the SDXL pipelines' force_zeros_for_empty_prompt, true for SDXL base).
Text = namedtuple("Text", "tokenizers encoders zero_uncond")


@dataclass
class Cond:
    """The text conditioning of a batch: everything a UNet call takes besides x and t, and what D2O's
    discriminator reads. hidden (B, L, D): what the UNet cross-attends to. pooled (B, P): one vector per prompt
    (SD: CLIP's pooled output, read only by D2O's discriminator; SDXL: text_encoder_2's projected text_embeds,
    which its UNet also takes). time_ids (B, 6): SDXL's size conditioning (original size, crop top-left, target
    size); None for SD 1.x/2.x, whose UNet takes neither."""
    hidden: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor = None

    def map(self, fn):
        return Cond(fn(self.hidden), fn(self.pooled), None if self.time_ids is None else fn(self.time_ids))

    def to(self, *args, **kwargs):
        return self.map(lambda t: t.to(*args, **kwargs))

    def __getitem__(self, index):
        return self.map(lambda t: t[index])

    def expand(self, n):
        return self.map(lambda t: t.expand(n, *t.shape[1:]))

    def __len__(self):
        return len(self.hidden)

    @property
    def dtype(self):
        return self.hidden.dtype

    @staticmethod
    def cat(conds):
        return Cond(*(None if parts[0] is None else torch.cat(parts)
                      for parts in zip(*((c.hidden, c.pooled, c.time_ids) for c in conds))))

    def unet_kwargs(self):
        added = None if self.time_ids is None else {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": added}


def is_sdxl(unet):
    """SDXL's UNet takes the pooled text and the size as an added embedding ('text_time')."""
    return unet.config.get("addition_embed_type") == "text_time"


def is_hub_id(path):
    """ORG/NAME that is not a local folder is a hub id: from_pretrained finds it in the HF cache (HF_HOME), or
    downloads it unless HF_HUB_OFFLINE=1. Anything else is a folder."""
    return not os.path.isdir(path) and not path.startswith((".", "/")) and path.count("/") == 1


def read_model_index(path, hub_id):
    """The model's model_index.json as a dict ({} where it has none, or a hub id's is not in the local cache)."""
    try:
        if hub_id:
            from huggingface_hub import hf_hub_download
            path = os.path.dirname(hf_hub_download(path, "model_index.json"))
        with open(os.path.join(path, "model_index.json")) as f:
            return json.load(f)
    except (OSError, ValueError):  # the parts' own loading errors say the rest
        return {}


def model_family(path, hub_id):
    """('sd' or 'sdxl', zero_uncond), found from the model itself (its pipeline class, else its folders); one clear
    line for a family this repository does not load. zero_uncond: guidance's unconditional branch is zeros (the
    SDXL pipelines' force_zeros_for_empty_prompt, their default: true)."""
    index = read_model_index(path, hub_id)
    kind = index.get("_class_name")
    if kind is None:  # a folder of parts: SDXL has a second text encoder; SD3, FLUX, PixArt a transformer
        if not hub_id and os.path.isdir(os.path.join(path, "transformer")):
            raise SystemExit(f"model error: {path} holds a transformer, not a UNet (SD3, FLUX, PixArt?); "
                             f"supported: {SUPPORTED}")
        sdxl = not hub_id and os.path.isdir(os.path.join(path, "text_encoder_2"))
        return ("sdxl", True) if sdxl else ("sd", False)
    if kind not in FAMILIES:
        raise SystemExit(f"model error: {path} is a {kind}, which this repository does not load; supported: "
                         f"{SUPPORTED}")
    if FAMILIES[kind] == "sdxl" and (index.get("requires_aesthetics_score") or index.get("text_encoder", [None])[0]
                                     is None):
        raise SystemExit(f"model error: {path} is an SDXL refiner-style {kind} (one text encoder, aesthetic-score "
                         f"conditioning), which this repository does not load; supported: {SUPPORTED}")
    return FAMILIES[kind], FAMILIES[kind] == "sdxl" and index.get("force_zeros_for_empty_prompt", True)


def load_sd(path, device="cpu", dtype=torch.float32):
    """(text, vae, unet, scheduler) of an SD 1.x/2.x or SDXL model, hub id or local folder, the family found
    from the model. All frozen (requires_grad False, eval mode). text: Text (tokenizers, encoders, zero_uncond).
    The scheduler is DDIM with trailing spacing (1 step starts at t=T-1, not at the legacy 'leading' t=1) and a
    final alpha of 1 (the last step returns x0, not x0 re-noised to t=0); the model's own noise schedule and
    prediction type are kept (SDXL ships an Euler scheduler with SD's betas: the same alphas_cumprod)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from huggingface_hub import constants
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    path = os.path.expanduser(path)
    hub_id = is_hub_id(path)
    family, zero_uncond = model_family(path, hub_id)
    if not hub_id:
        missing = [d for d in PARTS[family] if not os.path.isdir(os.path.join(path, d))]
        if missing:
            raise SystemExit(f"model error: {path} is not an {'SDXL' if family == 'sdxl' else 'SD'}-format folder "
                             f"(missing {', '.join(missing)})")
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)]
        if family == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                        torch_dtype=dtype))
        # SDXL's VAE overflows in fp16 (force_upcast in its config; diffusers' SDXL pipeline upcasts it to decode):
        # it is loaded in fp32 when fp16 is asked for. (SD's: sample.py and bench.py decode in fp32 anyway.)
        vae_config = AutoencoderKL.load_config(path, subfolder="vae")
        vae_dtype = torch.float32 if family == "sdxl" and dtype == torch.float16 and vae_config.get(
            "force_upcast", True) else dtype
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", timestep_spacing="trailing",
                                                  set_alpha_to_one=True)
    except OSError as e:  # the hub's errors (not cached, offline, no such repo, HTTP) are all OSErrors
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if hub_id:
            why = (f"no such local folder, and not in the local Hugging Face cache ({constants.HF_HUB_CACHE}): "
                   + ("HF_HUB_OFFLINE=1 forbids downloading" if constants.HF_HUB_OFFLINE else "the download failed")
                   + f" ({why})")
        raise SystemExit(f"model error: cannot load '{path}': {why}")
    if is_sdxl(unet) != (family == "sdxl"):
        raise SystemExit(f"model error: {path}'s UNet is {'' if is_sdxl(unet) else 'not '}an SDXL UNet, but the "
                         f"model is laid out as {'SDXL' if family == 'sdxl' else 'SD 1.x/2.x'}")
    for m in (*encoders, vae, unet):
        m.requires_grad_(False).eval().to(device)
    text = Text(tuple(tokenizers), tuple(encoders), zero_uncond)
    return text, vae, fp32_output(unet), scheduler


class FP32Conv2d(torch.nn.Conv2d):
    """A Conv2d that computes in fp32 whatever the autocast or the weights' dtype (see fp32_output)."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return self._conv_forward(x.float(), self.weight.float(), bias)


def fp32_output(unet):
    """Keep the UNet's last layer (conv_out) and its output in fp32, so that the output is never rounded to
    bf16/fp16: the epsilon x0 formula at t=999 divides it by sqrt(alphas_cumprod[999]) = 0.068 (SD), which
    multiplies a bf16 rounding error of 2^-9 by 14.6. The class swap keeps the state-dict keys and survives
    deepcopy; call it again after casting the UNet to another dtype."""
    unet.conv_out.__class__ = FP32Conv2d
    for p in unet.conv_out.parameters():
        p.data = p.data.float()  # (not .float(): Module._apply cannot swap the fake tensors of estimate_memory)
    return unet


def encode_prompts(text, prompts, size=None):
    """Prompts -> Cond, as diffusers' pipelines encode them. SD 1.x/2.x: the text encoder's last hidden states
    and its pooled output. SDXL (StableDiffusionXLPipeline.encode_prompt): both encoders' penultimate hidden
    states concatenated (768 + 1280 = 2048 on SDXL base), text_encoder_2's projected text_embeds, and the time ids
    of plain generation at size = (height, width) of the images: original size, crop top-left (0, 0), target
    size. A prompt longer than the tokenizer's max length is truncated, with diffusers' warning."""
    ids = [tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids for tokenizer in text.tokenizers]
    tokenizer = text.tokenizers[0]  # (SDXL's second tokenizer has the same vocabulary: one warning)
    whole = tokenizer(list(prompts), padding="longest", return_tensors="pt").input_ids
    if whole.shape[-1] > ids[0].shape[-1]:
        removed = tokenizer.batch_decode(whole[:, tokenizer.model_max_length - 1: -1])
        print(f"warning: the following part of your input was truncated because CLIP can only handle sequences "
              f"up to {tokenizer.model_max_length} tokens: {removed}", file=sys.stderr)
    return encode_ids(text, ids, size)


@torch.no_grad()
def encode_ids(text, ids, size=None):
    """encode_prompts from token ids (one (B, L) tensor per tokenizer)."""
    if len(text.encoders) == 1:  # SD 1.x/2.x
        out = text.encoders[0](ids[0].to(text.encoders[0].device))
        return Cond(out.last_hidden_state, out.pooler_output)
    assert size is not None, "SDXL's conditioning needs the images' size"
    outs = [e(i.to(e.device), output_hidden_states=True) for e, i in zip(text.encoders, ids)]
    hidden = torch.cat([o.hidden_states[-2] for o in outs], -1)
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=hidden.dtype, device=hidden.device)
    return Cond(hidden, outs[-1].text_embeds, time_ids.expand(len(hidden), -1))


def empty_cond(text, size=None):
    """Guidance's unconditional branch for one image (Cond.expand it): the encoded empty prompt, or zeros (the
    time ids kept) where the model's pipeline sets force_zeros_for_empty_prompt (SDXL base), as diffusers does."""
    c = encode_prompts(text, [""], size)
    return Cond(torch.zeros_like(c.hidden), torch.zeros_like(c.pooled), c.time_ids) if text.zero_uncond else c


def guidance_text(text, size=None):
    """What the generation paths carry: (Text, the unconditional Cond of one image, the images' (height, width)),
    the unconditional branch computed once."""
    return text, empty_cond(text, size), size


def prompt_conds(gtext, prompts, dtype=None):
    """(cond, uncond) of a batch of prompts for guided_unet, from guidance_text's triple, in `dtype`."""
    text, uncond1, size = gtext
    cond = encode_prompts(text, prompts, size)
    dtype = dtype or cond.dtype
    return cond.to(dtype), uncond1.expand(len(prompts)).to(dtype)


def predict_x0_eps(model_out, x_t, alpha_bar, prediction_type):
    """(x0, eps) from a UNet output at noise level alpha_bar = alphas_cumprod[t], for
    x_t = sqrt(a) x0 + sqrt(1-a) eps. Epsilon models: x0 = (x_t - sqrt(1-a) eps) / sqrt(a);
    v models (v = sqrt(a) eps - sqrt(1-a) x0): x0 = sqrt(a) x_t - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x_t."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=x_t.device)
    model_out = model_out.float()
    x_t = x_t.float()
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * model_out) / a.sqrt(), model_out
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * model_out, a.sqrt() * model_out + (1 - a).sqrt() * x_t
    raise SystemExit(f"model error: prediction_type '{prediction_type}' is not supported (epsilon, v_prediction)")


def guided_unet(unet, x, t, cond, uncond, guidance, image_input=None, class_labels=None):
    """UNet output (fp32) with classifier-free guidance: uncond + w (cond - uncond), both in one batched call.
    guidance <= 1 (or uncond None) is a plain conditional call. The inpainting and x4 tasks (task_input) add
    image_input, channels appended to the latents (mask + masked-image latents, or the noised low-res image),
    and class_labels (the x4's noise level); guidance repeats them for the unconditional half."""
    if image_input is not None:
        x = torch.cat([x, image_input.to(x.dtype)], 1)
    if uncond is None or guidance == 1:
        return unet(x, t, **cond.unet_kwargs(), class_labels=class_labels).sample.float()
    labels = None if class_labels is None else torch.cat([class_labels, class_labels])
    out = unet(torch.cat([x, x]), t, **Cond.cat([uncond, cond]).unet_kwargs(), class_labels=labels).sample.float()
    out_uncond, out_cond = out.chunk(2)  # combined in fp32: under bf16 autocast the difference would be rounded
    return out_uncond + guidance * (out_cond - out_uncond)


def seeded_noise(indices, shape, base_seed):
    """x_T for items `indices`: item k always gets the noise of seed base_seed + k, whatever the batch or rank."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(base_seed + int(k)))
                        for k in indices])


def one_step_x0(unet, scheduler, x_T, cond, uncond, w, image_input=None, class_labels=None, init_latents=None,
                strength=1.0):
    """The one-step generator of both methods, in latent space: one guided UNet call at t = T-1 (999 for SD)
    from pure noise, then the x0 formula of the model's prediction type. Editing (init_latents): the call is at
    t = strength x T - 1 on init_latents noised with x_T, as ddim_sample's one step (with gradients here)."""
    t = int(round(strength * scheduler.config.num_train_timesteps)) - 1
    a = scheduler.alphas_cumprod[t]
    x = x_T if init_latents is None else a.sqrt() * init_latents + (1 - a).sqrt() * x_T
    out = guided_unet(unet, x.to(cond.dtype), t, cond, uncond, w, image_input, class_labels)
    return predict_x0_eps(out, x, a, scheduler.config.prediction_type)[0]


@torch.no_grad()
def ddim_sample(unet, scheduler, x_T, cond, uncond, steps, guidance, image_input=None, class_labels=None,
                init_latents=None, strength=1.0):
    """Deterministic DDIM (eta 0) from x_T to x0 latents with diffusers' own DDIMScheduler.step, so that it
    equals StableDiffusionPipeline with the same scheduler. With the scheduler from load_sd (trailing spacing,
    final alpha 1) steps=1 is exactly the one-step x0 at t=T-1, and the last step of N lands on x0.
    Editing (SDEdit, strength < 1): init_latents noised with x_T to t = strength x T by the model's schedule,
    then `steps` DDIM steps spaced (trailing) below it; steps=1 is one UNet call returning x0. diffusers' step
    assumes its own spacing T / steps, so these steps apply the same DDIM update (eta 0) themselves."""
    scheduler.set_timesteps(steps)
    x = x_T.float()
    if init_latents is None and strength == 1:
        for t in scheduler.timesteps:
            out = guided_unet(unet, x.to(unet.dtype), t.to(x.device), cond, uncond, guidance, image_input,
                              class_labels)
            x = scheduler.step(out.float(), t, x).prev_sample
        return x
    start = strength * scheduler.config.num_train_timesteps
    timesteps = [int(round(start - i * start / steps)) - 1 for i in range(steps)] + [-1]  # -1: x0 (alpha 1)
    a = lambda t: scheduler.alphas_cumprod[t].to(x.device) if t >= 0 else torch.tensor(1.0, device=x.device)
    x = a(timesteps[0]).sqrt() * init_latents.float() + (1 - a(timesteps[0])).sqrt() * x  # q(x_t | x_0)
    for t, t_prev in zip(timesteps, timesteps[1:]):
        out = guided_unet(unet, x.to(unet.dtype), torch.tensor(t, device=x.device), cond, uncond, guidance,
                          image_input, class_labels)
        x0, eps = predict_x0_eps(out, x, a(t), scheduler.config.prediction_type)
        x = a(t_prev).sqrt() * x0 + (1 - a(t_prev)).sqrt() * eps
    return x


def vae_factor(vae):
    """Image side / latent side of an SD VAE (8 for SD, 4 for the tiny one); for the x4 upscaler also its upscale
    factor (StableDiffusionUpscalePipeline's latents have the low-res image's size)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae, unet, height=0, width=0):
    """(C, h, w) of the UNet's latents for images of height x width (0: the model's native size), or
    SystemExit if the size does not survive the VAE's and the UNet's downsampling."""
    factor = vae_factor(vae)
    multiple = factor * 2 ** (len(unet.config.block_out_channels) - 1)
    height, width = height or unet.config.sample_size * factor, width or unet.config.sample_size * factor
    if height % multiple or width % multiple:
        raise SystemExit(f"config error: image size {height}x{width} must be a multiple of {multiple} for this model "
                         f"(VAE factor {factor} x UNet downsampling)")
    return unet.config.out_channels, height // factor, width // factor  # (the inpainting UNet takes 9 in)


def decode(vae, latents, clamp="hard"):
    """Latents (scaled as the UNet sees them) -> images in [0, 1], decoded in the VAE's dtype, returned fp32.
    clamp: 'hard' (no gradient through saturated pixels), 'straight_through' (the clamped values with the
    unclamped gradient) or 'none'."""
    z = latents / vae.config.scaling_factor
    x = vae.decode(z.to(vae.dtype)).sample.float() / 2 + 0.5
    if clamp == "none":
        return x
    return x.clamp(0, 1) if clamp == "hard" else x + (x.clamp(0, 1) - x).detach()


def encode(vae, images):
    """Images in [-1, 1] -> latents scaled as the UNet sees them (the posterior mean: deterministic), fp32."""
    return vae.encode(images.to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor


# ----------------------------------------------------------------------------- tasks: editing, inpainting, x4
# The pipeline kind follows from the model: the UNet's input channels, as diffusers' pipelines lay them out.
# t2i (StableDiffusionPipeline, 4 = latents), inpaint (StableDiffusionInpaintPipeline, 9 = latents + mask at
# latent size + latents of the masked image), upscale (StableDiffusionUpscalePipeline, 7 = latents + the low-res
# RGB image noised to noise_level, which also enters as the class label). Editing uses a t2i model (SDEdit).

TASKS = {4: "t2i", 9: "inpaint", 7: "upscale"}
PIPELINES = {"t2i": "StableDiffusionPipeline", "inpaint": "StableDiffusionInpaintPipeline",
             "upscale": "StableDiffusionUpscalePipeline"}
SDXL_PIPELINES = {"t2i": "StableDiffusionXLPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"}
LOW_RES_NOISE_SEED = 10**8  # item k's low-res noise (x4) uses seed base_seed + LOW_RES_NOISE_SEED + k


def model_task(unet, path=None):
    """'t2i', 'inpaint' or 'upscale' from the UNet's input channels; a local model_index.json that names another
    pipeline, or an x4 UNet that is SDXL's (there is no SDXL x4 upscaler), is one clear error."""
    task = TASKS.get(unet.config.in_channels)
    if task is None:
        raise SystemExit(f"model error: a UNet with {unet.config.in_channels} input channels is none of "
                         f"t2i (4), inpainting (9), x4 upscaling (7)")
    pipelines = SDXL_PIPELINES if is_sdxl(unet) else PIPELINES
    if task not in pipelines:
        raise SystemExit(f"model error: {path} has an SDXL UNet with {unet.config.in_channels} input channels, an "
                         "x4 upscaler's; there is no SDXL x4 upscaler (the x4 task takes SD's, "
                         "stabilityai/stable-diffusion-x4-upscaler)")
    index = os.path.join(path, "model_index.json") if path and os.path.isdir(path) else None
    if index and os.path.exists(index):
        with open(index) as f:
            kind = json.load(f).get("_class_name")
        if kind in (*PIPELINES.values(), *SDXL_PIPELINES.values()) and kind != pipelines[task]:
            raise SystemExit(f"model error: {path} is a {kind} but its UNet takes {unet.config.in_channels} "
                             f"input channels ({pipelines[task]})")
    return task


def load_low_res_scheduler(path):
    """The x4 upscaler's low_res_scheduler (DDPM), which noises the low-res input to noise_level."""
    from diffusers import DDPMScheduler
    try:
        return DDPMScheduler.from_pretrained(os.path.expanduser(path), subfolder="low_res_scheduler")
    except OSError as e:
        raise SystemExit(f"model error: cannot load the low_res_scheduler of '{path}' (an x4 upscaler has one): "
                         f"{str(e).splitlines()[0]}")


def make_mask(kind, n, height, width):
    """(n, 1, H, W) inpainting masks, 1 = repaint, 0 = keep (diffusers' convention). 'periphery': the paper's,
    50% of the pixels masked around a kept centre square of side H / sqrt(2); 'center': its complement (the
    centre repainted); else a PNG path (white = repaint), resized (nearest) to the images' size."""
    if kind in ("periphery", "center"):
        side_h, side_w = round(height / math.sqrt(2)), round(width / math.sqrt(2))
        top, left = (height - side_h) // 2, (width - side_w) // 2
        mask = torch.ones(1, 1, height, width)
        mask[..., top: top + side_h, left: left + side_w] = 0
        return (mask if kind == "periphery" else 1 - mask).expand(n, -1, -1, -1).clone()
    from PIL import Image
    if not os.path.isfile(kind):
        raise SystemExit(f"config error: mask must be 'periphery', 'center' or a PNG file, and {kind} is no file")
    try:
        img = Image.open(kind).convert("L").resize((width, height), Image.NEAREST)
    except OSError as e:
        raise SystemExit(f"config error: mask {kind} is not an image ({e})")
    return torch.from_numpy((np.array(img) > 127).astype(np.float32))[None, None].expand(n, -1, -1, -1).clone()


def inpaint_input(vae, images, mask):
    """The inpainting UNet's extra channels, as StableDiffusionInpaintPipeline makes them: the mask resized
    (nearest) to the latents' size, then the latents of the masked image (images in [-1, 1], masked pixels 0)."""
    masked_latents = encode(vae, images * (mask < 0.5))
    return torch.cat([F.interpolate(mask.float(), size=masked_latents.shape[-2:]), masked_latents], 1)


def upscale_input(low_res_scheduler, low_res, noise, noise_level):
    """The x4 UNet's extra channels and class labels, as StableDiffusionUpscalePipeline makes them: the low-res
    image in [-1, 1] noised to noise_level (one int, or one per image) by low_res_scheduler (the noise
    augmentation it was trained with), and noise_level itself as the class label."""
    labels = torch.as_tensor(noise_level, dtype=torch.long, device=low_res.device).expand(len(low_res))
    return low_res_scheduler.add_noise(low_res.float(), noise.float(), labels), labels


def task_input(task, vae, images, indices, base_seed, mask=None, low_res_scheduler=None, noise_level=20,
               strength=1.0):
    """What a task adds to the one generation path (keyword arguments of ddim_sample), for input images
    (B, 3, H, W) in [-1, 1] that are items `indices`: inpaint: the mask and masked-image channels; upscale: the
    noised low-res image (item k's noise from seed base_seed + LOW_RES_NOISE_SEED + k) and its noise level;
    t2i (editing): the images' latents, noised to t = strength x T by ddim_sample."""
    if task == "inpaint":
        return {"image_input": inpaint_input(vae, images, mask)}
    if task == "upscale":
        noise = seeded_noise(indices, images.shape[1:], base_seed + LOW_RES_NOISE_SEED).to(images.device)
        image_input, labels = upscale_input(low_res_scheduler, images, noise, noise_level)
        return {"image_input": image_input, "class_labels": labels}
    return {"init_latents": encode(vae, images), "strength": strength}


def downsample(images, factor):
    """Images (B, C, H, W) -> H / factor: an antialiased bicubic resize (the x4 task's low-res inputs)."""
    h, w = images.shape[-2:]
    return F.interpolate(images.float(), size=(h // factor, w // factor), mode="bicubic", antialias=True).clamp(-1, 1)


# Fashion-MNIST's classes and caption templates: prepare_fmnist.py writes them, export_split's other_class and
# eval_fid.py's caption accuracy read them.
CLASSES = ["t-shirt", "pair of trousers", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = ["a photo of {}", "{}", "a picture of {}", "an image of {}", "a product photo of {}",
             "a black and white photo of {}"]


def with_article(name):
    return ("an " if name[0] in "aeiou" else "a ") + name


def captions_for(label):
    """The captions of a Fashion-MNIST class: its name, with an article, in each template."""
    return [t.format(with_article(CLASSES[label])) for t in TEMPLATES]


def export_split(data_dir, split, n, out_dir, factor=1, bicubic_up=False, other_class=False):
    """The first n images of a prepared split as out_dir/{i:06d}.png (downsampled by `factor`, antialiased
    bicubic, as the x4 task's low-res inputs) with metadata.jsonl (file_name, prompt: the first caption): inputs
    for sample.py --init_images and ground truth for eval_fid.py --paired. bicubic_up: the low-res images
    upsampled back (bicubic), the no-model baseline of super-resolution. other_class (Fashion-MNIST): the prompt
    is the first caption of another class, (label + 1 + i mod (C - 1)) mod C, every other class equally often: the
    target of a text-guided edit, which caption accuracy then scores."""
    images, rows = load_split(data_dir, split)
    if n > len(rows):
        raise SystemExit(f"data error: {data_dir} {split} has {len(rows)} images, fewer than {n}")
    if other_class and "label" not in rows[0]:
        raise SystemExit(f"data error: other_class needs class labels, which {data_dir} {split} has not")
    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    x = images_to_tensor(images[:n])
    x = downsample(x, factor) if factor > 1 else x
    x = F.interpolate(x, scale_factor=factor, mode="bicubic").clamp(-1, 1) if bicubic_up else x
    arr = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(os.path.join(out_dir, f"{i:06d}.png"))
    if other_class:
        c = len(CLASSES)
        prompts = [captions_for((rows[i]["label"] + 1 + i % (c - 1)) % c)[0] for i in range(n)]
    else:
        prompts = [rows[i]["captions"][0] for i in range(n)]
    write_jsonl([{"file_name": f"{i:06d}.png", "prompt": p} for i, p in enumerate(prompts)],
                os.path.join(out_dir, "metadata.jsonl"))


# ----------------------------------------------------------------------------- distributed, devices

Dist = namedtuple("Dist", "ddp rank local_rank world_size device master")


def setup_ddp(device="auto"):
    """torchrun's environment -> process group (NCCL on CUDA, gloo on CPU) and this rank's device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("RANK", -1)) == -1:
        return Dist(False, 0, 0, 1, torch.device(device), True)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        dev = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        dev = torch.device(device)
    return Dist(True, rank, local_rank, world, dev, rank == 0)


def check_config(config, positive=(), non_negative=()):
    """Sizes and rates a user can get wrong, checked before anything is loaded or written: one clear line."""
    for k in positive:
        if not config[k] > 0:
            raise SystemExit(f"config error: {k} must be > 0, got {config[k]!r}")
    for k in non_negative:
        if not config[k] >= 0:
            raise SystemExit(f"config error: {k} must be >= 0, got {config[k]!r}")


def start_run(device, init_from, batch_size, grad_accum, seed, out_dir, overwrite):
    """The first lines of every trainer: DDP set-up, the checks that need the world size, that a scratch run
    never destroys an earlier one in out_dir, per-rank seeds. Returns (Dist, micro-batch per rank): the global
    batch stays batch_size for any number of ranks."""
    if init_from not in ("scratch", "resume"):
        raise SystemExit(f"config error: init_from must be 'scratch' or 'resume', not '{init_from}'")
    previous = [f for f in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if init_from == "scratch" and previous and not overwrite:
        raise SystemExit(f"config error: {out_dir} holds an earlier run ({', '.join(previous)}); continue it with "
                         "--init_from=resume, pick another out_dir, or replace it with --overwrite=True")
    if init_from == "resume" and not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        raise SystemExit(f"resume error: no checkpoint at {os.path.join(out_dir, 'ckpt.pt')}")
    d = setup_ddp(device)
    micro = micro_batch(batch_size, grad_accum, d.world_size)
    check_out_dir_free(out_dir, d)
    torch.manual_seed(seed * d.world_size + d.rank)
    return d, micro


def micro_batch(batch_size, grad_accum, ranks, ranks_name="world size"):
    """The per-rank micro-batch batch_size / (grad_accum * ranks) that keeps the global batch, or one clear line."""
    if batch_size % (grad_accum * ranks):
        raise SystemExit(f"config error: batch_size {batch_size} must divide by grad_accum * {ranks_name} "
                         f"({grad_accum} * {ranks})")
    return batch_size // (grad_accum * ranks)


def gather(obj, d):
    """Every rank's obj, in rank order (e.g. RNG states for a checkpoint that resumes exactly)."""
    if not d.ddp:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(values, d):
    """Mean of a list of floats over ranks (for logging)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.ddp:
        dist.all_reduce(t)
        t /= d.world_size
    return t.tolist()


def torch_dtype(name, device):
    """'auto' (fp16 on CUDA, fp32 on CPU), 'float32', 'bfloat16' or 'float16' -> the torch dtype."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in dtypes:
        raise SystemExit(f"config error: dtype must be 'auto' or one of {sorted(dtypes)}, not '{name}'")
    return dtypes[name]


def autocast(device):
    """bf16 autocast on CUDA, nothing on CPU (fp32); CPU's bf16 autocast stands in for CUDA's in estimate_memory."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=_emulating_cuda)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----------------------------------------------------------------------------- checkpoints, RNG


def start_log(out_dir, init_from, d, also=(), exported=(), resume_iter=None):
    """Path of the run's JSON-lines log (out_dir/log.jsonl). A scratch run (start_run lets one into an earlier
    run's out_dir only with overwrite=True) starts it and the run's other logs (`also`: d2o's curve.jsonl) anew,
    and removes the earlier run's ckpt.pt and exported models (`exported`: the LoRA files, unet/, model/), saying
    so: a folder never shows one run's model under another run's config. A resumed one keeps the records up to
    the checkpoint's iteration (`resume_iter`) and appends: the steps after it (a run killed between checkpoints)
    are made again, and logged once."""
    path = os.path.join(out_dir, "log.jsonl")
    if not d.master:
        return path
    if init_from == "scratch":
        for old in (path, os.path.join(out_dir, "ckpt.pt"), *(os.path.join(out_dir, f) for f in (*also, *exported))):
            if os.path.isdir(old):
                shutil.rmtree(old)
            elif os.path.exists(old):
                os.remove(old)
            else:
                continue
            if os.path.basename(old) in exported:
                print(f"overwrite: removed the earlier run's {old}")
    elif resume_iter is not None:
        for log in (path, *(os.path.join(out_dir, f) for f in also)):
            if os.path.exists(log):
                with open(log) as f:
                    records = [json.loads(line) for line in f if line.strip()]
                kept = [r for r in records if r.get("iter", 0) <= resume_iter]
                if len(kept) < len(records):
                    write_jsonl(kept, log)
                    print(f"resume: {log} cut back to iteration {resume_iter} ({len(records) - len(kept)} records "
                          "after the checkpoint dropped)")
    return path


# ----------------------------------------------------------------------------- preemption, one run per out_dir
# SLURM (and most schedulers) send SIGTERM, or a chosen signal such as SIGUSR1 some minutes before the kill
# (sbatch --signal). The trainers finish the step they are in, write a checkpoint and exit with EXIT_STOPPED.

EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal with a checkpoint written; resume to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def catch_stop_signals():
    """From now on SIGTERM and SIGUSR1 only set a flag (a dict: {'signal': name or None}) that the training loop
    reads between steps (stop_requested)."""
    flag = {"signal": None, "previous": {s: signal.getsignal(s) for s in STOP_SIGNALS}}
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked child (a multiprocessing worker, which Pool.terminate ends with
            signal.signal(signum, signal.SIG_DFL)  # SIGTERM) inherited this handler: the signal's usual effect
            os.kill(os.getpid(), signum)
            return
        flag["signal"] = signal.Signals(signum).name
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    return flag


def restore_stop_signals(flag):
    """The handlers from before catch_stop_signals (the training loop is over)."""
    for s, previous in flag["previous"].items():
        signal.signal(s, previous)


def stop_requested(flag, d):
    """Whether any rank was signalled (one MAX all-reduce: every rank stops after the same step)."""
    stop = torch.tensor(float(flag["signal"] is not None), device=d.device)
    if d.ddp:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return stop.item() > 0


def stop_run(flag, it, out_dir, d):
    """The end of a run stopped by a signal, after its checkpoint at iteration `it` is written: one line, then
    exit code EXIT_STOPPED on every rank."""
    if d.master:
        print(f"stopped by {flag['signal'] or 'a signal to another rank'} after iteration {it}: checkpoint "
              f"{os.path.join(out_dir, 'ckpt.pt')} written; continue with --init_from=resume "
              f"(exit code {EXIT_STOPPED})")
    if d.ddp:
        dist.barrier()
        dist.destroy_process_group()
    raise SystemExit(EXIT_STOPPED)


def checkpoint_step(it, last, interval, save_checkpoint, stop, out_dir, d):
    """A trainer's checkpoints after step `it`: every `interval` steps and at the `last`; and when any rank was
    signalled (catch_stop_signals), one at this step if none was just written, then stop_run."""
    if it % interval == 0 or it == last:
        save_checkpoint()
    if it < last and stop_requested(stop, d):
        if it % interval:
            save_checkpoint()
        stop_run(stop, it, out_dir, d)


def end_run(stop, out_dir, wandb_run, d):
    """A trainer's last lines: the signal handlers and out_dir's lock given back, wandb and the process group closed."""
    restore_stop_signals(stop)
    release_out_dir(out_dir)
    if wandb_run is not None:
        wandb_run.finish()
    if d.ddp:
        dist.destroy_process_group()


_held_locks = set()


def lock_holder(out_dir):
    """Who holds out_dir/run.lock ('host pid start time'), or None where no live run does. A lock left by a
    process that no longer runs on this host is stale (taken over by lock_out_dir); one from another host cannot be
    checked, so it counts as held. A lock this very process holds (an earlier run of it, in-process) is free."""
    path = os.path.join(out_dir, "run.lock")
    try:
        with open(path) as f:
            host, pid, started = f.read().split(" ", 2)
    except (OSError, ValueError):
        return None
    if host == socket.gethostname() and (int(pid) == os.getpid() or not _alive(int(pid))):
        return None
    return f"{host} pid {pid}, started {started.strip()}"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_out_dir_free(out_dir, d):
    """One clear line on every rank if another live run holds out_dir (checked by rank 0, before anything is
    loaded or written)."""
    holder = [lock_holder(out_dir) if d.master else None]
    if d.ddp:
        dist.broadcast_object_list(holder, src=0)
    if holder[0]:
        raise SystemExit(f"config error: another run is writing to {out_dir} ({holder[0]}; its lock: "
                         f"{os.path.join(out_dir, 'run.lock')}); wait for it, pick another out_dir, or delete the "
                         "lock if that run is dead")


def lock_out_dir(out_dir):
    """Take out_dir/run.lock (host, pid, start time) for this process, before its first write into out_dir (rank 0
    only). A stale lock (its process no longer runs on this host) is taken over, with a line saying so. Released
    when the process exits."""
    path = os.path.join(out_dir, "run.lock")
    if path in _held_locks:
        return
    os.makedirs(out_dir, exist_ok=True)
    holder = lock_holder(out_dir)
    if holder:
        raise SystemExit(f"config error: another run is writing to {out_dir} ({holder})")
    if os.path.exists(path):
        with open(path) as f:
            old = f.read().strip()
        if not old.startswith(f"{socket.gethostname()} {os.getpid()} "):
            print(f"lock: taking over {path} from a run that no longer runs ({old})")
    with open(path + f".{os.getpid()}", "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    os.replace(path + f".{os.getpid()}", path)
    if not _held_locks:
        atexit.register(_release_locks, os.getpid())
    _held_locks.add(path)


def release_out_dir(out_dir):
    """The end of a run: out_dir/run.lock removed, if this process holds it."""
    path = os.path.join(out_dir, "run.lock")
    if path in _held_locks:
        _held_locks.discard(path)
        _release_locks(os.getpid(), [path])


def _release_locks(pid, paths=None):
    for path in list(_held_locks) if paths is None else paths:
        try:
            with open(path) as f:
                if f.read().split(" ")[1] == str(pid):
                    os.remove(path)
        except (OSError, IndexError):
            pass


def fetch(spec, cache):
    """Local path of a file given as a path or an http(s) URL; a URL is downloaded once into `cache` (through a
    temp file, so an interrupted download is never taken for the file). None for a path that does not exist;
    OSError when a download fails (the caller says what to do instead)."""
    if os.path.exists(spec):
        return spec
    if not spec.startswith(("http://", "https://")):
        return None
    path = os.path.join(cache, os.path.basename(spec))
    if not os.path.exists(path):
        print(f"downloading {spec} -> {path}")
        os.makedirs(cache, exist_ok=True)
        urllib.request.urlretrieve(spec, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint. A write that fails
    (a full disk) removes the temp file, keeps the previous checkpoint and stops the run with one line."""
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        kept = f"the previous {path} is kept" if os.path.exists(path) else f"there is no earlier {path}"
        raise SystemExit(f"checkpoint error: cannot write {path} ({e.strerror or e}); {kept}")


def load_checkpoint(path, config=None, verbose=False):
    """A trainer's ckpt.pt. A resumed run goes on with the settings it is given now (a longer run is the usual
    point); with `config` and verbose, the ones that differ from the checkpoint's run are printed."""
    if not os.path.exists(path):
        raise SystemExit(f"resume error: no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated or not a checkpoint at all
        raise SystemExit(f"resume error: {path} is not a readable checkpoint (truncated or corrupt? "
                         f"{str(e).splitlines()[0][:200]})")
    if verbose and config is not None:
        changed = changed_settings(ck.get("config", {}), config, skip=("init_from", "overwrite"))
        if changed:
            print("resume: settings that differ from the checkpoint's run: " + ", ".join(changed))
    return ck


def changed_settings(old, new, skip=()):
    """'key old -> new' for each setting that differs between two runs' settings (a key one of them lacks reads
    None): sample.py's refusal to mix images, a trainer's resume."""
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in {**new, **old} if k not in skip and old.get(k) != new.get(k)]


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_rng(states, d, seed, it):
    """Every rank's RNG state from a checkpoint (one per rank): exact for the world size that wrote it. With
    another world size, fresh per-rank seeds from (seed, iteration, rank) instead: never one rank's state on
    every rank, which would make all ranks draw the same noise. Returns whether the resume is exact."""
    if len(states) == d.world_size:
        set_rng_state(states[d.rank])
        return True
    new_seed = (seed * 1_000_003 + it) * d.world_size + d.rank
    torch.manual_seed(new_seed)
    random.seed(new_seed)
    if d.master:
        print(f"resume: checkpoint from {len(states)} ranks, now {d.world_size}: RNG reseeded per rank "
              "(the run continues, but not bit-exactly)")
    return False


# ----------------------------------------------------------------------------- divergence, logs


def all_finite(values, tensors, d):
    """True on every rank iff every float in `values` and every tensor in `tensors` is finite on every rank
    (one MIN all-reduce of a flag on this rank's device: NCCL takes no CPU tensors)."""
    ok = all(math.isfinite(v) for v in values) and all(bool(torch.isfinite(t).all()) for t in tensors)
    flag = torch.tensor(float(ok), device=d.device)
    if d.ddp:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1


def stop_if_diverged(streak, limit, it):
    """A run that stays non-finite stops with a non-zero exit instead of exporting garbage."""
    if streak >= limit:
        raise SystemExit(f"training error: {streak} consecutive steps with a non-finite loss or gradient, the last "
                         f"at iteration {it}: the run diverged (lower the lr?). Nothing was exported; ckpt.pt holds "
                         "the last finite state")


def require_finite(tensors, what):
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise SystemExit(f"training error: {what} has non-finite weights; not saved (the run diverged: lower the lr?)")


def finite_or_null(record):
    """The record with each non-finite float as None: JSON's null (a bare NaN is not JSON)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def append_log(path, record, run=None):
    """One JSON line; a non-finite float is written as null (finite_or_null). With a wandb run (start_wandb),
    the same record goes there too, at step record['iter']: log.jsonl stays the ground truth."""
    record = finite_or_null(record)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if run is not None:
        run.log(record, step=record["iter"])


def start_wandb(config, d):
    """A wandb run on rank 0 when config['wandb_log'] is on, else None. wandb is imported only then (on every
    rank, so that a missing package stops all of them with one line), before the trainer writes anything."""
    if not config["wandb_log"]:
        return None
    try:
        import wandb
    except ImportError:
        raise SystemExit("config error: wandb_log=True needs the wandb package (pip install wandb)")
    if not d.master:
        return None
    return wandb.init(project=config["wandb_project"], name=config["wandb_run_name"] or None, config=config)


def wandb_image(run, path, step, key="val_grid"):
    """A picture the trainer just wrote (a validation grid), logged to the wandb run, if any."""
    if run is not None:
        import wandb
        run.log({key: wandb.Image(path)}, step=step)


# ----------------------------------------------------------------------------- torch.compile guard


def checked_compile(module, loss_fn, backend="inductor", rtol=1e-3):
    """torch.compile(module), but only after checking that one backward pass through a compiled copy gives
    the same gradients as eager. (torch 2.13 + Inductor on CPU returns exact zeros for the gradients of a
    diffusers UNet's mid block and everything before it, while the forward is right.) The check runs on an
    fp32 copy with autocast off: bf16 and fp32 eager gradients of the tiny UNet already differ by ~2e-2, so a
    bf16 comparison could not tell a compiler bug from rounding, while in fp32 they agree to ~1e-6. So
    loss_fn(m) must be deterministic and feed fp32 inputs. SystemExit naming the worst parameter if they differ."""
    import copy
    reference = copy.deepcopy(module).float()
    params = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    grads = []
    with torch.autocast(params[0][1].device.type, enabled=False):
        for m in (reference, torch.compile(reference, backend=backend)):
            for _, p in params:
                p.grad = None
            loss_fn(m).backward()
            grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for _, p in params])
    del reference
    worst, worst_name = 0.0, ""
    for (name, _), ge, gc in zip(params, *grads):
        err = ((ge - gc).norm() / (ge.norm() + 1e-12)).item() if ge.norm() > 0 else gc.norm().item()
        if not math.isfinite(err) or err > worst:
            worst, worst_name = (err if math.isfinite(err) else float("inf")), name
    if worst > rtol:
        raise SystemExit(f"compile error: torch.compile(backend='{backend}') gives wrong gradients on this device "
                         f"(relative error {worst:.3g} at {worst_name}); run with --compile=False "
                         f"or --compile_backend=aot_eager")
    return torch.compile(module, backend=backend)


# ----------------------------------------------------------------------------- memory estimate without a GPU
# A training step runs on fake tensors (shapes and dtypes, no data: FakeTensorMode), with CPU's bf16 autocast in
# place of CUDA's, while a dispatch mode adds up the bytes of every live tensor storage. The peak is an
# ESTIMATE of torch.cuda.max_memory_allocated: it leaves out the CUDA context (~0.5 GB), the caching allocator's
# slack and cuDNN/cuBLAS workspaces, and CPU's attention and autocast kernels stand in for CUDA's.

_emulating_cuda = False


class PeakMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages made by the ops run under it (plus those given to add)."""

    def __init__(self):
        super().__init__()
        self.seen, self.now, self.peak = weakref.WeakSet(), 0, 0

    def add(self, tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                s = t.untyped_storage()
                self.seen.add(s)
                self.now += s.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(s, self._free, s.nbytes())

    def _free(self, n):
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.add(tree_flatten(out)[0])
        return out


@contextlib.contextmanager
def estimate_memory():
    """with estimate_memory() as mem: build the models and run a step, then read mem.peak (bytes). Build modules
    in their final dtype and device inside it (Module.to / .float() cannot swap fake parameters), and never
    deepcopy one (it reads the data pointers fake tensors do not have)."""
    global _emulating_cuda
    from torch._subclasses.fake_tensor import FakeTensorMode
    _emulating_cuda = True
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), PeakMemory() as mem:
            yield mem
    finally:
        _emulating_cuda = False


def sd_from_configs(path, unet_dtype=torch.float32):
    """(text, vae, unet, scheduler) of an SD 1.x/2.x or SDXL model built from its config files alone (local folder
    or the HF cache: no weights are read): random weights, for estimate_memory. text has no tokenizers: use
    placeholder_cond."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    family, zero_uncond = model_family(path, is_hub_id(path))
    try:
        configs = [UNet2DConditionModel.load_config(path, subfolder="unet"),
                   AutoencoderKL.load_config(path, subfolder="vae"),
                   *(CLIPTextConfig.from_pretrained(path, subfolder=s)
                     for s in ("text_encoder", "text_encoder_2")[:1 + (family == "sdxl")])]
        with _disable_current_modes():  # a real noise schedule: the step reads its values
            scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", timestep_spacing="trailing",
                                                      set_alpha_to_one=True)
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.numpy()  # (fake mode would fake a tensor's reads)
    except OSError as e:
        raise SystemExit(f"model error: cannot read the configs of '{path}': {str(e).splitlines()[0]}")
    default = torch.get_default_dtype()
    torch.set_default_dtype(unet_dtype)
    try:
        unet = UNet2DConditionModel.from_config(configs[0])
    finally:
        torch.set_default_dtype(default)
    vae = AutoencoderKL.from_config(configs[1])
    for c in configs[2:]:
        c.dtype = torch.float32  # as load_sd loads them (transformers would take the file's, fp16 for SDXL)
    encoders = [CLIPTextModel(configs[2])] + [CLIPTextModelWithProjection(c) for c in configs[3:]]
    for m in (*encoders, vae, unet):
        m.requires_grad_(False).eval()
    return Text(None, tuple(encoders), zero_uncond), vae, fp32_output(unet), scheduler


def placeholder_cond(text, n, size=None):
    """A batch of n Conds from all-zero token ids: the shapes and dtypes of real conditioning (estimate_memory)."""
    return encode_ids(text, [torch.zeros(n, e.config.max_position_embeddings, dtype=torch.long)
                             for e in text.encoders], size)


def memory_report(mem, what):
    return (f"estimated peak GPU memory of {what}: {mem.peak / 2**30:.1f} GiB of live tensors "
            f"(add ~1-2 GiB for the CUDA context and allocator slack; an estimate, not a measurement)")


# ----------------------------------------------------------------------------- pictures


def save_grid(images, path, nrow):
    """images (N, 3, H, W) in [0, 1] -> one PNG, nrow images per row, 2 px white gaps. Atomic."""
    from PIL import Image
    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 2) + 2, nrow * (w + 2) + 2, 3), 255, np.uint8)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = arr[i]
    tmp = path + ".tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
