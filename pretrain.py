"""
Train a small text-to-image latent diffusion model from scratch, in Stable Diffusion's own format
(AutoencoderKL + UNet2DConditionModel + CLIPTextModel + CLIPTokenizer + DDIM scheduler), so that
`StableDiffusionPipeline.from_pretrained(out_dir + "/model")` and every script here load it.
It is the embedded default's teacher (assets/tiny-sd-fmnist) and a laptop-scale testbed.

Two phases in one run, counted by one iteration counter:
  1. iterations [0, vae_iters): the VAE, L1 reconstruction of the posterior mean + a small KL term
     (decoding posterior samples stalls a tiny VAE; the KL keeps the latent scale in check);
  2. iterations [vae_iters, vae_iters + iters): the UNet and text encoder, epsilon-prediction DDPM
     loss on the frozen VAE's latents (cached once), captions dropped with prob. uncond_prob for
     classifier-free guidance. An EMA of both is what gets saved.

    python pretrain.py config/fmnist_pretrain.py
    torchrun --nproc_per_node=2 pretrain.py config/fmnist_pretrain.py
    python pretrain.py config/fmnist_pretrain.py --init_from=resume
"""
import copy
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (all_reduce_mean, append_log, atomic_save, autocast, check_config, checked_compile, ddim_sample,
                    decode, encode_prompts, gather, images_to_tensor, load_checkpoint, load_split, peak_memory_gb,
                    resume_rng, rng_state, save_grid, save_json, start_log, start_run, start_wandb, wandb_image)

# ----------------------------------------------------------------------------- config
out_dir = "out/pretrain"  # checkpoints, sample grids, config.json, log.jsonl and the final model/ folder
data_dir = "data/fmnist"  # prepared data (prepare_fmnist.py / prepare_coco.py)
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
overwrite = False  # a scratch run into an out_dir that holds an earlier run: refused unless True
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


def make_scheduler():
    """Stable Diffusion's noise schedule (scaled linear betas, 1000 steps, epsilon), DDIM with trailing
    spacing and final alpha 1, so that diffusers pipelines loading it start at t=999 for any step count
    and end on the x0 prediction (the same scheduler load_sd makes from any SD model)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=True, steps_offset=1, prediction_type="epsilon",
                         timestep_spacing="trailing")


class VAEReconstruction(torch.nn.Module):
    """VAE forward for training: reconstruction of the posterior mean and the KL to N(0, I)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.mean).sample, posterior.kl().mean()


class Denoiser(torch.nn.Module):
    """Text encoder + UNet as one module, so DDP and the EMA see both."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy, t, input_ids):
        return self.unet(noisy, t, encoder_hidden_states=self.text_encoder(input_ids)[0]).sample


@torch.no_grad()
def encode_latents(vae, images_u8, device, batch=1000):
    """The whole split's posterior means (unscaled), computed once for the diffusion phase."""
    out = []
    for i in tqdm(range(0, len(images_u8), batch), desc="encoding latents", leave=False):
        x = images_to_tensor(images_u8[i: i + batch]).to(device)
        out.append(vae.encode(x).latent_dist.mean.cpu())
    return torch.cat(out)


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
    cond = encode_prompts(tokenizer, text_encoder, [p for p in prompts for _ in range(per_prompt)])
    uncond = encode_prompts(tokenizer, text_encoder, [""] * n)
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


# ----------------------------------------------------------------------------- main


def main(argv):
    from configurator import configure
    config = configure(globals(), argv)
    check_config(config, positive=("vae_batch_size", "vae_lr", "batch_size", "grad_accum", "lr", "grad_clip",
                                   "max_length", "log_interval", "sample_interval", "ckpt_interval", "sample_steps"),
                 non_negative=("vae_iters", "iters", "warmup_iters", "weight_decay", "uncond_prob", "ema_decay",
                               "kl_weight"))
    d, micro = start_run(device, init_from, batch_size, grad_accum, seed, out_dir, overwrite)
    wandb_run = start_wandb(config, d)
    log_path = start_log(out_dir, init_from, d)
    if d.master:
        os.makedirs(out_dir, exist_ok=True)
        save_json(config, os.path.join(out_dir, "config.json"))
    images, rows = load_split(data_dir, "train")
    resolution = images.shape[1]
    if resolution % 2 ** (len(vae_channels) - 1) or resolution != images.shape[2]:
        raise SystemExit(f"config error: images are {images.shape[1]}x{images.shape[2]}; need square images "
                         f"divisible by {2 ** (len(vae_channels) - 1)}")

    tokenizer = build_tokenizer([c for r in rows for c in r["captions"]], max_length)
    vae, unet, text_encoder = build_models(tokenizer, resolution)
    scheduler = make_scheduler()
    vae.to(d.device)
    denoiser = Denoiser(unet, text_encoder).to(d.device)
    ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
    opt_vae = torch.optim.AdamW(vae.parameters(), lr=vae_lr, weight_decay=0.0)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=lr, weight_decay=weight_decay)
    data_gen = torch.Generator().manual_seed(seed + 1000 * d.rank)  # which rows and captions this rank reads
    it = 0
    if init_from == "resume":
        ck = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
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

    if d.master:
        n_params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
                    (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))}
        print("parameters (M): " + ", ".join(f"{k} {v:.2f}" for k, v in n_params.items()))
    vae_train = VAEReconstruction(vae)
    if compile:
        x = images_to_tensor(images[:4]).to(d.device)
        vae_train = checked_compile(vae_train, lambda m: F.l1_loss(m(x)[0], x), backend=compile_backend)
        ids = tokenizer(["a"] * 4, padding="max_length", max_length=max_length, return_tensors="pt").input_ids
        noisy = torch.randn(4, latent_channels, unet.config.sample_size, unet.config.sample_size)
        t = torch.tensor([500] * 4, device=d.device)
        denoiser_fwd = checked_compile(denoiser, lambda m: m(noisy.to(d.device), t, ids.to(d.device)).square().mean(),
                                       backend=compile_backend)
    else:
        denoiser_fwd = denoiser
    if d.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        vae_train = DDP(vae_train)
        denoiser_fwd = DDP(denoiser_fwd)
    alphas = scheduler.alphas_cumprod.to(d.device)
    prompts = grid_prompts(rows)

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
            if latents is None:  # frozen VAE from here on: latents once, scale so that they have unit std
                vae.eval().requires_grad_(False)
                raw = encode_latents(vae, images, d.device)
                vae.register_to_config(scaling_factor=float(1 / raw.std()))
                latents = raw * vae.config.scaling_factor
            model, optimizer, B = denoiser_fwd, opt, micro
            for g_ in opt.param_groups:  # linear warm-up, then constant
                g_["lr"] = lr * min(1.0, (it - vae_iters + 1) / max(1, warmup_iters))
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
                    ids = tokenizer(caps, padding="max_length", max_length=max_length, truncation=True,
                                    return_tensors="pt").input_ids.to(d.device)
                    x0 = latents[idx].to(d.device)
                    noise = torch.randn_like(x0)
                    t = torch.randint(0, scheduler.config.num_train_timesteps, (B,), device=d.device)
                    a = alphas[t].view(-1, 1, 1, 1)
                    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
                    loss = F.mse_loss(model(noisy, t, ids).float(), noise)
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
            msg = (f"iter {it} {'vae L1' if vae_phase else 'eps mse'} {loss_mean:.4f} "
                   f"{seen / dt:.0f} img/s peak mem {peak_memory_gb(d.device):.2f} GB")
            pbar.set_postfix_str(msg.split(" ", 2)[2])
            if d.master:
                tqdm.write(msg)
                append_log(log_path, {"iter": it, "vae_l1" if vae_phase else "eps_mse": loss_mean,
                                      "img_per_s": seen / dt, "peak_mem_gb": peak_memory_gb(d.device)}, wandb_run)
            t0, seen = time.time(), 0
        if d.master and not vae_phase and (it % sample_interval == 0 or it == total):
            sample_grid(ema, vae, tokenizer, scheduler, prompts, 8, os.path.join(out_dir, f"samples_{it:06d}.png"),
                        d.device)
            wandb_image(wandb_run, os.path.join(out_dir, f"samples_{it:06d}.png"), it, key="samples")
        if it % ckpt_interval == 0 or it == total:
            save_checkpoint()
    pbar.close()
    if d.master and iters > 0:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=ema.text_encoder, tokenizer=tokenizer, unet=ema.unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        tmp = os.path.join(out_dir, "model.tmp")
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_slow_tokenizer_files(tokenizer, os.path.join(tmp, "tokenizer"))
        final = os.path.join(out_dir, "model")
        if os.path.exists(final):
            import shutil
            shutil.rmtree(final)
        os.replace(tmp, final)
        print(f"saved {final} (StableDiffusionPipeline.from_pretrained loads it)")
    if wandb_run is not None:
        wandb_run.finish()
    if d.ddp:
        torch.distributed.destroy_process_group()


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
