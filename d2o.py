"""
D2O: Diffusion to One-step (papers/d2o.txt), GAN-only fine-tuning of a pretrained diffusion model.

The pretrained UNet, called ONCE from pure noise at the terminal timestep, is the generator; no distillation
loss, no teacher targets: a projected discriminator (frozen feature networks, trainable multi-scale heads)
and the non-saturating GAN objective with lazy R1 (Sec. 3.3-3.4) turn it into a one-step model. D2O-F
(Sec. 4.2, Table 3) trains with most of the UNet frozen: the main convolutions of the residual blocks and
the attention output projections stay as the diffusion training left them; norms, time-embedding
projections, skip convolutions and q/k/v adapt.

    python d2o.py config/fmnist_d2o.py                                # the laptop run (< 30 min CPU)
    torchrun --nproc_per_node=8 d2o.py config/coco_d2o.py             # SD 2.1-base on COCO
    python d2o.py config/fmnist_d2o.py --init_from=resume             # continue a run
    python sample.py --unet=out/d2o-fmnist/unet --guidance=1          # one-step images from the EMA UNet

Reads top to bottom: config, freezing, discriminator (feature networks, CCM/CSM projection, heads),
objective, generator, training loop. Per step, as the official code: a G step on fresh noise, a D step on
fresh noise with fakes from the updated G, an R1 step every r1_interval steps, the EMA update.
"""
import copy
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from efficientnet_lite import EfficientNetLite0, load_lite0

from common import (Dist, all_finite, all_reduce_mean, append_log, atomic_save, autocast, catch_stop_signals,
                    check_config, checked_compile, checkpoint_step, ddim_sample, decode, encode, end_run,
                    estimate_memory, fp32_output, gather, guidance_text, images_to_tensor, latent_shape,
                    load_checkpoint, load_sd, load_split, lock_out_dir, memory_report, micro_batch, one_step_x0,
                    peak_memory_gb, placeholder_cond, prompt_conds, require_finite, resume_rng, rng_state, save_grid,
                    save_json, sd_from_configs, seeded_noise, start_log, start_run, start_wandb, stop_if_diverged,
                    vae_factor, wandb_image)

# ----------------------------------------------------------------------------- config
model = "assets/tiny-sd-fmnist"  # SD-format model (hub id or folder): the generator's initialisation
data_dir = "data/fmnist"  # prepared data with real images (the GAN's target distribution) and captions
split = "train"
out_dir = "out/d2o-fmnist"
init_from = "scratch"  # 'scratch' or 'resume' (out_dir/ckpt.pt)
overwrite = False  # a scratch run into an out_dir that holds an earlier run: refused unless True
resolution = 0  # generator image size; 0 = the model's native size (real images may have another size)
# generator
freeze = 1  # D2O-F level (FREEZE_LEVELS): 0 = full D2O, 1 = freeze convs + attention out/ff, 2 = + q/k/v, 3 = + skip
freeze_ff = True  # levels >= 1 also freeze the transformers' feed-forward and proj_in/proj_out (no EDM counterpart)
guidance = 1.0  # classifier-free guidance of the one-step generator; 1 = a plain conditional call (the paper uses none)
# discriminator
backbones = ("lite0",)  # feature networks: 'lite0' (the official EfficientNet-Lite0, offline), transformers
# EfficientNet/DeiT/ViT (hub id or folder), or 'teacher_unet' (the frozen teacher's own encoder)
lite0_size = 224  # 'lite0': images are resized to this side (the paper: 224)
joint_batch = True  # the heads see real and fake as ONE batch (shared BatchNorm statistics); False: two calls
real_through_vae = True  # real images reach D after a VAE round trip (encode, decode), as every fake comes out of
# the frozen decoder; raw reals carry the decoder's signature, a cue the generator can never remove
offline_fallback = True  # a backbone that cannot be loaded is replaced by 'teacher_unet' (announced); False: stop
unet_feature_t = 50  # 'teacher_unet': timestep at which the frozen UNet encoder sees the image's latent (small noise)
proj_channels = 64  # CCM widths 64/128/256/512 at the four scales (Projected GAN's cout, expand=True)
cmap_dim = 64  # conditional heads: logit = sum(out * proj(text)) / sqrt(cmap_dim)
# objective and optimisation (paper Table 10)
r1_gamma = 1e-4  # the official code's R1 gamma; divided by the per-GPU batch here (r1_weight: one rule everywhere)
r1_interval = 16  # lazy R1: every this many steps, weighted by the interval
g_lr = 1e-4  # the paper's G learning rate (Table 10), in the official EDM generator's units ...
g_lr_rule = True  # ... so multiplied by g_step_scale(scheduler): the official code's motion of the image per step
d_lr = 1e-4  # scaled by c = r1_interval / (r1_interval + 1), and beta2 ** c, for lazy R1 (StyleGAN2)
fake_clamp = "hard"  # the fakes' decode: 'hard' clamp to [-1, 1] (zero gradient on saturated pixels),
# 'straight_through' (clamped forward, identity gradient) or 'none' (unclamped, as the official generator's output)
cache_real_vae = False  # keep each real image's VAE round trip after its first use (in RAM, fp16: N x 3 x H x W x 2
# bytes per process; 0.37 GB for Fashion-MNIST, 46 GB for COCO at 256 px): a deterministic posterior mean, so reused
init_lora = ""  # a HiPA adaptor (diffusers-format file) merged into the generator before training: D2O from a
# distilled start (an extension, docs/d2o.md); the teacher, the discriminator and everything else are unchanged
max_iters = 800  # training images = max_iters * batch_size
batch_size = 32  # global batch, over all ranks and micro-steps
grad_accum = 1
ema_kimg = 500.0  # EMA half-life in thousands of images (paper: 0.5 Mimg)
ema_rampup = 0.05  # half-life at most ema_rampup * images seen (EDM's warm-up); 0 = off
max_nonfinite = 10  # this many consecutive steps with a non-finite G or D loss stop the run (non-zero exit)
# logging, evaluation, checkpoints
log_interval = 10
eval_interval = 200  # validation grid every this many iterations (and at the end)
ckpt_interval = 100
curve_interval = 0  # learning curve: every this many iterations (and at the end), the EMA UNet's one-step samples
curve_sample_config = "config/fmnist_sample.py"  # ... made by sample.py with this config (its prompts, seeds)
curve_per_prompt = 50  # ... this many per prompt, evaluated by eval_fid.py against data_dir's test split -> curve.jsonl
curve_cache_dir = "out/eval_cache"  # eval_fid.py's cache (the reference statistics, the Fashion-MNIST classifier)
num_val_prompts = 10
teacher_steps = 25  # the grid's teacher column: DDIM steps and guidance
teacher_guidance = 2.0
wandb_log = False  # also log log.jsonl's records and the validation grids to wandb (imported only then)
wandb_project = "one-step"
wandb_run_name = ""  # '' = wandb's own name
# system
device = "auto"
compile = False  # torch.compile the generator (checked against eager gradients first)
compile_backend = "inductor"
grad_checkpointing = False  # trade compute for memory in the generator UNet and VAE decoder (SD at 512)
seed = 0
dry_run = False  # print the estimated peak GPU memory of one training step per GPU and exit (no weights, no GPU)
dry_run_gpus = 8  # for dry_run: the micro-batch per GPU is batch_size / (grad_accum * dry_run_gpus)
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------- D2O-F freezing
# The official rule (EDM names) freezes 'conv' and 'proj' (attention out-projection), then 'qkv', then 'skip'.
# In diffusers' names: resnets.*.conv1/conv2 are EDM's conv0/conv1; EDM fuses resampling into conv0, so the
# separate down/upsampler convs are main convolutions too; to_out.0 is the out-projection, and the
# transformer's own projections (proj_in/out, feed-forward) are frozen with it. Norms, time_emb_proj (EDM's
# 'affine'), the time embedding, conv_shortcut (EDM's 'skip'), to_q/k/v and conv_in/conv_out stay trainable.
FREEZE_LEVELS = {0: (), 1: ("conv", "resample", "attn_out", "ff", "proj_io")}
FREEZE_LEVELS[2] = FREEZE_LEVELS[1] + ("qkv",)
FREEZE_LEVELS[3] = FREEZE_LEVELS[2] + ("skip",)


def param_kind(name):
    """What a UNet2DConditionModel parameter is, from its qualified name."""
    module = name.rsplit(".", 1)[0]
    leaf = module.split(".")[-1]
    if ".resnets." in module and leaf in ("conv1", "conv2"):
        return "conv"
    if leaf == "conv_shortcut":
        return "skip"
    if "samplers." in module:
        return "resample"
    if leaf in ("to_q", "to_k", "to_v"):
        return "qkv"
    if module.endswith("to_out.0"):
        return "attn_out"
    if ".ff." in module:
        return "ff"
    if leaf in ("proj_in", "proj_out"):
        return "proj_io"
    if "norm" in leaf:
        return "norm"
    if leaf == "time_emb_proj" or module.startswith("time_embedding"):
        return "time"
    if leaf in ("conv_in", "conv_out"):
        return "io"
    return "other"


def freeze_unet(unet, level, ff=True):
    """requires_grad per D2O-F level; ff=False keeps the feed-forward and proj_in/proj_out layers trainable
    (EDM's blocks have none: the official rule freezes only convs and the attention out-projection).
    Returns {kind: [parameters, frozen]}."""
    if level not in FREEZE_LEVELS:
        raise SystemExit(f"config error: freeze must be 0 (full D2O), 1, 2 or 3, not {level!r}")
    frozen_kinds = [k for k in FREEZE_LEVELS[level] if ff or k not in ("ff", "proj_io")]
    stats = {}
    for name, p in unet.named_parameters():
        kind = param_kind(name)
        p.requires_grad_(kind not in frozen_kinds)
        s = stats.setdefault(kind, [0, 0])
        s[0] += p.numel()
        s[1] += 0 if p.requires_grad else p.numel()
    return stats


def freeze_table(stats, level):
    total, frozen = sum(s[0] for s in stats.values()), sum(s[1] for s in stats.values())
    lines = [(f"D2O-F freeze level {level}: {frozen:,} of {total:,} UNet parameters frozen "
              f"({100 * frozen / total:.2f}%), {total - frozen:,} trainable"),
             f"  {'kind':<9} {'parameters':>13} {'% of UNet':>9} {'trainable':>13} {'frozen':>13}"]
    for kind, (n, f) in sorted(stats.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {kind:<9} {n:>13,} {100 * n / total:>8.2f}% {n - f:>13,} {f:>13,}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- discriminator
# Projected GAN (StyleGAN-XL style), as the official code builds it: per backbone, frozen features at four
# depths -> frozen random cross-channel mixing (CCM) and top-down cross-scale mixing (CSM) -> four trainable
# heads. The feature module is frozen and always in eval mode; only the heads train (BatchNorm in train mode).


def resize(images, size):
    """The one path by which real and fake images reach a feature network: bilinear, antialiased when shrinking.
    Without antialiasing, 512-px fakes shrunk to 224 keep about 2x the power above half-Nyquist of 256-px reals
    shrunk to 224: a real/fake cue that has nothing to do with content (tests/test_d2o.py checks the spectra)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Lite0Features(nn.Module):
    """The official code's first backbone, offline: ImageNet EfficientNet-Lite0 (efficientnet_lite.py, timm's
    tf_efficientnet_lite0). Images in [-1, 1] -> [0, 1] (the network applies its own (x - 0.5) / 0.5) -> resized
    to `size` -> the outputs of stages 1, 2, 4, 6: 24/40/112/320 channels at strides 4, 8, 16, 32.
    configs_only: the architecture with random weights (for dry_run's memory estimate)."""

    def __init__(self, size, device, configs_only=False):
        super().__init__()
        if configs_only:
            with torch.device(device):
                self.net = EfficientNetLite0().requires_grad_(False).eval()
        else:
            self.net = load_lite0(device)
        self.input_size = size

    def forward(self, x):
        return self.net.features(resize((x + 1) / 2, self.input_size))


class PretrainedFeatures(nn.Module):
    """A frozen ImageNet network from transformers: the official DeiT-B distilled
    (facebook/deit-base-distilled-patch16-224), or an EfficientNet / ViT. (The official EfficientNet-Lite0 is
    'lite0', Lite0Features: transformers has no Lite variant.) Images in [-1, 1] -> [0, 1] -> the network's own normalisation -> resized to its input size (224).
    EfficientNet: the last block at strides 4, 8, 16, 32. ViT/DeiT: tokens of blocks L/4, L/2, 3L/4, L (2, 5,
    8, 11 of 12), prefix tokens dropped, as (B, D, 14, 14) maps (brought to 4 scales in the Projector)."""

    def __init__(self, net, kind, mean, std, device):
        super().__init__()
        self.net, self.vit = net, kind in ("deit", "vit")
        self.prefix = 2 if kind == "deit" else 1  # class (+ distillation) tokens
        self.input_size = net.config.image_size
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1))
        if not self.vit:  # which hidden states end a stride: found once from the shapes
            with torch.no_grad():
                x = torch.zeros(1, 3, self.input_size, self.input_size, device=device)
                hidden = net(x, output_hidden_states=True).hidden_states
            sizes = [h.shape[-1] for h in hidden]
            ends = [i for i in range(len(sizes)) if i + 1 == len(sizes) or sizes[i + 1] != sizes[i]]
            if len(ends) < 5:
                raise SystemExit(f"backbone error: this EfficientNet has {len(ends)} scales, the discriminator taps 4 "
                                 "below the stem")
            self.taps = ends[-4:]

    def forward(self, x):
        x = resize(((x + 1) / 2 - self.mean) / self.std, self.input_size)
        hidden = self.net(x, output_hidden_states=True).hidden_states
        if not self.vit:
            return [hidden[i] for i in self.taps]
        n, grid = len(hidden) - 1, self.input_size // self.net.config.patch_size
        return [hidden[n * (k + 1) // 4][:, self.prefix:].transpose(1, 2).unflatten(2, (grid, grid)) for k in range(4)]


class TeacherUNetFeatures(nn.Module):
    """'teacher_unet', an alternative offline feature network: the frozen teacher's own encoder. Image -> VAE latent
    (posterior mean) noised to timestep t -> conv_in, down blocks, mid block, with the empty prompt as context
    (the condition enters through the heads, as with the ImageNet backbones). Four taps evenly spaced along
    the encoder's depth: conv_in's output ... the mid block's output. A model trained on this very domain,
    but not the paper's discriminator: numbers from it are not comparable with the paper's."""

    def __init__(self, unet, vae, scheduler, uncond, t, size):
        super().__init__()
        self.unet, self.vae, self.uncond, self.t, self.input_size = unet, vae, uncond, t, size
        self.alpha_bar = float(scheduler.alphas_cumprod[t])
        n = 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)  # conv_in, skips
        n += unet.mid_block is not None
        self.taps = [round(k * (n - 1) / 3) for k in range(4)]

    def forward(self, x):
        z = self.vae.encode(resize(x, self.input_size)).latent_dist.mean * self.vae.config.scaling_factor
        z = math.sqrt(self.alpha_bar) * z + math.sqrt(1 - self.alpha_bar) * torch.randn_like(z)
        unet, context = self.unet, self.uncond.expand(len(z)).to(z.dtype)
        emb = unet.time_embedding(unet.time_proj(torch.full((len(z),), self.t, device=z.device)).to(z.dtype))
        if context.time_ids is not None:  # SDXL: the pooled text and size embedding, as its forward adds it
            emb = emb + unet.get_aug_embed(emb, context.hidden, context.unet_kwargs()["added_cond_kwargs"])
        context = context.hidden
        h = unet.conv_in(z)
        feats = [h]
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(h, temb=emb, encoder_hidden_states=context)
            else:
                h, res = block(h, temb=emb)
            feats += list(res)
        if unet.mid_block is not None:
            feats.append(unet.mid_block(h, emb, encoder_hidden_states=context))
        return [feats[i] for i in self.taps]


class Projector(nn.Module):
    """Frozen random projection (Projected GAN, proj_type=2, expand=True). CCM: 1x1 convs to cout * (1, 2, 4, 8)
    channels. CSM, top-down: h3 = conv(up2(c3)), hk = conv(up2(ck + h(k+1))), convs halving the channels except
    the finest; bilinear x2, no activation. ViT taps first go to strides 4, 8, 16, 32 as in the official code
    (DPT's reassembly): 1x1 conv to D/8, D/4, D/2, D channels, then transposed conv x4, x2, identity, conv /2."""

    def __init__(self, in_channels, cout, vit_dim=None):
        super().__init__()
        self.reassemble = None
        if vit_dim:
            c = [vit_dim // 8, vit_dim // 4, vit_dim // 2, vit_dim]
            self.reassemble = nn.ModuleList([
                nn.Sequential(nn.Conv2d(vit_dim, c[0], 1), nn.ConvTranspose2d(c[0], c[0], 4, stride=4)),
                nn.Sequential(nn.Conv2d(vit_dim, c[1], 1), nn.ConvTranspose2d(c[1], c[1], 2, stride=2)),
                nn.Conv2d(vit_dim, c[2], 1),
                nn.Sequential(nn.Conv2d(vit_dim, c[3], 1), nn.Conv2d(c[3], c[3], 3, stride=2, padding=1))])
            in_channels = c
        mixed = [cout, cout * 2, cout * 4, cout * 8]
        self.ccm = nn.ModuleList(nn.Conv2d(i, o, 1) for i, o in zip(in_channels, mixed))
        self.csm = nn.ModuleList(nn.Conv2d(o, o // 2 if k else o, 1) for k, o in enumerate(mixed))

    def forward(self, feats):
        if self.reassemble is not None:
            feats = [r(f) for r, f in zip(self.reassemble, feats)]
        mixed = [ccm(f) for ccm, f in zip(self.ccm, feats)]
        out, h = [None] * 4, None
        for k in (3, 2, 1, 0):
            x = mixed[k]
            if h is not None:  # taps that are not exactly 2x apart (teacher_unet) meet at the finer one's size
                x = x + (h if h.shape[-2:] == x.shape[-2:] else
                         F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=True))
            h = out[k] = self.csm[k](F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
        return out


def sn_conv(c_in, c_out, kernel, stride, padding):
    return nn.utils.parametrizations.spectral_norm(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False))


HEAD_CHANNELS = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}


def nearest_size(res):
    return min(HEAD_CHANNELS, key=lambda s: abs(s - res))


class Head(nn.Module):
    """One conditional multi-scale head (Projected GAN's SingleDiscCond): DownBlocks (spectral-norm conv 4x4
    stride 2, BatchNorm, LeakyReLU 0.2) from the map's size (nearest power of two) down to `end` (8 for 224
    inputs: depth 4/3/2/1 on the four scales), a spectral-norm conv to cmap_dim channels, and the projection
    logit = sum(out * proj(text)) / sqrt(cmap_dim) per position."""

    def __init__(self, channels, res, end, text_dim, cmap_dim):
        super().__init__()
        size, widths, layers = nearest_size(res), dict(HEAD_CHANNELS), []
        widths[size] = channels
        while size > end:
            layers += [sn_conv(widths[size], widths[size // 2], 4, 2, 1), nn.BatchNorm2d(widths[size // 2]),
                       nn.LeakyReLU(0.2)]
            size //= 2
        self.main = nn.Sequential(*layers)
        self.cls = sn_conv(widths[end], cmap_dim, 4 if end >= 8 else max(1, end // 2), 1, 0)
        self.embed_proj = nn.Sequential(nn.Linear(text_dim, cmap_dim), nn.LeakyReLU(0.2))
        self.cmap_dim = cmap_dim

    def forward(self, x, text):
        out = self.cls(self.main(x))
        cmap = self.embed_proj(text)[:, :, None, None]
        return ((out * cmap).sum(1) / math.sqrt(self.cmap_dim)).flatten(1)


class ProjectedDiscriminator(nn.Module):
    """D(images in [-1, 1], pooled text embeddings) -> one (B, positions) logit tensor per backbone."""

    def __init__(self, feature_nets, text_dim, cout, cmap_dim, device):
        super().__init__()
        self.backbones = nn.ModuleList(feature_nets).requires_grad_(False).eval()
        self.projectors, self.heads = nn.ModuleList(), nn.ModuleList()
        for net in feature_nets:
            with torch.no_grad(), torch.device(device):
                feats = net(torch.zeros(1, 3, net.input_size, net.input_size))
                proj = Projector([f.shape[1] for f in feats], cout, feats[0].shape[1] if getattr(net, "vit", False)
                                 else None)
                maps = proj(feats)
            self.projectors.append(proj.requires_grad_(False))
            with torch.device(device):  # Projected GAN's end_sz = 8; a map already smaller gets the final conv only
                self.heads.append(nn.ModuleList(Head(m.shape[1], m.shape[-1], min(8, nearest_size(m.shape[-1])),
                                                     text_dim, cmap_dim) for m in maps))
        self.train()

    def train(self, mode=True):  # the feature module stays in eval mode whatever D is asked (frozen BatchNorms)
        super().train(mode)
        self.backbones.eval(), self.projectors.eval()
        return self

    def features(self, images):
        """The frozen part: per backbone, the four projected maps. Real images need it once per step (no grad)."""
        return [proj(net(images)) for net, proj in zip(self.backbones, self.projectors)]

    def logits(self, maps, text):
        """The trainable heads on features(images): one (B, positions) logit tensor per backbone."""
        return [torch.cat([head(m, text) for head, m in zip(heads, ms)], 1) for heads, ms in zip(self.heads, maps)]

    def forward(self, images, text):
        return self.logits(self.features(images), text)

    def fake_and_real(self, fake_maps, real_maps, text_fake, text_real, joint):
        """(fake logits, real logits). joint: the heads see both as one batch, so their BatchNorms normalise with
        statistics shared by real and fake. Two calls (the official code) normalise an all-real and an all-fake
        batch each by its own mean: a per-channel shift between real and fake, the plainest cue there is, is
        subtracted before any head can use it (tests/test_d2o.py shows a head blind to it)."""
        if not joint:
            return self.logits(fake_maps, text_fake), self.logits(real_maps, text_real)
        n = len(text_fake)
        maps = [[torch.cat([f, r]) for f, r in zip(fs, rs)] for fs, rs in zip(fake_maps, real_maps)]
        logits = self.logits(maps, torch.cat([text_fake, text_real]))
        return [l[:n] for l in logits], [l[n:] for l in logits]


def load_backbone(spec, device, configs_only=False):
    """A transformers EfficientNet / DeiT / ViT as a PretrainedFeatures on `device`, or None if it cannot be loaded.
    configs_only: random weights from its config (for dry_run's memory estimate)."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import cached_file
    try:
        kind = AutoConfig.from_pretrained(spec).model_type
        if kind not in ("efficientnet", "deit", "vit"):
            raise SystemExit(f"config error: backbone '{spec}' is a '{kind}' model; the discriminator takes "
                             "EfficientNet, DeiT or ViT (transformers), or 'teacher_unet'")
        kwargs = {} if kind == "efficientnet" else {"add_pooling_layer": False}
        if configs_only:
            try:
                from transformers.initialization import no_init_weights
            except ImportError:  # transformers 4
                from transformers.modeling_utils import no_init_weights
            with torch.device(device), no_init_weights():  # (random init draws data-dependent values)
                net = AutoModel.from_config(AutoConfig.from_pretrained(spec), **kwargs)
        else:
            net = AutoModel.from_pretrained(spec, **kwargs).to(device)
        stats_file = cached_file(spec, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):  # unreachable offline, or not a transformers model
        return None
    stats = {}
    if stats_file:
        with open(stats_file) as f:
            stats = json.load(f)
    mean = stats.get("image_mean", [0.485, 0.456, 0.406])
    std = stats.get("image_std", [0.229, 0.224, 0.225])
    if kind == "efficientnet" and stats.get("include_top", False):  # its processor divides by std twice (Keras port)
        std = [s * s for s in std]
    return PretrainedFeatures(net.requires_grad_(False).eval(), kind, mean, std, device)


def build_discriminator(specs, teacher, vae, scheduler, uncond, image_size, text_dim, device, verbose=True):
    """The feature networks of `specs` ('teacher_unet' or transformers models), then the projected D. A backbone
    that cannot be loaded is replaced by 'teacher_unet' if offline_fallback, else a clear error."""
    nets, names = [], []
    for spec in specs:
        if spec == "lite0":
            try:
                net = Lite0Features(lite0_size, device, configs_only=dry_run)
            except SystemExit as e:  # the weights package is missing or broken
                if not offline_fallback:
                    raise
                print(e)
                net = None
        else:
            net = None if spec == "teacher_unet" else load_backbone(spec, device, configs_only=dry_run)
        if net is None and spec != "teacher_unet":
            if not offline_fallback:
                raise SystemExit(f"backbone error: cannot load '{spec}' (offline, or not a transformers model folder); "
                                 "download it or give its local folder, or set offline_fallback=True")
            if verbose:
                print("=" * 100 + f"\nWARNING: discriminator backbone '{spec}' cannot be loaded; using the offline "
                      "fallback 'teacher_unet' (the frozen teacher's encoder).\nNumbers from it are not comparable "
                      "with the paper's; give a local folder for paper runs.\n" + "=" * 100)
            spec = "teacher_unet"
        if spec == "teacher_unet" and spec not in names:
            net = TeacherUNetFeatures(teacher, vae, scheduler, uncond, unet_feature_t, image_size)
        if net is not None:  # (already on device: the teacher's, or loaded there)
            nets.append(net)
            names.append(spec)
    return ProjectedDiscriminator(nets, text_dim, proj_channels, cmap_dim, device), names


# ----------------------------------------------------------------------------- objective


def generator_loss(fake_logits):
    """Non-saturating G loss (Sec. 3.3): softplus(-D(G(z))), mean over images and positions, summed over backbones."""
    return sum(F.softplus(-l).mean() for l in fake_logits)


def discriminator_loss(fake_logits, real_logits):
    """softplus(D(G(z))) + softplus(-D(x)), reduced as generator_loss."""
    return sum(F.softplus(l).mean() for l in fake_logits) + sum(F.softplus(-l).mean() for l in real_logits)


def r1_penalty(D, real, text):
    """Per-image R1 penalty |grad_x sum(D(x))|^2 on real images, through the whole discriminator (features
    included), with the graph kept for the double backward. As the official code, the logits are summed over
    positions and backbones here while the adversarial terms average over positions. The official adversarial
    terms are also summed over the per-GPU batch (a per-image list) while R1 is a batch mean: r1_weight. The
    MATH attention kernel: the fused ones have no double backward."""
    real = real.detach().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):
        logits = D(real, text)
        grad, = torch.autograd.grad(sum(l.sum() for l in logits), real, create_graph=True)
    return grad.square().sum([1, 2, 3])


def r1_weight(micro):
    """The R1 term's weight with our mean-reduced adversarial terms: the official loss sums its adversarial terms
    over the per-GPU batch and takes R1 as a batch mean, so the same balance is r1_gamma / per-GPU batch."""
    return r1_gamma / micro


# The official generator is EDM-preconditioned and called at sigma_max = 80 with sigma_data = 0.5: its image is
# c_skip x + c_out F(x), c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2) = 0.49998, that is 0.99998 data
# standard deviations per unit of the network's output F.
EDM_C_OUT = 80.0 / math.sqrt(80.0 ** 2 + 0.5 ** 2)


def output_scale(scheduler):
    """How far one unit of the network's output moves the one-step x0 at t = T-1, in data standard deviations
    (SD latents have about unit std by the VAE's scaling factor: 1.0005 on the tiny teacher's train images).
    epsilon: x0 = (x_T - sqrt(1-a) eps) / sqrt(a) -> sqrt(1-a) / sqrt(a), 14.6 for SD's betas at 512 and on the
    tiny teacher alike; v_prediction: x0 = sqrt(a) x_T - sqrt(1-a) v -> sqrt(1-a); sample: 1."""
    a = scheduler.alphas_cumprod[scheduler.config.num_train_timesteps - 1].item()
    kind = scheduler.config.prediction_type
    return {"epsilon": math.sqrt((1 - a) / a), "v_prediction": math.sqrt(1 - a), "sample": 1.0}[kind]


def g_step_scale(scheduler):
    """The factor that turns the paper's generator learning rates into ours: Adam moves each weight by about lr
    whatever the gradient's scale, so the image moves by lr x (the network's sensitivity) x c_out per step. The
    same motion as the official generator's needs lr x EDM_C_OUT / output_scale: 1/14.6 for an SD epsilon model."""
    return EDM_C_OUT / output_scale(scheduler)


def ema_decay(images_seen, batch, halflife_kimg, rampup):
    """EDM / official EMA: half-life h = min(halflife_kimg * 1000, rampup * images_seen) images,
    decay = 0.5 ** (batch / h) per step (0 at the first step: the EMA starts at the weights)."""
    h = halflife_kimg * 1000
    if rampup:
        h = min(h, rampup * images_seen)
    return 0.5 ** (batch / max(h, 1e-8))


def optimizer_step(opt, params, d):
    """Average gradients over ranks (one flat all-reduce: no DDP wrappers, whose hooks fight the GAN's
    alternating requires_grad), nan_to_num as the official code, step, zero."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if d.ddp:
        flat = torch.cat([g.flatten() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= d.world_size
        grads = [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)]
    for p, g in zip(params, grads):
        p.grad = torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- generator and data


def generate(unet, scheduler, vae, cond, uncond, shape, device):
    """The generator: fresh x_T, one UNet call at t = T-1 (bf16 autocast on CUDA), x0, VAE decode (fp32,
    fake_clamp), images in [-1, 1]."""
    x_T = torch.randn(len(cond), *shape, device=device)
    with autocast(device):
        x0 = one_step_x0(unet, scheduler, x_T, cond, uncond, guidance)
    return decode(vae, x0.float(), fake_clamp) * 2 - 1


def real_images(vae, images_u8, device):
    """What D sees of real images, in [-1, 1]: with real_through_vae, their VAE round trip (posterior mean,
    decode), the distribution a generator behind this frozen decoder can reach. Raw reals differ from it in the
    decoder's own signature: on the tiny teacher, the heads told raw reals from round-tripped reals 93% right
    after 40 steps, as sure (logit gap 7) as they grew of real against one-step fakes."""
    real = images_to_tensor(images_u8).to(device)
    if not real_through_vae:
        return real
    with torch.no_grad():
        return decode(vae, encode(vae, real)) * 2 - 1


class RealRoundTrips:
    """real_images with cache_real_vae: each image's round trip is computed at its first use and kept in RAM
    (fp16), so that every later epoch reads it instead of running the VAE again (the posterior mean: the same
    values every time, to fp16's rounding). A resumed run fills it again."""

    def __init__(self, images):
        self.images, self.store, self.done = images, None, torch.zeros(len(images), dtype=torch.bool)

    def __call__(self, vae, idx, device):
        if not (real_through_vae and cache_real_vae):
            return real_images(vae, self.images[idx], device)
        todo = [k for k in idx if not self.done[k]]
        if todo:
            fresh = real_images(vae, self.images[todo], device).half().cpu()
            if self.store is None:
                self.store = torch.empty(len(self.images), *fresh.shape[1:], dtype=torch.float16)
            self.store[todo], self.done[todo] = fresh, True
        return self.store[idx].to(device).float()


def load_real_data(root, split_name):
    """(images memmap, caption rows); a clear error for captions-only data (prepare_coco.py --resolution=0)."""
    load_split(root, split_name, need_images=False)  # meta.json and captions first, with their own errors
    if not os.path.exists(os.path.join(root, f"{split_name}_images.u8")):
        raise SystemExit(f"data error: D2O trains on real images, but {root} has no {split_name}_images.u8 (captions "
                         "only?); prepare it with images, e.g. prepare_coco.py --resolution=256")
    return load_split(root, split_name, need_images=True)


@torch.no_grad()
def validation_grid(teacher, ema, vae, scheduler, text, prompts, shape, device, path):
    """Columns: teacher N-step | base model 1-step | D2O 1-step (EMA); fixed prompts and seeds."""
    x_T = seeded_noise(range(len(prompts)), shape, 10**6).to(device)  # seeds outside any training noise
    cond, uncond = prompt_conds(text, prompts)
    cols = []
    for unet, steps, w in ((teacher, teacher_steps, teacher_guidance), (teacher, 1, guidance), (ema, 1, guidance)):
        with autocast(device):
            cols.append(decode(vae, ddim_sample(unet, scheduler, x_T, cond, uncond, steps, w)))
    save_grid(torch.stack(cols, 1).flatten(0, 1), path, nrow=3)


def learning_curve_point(ema, it, images_seen, device):
    """One point of the learning curve, by the demo's own recipe: the EMA UNet saved, one-step samples made from
    it by sample.py (curve_sample_config's prompts and seeds, this run's guidance), scored by eval_fid.py against
    data_dir's test split; appended to out_dir/curve.jsonl. sample.py runs as its own process, exactly as on the
    command line (its module-level config would otherwise carry over between calls); single process only."""
    import subprocess

    import eval_fid
    folder = os.path.join(out_dir, "curve")
    ema.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    samples = os.path.join(folder, "samples")
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample.py"),
                    curve_sample_config, f"--model={model}", f"--unet={folder}/unet", "--steps=1",
                    f"--guidance={guidance}", f"--num_per_prompt={curve_per_prompt}", f"--out_dir={samples}",
                    "--skip_existing=False", "--grid=False", f"--device={device}"], check=True)
    with torch.random.fork_rng(devices=[]):  # the run's own random streams stay as without the curve
        row, = eval_fid.evaluate([samples], data_dir, out=os.path.join(folder, "metrics.json"), spectrum=False,
                                 device=str(device), cache_dir=curve_cache_dir)
    record = {"iter": it, "images_seen": images_seen, **{k: row[k] for k in row if k not in ("gen", "size")}}
    append_log(os.path.join(out_dir, "curve.jsonl"), record)
    plot_curve(os.path.join(out_dir, "curve.jsonl"), os.path.join(out_dir, "curve.png"))
    return record


def plot_curve(jsonl, png, refs=()):
    """curve.jsonl -> curve.png: FID(fmnist-clf) and caption accuracy against the images seen; jsonl may also be
    {label: curve.jsonl} to compare runs on one figure. refs: (metric key, value, label) drawn as horizontal lines
    (e.g. the teacher's figures from eval_fid.py's metrics.json)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {"D2O one step (EMA)": jsonl} if isinstance(jsonl, str) else jsonl
    curves = {}
    for name, path in runs.items():
        with open(path) as f:
            curves[name] = [json.loads(line) for line in f if line.strip()]
    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2 if len(runs) == 1 else 4.2))
    for ax, key, label in ((ax_fid, "fid_fmnist_classifier", "FID (fmnist-clf)"),
                           (ax_acc, "caption_accuracy", "caption accuracy")):
        for name, points in curves.items():
            ax.plot([p["images_seen"] for p in points], [p.get(key) for p in points], "o-", ms=3, label=name)
        for i, (k, value, text) in enumerate(r for r in refs if r[0] == key):
            ax.axhline(value, color="grey" if len(runs) > 1 else f"C{i + 1}", ls=("--", ":", "-.")[i % 3], label=text)
        ax.legend(fontsize=7)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
        ax.set_xlabel("real images seen by the discriminator")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def estimate_step_memory(micro, real_size):
    """One training step of this config on fake tensors (common.estimate_memory): the frozen teacher, the
    generator, its EMA, the discriminator and both Adam states as a run holds them; a G step, a D step and an R1
    step, each freeing its graph before the next."""
    cpu, single = torch.device("cpu"), Dist(False, 0, 0, 1, torch.device("cpu"), True)
    with estimate_memory() as mem:
        text, vae, teacher, scheduler = sd_from_configs(model)
        G = fp32_output(type(teacher).from_config(teacher.config)).train()  # (no deepcopy of fake tensors)
        freeze_unet(G, freeze, freeze_ff)
        g_params = [p for p in G.parameters() if p.requires_grad]
        ema = type(teacher).from_config(teacher.config).requires_grad_(False)  # held, as in a run
        size = resolution or teacher.config.sample_size * vae_factor(vae)
        uncond, cond = placeholder_cond(text, 1, (size, size)), placeholder_cond(text, micro, (size, size))
        pooled = cond.pooled
        D, _ = build_discriminator(backbones, teacher, vae, scheduler, uncond, size, pooled.shape[-1], cpu,
                                   verbose=False)
        d_params = list(D.heads.parameters())
        opt_g = torch.optim.Adam(g_params, lr=g_lr, betas=(0.0, 0.99))
        opt_d = torch.optim.Adam(d_params, lr=d_lr, betas=(0.0, 0.99))
        if grad_checkpointing:
            G.enable_gradient_checkpointing(), vae.enable_gradient_checkpointing()
        real = torch.randn(micro, 3, real_size or size, real_size or size)
        shape = latent_shape(vae, teacher, size, size)
        D.heads.requires_grad_(False)
        fake = generate(G, scheduler, vae, cond, uncond.expand(micro), shape, cpu)
        generator_loss(D(fake, pooled)).backward()
        D.heads.requires_grad_(True)
        optimizer_step(opt_g, g_params, single)
        with torch.no_grad():
            fake = generate(G, scheduler, vae, cond, uncond.expand(micro), shape, cpu)
            fake_maps, real_maps = D.features(fake), D.features(real)
        discriminator_loss(*D.fake_and_real(fake_maps, real_maps, pooled, pooled, joint_batch)).backward()
        optimizer_step(opt_d, d_params, single)
        if r1_gamma > 0:
            with sdpa_kernel([SDPBackend.MATH]):
                r1_penalty(D, real, pooled).mean().backward()
            optimizer_step(opt_d, d_params, single)
        del ema
    return mem


def export_unet(ema):
    """out_dir/unet: the EMA UNet, a plain diffusers folder (safetensors); replaced whole, never half-written."""
    require_finite(list(ema.parameters()), "the EMA generator")
    path = os.path.join(out_dir, "unet")
    ema.save_pretrained(path + ".tmp", safe_serialization=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(path + ".tmp", path)
    print(f"saved {path} (UNet2DConditionModel.from_pretrained loads it; "
          f"python sample.py --model={model} --unet={path} --guidance={guidance:g})")


# ----------------------------------------------------------------------------- main


def main(argv):
    from configurator import configure
    config = configure(globals(), argv)
    check_config(config, positive=("batch_size", "grad_accum", "max_iters", "g_lr", "d_lr", "r1_interval",
                                   "ema_kimg", "proj_channels", "cmap_dim", "teacher_steps", "log_interval",
                                   "eval_interval", "ckpt_interval", "max_nonfinite", "lite0_size", "curve_per_prompt"),
                 non_negative=("resolution", "r1_gamma", "ema_rampup", "num_val_prompts", "curve_interval"))
    if fake_clamp not in ("hard", "straight_through", "none"):
        raise SystemExit(f"config error: fake_clamp must be 'hard', 'straight_through' or 'none', not {fake_clamp!r}")
    if dry_run:
        micro = micro_batch(batch_size, grad_accum, dry_run_gpus, "dry_run_gpus")
        meta = os.path.join(data_dir, "meta.json")  # the real images' stored size, if prepared already
        real_size = json.load(open(meta))["splits"].get(split, {}).get("H", 0) if os.path.exists(meta) else 0
        mem = estimate_step_memory(micro, real_size)
        print(memory_report(mem, f"one D2O step at {micro} image(s) per GPU ({dry_run_gpus} GPUs, grad_accum "
                                 f"{grad_accum}, grad_checkpointing {grad_checkpointing})"))
        return mem.peak
    d, micro = start_run(device, init_from, batch_size, grad_accum, seed, out_dir, overwrite)
    if not backbones:
        raise SystemExit("config error: backbones must name at least one feature network")
    if curve_interval and d.ddp:
        raise SystemExit("config error: curve_interval needs a single process (sample.py and eval_fid.py run inside)")
    wandb_run = start_wandb(config, d)

    # --- data: real images (any size: the discriminator resizes) and their captions
    images, rows = load_real_data(data_dir, split)
    reals = RealRoundTrips(images)
    n = len(rows)
    iters_per_epoch = n // batch_size
    if iters_per_epoch == 0:
        raise SystemExit(f"config error: {n} real images are fewer than one batch of {batch_size}")
    val_prompts = list(dict.fromkeys(r["captions"][0] for r in rows[:1000]))[:num_val_prompts]

    # --- models: frozen teacher, generator G (its trainable copy), EMA of G, discriminator D
    text_model, vae, teacher, scheduler = load_sd(model, d.device)
    factor = vae_factor(vae)
    size = resolution or teacher.config.sample_size * factor
    multiple = factor * 2 ** (len(teacher.config.block_out_channels) - 1)
    if size % multiple:
        raise SystemExit(f"config error: resolution {size} must be a multiple of {multiple} for this model "
                         f"(VAE factor {factor} x UNet downsampling)")
    shape = (teacher.config.in_channels, size // factor, size // factor)
    if not 0 <= unet_feature_t < scheduler.config.num_train_timesteps:
        raise SystemExit(f"config error: unet_feature_t must be a timestep in [0, "
                         f"{scheduler.config.num_train_timesteps}), not {unet_feature_t}")
    text = guidance_text(text_model, (size, size))  # (Text, the unconditional Cond of one image, image size)
    uncond = text[1]
    G = copy.deepcopy(teacher).train()
    if init_lora:  # the EMA below starts from the merged weights too
        from lora_files import merge_lora
        layers = merge_lora(G, init_lora, model, "d2o", d.master)
        if d.master:
            print(f"init_lora: {init_lora} merged into the generator ({layers} layers); the teacher stays as it was")
    stats = freeze_unet(G, freeze, freeze_ff)
    g_names = [k for k, p in G.named_parameters() if p.requires_grad]
    g_params = [p for p in G.parameters() if p.requires_grad]
    ema = copy.deepcopy(G).requires_grad_(False).eval()
    ema_params = [dict(ema.named_parameters())[k] for k in g_names]
    with torch.random.fork_rng(devices=[]):  # D's random parts: the same on every rank and every run
        torch.manual_seed(seed)
        D, d_backbones = build_discriminator(backbones, teacher, vae, scheduler, uncond, size,
                                             uncond.pooled.shape[-1], d.device, verbose=d.master)
    d_params = list(D.heads.parameters())
    if d.master:
        print(freeze_table(stats, freeze))
        print(f"discriminator: backbones {d_backbones}, {sum(p.numel() for p in d_params):,} trainable head parameters")
    if grad_checkpointing:
        G.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()

    scale = g_step_scale(scheduler) if g_lr_rule else 1.0
    if d.master:
        print(f"generator lr {g_lr * scale:.3g} = g_lr {g_lr:g} x {scale:.4f} " + (
            f"(g_lr_rule: the official generator's motion of the image per step; this model's output scale "
            f"{output_scale(scheduler):.2f})" if g_lr_rule else "(g_lr_rule=False: as given)"))
    opt_g = torch.optim.Adam(g_params, lr=g_lr * scale, betas=(0.0, 0.99), eps=1e-8)
    c = r1_interval / (r1_interval + 1) if r1_gamma > 0 else 1.0  # lazy regularisation (StyleGAN2)
    opt_d = torch.optim.Adam(d_params, lr=d_lr * c, betas=(0.0, 0.99 ** c), eps=1e-8)
    it = 0
    if init_from == "resume":
        ck = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), config, d.master)
        if ck["config"].get("init_lora", "") != init_lora:  # the frozen layers hold the merged adaptor too
            raise SystemExit(f"resume error: the checkpoint's run started from init_lora="
                             f"{ck['config'].get('init_lora', '')!r}, not {init_lora!r}; resume with the same one")
        if sorted(ck["g"]) != sorted(g_names):
            raise SystemExit("resume error: the checkpoint trains other UNet parameters (another freeze level?)")
        with torch.no_grad():
            for k, p, e in zip(g_names, g_params, ema_params):
                p.copy_(ck["g"][k]), e.copy_(ck["ema"][k])
        D.heads.load_state_dict(ck["d_heads"]), D.projectors.load_state_dict(ck["d_projectors"])
        opt_g.load_state_dict(ck["opt_g"]), opt_d.load_state_dict(ck["opt_d"])
        it = ck["iter"]
        resume_rng(ck["rng"], d, seed, it)
        print(f"resumed from {out_dir}/ckpt.pt at iteration {it}")
    generator = G
    if compile:
        cond = prompt_conds(text, val_prompts[:2])[0]
        x = seeded_noise([0, 1], shape, seed).to(d.device)
        generator = checked_compile(G, lambda m: one_step_x0(m, scheduler, x, cond, None, 1.0).square().mean(),
                                    backend=compile_backend)
    if d.master:
        lock_out_dir(out_dir)  # one run per out_dir: taken before the first write into it
        save_json(config, os.path.join(out_dir, "config.json"))
    log_path = start_log(out_dir, init_from, d, also=("curve.jsonl",), exported=("unet",), resume_iter=it)
    stop = catch_stop_signals()  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit EXIT_STOPPED

    def save_checkpoint():
        require_finite(g_params + ema_params, "the generator")  # never replace a good checkpoint with a broken one
        rngs = gather(rng_state(), d)
        if d.master:
            atomic_save({"g": {k: p.detach().cpu() for k, p in zip(g_names, g_params)},
                         "ema": {k: e.detach().cpu() for k, e in zip(g_names, ema_params)},
                         "d_heads": D.heads.state_dict(), "d_projectors": D.projectors.state_dict(),
                         "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "iter": it,
                         "data_position": list(divmod(it, iters_per_epoch)), "rng": rngs, "config": config},
                        os.path.join(out_dir, "ckpt.pt"))

    if curve_interval and it == 0:  # the curve starts at the base model (the EMA starts at its weights)
        learning_curve_point(ema, 0, 0, d.device)
    pbar = tqdm(total=max_iters, initial=it, disable=not d.master, desc="d2o")
    t0, seen, sums, streak = time.time(), 0, {}, 0
    while it < max_iters:
        epoch, pos = divmod(it, iters_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))  # the epoch's order
        batch = order[pos * batch_size: (pos + 1) * batch_size]
        micros = []  # this rank's micro-batches: (cond, pooled text, real images)
        for m in range(grad_accum):
            idx = batch[(m * d.world_size + d.rank) * micro: (m * d.world_size + d.rank + 1) * micro].tolist()
            prompts = [rows[k]["captions"][torch.randint(len(rows[k]["captions"]), (1,)).item()] for k in idx]
            cond = prompt_conds(text, prompts)[0]
            micros.append((cond, cond.pooled, reals(vae, idx, d.device)))
        step = dict.fromkeys(("g_loss", "d_loss", "logit_real", "logit_fake", "logit_gap", "d_acc_real",
                              "d_acc_fake"), 0.0)

        # G step: fresh noise, D fixed. joint_batch: the heads' BatchNorms use the running statistics that the D
        # steps gathered from joint real + fake batches (the D step's view, at half the cost of a joint batch)
        for p in d_params:
            p.requires_grad_(False)
        D.heads.train(not joint_batch)
        for cond, pooled, _ in micros:
            fake = generate(generator, scheduler, vae, cond, uncond.expand(len(cond)), shape, d.device)
            loss = generator_loss(D(fake, pooled)) / grad_accum
            loss.backward()
            step["g_loss"] += loss.item()
        D.heads.train()
        for p in d_params:
            p.requires_grad_(True)
        optimizer_step(opt_g, g_params, d)

        # D step: fresh noise, fakes from the updated G
        for cond, pooled, real in micros:
            with torch.no_grad():
                fake = generate(generator, scheduler, vae, cond, uncond.expand(len(cond)), shape, d.device)
                fake_maps, real_maps = D.features(fake), D.features(real)  # (frozen: no graph needed)
            fake_logits, real_logits = D.fake_and_real(fake_maps, real_maps, pooled, pooled, joint_batch)
            loss = discriminator_loss(fake_logits, real_logits) / grad_accum
            loss.backward()
            step["d_loss"] += loss.item()
            # the discriminator's health: mean logits, their gap, the share of positions it gets right (0.5: chance)
            fake_logits, real_logits = torch.cat(fake_logits, 1).detach(), torch.cat(real_logits, 1).detach()
            step["logit_fake"] += fake_logits.mean().item() / grad_accum
            step["logit_real"] += real_logits.mean().item() / grad_accum
            step["logit_gap"] += (real_logits.mean() - fake_logits.mean()).item() / grad_accum
            step["d_acc_fake"] += (fake_logits < 0).float().mean().item() / grad_accum
            step["d_acc_real"] += (real_logits > 0).float().mean().item() / grad_accum
        optimizer_step(opt_d, d_params, d)

        # lazy R1 on real images, weighted by the interval
        if r1_gamma > 0 and it > 0 and it % r1_interval == 0:
            step["r1"] = 0.0
            for _, pooled, real in micros:
                with sdpa_kernel([SDPBackend.MATH]):  # backward recomputes checkpointed blocks: the same kernel
                    penalty = r1_penalty(D, real, pooled).mean()
                    (penalty * (r1_weight(micro) / 2) * r1_interval / grad_accum).backward()
                step["r1"] += penalty.item() / grad_accum
            optimizer_step(opt_d, d_params, d)

        # divergence: optimizer_step's nan_to_num (as the official code) would hide it; a streak stops the run
        streak = 0 if all_finite([step["g_loss"], step["d_loss"]], [], d) else streak + 1
        stop_if_diverged(streak, max_nonfinite, it + 1)
        beta = ema_decay(it * batch_size, batch_size, ema_kimg, ema_rampup)
        with torch.no_grad():
            for e, p in zip(ema_params, g_params):
                e.copy_(p.detach().lerp(e, beta))
        it += 1
        seen += batch_size
        pbar.update(1)
        for k, v in step.items():
            sums[k] = (sums.get(k, (0.0, 0))[0] + v, sums.get(k, (0.0, 0))[1] + 1)
        if it % log_interval == 0 or it == max_iters:
            names = sorted(sums)
            vals = all_reduce_mean([sums[k][0] / sums[k][1] for k in names], d)
            record = {"iter": it, "epoch": epoch, **dict(zip(names, vals)), "ema_beta": beta,
                      "img_per_s": seen / (time.time() - t0), "peak_mem_gb": peak_memory_gb(d.device)}
            pbar.set_postfix_str(" ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("iter", "epoch")))
            if d.master:
                append_log(log_path, record, wandb_run)
            t0, seen, sums = time.time(), 0, {}
        if d.master and (it % eval_interval == 0 or it == max_iters):
            validation_grid(teacher, ema, vae, scheduler, text, val_prompts, shape,
                            d.device, os.path.join(out_dir, f"val_{it:06d}.png"))
            wandb_image(wandb_run, os.path.join(out_dir, f"val_{it:06d}.png"), it)
        if curve_interval and (it % curve_interval == 0 or it == max_iters):
            point = learning_curve_point(ema, it, it * batch_size, d.device)
            print(f"curve: iter {it}, {it * batch_size:,} images: " + ", ".join(
                f"{k} {point[k]:.4g}" for k in ("fid_fmnist_classifier", "caption_accuracy") if point.get(k) is not None))
        if it == max_iters and d.master:  # the UNet before the last checkpoint: a full disk keeps it
            export_unet(ema)
        checkpoint_step(it, max_iters, ckpt_interval, save_checkpoint, stop, out_dir, d)  # (and SIGTERM's stop)
    pbar.close()
    end_run(stop, out_dir, wandb_run, d)


if __name__ == "__main__":
    main(sys.argv[1:])
