"""
Train a small text-to-image latent diffusion model from scratch, in Stable Diffusion's own format
(AutoencoderKL + UNet2DConditionModel + CLIPTextModel + CLIPTokenizer + DDIM scheduler), so that
`StableDiffusionPipeline.from_pretrained(out_dir + "/model")` and every script here load it.
It is the embedded default's teacher (assets/tiny-sd-fmnist) and a laptop-scale testbed.

task = 'inpaint' or 'upscale' instead fine-tunes the task teachers of HiPA's other tasks from such a t2i
model (init_model): same loop, only the UNet's input and conditioning change; VAE, text encoder, tokenizer
are the t2i model's, frozen; no VAE phase.
  inpaint: StableDiffusionInpaintPipeline's format, a UNet with 9 input channels (latents, the mask at latent
           size, the latents of the masked image), started from the t2i UNet with the 5 extra channels zero (as
           SD 2 inpainting was made from SD 2 base), trained on random masks (random_masks);
  upscale: StableDiffusionUpscalePipeline's (the SD x4 upscaler's) format, the VAE's factor up (x4 for the tiny
           VAE: 8x8 -> 32x32): 7 input channels (latents + the low-res RGB image), the low-res image noised to a
           random noise level (the x4's augmentation) that is also the UNet's class label, v-prediction.

Two phases in one run, counted by one iteration counter:
  1. iterations [0, vae_iters): the VAE, L1 reconstruction of the posterior mean + a small KL term
     (decoding posterior samples stalls a tiny VAE; the KL keeps the latent scale in check);
  2. iterations [vae_iters, vae_iters + iters): the UNet and text encoder, epsilon-prediction DDPM
     loss on the frozen VAE's latents (cached once), captions dropped with prob. uncond_prob for
     classifier-free guidance. An EMA of both is what gets saved.

    python pretrain.py config/fmnist_pretrain.py
    torchrun --nproc_per_node=2 pretrain.py config/fmnist_pretrain.py
    python pretrain.py config/fmnist_pretrain.py --init_from=resume
    python pretrain.py config/fmnist_pretrain_inpaint.py   # then config/fmnist_pretrain_x4.py
"""
import copy
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (Text, all_reduce_mean, append_log, atomic_save, autocast, catch_stop_signals, check_config,
                    checked_compile, checkpoint_step, ddim_sample, decode, downsample, encode, encode_prompts,
                    end_run, gather, images_to_tensor, inpaint_input, load_checkpoint, load_split, lock_out_dir,
                    make_mask, peak_memory_gb, resume_rng, rng_state, save_grid, save_json, start_log, start_run,
                    start_wandb, upscale_input, vae_factor, wandb_image)

# ----------------------------------------------------------------------------- config
out_dir = "out/pretrain"  # checkpoints, sample grids, config.json, log.jsonl and the final model/ folder
data_dir = "data/fmnist"  # prepared data (prepare_fmnist.py / prepare_coco.py)
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
overwrite = False  # a scratch run into an out_dir that holds an earlier run: refused unless True
task = "t2i"  # 't2i' (a model from scratch), 'inpaint' or 'upscale' (a task teacher fine-tuned from init_model)
init_model = ""  # inpaint/upscale: the t2i SD folder whose UNet they start from (VAE, text encoder, tokenizer kept)
new_lr_mult = 10.0  # inpaint/upscale: lr multiple for what they add (conv_in: new channels at 0; x4 class embedding)
max_noise_level = 350  # upscale: the low-res input's noise level is uniform in [0, this) in training (SD x4's)
# model
vae_channels = (32, 64, 64)  # AutoencoderKL block widths; len-1 downsamplings (32x32 -> 8x8 for 3)
latent_channels = 4
unet_channels = (64, 128)  # UNet2DConditionModel block widths
layers_per_block = 2
attention_head_dim = 8
text_width = 64  # CLIP text encoder width = the UNet's cross_attention_dim
text_layers = 2
max_length = 16  # tokens per prompt, incl. start and end
# VAE phase
vae_iters = 1000
vae_batch_size = 32
vae_lr = 1e-3
kl_weight = 1e-6
# diffusion phase
iters = 4000
batch_size = 128  # global batch, over all ranks and micro-steps
grad_accum = 1  # micro-steps per iteration (divided by the world size)
lr = 5e-4
warmup_iters = 200
weight_decay = 0.0
uncond_prob = 0.1  # caption dropout, for classifier-free guidance
ema_decay = 0.999  # EMA of UNet + text encoder (warm-up: min(decay, (1 + step) / (10 + step)))
grad_clip = 1.0
# logging, sampling, checkpoints
log_interval = 50
sample_interval = 1000  # iterations between sample grids (and at the end)
ckpt_interval = 500
sample_steps = 25  # DDIM steps for the grid's teacher rows
sample_guidance = 2.0
wandb_log = False  # also log log.jsonl's records and the sample grids to wandb (imported only then)
wandb_project = "one-step"
wandb_run_name = ""  # '' = wandb's own name
# system
device = "auto"  # 'auto', 'cpu', 'cuda'
compile = False  # torch.compile the trained nets (checked against eager gradients first)
compile_backend = "inductor"
seed = 1337
# -----------------------------------------------------------------------------


# ----------------------------------------------------------------------------- tokenizer


def caption_words(text):
    """CLIP's pre-tokenisation, restricted to what captions use: lowercase words, digits, punctuation runs."""
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def build_tokenizer(captions, max_length):
    """A CLIPTokenizer whose vocabulary is the captions' words: every word is one token, built by BPE
    merges that rebuild it left to right from its characters (with no merges, every character would be
    a token). Single characters stay in the vocabulary so unseen words still tokenize."""
    from transformers import CLIPTokenizer
    words = sorted({w for c in captions for w in caption_words(c)})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for w in words:
        symbols = list(w[:-1]) + [w[-1] + "</w>"]
        for s in symbols:
            vocab.setdefault(s, len(vocab))
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


# ----------------------------------------------------------------------------- models


def build_models(tokenizer, resolution):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    n = len(vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=vae_channels, layers_per_block=1, norm_num_groups=16,
                        sample_size=resolution)
    latent_size = resolution // 2 ** (n - 1)
    m = len(unet_channels)
    unet = UNet2DConditionModel(sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
                                block_out_channels=unet_channels, layers_per_block=layers_per_block,
                                down_block_types=("CrossAttnDownBlock2D",) * m,
                                up_block_types=("CrossAttnUpBlock2D",) * m,
                                cross_attention_dim=text_width, attention_head_dim=attention_head_dim,
                                norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=text_width, intermediate_size=4 * text_width,
        num_hidden_layers=text_layers, num_attention_heads=max(1, text_width // 32),
        max_position_embeddings=max_length, projection_dim=text_width,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return vae, unet, text_encoder


def make_scheduler(task="t2i"):
    """Stable Diffusion's noise schedule (scaled linear betas, 1000 steps, epsilon; for upscale the SD x4
    upscaler's: betas 1e-4..0.02, v-prediction), DDIM with trailing spacing and final alpha 1, so that diffusers
    pipelines loading it start at t=999 for any step count and end on the x0 prediction (the same scheduler
    load_sd makes from any SD model)."""
    from diffusers import DDIMScheduler
    betas = (0.0001, 0.02) if task == "upscale" else (0.00085, 0.012)
    return DDIMScheduler(num_train_timesteps=1000, beta_start=betas[0], beta_end=betas[1],
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                         timestep_spacing="trailing",
                         prediction_type="v_prediction" if task == "upscale" else "epsilon")


def make_low_res_scheduler():
    """The x4 upscaler's low_res_scheduler (SD x4's config): the DDPM schedule that noises the low-res input."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                         clip_sample=False, variance_type="fixed_small")


UPSCALE_SCALING_FACTOR = 0.08333  # StableDiffusionUpscalePipeline sets every VAE's scaling factor to SD x4's


def widen_unet(unet, in_channels, num_class_embeds=None):
    """A UNet with in_channels inputs (and a class embedding when num_class_embeds is set), initialised from a
    t2i UNet: the extra input channels of conv_in and the class embedding zero, so that at initialisation it
    computes exactly what the t2i UNet computes from the latents (how SD 2 inpainting was made from SD 2 base)."""
    from diffusers import UNet2DConditionModel
    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": in_channels,
                                              "num_class_embeds": num_class_embeds})
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], in_channels - w.shape[1], *w.shape[2:])], 1)
    missing, unexpected = wide.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("class_embedding.") for k in missing), (missing, unexpected)
    if num_class_embeds:
        torch.nn.init.zeros_(wide.class_embedding.weight)
    return wide


@torch.no_grad()
def rescale_vae(vae, scaling_factor):
    """The same autoencoder with latents k times larger, k = old / new scaling factor, so that the latents the
    UNet sees (x scaling_factor) stay the same: quant_conv's mean outputs x k (its log-variance + 2 ln k),
    post_quant_conv's inputs / k. decode(encode(x)) is unchanged. StableDiffusionUpscalePipeline overwrites
    any VAE's scaling factor with SD x4's 0.08333; this keeps the tiny VAE's unit-variance latents under it."""
    k, c = vae.config.scaling_factor / scaling_factor, vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=scaling_factor)
    return vae


@torch.no_grad()
def deterministic_posterior(vae):
    """The same autoencoder with a posterior std of ~0 (log-variance -30, the least diffusers allows): the VAE
    phase decodes the posterior mean, so the tiny VAE's log-variance is untrained (std ~1 against a mean std of
    ~1.6), and StableDiffusionInpaintPipeline encodes the masked image with a posterior *sample*; this makes
    that sample the mean, which the task teachers are trained on (as sample.py encodes)."""
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:] = 0
    vae.quant_conv.bias[c:] = -30.0
    return vae


def load_task_models(path, task):
    """(tokenizer, text_encoder, vae, unet) for a task teacher, from the t2i SD folder `path`: the UNet widened
    (9 inputs for inpaint; 7 and a noise-level class embedding for upscale), the VAE's posterior made
    deterministic (and rescaled for upscale): the same encoder mean (x scaling factor) and decoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    if not os.path.isfile(os.path.join(path, "unet", "config.json")):
        raise SystemExit(f"config error: init_model '{path}' is not an SD-format folder (no unet/config.json)")
    if os.path.isdir(os.path.join(path, "text_encoder_2")):
        raise SystemExit(f"config error: init_model '{path}' is an SDXL model; pretrain.py makes SD-format task "
                         "teachers from an SD 1.x/2.x-style t2i folder (SDXL inpainting exists: "
                         "diffusers/stable-diffusion-xl-1.0-inpainting-0.1)")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    if unet.config.in_channels != 4:
        raise SystemExit(f"config error: init_model '{path}' is no t2i model (its UNet takes "
                         f"{unet.config.in_channels} input channels, not 4)")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    if task == "inpaint":
        unet = widen_unet(unet, 2 * vae.config.latent_channels + 1)
    else:
        unet = widen_unet(unet, vae.config.latent_channels + 3, num_class_embeds=1000)  # SD x4's 1000 levels
        vae = rescale_vae(vae, UPSCALE_SCALING_FACTOR)
    return tokenizer, text_encoder.requires_grad_(False), deterministic_posterior(vae), unet


def random_masks(n, height, width, generator):
    """(n, 1, H, W) training masks, 1 = repaint: the kinds diffusers' inpainting scripts draw (random
    rectangles 30%, random ellipses 30%, everything 10%: plain text-to-image), and the two fixed masks of the
    inpainting task here (make_mask's 'periphery', the paper's 50%, and 'center', 15% each)."""
    u = torch.rand(n, 5, generator=generator)  # kind, then two sizes and two positions in [0, 1)
    ys = (torch.arange(height) + 0.5).view(1, -1, 1) / height
    xs = (torch.arange(width) + 0.5).view(1, 1, -1) / width
    h, w = (0.1 + 0.8 * u[:, 1]).view(-1, 1, 1), (0.1 + 0.8 * u[:, 2]).view(-1, 1, 1)  # sides (rectangles)
    cy, cx = (h / 2 + (1 - h) * u[:, 3].view(-1, 1, 1)), (w / 2 + (1 - w) * u[:, 4].view(-1, 1, 1))
    rect = ((ys - cy).abs() < h / 2) & ((xs - cx).abs() < w / 2)
    ellipse = ((ys - cy) / (h / 2)) ** 2 + ((xs - cx) / (w / 2)) ** 2 < 1
    kind = u[:, 0].view(-1, 1, 1)
    masks = torch.where(kind < 0.3, rect, ellipse).float()
    masks[u[:, 0] >= 0.6] = 1.0
    masks[u[:, 0] >= 0.7] = make_mask("periphery", 1, height, width)[0, 0]
    masks[u[:, 0] >= 0.85] = make_mask("center", 1, height, width)[0, 0]
    return masks[:, None]


class VAEReconstruction(torch.nn.Module):
    """VAE forward for training: reconstruction of the posterior mean and the KL to N(0, I)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.mean).sample, posterior.kl().mean()


class Denoiser(torch.nn.Module):
    """Text encoder + UNet as one module, so DDP and the EMA see both. The tasks' extra channels (image_input)
    follow the latents, as in diffusers' pipelines; class_labels is the x4's noise level."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy, t, input_ids, image_input=None, class_labels=None):
        x = noisy if image_input is None else torch.cat([noisy, image_input], 1)
        return self.unet(x, t, encoder_hidden_states=self.text_encoder(input_ids)[0], class_labels=class_labels).sample


@torch.no_grad()
def encode_latents(vae, images_u8, device, batch=1000):
    """The whole split's posterior means (unscaled), computed once for the diffusion phase."""
    out = []
    for i in tqdm(range(0, len(images_u8), batch), desc="encoding latents", leave=False):
        x = images_to_tensor(images_u8[i: i + batch]).to(device)
        out.append(vae.encode(x).latent_dist.mean.cpu())
    return torch.cat(out)


def task_channels(task, vae, x, masks, noise_levels, low_res_scheduler, generator=None):
    """(image_input, class_labels) of the task UNets for images x in [-1, 1], as diffusers' pipelines make them.
    inpaint: the mask at latent size + the masked image's latents; upscale: the image downsampled by the VAE's
    factor and noised to noise_levels by low_res_scheduler, the levels also the class labels; t2i: nothing."""
    if task == "inpaint":
        return inpaint_input(vae, x, masks), None
    if task == "upscale":
        low = downsample(x, vae_factor(vae))
        noise = torch.randn(low.shape, generator=generator).to(x.device)
        return upscale_input(low_res_scheduler, low, noise, noise_levels)
    return None, None


@torch.no_grad()
def task_grid(denoiser, vae, tokenizer, scheduler, low_res_scheduler, task, images, prompts, per_row, path, device):
    """Rows of per_row images: the task's input (inpaint: periphery and center masks in turn, masked pixels grey;
    upscale: the low-res image, nearest-upsampled), the sample_steps-step DDIM output at sample_guidance (x4 at
    the pipeline's default noise_level 20), the ground truth."""
    unet, text_encoder = denoiser.unet, denoiser.text_encoder
    was_training = denoiser.training
    denoiser.eval()
    g = torch.Generator().manual_seed(0)
    x = images.to(device)
    n, size = len(x), unet.config.sample_size
    x_T = torch.randn((n, unet.config.out_channels, size, size), generator=g).to(device)
    masks = make_mask("periphery", n, *x.shape[-2:]).to(device)
    masks[1::2] = 1 - masks[1::2]  # the centre mask
    levels = torch.full((n,), 20, dtype=torch.long, device=device)
    image_input, labels = task_channels(task, vae, x, masks, levels, low_res_scheduler, g)
    text = Text((tokenizer,), (text_encoder,), False)
    cond, uncond = encode_prompts(text, prompts), encode_prompts(text, [""] * n)
    out = decode(vae, ddim_sample(unet, scheduler, x_T, cond, uncond, sample_steps, sample_guidance,
                                  image_input, labels))
    if task == "inpaint":
        shown = x * (masks < 0.5)
    else:
        shown = F.interpolate(downsample(x, vae_factor(vae)), size=x.shape[-2:], mode="nearest")
    blocks = [t.view(n // per_row, per_row, *t.shape[1:]) for t in ((shown + 1) / 2, out, (x + 1) / 2)]
    save_grid(torch.cat(blocks, 1).flatten(0, 1), path, nrow=3 * per_row)
    denoiser.train(was_training)


@torch.no_grad()
def sample_grid(denoiser, vae, tokenizer, scheduler, prompts, per_prompt, path, device):
    """Rows: one per prompt, `per_prompt` seeds; left half sample_steps-step DDIM at sample_guidance,
    right half one step from the same noise: the gap the one-step trainers close."""
    unet, text_encoder = denoiser.unet, denoiser.text_encoder
    was_training = denoiser.training
    denoiser.eval()
    g = torch.Generator().manual_seed(0)
    n = len(prompts) * per_prompt
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x_T = torch.randn(shape, generator=g).to(device)
    text = Text((tokenizer,), (text_encoder,), False)
    cond = encode_prompts(text, [p for p in prompts for _ in range(per_prompt)])
    uncond = encode_prompts(text, [""] * n)
    many = decode(vae, ddim_sample(unet, scheduler, x_T, cond, uncond, sample_steps, sample_guidance))
    one = decode(vae, ddim_sample(unet, scheduler, x_T, cond, uncond, 1, sample_guidance))
    rows = torch.cat([many.view(len(prompts), per_prompt, *many.shape[1:]),
                      one.view(len(prompts), per_prompt, *one.shape[1:])], dim=1)
    save_grid(rows.flatten(0, 1), path, nrow=2 * per_prompt)
    denoiser.train(was_training)


def grid_prompts(rows):
    """One prompt per class for labelled data (the first caption of the first image of each label),
    else the first captions of the split."""
    by_label = {}
    for r in rows:
        by_label.setdefault(r.get("label", len(by_label)), r["captions"][0])
        if len(by_label) >= 10:
            break
    return [by_label[k] for k in sorted(by_label)]


def grid_images(rows, per_label):
    """The tasks' grid: indices of the first per_label images of each of the first 10 labels (unlabelled data:
    the first 10 x per_label images)."""
    by_label = {}
    for i, r in enumerate(rows):
        items = by_label.setdefault(r.get("label", i // per_label), [])
        if len(items) < per_label:
            items.append(i)
        if len(by_label) >= 10 and all(len(v) == per_label for v in by_label.values()):
            break
    return [i for k in sorted(by_label) if len(by_label[k]) == per_label for i in by_label[k]]


# ----------------------------------------------------------------------------- main


def main(argv):
    from configurator import configure
    config = configure(globals(), argv)
    check_config(config, positive=("vae_batch_size", "vae_lr", "batch_size", "grad_accum", "lr", "grad_clip",
                                   "max_length", "log_interval", "sample_interval", "ckpt_interval", "sample_steps"),
                 non_negative=("vae_iters", "iters", "warmup_iters", "weight_decay", "uncond_prob", "ema_decay",
                               "kl_weight", "new_lr_mult"))
    if task not in ("t2i", "inpaint", "upscale"):
        raise SystemExit(f"config error: task must be 't2i', 'inpaint' or 'upscale', not '{task}'")
    if task != "t2i" and (not init_model or vae_iters):
        raise SystemExit(f"config error: task '{task}' fine-tunes init_model (a t2i SD folder) and keeps its VAE: "
                         f"set init_model and vae_iters=0")
    if not 0 < max_noise_level <= 1000:
        raise SystemExit(f"config error: max_noise_level must be in (0, 1000] (the class embeddings), "
                         f"not {max_noise_level}")
    d, micro = start_run(device, init_from, batch_size, grad_accum, seed, out_dir, overwrite)
    wandb_run = start_wandb(config, d)
    if d.master:
        lock_out_dir(out_dir)  # one run per out_dir: taken before the first write into it
        save_json(config, os.path.join(out_dir, "config.json"))
    images, rows = load_split(data_dir, "train")
    resolution = images.shape[1]
    if resolution % 2 ** (len(vae_channels) - 1) or resolution != images.shape[2]:
        raise SystemExit(f"config error: images are {images.shape[1]}x{images.shape[2]}; need square images "
                         f"divisible by {2 ** (len(vae_channels) - 1)}")

    if task == "t2i":
        tokenizer = build_tokenizer([c for r in rows for c in r["captions"]], max_length)
        vae, unet, text_encoder = build_models(tokenizer, resolution)
    else:
        tokenizer, text_encoder, vae, unet = load_task_models(init_model, task)
        vae.eval().requires_grad_(False)
        if resolution % (vae_factor(vae) * 2 ** (len(unet.config.block_out_channels) - 1)):
            raise SystemExit(f"config error: images are {resolution}x{resolution}, not a multiple of "
                             f"{vae_factor(vae)} x the UNet's downsampling for init_model {init_model}")
    scheduler = make_scheduler(task)
    low_res_scheduler = make_low_res_scheduler() if task == "upscale" else None
    vae.to(d.device)
    denoiser = Denoiser(unet, text_encoder).to(d.device)
    ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
    opt_vae = torch.optim.AdamW(vae.parameters(), lr=vae_lr, weight_decay=0.0)
    # the task's new inputs start at zero and Adam moves a weight by about lr a step: they get new_lr_mult x lr
    new = {id(p) for m in (unet.conv_in, unet.class_embedding) if task != "t2i" and m is not None
           for p in m.parameters()}
    groups = [{"params": [p for p in denoiser.parameters() if p.requires_grad and (id(p) in new) == is_new],
               "lr_mult": new_lr_mult if is_new else 1.0} for is_new in (False, True)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
    data_gen = torch.Generator().manual_seed(seed + 1000 * d.rank)  # which rows and captions this rank reads
    it = 0
    if init_from == "resume":
        ck = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), config, d.master)
        vae.load_state_dict(ck["vae"])
        denoiser.load_state_dict(ck["denoiser"])
        ema.load_state_dict(ck["ema"])
        opt_vae.load_state_dict(ck["opt_vae"])
        opt.load_state_dict(ck["opt"])
        it = ck["iter"]
        vae.register_to_config(scaling_factor=ck["scaling_factor"])
        if resume_rng(ck["rng"], d, seed, it):
            data_gen.set_state(ck["data_gen"][d.rank])
        else:  # another world size: this rank's own fresh data stream, as resume_rng does for the noise
            data_gen.manual_seed(seed + 1000 * d.rank + 7919 * it)
        print(f"resumed from {out_dir}/ckpt.pt at iteration {it}")
    log_path = start_log(out_dir, init_from, d, exported=("model",), resume_iter=it)
    stop = catch_stop_signals()  # SIGTERM / SIGUSR1: finish the step, checkpoint, exit EXIT_STOPPED

    if d.master:
        n_params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
                    (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))}
        print("parameters (M): " + ", ".join(f"{k} {v:.2f}" for k, v in n_params.items()))
    vae_train = VAEReconstruction(vae)
    if compile:
        x = images_to_tensor(images[:4]).to(d.device)
        vae_train = checked_compile(vae_train, lambda m: F.l1_loss(m(x)[0], x), backend=compile_backend)
        ids = tokenizer(["a"] * 4, padding="max_length", max_length=max_length, return_tensors="pt").input_ids
        noisy = torch.randn(4, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        t = torch.tensor([500] * 4, device=d.device)
        labels = t if unet.config.num_class_embeds else None
        denoiser_fwd = checked_compile(denoiser, lambda m: m(noisy.to(d.device), t, ids.to(d.device),
                                                             class_labels=labels).square().mean(),
                                       backend=compile_backend)
    else:
        denoiser_fwd = denoiser
    if d.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        vae_train = DDP(vae_train)
        denoiser_fwd = DDP(denoiser_fwd)
    alphas = scheduler.alphas_cumprod.to(d.device)
    prompts = grid_prompts(rows)
    grid_idx = grid_images(rows, 4)
    loss_name = "v_mse" if scheduler.config.prediction_type == "v_prediction" else "eps_mse"

    def save_checkpoint():
        # every rank's generator and RNG state, gathered so that resume is exact for the same world size
        states = gather((data_gen.get_state(), rng_state()), d)
        if d.master:
            atomic_save({"vae": vae.state_dict(), "denoiser": denoiser.state_dict(), "ema": ema.state_dict(),
                         "opt_vae": opt_vae.state_dict(), "opt": opt.state_dict(), "iter": it,
                         "scaling_factor": vae.config.scaling_factor,
                         "data_gen": [s[0] for s in states], "rng": [s[1] for s in states], "config": config},
                        os.path.join(out_dir, "ckpt.pt"))

    latents = None
    total = vae_iters + iters
    pbar = tqdm(total=total, initial=it, disable=not d.master, desc="pretrain")
    t0, seen = time.time(), 0
    while it < total:
        vae_phase = it < vae_iters
        if vae_phase:
            model, optimizer, B = vae_train, opt_vae, vae_batch_size // d.world_size
        else:
            if latents is None and task == "t2i":  # frozen VAE from here on: latents once, scaled to unit std
                vae.eval().requires_grad_(False)
                raw = encode_latents(vae, images, d.device)
                vae.register_to_config(scaling_factor=float(1 / raw.std()))
                latents = raw * vae.config.scaling_factor
            model, optimizer, B = denoiser_fwd, opt, micro
            for g_ in opt.param_groups:  # linear warm-up, then constant
                g_["lr"] = lr * g_.get("lr_mult", 1.0) * min(1.0, (it - vae_iters + 1) / max(1, warmup_iters))
        model.train()
        losses = []
        for micro_step in range(1 if vae_phase else grad_accum):
            if d.ddp:
                model.require_backward_grad_sync = vae_phase or micro_step == grad_accum - 1
            idx = torch.randint(len(images), (B,), generator=data_gen)
            with autocast(d.device):
                if vae_phase:
                    x = images_to_tensor(images[idx.sort().values.numpy()]).to(d.device)
                    recon, kl = model(x)
                    loss = F.l1_loss(recon.float(), x) + kl_weight * kl
                else:
                    caps = [rows[i]["captions"][torch.randint(len(rows[i]["captions"]), (1,),
                                                              generator=data_gen).item()] for i in idx.tolist()]
                    drop = torch.rand(B, generator=data_gen) < uncond_prob
                    caps = ["" if dr else c for c, dr in zip(caps, drop.tolist())]
                    ids = tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids.to(d.device)
                    if task == "t2i":
                        x0, image_input, class_labels = latents[idx].to(d.device), None, None
                    else:  # the images, a mask or a noise level each: latents and the task's extra inputs (encoded
                        # here: a task fine-tune sees fewer images than the split holds, and encodes them anyway)
                        x = images_to_tensor(images[idx.numpy()]).to(d.device)
                        masks = random_masks(B, *x.shape[-2:], data_gen).to(d.device)
                        levels = torch.randint(0, max_noise_level, (B,), generator=data_gen).to(d.device)
                        with torch.no_grad():
                            x0 = encode(vae, x)
                            image_input, class_labels = task_channels(task, vae, x, masks, levels, low_res_scheduler)
                    noise = torch.randn_like(x0)
                    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), device=d.device)
                    a = alphas[t].view(-1, 1, 1, 1)
                    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
                    if loss_name == "v_mse":  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, eq. 10)
                        target = a.sqrt() * noise - (1 - a).sqrt() * x0
                    else:
                        target = noise
                    loss = F.mse_loss(model(noisy, t, ids, image_input, class_labels).float(), target)
                    loss = loss / grad_accum
            loss.backward()
            losses.append(loss.item())
        params = vae.parameters() if vae_phase else denoiser.parameters()
        for p in params:
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        torch.nn.utils.clip_grad_norm_(vae.parameters() if vae_phase else denoiser.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not vae_phase:
            step = it - vae_iters
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), denoiser.parameters()):
                    pe.lerp_(p, 1 - decay)
        it += 1
        seen += B * d.world_size * (1 if vae_phase else grad_accum)
        pbar.update(1)
        if it % log_interval == 0 or it == total:
            loss_mean = all_reduce_mean([sum(losses)], d)[0]
            dt = time.time() - t0
            msg = (f"iter {it} {'vae L1' if vae_phase else loss_name.replace('_', ' ')} {loss_mean:.4f} "
                   f"{seen / dt:.0f} img/s peak mem {peak_memory_gb(d.device):.2f} GB")
            pbar.set_postfix_str(msg.split(" ", 2)[2])
            if d.master:
                tqdm.write(msg)
                append_log(log_path, {"iter": it, "vae_l1" if vae_phase else loss_name: loss_mean,
                                      "img_per_s": seen / dt, "peak_mem_gb": peak_memory_gb(d.device)}, wandb_run)
            t0, seen = time.time(), 0
        if d.master and not vae_phase and (it % sample_interval == 0 or it == total):
            path = os.path.join(out_dir, f"samples_{it:06d}.png")
            if task == "t2i":
                sample_grid(ema, vae, tokenizer, scheduler, prompts, 8, path, d.device)
            else:
                task_grid(ema, vae, tokenizer, scheduler, low_res_scheduler, task, images_to_tensor(images[grid_idx]),
                          [rows[i]["captions"][0] for i in grid_idx], 4, path, d.device)
            wandb_image(wandb_run, path, it, key="samples")
        checkpoint_step(it, total, ckpt_interval, save_checkpoint, stop, out_dir, d)  # (and SIGTERM's stop)
    pbar.close()
    if d.master and iters > 0:
        import diffusers
        parts = dict(vae=vae, text_encoder=ema.text_encoder, tokenizer=tokenizer, unet=ema.unet, scheduler=scheduler,
                     safety_checker=None, feature_extractor=None)
        if task == "upscale":
            pipe = diffusers.StableDiffusionUpscalePipeline(**parts, low_res_scheduler=low_res_scheduler,
                                                            max_noise_level=max_noise_level)
        else:
            pipe = getattr(diffusers, {"t2i": "StableDiffusionPipeline", "inpaint": "StableDiffusionInpaintPipeline"}
                           [task])(**parts, requires_safety_checker=False)
        tmp = os.path.join(out_dir, "model.tmp")
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_slow_tokenizer_files(tokenizer, os.path.join(tmp, "tokenizer"))
        final = os.path.join(out_dir, "model")
        if os.path.exists(final):
            import shutil
            shutil.rmtree(final)
        os.replace(tmp, final)
        print(f"saved {final} ({type(pipe).__name__}.from_pretrained loads it)")
    end_run(stop, out_dir, wandb_run, d)


def write_slow_tokenizer_files(tokenizer, folder):
    """vocab.json + merges.txt beside tokenizer.json, for transformers versions that load the slow tokenizer."""
    import json
    data = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(data["vocab"], f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
        for m in data["merges"]:
            f.write((" ".join(m) if isinstance(m, list) else m) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
