"""
HiPA: High-frequency-Promoting Adaptation (papers/hipa.txt), one-step text-to-image with a LoRA.

A low-rank adaptor on the frozen UNet is trained so that the adapted model's ONE-step image matches the
frozen model's N-step (15) image from the same noise and prompt, with a perceptual loss on the image and on
its high frequencies (Eq. 1-3):

    L = DISTS(x1, xT) + DISTS(HP(x1), HP(xT)) + DISTS(Sobel(x1), Sobel(xT))

x1: student image (LoRA on, one UNet call at t = T-1), xT: teacher image (same UNet with LoRA off, N-step
DDIM, guidance 2). The teacher's targets depend only on (prompt, noise seed): each epoch draws every example's
caption and noise anew (vary_per_epoch), and its targets are computed once and cached on disk.

    python hipa.py config/fmnist_hipa.py                                  # the laptop run (~5 min CPU)
    torchrun --nproc_per_node=8 hipa.py config/coco_hipa.py               # the paper's run
    python hipa.py config/fmnist_hipa.py --init_from=resume               # continue a run
    python hipa.py config/fmnist_hipa_inpaint.py                          # HiPA's other tasks (paper 4.3, 4.4)
    python hipa.py config/fmnist_hipa_x4.py

The inpainting and x4 tasks (task=) train the same way: the example's real image (from the prepared data) gives
the UNet's extra input (the masked image and its mask, or the image downsampled by the VAE's factor as the
low-res input, noised to noise_level), the same for teacher and student; the rest is unchanged. Editing
(SDEdit) as the paper does it needs no training: it reuses the t2i adaptor (sample.py --init_images
--strength). task=edit (an extension, not in the paper) trains an adaptor for it: the student's one step from
the example's image noised to t = strength x T, the teacher's N steps from the same point, both toward a caption
of another example (edit_captions).

Reads top to bottom: config, LoRA, losses (DISTS, high-pass, Sobel), teacher targets, training loop.
"""
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from common import (all_finite, all_reduce_mean, append_log, atomic_save, autocast, catch_stop_signals, check_config,
                    checked_compile, checkpoint_step, ddim_sample, decode, downsample, end_run, estimate_memory,
                    fetch, fp32_output, gather, guidance_text, images_to_tensor, is_sdxl, latent_shape,
                    load_checkpoint, load_low_res_scheduler, load_sd, load_split, lock_out_dir, make_mask,
                    memory_report, micro_batch, model_task, one_step_x0, peak_memory_gb, placeholder_cond,
                    prompt_conds, require_finite, resume_rng, rng_state, save_grid, save_json, sd_from_configs,
                    seeded_noise, start_log, start_run, start_wandb, stop_if_diverged, task_input, vae_factor,
                    wandb_image)
from lora_files import adaptor_metadata, kohya_lora_state, unet_fingerprint

# ----------------------------------------------------------------------------- config
model = "assets/tiny-sd-fmnist"  # SD-format model to adapt (hub id or folder), frozen
task = "t2i"  # 't2i', 'edit' (SDEdit from real images, t2i model), 'inpaint' (an inpainting model), 'upscale' (x4)
data_dir = "data/fmnist"  # prepared data: t2i reads only the captions (the teacher makes the targets); edit,
# inpaint and upscale also read the images, at the output size, for the edited / masked / low-res inputs
strength = 0.8  # edit: SDEdit's strength (the adaptor learns the one step from t = strength x T; in (0, 1])
edit_captions = "other"  # edit: image k's prompt, another row's caption ('other': text-guided) or its own ('own')
mask = "periphery"  # inpaint: 'periphery' (the paper's: 50% of the pixels masked around a kept centre), 'center', PNG
noise_level = 20  # upscale: the low-res input's noise augmentation (StableDiffusionUpscalePipeline's default)
split = "train"
num_examples = 0  # (prompt, noise) pairs per epoch; 0 = one per caption row of the split
out_dir = "out/hipa-fmnist"
init_from = "scratch"  # 'scratch' or 'resume' (out_dir/ckpt.pt)
overwrite = False  # a scratch run into an out_dir that holds an earlier run: refused unless True
resolution = 0  # image size; 0 = the model's native size
# LoRA: W' = W + (alpha / rank) B A on every Linear/Conv2d whose name ends with a target
lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the paper's attention projections
lora_rank = 16
lora_alpha = 16.0
# teacher (LoRA off) and student (LoRA on)
teacher_steps = 15  # DDIM steps, trailing spacing
guidance = 2.0  # classifier-free guidance of the teacher and of the one-step student
teacher_cache = True  # compute the teacher's targets once (fp16 latents on disk) instead of every step
vary_per_epoch = True  # each epoch draws every example's caption and noise anew (the cache then holds epochs x
# examples targets: 32 KB each for SD at 512, 19 GB for COCO's 118k x 5 epochs); False: the same pairs each epoch
cache_dir = "out/hipa_cache"
# loss
loss = "hipa"  # 'hipa' (DISTS on image, high-pass, Sobel); Table 1 rows: 'l2', 'l2+low', 'l2+high'
w_spatial = 1.0  # weights of the three terms
w_fft = 1.0
w_sobel = 1.0
hp_radius = 0.25  # ideal high/low-pass cut-off radius, as a fraction of the Nyquist frequency
vgg_weights = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (URL or path)
dists_weights = "https://github.com/dingkeyan93/DISTS/raw/master/DISTS_pytorch/weights.pt"  # alpha, beta (URL or path)
standin = "vgg_random"  # if those are unreachable: 'vgg_random' (VGG16 at quarter width with random weights;
# measured better here) or 'lite0' (the DISTS form on ImageNet EfficientNet-Lite0 features); never called DISTS
standin_size = 0  # the stand-in sees the images resized to this (0: as they are; standin=lite0 on 32 px: 64)
# optimisation
epochs = 5
batch_size = 64  # global batch, over all ranks and micro-steps
grad_accum = 1
lr = 1e-4
warmup_iters = 50
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.0  # EMA of the LoRA weights (0: off); the export uses the EMA when on
max_nonfinite = 10  # this many consecutive steps with a non-finite loss or gradient stop the run (non-zero exit)
# logging, evaluation, checkpoints
log_interval = 10
eval_interval = 100  # validation grid every this many iterations (and at the end)
ckpt_interval = 100
num_val_prompts = 8
wandb_log = False  # also log log.jsonl's records and the validation grids to wandb (imported only then)
wandb_project = "one-step"
wandb_run_name = ""  # '' = wandb's own name
# system
device = "auto"
compile = False  # torch.compile the student UNet (checked against eager gradients first)
compile_backend = "inductor"
grad_checkpointing = False  # trade compute for memory in the UNet, the VAE decoder and the DISTS network
seed = 0
dry_run = False  # print the estimated peak GPU memory of one training step per GPU and exit (no weights, no GPU)
dry_run_gpus = 8  # for dry_run: the micro-batch per GPU is batch_size / (grad_accum * dry_run_gpus)
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------- LoRA


class LoRA(nn.Module):
    """y = base(x) + (alpha / r) B(A(x)), on a frozen Linear or Conv2d. A: r x in (Kaiming-uniform, as peft),
    B: out x r (zeros), so training starts exactly at the frozen model. `enabled` off gives the teacher."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / rank, True
        fp32 = {"device": base.weight.device, "dtype": torch.float32}  # trainable params in fp32, even on a bf16 base
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False, **fp32)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False, **fp32)
        else:  # Conv2d: A has the base's kernel and stride, B is 1x1
            self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False,
                                    **fp32)
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False, **fp32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = self.base(x)
        if self.enabled:
            out = out + self.scale * self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(out.dtype)
        return out


def add_lora(unet, targets, rank, alpha):
    """Wrap every Linear/Conv2d whose qualified name ends with one of `targets`. Returns {name: LoRA}."""
    if rank < 1:
        raise SystemExit(f"config error: lora_rank must be >= 1, got {rank}")
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    chosen = {n: m for n, m in layers.items() if any(n == t or n.endswith("." + t) for t in targets)}
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in chosen)]
    if unmatched:
        if not any(".attn" in n for n in layers) and any(t.startswith("to_") for t in unmatched):
            raise SystemExit("config error: this UNet has no attention layers; set lora_targets to convolutions, "
                             "e.g. ('conv1', 'conv2')")
        candidates = sorted({n.split(".")[-1] if not n.endswith(".0") else ".".join(n.split(".")[-2:]) for n in layers})
        raise SystemExit(f"config error: lora_targets {unmatched} match no layer of the UNet; candidates: {candidates}")
    loras = {}
    for name, base in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        lora = LoRA(base, rank, alpha)
        setattr(parent, child, lora)
        loras[name] = lora
    return loras


def set_lora(loras, enabled):
    for m in loras.values():
        m.enabled = enabled


def lora_state(loras, ema=None):
    """diffusers' LoRA format: 'unet.<module>.lora_A.weight' / 'lora_B.weight', (alpha / rank) folded into B,
    so that StableDiffusionPipeline.load_lora_weights(...) gives back exactly this adaptor."""
    params = dict(zip(lora_param_names(loras), ema)) if ema is not None else None
    out = {}
    for name, m in loras.items():
        A = params[f"{name}.lora_A.weight"] if params else m.lora_A.weight
        B = params[f"{name}.lora_B.weight"] if params else m.lora_B.weight
        out[f"unet.{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        out[f"unet.{name}.lora_B.weight"] = (B.detach().float() * m.scale).cpu().contiguous()
    return out


def lora_param_names(loras):
    return [f"{n}.{ab}.weight" for n in loras for ab in ("lora_A", "lora_B")]


def lora_params(loras):
    return [getattr(m, ab).weight for m in loras.values() for ab in ("lora_A", "lora_B")]


# ----------------------------------------------------------------------------- losses
# DISTS (Ding et al. 2020), as the reference DISTS_pytorch computes it: VGG16 with L2 pooling instead of
# max pooling, six stages (the raw image and relu1_2 .. relu5_3), texture and structure similarity per channel.

VGG16_CFG = [64, 64, "L2", 128, 128, "L2", 256, 256, 256, "L2", 512, 512, 512, "L2", 512, 512, 512]
DISTS_STAGE_ENDS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
STANDIN_WIDTH = 0.25  # the offline stand-in's VGG16 is a quarter as wide: 16x cheaper, for CPU runs


class L2Pool(nn.Module):
    """sqrt(blur(x^2)): a 3x3 [1,2,1]x[1,2,1]/16 depthwise blur, stride 2, padding 1 (anti-aliased pooling)."""

    def __init__(self, channels):
        super().__init__()
        g = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (g[:, None] * g[None, :] / 16).expand(channels, 1, 3, 3).clone())

    def forward(self, x):
        return (F.conv2d(x ** 2, self.kernel, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS on VGG16 (width 1: the real one; the weights come from load_dists), or its form on another frozen
    network's stages (`lite0`: efficientnet_lite's 4 taps, images resized to `size`) with uniform alpha/beta."""

    def __init__(self, width=1.0, lite0=None, size=0):
        super().__init__()
        self.checkpoint = False  # recompute each stage in backward instead of keeping its activations
        self.lite0, self.size = lite0, size
        layers, c_in = [], 3
        for v in VGG16_CFG:  # same indices as torchvision's vgg16().features, so its weights load as they are
            if v == "L2":
                layers.append(L2Pool(c_in))
            else:
                layers += [nn.Conv2d(c_in, int(v * width), 3, padding=1), nn.ReLU()]
                c_in = int(v * width)
        self.features = nn.Sequential(*layers)
        self.channels = [3] + [self.features[i - 1].out_channels for i in DISTS_STAGE_ENDS]  # 1475 at full width
        if lite0 is not None:
            from efficientnet_lite import LITE0_CHANNELS
            self.features, self.channels = nn.Sequential(), [3, *LITE0_CHANNELS]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.register_buffer("alpha", torch.full((sum(self.channels),), 0.5 / sum(self.channels)))
        self.register_buffer("beta", torch.full((sum(self.channels),), 0.5 / sum(self.channels)))

    def stages(self, x):
        """Stage 0 is the image as given; the network sees it resized to `size` (stand-ins; 0: as it is)."""
        h = F.interpolate(x, size=self.size, mode="bilinear", antialias=True) if self.size else x
        if self.lite0 is not None:  # (Lite0 normalises its input itself)
            return [x] + (checkpoint(self.lite0.features, h, use_reentrant=False) if self.checkpoint and
                          h.requires_grad else self.lite0.features(h))
        feats, h, start = [x], (h - self.mean) / self.std, 0
        for end in DISTS_STAGE_ENDS:
            stage = self.features[start: end + 1]
            h = checkpoint(stage, h, use_reentrant=False) if self.checkpoint and h.requires_grad else stage(h)
            feats.append(h)
            start = end + 1
        return feats

    def forward(self, x, y, c1=1e-6, c2=1e-6):
        """Per-image DISTS distance of images in [0, 1] (B,), fp32."""
        w_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w_sum, self.channels)
        betas = torch.split(self.beta / w_sum, self.channels)
        dist = 0
        for fx, fy, a, b in zip(self.stages(x), self.stages(y), alphas, betas):
            mx, my = fx.mean([2, 3]), fy.mean([2, 3])
            vx, vy = fx.var([2, 3], unbiased=False), fy.var([2, 3], unbiased=False)
            cov = (fx * fy).mean([2, 3]) - mx * my
            texture = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
            structure = (2 * cov + c2) / (vx + vy + c2)
            dist = dist + (a * texture).sum(1) + (b * structure).sum(1)
        return 1 - dist


def reachable(spec, cache):
    """common.fetch, with a failed download (offline) meaning 'unreachable': None."""
    try:
        return fetch(spec, cache)
    except OSError:
        return None


def load_dists(vgg_spec, dists_spec, cache, verbose=True, standin_kind="vgg_random", size=0):
    """DISTS with torchvision's ImageNet VGG16 and the authors' alpha/beta (loaded with weights_only=True).
    If either is unreachable (offline), a deterministic stand-in, announced loudly: 'lite0', the DISTS form on
    ImageNet EfficientNet-Lite0 features with uniform alpha = beta, or 'vgg_random', VGG16 at STANDIN_WIDTH with
    seeded random weights (random deep features still measure texture and structure, Ulyanov et al. 2018).
    Numbers from a stand-in are not comparable with the paper's."""
    vgg, ab = reachable(vgg_spec, cache), reachable(dists_spec, cache)
    if standin_kind not in ("lite0", "vgg_random"):
        raise SystemExit(f"config error: standin must be 'lite0' or 'vgg_random', not '{standin_kind}'")
    if not (vgg and ab) and standin_kind == "lite0":
        from efficientnet_lite import load_lite0
        if verbose:
            print("=" * 100 + f"\nWARNING: DISTS weights unreachable ({vgg_spec if not vgg else dists_spec}).\n"
                  f"Using the offline stand-in 'lite0': the DISTS form (texture and structure terms, uniform "
                  f"weights) on ImageNet EfficientNet-Lite0 features at {size or 'native'} px. Not DISTS.\n"
                  + "=" * 100)
        return DISTS(lite0=load_lite0(), size=size).requires_grad_(False).eval()
    net = DISTS(1.0) if vgg and ab else DISTS(STANDIN_WIDTH, size=size)
    if vgg and ab:  # strictly: every conv of VGG16's features with its shape, 1475 alphas and betas
        state = torch.load(vgg, map_location="cpu", weights_only=True)
        got = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        want = {k: v.shape for k, v in net.features.state_dict().items() if not k.endswith(".kernel")}  # (L2Pool)
        bad = sorted(set(want) ^ set(got)) or [k for k in want if got[k].shape != want[k]]
        w = torch.load(ab, map_location="cpu", weights_only=True)
        if bad or not isinstance(w, dict) or any(w.get(k, torch.empty(0)).numel() != len(net.alpha)
                                                 for k in ("alpha", "beta")):
            raise SystemExit(f"DISTS error: {vgg} / {ab} are not torchvision's VGG16 and the DISTS alpha/beta "
                             f"({'keys or shapes differ at ' + ', '.join(bad[:3]) if bad else 'alpha/beta'})")
        net.features.load_state_dict(got, strict=False)
        net.alpha.copy_(w["alpha"].flatten()), net.beta.copy_(w["beta"].flatten())
    else:
        g = torch.Generator().manual_seed(0)
        for m in net.features:
            if isinstance(m, nn.Conv2d):  # Kaiming-normal fan-out, as torchvision initialises VGG
                m.weight.data = torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / (m.out_channels * 9))
                m.bias.data.zero_()
        if verbose:
            print("=" * 100 + f"\nWARNING: DISTS weights unreachable ({vgg_spec if not vgg else dists_spec}).\n"
                  f"Using the offline stand-in 'vgg_random': VGG16 at width {STANDIN_WIDTH}, seeded random weights, "
                  "uniform alpha/beta.\nFor paper runs give vgg_weights= and dists_weights= (paths).\n" + "=" * 100)
    return net.requires_grad_(False).eval()


def gray(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def as_images(student_map, teacher_map, signed):
    """Single-channel maps of the student and the teacher -> 3-channel images for the perceptual network, both
    scaled by ONE factor per pair: the teacher map's largest magnitude (detached), so the teacher's fills [0, 1]
    (signed maps centred on 0.5) and a student with too little high-frequency amplitude shows it as a fainter
    image. Scaling each map by its own min and max (an earlier version) made the loss blind to that amplitude:
    a student with every frequency above the cut-off scaled to 0.3 scored exactly 0."""
    scale = teacher_map.detach().abs().amax(dim=(1, 2, 3), keepdim=True) + 1e-8
    shift, span = (0.5, 2 * scale) if signed else (0.0, scale)
    return [(shift + m / span).expand(-1, 3, -1, -1) for m in (student_map, teacher_map)]


def fourier_pass(x, radius, high=True):
    """Re IFFT(FFT(gray(x)) * M) with M an ideal circular mask around the centred spectrum: high-pass keeps
    frequencies beyond radius * Nyquist, low-pass the rest (paper Sec. 3, I_freq). The result is real (the mask
    is symmetric); its sign is part of the signal."""
    g = gray(x)
    h, w = g.shape[-2:]
    fy = torch.fft.fftshift(torch.fft.fftfreq(h, device=x.device)).view(-1, 1) * 2  # in units of Nyquist
    fx = torch.fft.fftshift(torch.fft.fftfreq(w, device=x.device)).view(1, -1) * 2
    keep = ((fy ** 2 + fx ** 2).sqrt() > radius) == high
    spectrum = torch.fft.fftshift(torch.fft.fft2(g), dim=(-2, -1)) * keep
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real


def sobel(x, eps=1e-6):
    """sqrt((I*Gx)^2 + (I*Gy)^2 + eps) on the grayscale image (paper Sec. 3, I_edge)."""
    gx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device).view(1, 1, 3, 3)
    g = F.pad(gray(x), (1, 1, 1, 1), mode="replicate")
    return (F.conv2d(g, gx) ** 2 + F.conv2d(g, gx.transpose(2, 3)) ** 2 + eps).sqrt()


def adaptation_loss(x1, xT, dists, kind):
    """Per-term losses (dict of scalars) between student x1 and teacher xT images in [0, 1], fp32.
    'hipa': Eq. 1-3 with DISTS; 'l2', 'l2+low', 'l2+high': the rows of Table 1 (L2 on the image, plus L2 on
    the low- or high-pass Fourier reconstruction)."""
    x1, xT = x1.float(), xT.float()
    if kind == "hipa":
        hp = as_images(fourier_pass(x1, hp_radius), fourier_pass(xT, hp_radius), signed=True)
        edges = as_images(sobel(x1), sobel(xT), signed=False)
        return {"spatial": w_spatial * dists(x1, xT).mean(),
                "fft": w_fft * dists(*hp).mean(),
                "sobel": w_sobel * dists(*edges).mean()}
    terms = {"l2": F.mse_loss(x1, xT)}
    if kind in ("l2+low", "l2+high"):
        high = kind == "l2+high"
        terms["fft"] = w_fft * F.mse_loss(fourier_pass(x1, hp_radius, high), fourier_pass(xT, hp_radius, high))
    elif kind != "l2":
        raise SystemExit(f"config error: loss must be 'hipa', 'l2', 'l2+low' or 'l2+high', not '{kind}'")
    return terms


# ----------------------------------------------------------------------------- teacher and student


def example_prompts(rows, n, base_seed, other=False):
    """Example k's prompt: one caption, picked at random, of caption row k (mod the number of rows), or with
    other=True of a random other row (text-guided editing: image k edited toward another row's caption)."""
    pick, prompts = torch.Generator().manual_seed(base_seed), []
    for k in range(n):
        shift = 1 + torch.randint(len(rows) - 1, (1,), generator=pick).item() if other else 0
        row = rows[(k + shift) % len(rows)]
        prompts.append(row["captions"][torch.randint(len(row["captions"]), (1,), generator=pick).item()])
    return prompts


def epoch_examples(rows, n, epoch):
    """(prompts, noise seed) of an epoch's n examples: example k gets prompts[k] and the noise of seed
    noise_seed + k. With vary_per_epoch every epoch has its own (COCO's ~5 captions per image all get used, and
    no (prompt, noise, target) triple repeats); without it, epoch 0's pairs every epoch."""
    e = epoch if vary_per_epoch else 0
    other = task == "edit" and edit_captions == "other"
    return example_prompts(rows, n, seed + 1_000_003 * e, other), seed + e * n


def weights_fingerprint(*modules):
    """sha1 of every weight's bytes, names, shapes and dtypes: targets made by other weights or in another dtype
    never match (SD 2.1's UNet and text encoder: about 4 GB, a few seconds)."""
    h = hashlib.sha1()
    for m in modules:
        for name, t in m.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(weights, scheduler, prompts, noise_seed, latent_shape, inputs=None):
    """Teacher targets are valid for one model (its weights' fingerprint), sampler, resolution, noise seeds and
    example list, and for the inpaint and upscale tasks their inputs (`inputs`: the task, its images, mask and
    noise level)."""
    desc = json.dumps([weights, dict(scheduler.config), teacher_steps, guidance, latent_shape, noise_seed,
                       hashlib.sha1("\n".join(prompts).encode()).hexdigest(), 3]
                      + ([inputs] if inputs is not None else []), sort_keys=True, default=str)
    return hashlib.sha1(desc.encode()).hexdigest()[:16]


@torch.no_grad()
def teacher_latents(unet, loras, scheduler, text, prompts, noise_seed, indices, shape, device, dtype,
                    inputs_of=None):
    """The frozen model's N-step DDIM x0 latents (LoRA off) for examples `indices`; inputs_of(indices,
    noise_seed): the task's extra UNet input (common.task_input), none for t2i."""
    set_lora(loras, False)
    cond, uncond = prompt_conds(text, [prompts[k] for k in indices], dtype)
    with autocast(device):
        x = ddim_sample(unet, scheduler, seeded_noise(indices, shape, noise_seed).to(device), cond, uncond,
                        teacher_steps, guidance, **(inputs_of(indices, noise_seed) if inputs_of else {}))
    set_lora(loras, True)
    return x


def build_teacher_cache(unet, loras, scheduler, text, prompts, noise_seed, shape, d, dtype, path, batch,
                        inputs_of=None):
    """An epoch's teacher targets, fp16 latents in a memmap (examples sharded over ranks), once per cache key."""
    if not os.path.exists(path):
        owner = [f"{socket.gethostname()}.{os.getpid()}" if d.master else None]  # this run's own partial file: two
        if d.ddp:  # runs making the same targets in one cache_dir never write or rename each other's
            torch.distributed.broadcast_object_list(owner, src=0)
        tmp = f"{path}.{owner[0]}.partial"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        need, free = len(prompts) * math.prod(shape) * 2, shutil.disk_usage(os.path.dirname(path)).free
        if need > free:  # (a memmap written past the disk's end dies with a bus error, and no message)
            raise SystemExit(f"disk error: the teacher targets of this epoch need {need:,} bytes in "
                             f"{os.path.dirname(path)}, which has {free:,} bytes free (cache_dir=)")
        if d.master:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(prompts), *shape))
        if d.ddp:
            torch.distributed.barrier()
        arr = np.load(tmp, mmap_mode="r+")
        mine, written = list(range(d.rank, len(prompts), d.world_size)), 0
        for i in tqdm(range(0, len(mine), batch), desc="teacher targets", disable=not d.master):
            idx = mine[i: i + batch]
            latents = teacher_latents(unet, loras, scheduler, text, prompts, noise_seed, idx, shape, d.device, dtype,
                                      inputs_of)
            arr[idx] = latents.cpu().half().numpy()
            written += len(idx)
        assert written == len(mine) > 0, "every row of this rank's share is written before the file is renamed"
        arr.flush()
        del arr
        if d.ddp:
            torch.distributed.barrier()
        if d.master:
            os.replace(tmp, path)
        if d.ddp:
            torch.distributed.barrier()
    return np.load(path, mmap_mode="r")


def student_loss(student, vae, dists, scheduler, x_T, cond, uncond, target, device, task_kwargs=None):
    """Eq. 1-3 for one micro-batch: the student's one-step image from x_T (LoRA on, bf16 autocast on CUDA) against
    the teacher's image decoded from its N-step latents `target`; the VAE decode and the losses in fp32.
    task_kwargs: the task's input (inpaint / upscale: the extra UNet input; edit: the image latents and strength),
    the teacher's."""
    with torch.no_grad():
        teacher_images = decode(vae, target)
    with autocast(device):
        x0 = one_step_x0(student, scheduler, x_T, cond, uncond, guidance, **(task_kwargs or {}))
    return adaptation_loss(decode(vae, x0), teacher_images, dists, loss)


def estimate_step_memory(micro):
    """One training step of this config on fake tensors (common.estimate_memory): the frozen UNet in bf16 with
    the LoRA, the text encoder, the VAE and the full-width DISTS as a paper run holds them, the AdamW state."""
    with estimate_memory() as mem:
        text, vae, unet, scheduler = sd_from_configs(model, torch.bfloat16)
        params = lora_params(add_lora(unet, lora_targets, lora_rank, lora_alpha))
        dists = DISTS(1.0).requires_grad_(False) if loss == "hipa" else None
        if grad_checkpointing:
            unet.enable_gradient_checkpointing(), vae.enable_gradient_checkpointing()
            if dists is not None:
                dists.checkpoint = True
        opt = torch.optim.AdamW(params, lr=lr)
        shape = latent_shape(vae, unet, resolution, resolution)
        size = [v * vae_factor(vae) for v in shape[1:]]
        cond, uncond = (placeholder_cond(text, micro, size).to(torch.bfloat16) for _ in range(2))
        extra = unet.config.in_channels - shape[0]  # inpaint: mask + masked latents; upscale: the low-res image
        kw = {"image_input": torch.randn(micro, extra, *shape[1:])} if extra else {}
        if unet.config.num_class_embeds:
            kw["class_labels"] = torch.full((micro,), noise_level, dtype=torch.long)
        terms = student_loss(unet, vae, dists, scheduler, torch.randn(micro, *shape), cond, uncond,
                             torch.randn(micro, *shape), torch.device("cpu"), kw)
        sum(terms.values()).backward()
        opt.step()
    return mem


@torch.no_grad()
def validation_grid(unet, loras, vae, scheduler, text, prompts, shape, device, dtype, path, inputs_of=None):
    """Columns: teacher N-step | base model 1-step | student 1-step; fixed prompts and seeds (and, for the inpaint
    and upscale tasks, the inputs of the first len(prompts) examples)."""
    idx = list(range(len(prompts)))
    x_T = seeded_noise(idx, shape, 10**9).to(device)  # seeds outside the training examples'
    kw = inputs_of(idx, 10**9) if inputs_of else {}
    cond, uncond = prompt_conds(text, prompts, dtype)
    cols = []
    for enabled, steps in ((False, teacher_steps), (False, 1), (True, 1)):
        set_lora(loras, enabled)
        with autocast(device):
            cols.append(decode(vae, ddim_sample(unet, scheduler, x_T, cond, uncond, steps, guidance, **kw)))
    set_lora(loras, True)
    save_grid(torch.stack(cols, 1).flatten(0, 1), path, nrow=3)


def export_adaptor(loras, ema, params, unet, base_fingerprint, config):
    """out_dir's two adaptor files: diffusers' format and kohya's (ComfyUI, A1111), each written atomically, each
    saying what it is for in its metadata (lora_files.adaptor_metadata: sample.py refuses it for another task)."""
    from safetensors.torch import save_file
    require_finite(ema if ema is not None else params, "the adaptor")
    path = os.path.join(out_dir, EXPORTED[0])
    state = lora_state(loras, ema)
    meta, kohya_meta = adaptor_metadata(model, base_fingerprint, unet, task, lora_rank, lora_alpha, lora_targets,
                                        "hipa.py", os.path.basename(os.path.normpath(out_dir)), config)
    save_file(state, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)
    print(f"saved {path} (StableDiffusionPipeline.load_lora_weights loads it; sample.py --lora={path})")
    kohya = os.path.join(out_dir, EXPORTED[1])
    try:
        save_file(kohya_lora_state(state, unet), kohya + ".tmp", metadata=kohya_meta)
        os.replace(kohya + ".tmp", kohya)
        print(f"saved {kohya} (the same adaptor for ComfyUI and A1111)")
    except ValueError as e:  # a UNet without an LDM layout: the diffusers file above is the adaptor
        print(f"no {kohya}: {e}")


# ----------------------------------------------------------------------------- main

EXPORTED = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors")  # what a run exports



def main(argv):
    from configurator import configure
    config = configure(globals(), argv)
    check_config(config, positive=("batch_size", "grad_accum", "epochs", "lr", "lora_alpha", "teacher_steps",
                                   "hp_radius", "grad_clip", "log_interval", "eval_interval", "ckpt_interval",
                                   "max_nonfinite"),
                 non_negative=("resolution", "num_examples", "warmup_iters", "weight_decay", "ema_decay", "w_spatial",
                               "w_fft", "w_sobel", "num_val_prompts"))
    if ema_decay >= 1:
        raise SystemExit(f"config error: ema_decay must be < 1, got {ema_decay}")
    if task not in ("t2i", "edit", "inpaint", "upscale"):
        raise SystemExit(f"config error: task must be 't2i', 'edit', 'inpaint' or 'upscale', not '{task}'")
    if edit_captions not in ("own", "other"):
        raise SystemExit(f"config error: edit_captions must be 'own' or 'other', not '{edit_captions}'")
    if task == "edit" and not 0 < strength <= 1:
        raise SystemExit(f"config error: strength must be in (0, 1], not {strength}")
    kind = "t2i" if task == "edit" else task  # the model's kind: editing adapts a t2i model
    if dry_run:
        micro = micro_batch(batch_size, grad_accum, dry_run_gpus, "dry_run_gpus")
        mem = estimate_step_memory(micro)
        print(memory_report(mem, f"one HiPA step at {micro} image(s) per GPU ({dry_run_gpus} GPUs, grad_accum "
                                 f"{grad_accum}, grad_checkpointing {grad_checkpointing})"))
        return mem.peak
    d, micro = start_run(device, init_from, batch_size, grad_accum, seed, out_dir, overwrite)
    wandb_run = start_wandb(config, d)
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32  # the frozen UNet

    # --- data: n (prompt, noise seed) examples per epoch (epoch_examples), their teacher targets cached
    images, rows = load_split(data_dir, split, need_images=task != "t2i")
    if task == "edit" and edit_captions == "other" and len(rows) < 2:
        raise SystemExit(f"config error: edit_captions='other' needs at least two images in {data_dir} {split}")
    n = num_examples or len(rows)
    prompts, noise_seed = epoch_examples(rows, n, 0)
    iters_per_epoch = n // batch_size
    if iters_per_epoch == 0:
        raise SystemExit(f"config error: {n} examples are fewer than one batch of {batch_size}")
    max_iters = epochs * iters_per_epoch
    val_prompts = list(dict.fromkeys(r["captions"][0] for r in rows[:1000]))[:num_val_prompts]
    if task != "t2i":  # the first examples' images with their prompts (edit_captions='other': another image's)
        val_prompts = prompts[:min(num_val_prompts, len(rows))]

    # --- models: frozen SD, LoRA on the UNet (LoRA off = the teacher)
    text_model, vae, unet, scheduler = load_sd(model, d.device)
    base_fingerprint = unet_fingerprint(unet)  # fp32, without LoRA: the exported files name their base weights
    fp32_output(unet.to(dtype))  # the frozen UNet in bf16 on CUDA, its output layer in fp32 (x0 = ... / 0.068)
    shape = latent_shape(vae, unet, resolution, resolution)
    if task == "upscale" and is_sdxl(unet):
        raise SystemExit(f"config error: task 'upscale' (x4) needs an x4 upscaler, and there is no SDXL one; {model} "
                         "is SDXL (the x4 task takes SD's stabilityai/stable-diffusion-x4-upscaler)")
    if model_task(unet, model) != kind:
        raise SystemExit(f"config error: task '{task}' but {model} is a {model_task(unet, model)} model "
                         f"(UNet with {unet.config.in_channels} input channels)")
    inputs_of, inputs_desc = None, None
    if task != "t2i":  # the task's extra UNet input for examples idx: from image k % N of the prepared data
        size = [v * vae_factor(vae) for v in shape[1:]]
        if list(images.shape[1:3]) != size:
            raise SystemExit(f"data error: {data_dir} holds {images.shape[1]}x{images.shape[2]} images; this "
                             f"{task} model makes {size[0]}x{size[1]} (prepare the data at that resolution)")
        low_res_scheduler = load_low_res_scheduler(model) if task == "upscale" else None
        masks = make_mask(mask, 1, *size).to(d.device) if task == "inpaint" else None
        factor = size[0] // shape[1]

        def inputs_of(idx, noise_seed):
            x = images_to_tensor(images[[k % len(images) for k in idx]]).to(d.device)
            x = downsample(x, factor) if task == "upscale" else x  # the low-res input: 32 -> 8 here
            return task_input(kind, vae, x, idx, noise_seed, masks.expand(len(idx), -1, -1, -1) if masks is not None
                              else None, low_res_scheduler, noise_level, strength)
        inputs_desc = [task, os.path.abspath(data_dir), split, images.shape, os.path.getmtime(images.filename),
                       masks is not None and hashlib.sha1(masks.cpu().numpy().tobytes()).hexdigest(),
                       noise_level if task == "upscale" else None] + ([strength] if task == "edit" else [])
    # the targets' model: every weight (before the LoRA is added) and, for SDXL, whether uncond is zeros
    weights = (weights_fingerprint(unet, *text_model.encoders) + " zero_uncond" * text_model.zero_uncond
               if teacher_cache else None)
    loras = add_lora(unet, lora_targets, lora_rank, lora_alpha)
    params = lora_params(loras)
    if d.master:
        total = sum(p.numel() for p in unet.parameters())
        print(f"LoRA: {len(loras)} layers, {sum(p.numel() for p in params):,} trainable parameters "
              f"({100 * sum(p.numel() for p in params) / total:.2f}% of the UNet)")
    text = guidance_text(text_model, [v * vae_factor(vae) for v in shape[1:]])  # (Text, uncond, image size)
    dists = load_dists(vgg_weights, dists_weights, cache_dir, d.master, standin, standin_size).to(d.device) \
        if loss == "hipa" else None
    if grad_checkpointing:
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
        if dists is not None:
            dists.checkpoint = True
    probe = torch.rand(1, 3, 8, 8, device=d.device)
    adaptation_loss(probe, probe, dists, loss)  # a bad `loss` fails here, before anything is written

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else None
    it = 0
    if init_from == "resume":
        ck = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), config, d.master)
        if [tuple(v.shape) for v in ck["lora"]] != [tuple(p.shape) for p in params]:
            raise SystemExit(f"resume error: {out_dir}/ckpt.pt holds an adaptor of other LoRA targets or rank "
                             f"(its config: lora_targets={ck['config']['lora_targets']}, "
                             f"lora_rank={ck['config']['lora_rank']})")
        for p, v in zip(params, ck["lora"]):
            p.data.copy_(v)
        opt.load_state_dict(ck["opt"])
        ema = [e.to(p.device) for e, p in zip(ck["ema"], params)] if ema is not None else None
        it = ck["iter"]
        resume_rng(ck["rng"], d, seed, it)
        print(f"resumed from {out_dir}/ckpt.pt at iteration {it}")
    student = unet
    if compile:
        c = prompt_conds(text, prompts[:2])[0]  # fp32: the check runs on an fp32 copy
        x = seeded_noise([0, 1], shape, seed).to(d.device)
        kw = inputs_of([0, 1], seed) if inputs_of else {}
        student = checked_compile(unet, lambda m: one_step_x0(m, scheduler, x, c, None, 1.0, **kw).square().mean(),
                                  backend=compile_backend)
    if d.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        student = DDP(student)
    if d.master:
        lock_out_dir(out_dir)  # one run per out_dir: taken before the first write into it
        save_json(config, os.path.join(out_dir, "config.json"))
    stop = catch_stop_signals()  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit EXIT_STOPPED

    def epoch_targets(epoch):
        """The epoch's examples and, with teacher_cache, their teacher targets: made once, then read from disk."""
        prompts, noise_seed = epoch_examples(rows, n, epoch)
        if not teacher_cache:
            return prompts, noise_seed, None
        key = cache_key(weights, scheduler, prompts, noise_seed, shape, inputs_desc)
        path = os.path.join(cache_dir, f"teacher_{key}.npy")
        t0 = time.time()
        cache = build_teacher_cache(unet, loras, scheduler, text, prompts, noise_seed, shape, d, dtype, path,
                                    micro * 2, inputs_of)
        if d.master:
            tqdm.write(f"teacher targets of epoch {epoch}: {n} examples in {path} ({time.time() - t0:.1f} s)")
        return prompts, noise_seed, cache

    log_path = start_log(out_dir, init_from, d, exported=EXPORTED, resume_iter=it)

    def save_checkpoint():
        rngs = gather(rng_state(), d)
        if d.master:
            atomic_save({"lora": [p.detach().cpu() for p in params], "opt": opt.state_dict(), "ema": ema,
                         "iter": it, "rng": rngs, "config": config}, os.path.join(out_dir, "ckpt.pt"))

    pbar = tqdm(total=max_iters, initial=it, disable=not d.master, desc="hipa")
    t0, seen, skipped, streak, examples_of = time.time(), 0, 0, 0, None
    while it < max_iters:
        epoch, pos = divmod(it, iters_per_epoch)
        if examples_of != (epoch if vary_per_epoch else 0):  # a new epoch's examples (and targets)
            examples_of = epoch if vary_per_epoch else 0
            prompts, noise_seed, cache = epoch_targets(epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))  # the epoch's order
        batch = order[pos * batch_size: (pos + 1) * batch_size]
        for g_ in opt.param_groups:
            g_["lr"] = lr * min(1.0, (it + 1) / max(1, warmup_iters))
        terms_sum = {}
        for m in range(grad_accum):
            idx = batch[(m * d.world_size + d.rank) * micro: (m * d.world_size + d.rank + 1) * micro].tolist()
            if cache is not None:
                target = torch.from_numpy(np.stack([cache[k] for k in idx])).float().to(d.device)
            else:
                target = teacher_latents(unet, loras, scheduler, text, prompts, noise_seed, idx, shape, d.device,
                                         dtype, inputs_of)
            cond, uncond = prompt_conds(text, [prompts[k] for k in idx], dtype)
            if d.ddp:
                student.require_backward_grad_sync = m == grad_accum - 1
            terms = student_loss(student, vae, dists, scheduler, seeded_noise(idx, shape, noise_seed).to(d.device),
                                 cond, uncond, target, d.device, inputs_of(idx, noise_seed) if inputs_of else None)
            total_loss = sum(terms.values()) / grad_accum
            total_loss.backward()
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v.item() / grad_accum
        # NaN guard: a non-finite loss or gradient on any rank skips the step everywhere; a streak of them stops
        if all_finite(terms_sum.values(), [p.grad for p in params if p.grad is not None], d):
            streak = 0
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema, params):
                        e.lerp_(p.detach(), 1 - ema_decay)
        else:
            skipped, streak = skipped + 1, streak + 1
            tqdm.write(f"iter {it}: non-finite loss or gradient, step skipped ({skipped} so far)")
            stop_if_diverged(streak, max_nonfinite, it)
        opt.zero_grad(set_to_none=True)
        it += 1
        seen += batch_size
        pbar.update(1)
        if it % log_interval == 0 or it == max_iters:
            names = sorted(terms_sum)
            vals = all_reduce_mean([terms_sum[k] for k in names], d)
            stats = {"iter": it, "epoch": epoch, "loss": sum(vals), **dict(zip(names, vals)),
                     "img_per_s": seen / (time.time() - t0), "peak_mem_gb": peak_memory_gb(d.device),
                     "skipped": skipped}
            pbar.set_postfix_str(" ".join(f"{k} {v:.4g}" for k, v in stats.items() if k not in ("iter", "epoch")))
            if d.master:
                append_log(log_path, stats, wandb_run)
            t0, seen = time.time(), 0
        if d.master and (it % eval_interval == 0 or it == max_iters):
            validation_grid(unet, loras, vae, scheduler, text, val_prompts, shape, d.device, dtype,
                            os.path.join(out_dir, f"val_{it:06d}.png"), inputs_of)
            wandb_image(wandb_run, os.path.join(out_dir, f"val_{it:06d}.png"), it)
        if it == max_iters and d.master:  # the adaptor before the last checkpoint: a full disk keeps it
            export_adaptor(loras, ema, params, unet, base_fingerprint, config)
        checkpoint_step(it, max_iters, ckpt_interval, save_checkpoint, stop, out_dir, d)  # (and SIGTERM's stop)
    pbar.close()
    end_run(stop, out_dir, wandb_run, d)


if __name__ == "__main__":
    main(sys.argv[1:])
