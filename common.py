"""
Plumbing that the trainers, the sampler and the evaluator all need, kept once here:
the prepared-data format, loading an SD-format model, prompt encoding, the x0 formula,
DDIM sampling, DDP set-up, atomic checkpoint I/O, the torch.compile gradient check, image grids.
The methods themselves live in their own files (hipa.py, d2o.py, pretrain.py).
"""
import json
import math
import os
import random
import urllib.request
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist

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


def load_sd(path, device="cpu", dtype=torch.float32):
    """(tokenizer, text_encoder, vae, unet, scheduler) of an SD-format model: hub id or local folder.
    All frozen (requires_grad False, eval mode). The scheduler is DDIM with trailing spacing (1 step starts at
    t=T-1, not at the legacy 'leading' t=1) and a final alpha of 1 (the last step returns x0, not x0 re-noised
    to t=0); the model's own noise schedule and prediction type are kept."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    if os.path.sep in path or path.startswith("."):  # looks like a folder, not a hub id
        missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
                   if not os.path.isdir(os.path.join(path, d))]
        if missing:
            raise SystemExit(f"model error: {path} is not an SD-format folder (missing {', '.join(missing)})")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", timestep_spacing="trailing",
                                                  set_alpha_to_one=True)
    except OSError as e:
        raise SystemExit(f"model error: cannot load '{path}': {str(e).splitlines()[0]}")
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False).eval().to(device)
    return tokenizer, text_encoder, vae, unet, scheduler


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, pooled=False):
    """Prompts -> the text encoder's last hidden states (B, L, D), what the UNet cross-attends to
    (and, with pooled=True, also the pooled output (B, D))."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    out = text_encoder(ids.to(text_encoder.device))
    return (out.last_hidden_state, out.pooler_output) if pooled else out.last_hidden_state


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


def guided_unet(unet, x, t, cond, uncond, guidance):
    """UNet output with classifier-free guidance: uncond + w (cond - uncond), both in one batched call.
    guidance <= 1 (or uncond None) is a plain conditional call."""
    if uncond is None or guidance == 1:
        return unet(x, t, encoder_hidden_states=cond).sample
    out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


def seeded_noise(indices, shape, base_seed):
    """x_T for items `indices`: item k always gets the noise of seed base_seed + k, whatever the batch or rank."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(base_seed + int(k)))
                        for k in indices])


def one_step_x0(unet, scheduler, x_T, cond, uncond, w):
    """The one-step generator of both methods, in latent space: one guided UNet call at t = T-1 (999 for SD)
    from pure noise, then the x0 formula of the model's prediction type."""
    t = scheduler.config.num_train_timesteps - 1
    out = guided_unet(unet, x_T.to(cond.dtype), t, cond, uncond, w)
    return predict_x0_eps(out, x_T, scheduler.alphas_cumprod[t], scheduler.config.prediction_type)[0]


@torch.no_grad()
def ddim_sample(unet, scheduler, x_T, cond, uncond, steps, guidance):
    """Deterministic DDIM (eta 0) from x_T to x0 latents with diffusers' own DDIMScheduler.step, so that it
    equals StableDiffusionPipeline with the same scheduler. With the scheduler from load_sd (trailing spacing,
    final alpha 1) steps=1 is exactly the one-step x0 at t=T-1, and the last step of N lands on x0."""
    scheduler.set_timesteps(steps)
    x = x_T.float()
    for t in scheduler.timesteps:
        out = guided_unet(unet, x.to(unet.dtype), t.to(x.device), cond, uncond, guidance)
        x = scheduler.step(out.float(), t, x).prev_sample
    return x


def latent_shape(vae, unet, height=0, width=0):
    """(C, h, w) of the UNet's latents for images of height x width (0: the model's native size), or
    SystemExit if the size does not survive the VAE's and the UNet's downsampling."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    multiple = factor * 2 ** (len(unet.config.block_out_channels) - 1)
    height, width = height or unet.config.sample_size * factor, width or unet.config.sample_size * factor
    if height % multiple or width % multiple:
        raise SystemExit(f"config error: image size {height}x{width} must be a multiple of {multiple} for this model "
                         f"(VAE factor {factor} x UNet downsampling)")
    return unet.config.in_channels, height // factor, width // factor


def decode(vae, latents):
    """Latents (scaled as the UNet sees them) -> images in [0, 1], decoded in the VAE's dtype, returned fp32."""
    z = latents / vae.config.scaling_factor
    return (vae.decode(z.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)


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


def start_run(device, init_from, batch_size, grad_accum, seed):
    """The first lines of every trainer: DDP set-up, the checks that need the world size, per-rank seeds.
    Returns (Dist, micro-batch per rank): the global batch stays batch_size for any number of ranks."""
    d = setup_ddp(device)
    if init_from not in ("scratch", "resume"):
        raise SystemExit(f"config error: init_from must be 'scratch' or 'resume', not '{init_from}'")
    if batch_size % (grad_accum * d.world_size):
        raise SystemExit(f"config error: batch_size {batch_size} must divide by grad_accum * world size "
                         f"({grad_accum} * {d.world_size})")
    torch.manual_seed(seed * d.world_size + d.rank)
    return d, batch_size // (grad_accum * d.world_size)


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
    """bf16 autocast on CUDA, nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----------------------------------------------------------------------------- checkpoints, RNG


def start_log(out_dir, init_from, d):
    """Path of the run's JSON-lines log (out_dir/log.jsonl): a scratch run starts it anew, a resumed one appends."""
    path = os.path.join(out_dir, "log.jsonl")
    if d.master and init_from == "scratch" and os.path.exists(path):
        os.remove(path)
    return path


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
    """torch.save to a temp file, then rename: a crash never leaves a half-written checkpoint."""
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise SystemExit(f"resume error: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


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


# ----------------------------------------------------------------------------- torch.compile guard


def checked_compile(module, loss_fn, backend="inductor", rtol=1e-3):
    """torch.compile(module), but only after checking that one backward pass through the compiled
    module gives the same gradients as eager. (torch 2.13 + Inductor on CPU returns exact zeros for the
    gradients of a diffusers UNet's mid block and everything before it, while the forward is right.)
    loss_fn(m) must be deterministic. Raises SystemExit naming the worst parameter if they differ."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    compiled = torch.compile(module, backend=backend)
    grads = []
    for m in (module, compiled):
        for _, p in params:
            p.grad = None
        loss_fn(m).backward()
        grads.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for _, p in params])
    for _, p in params:
        p.grad = None
    worst, worst_name = 0.0, ""
    for (name, _), ge, gc in zip(params, *grads):
        err = ((ge - gc).norm() / (ge.norm() + 1e-12)).item() if ge.norm() > 0 else gc.norm().item()
        if not math.isfinite(err) or err > worst:
            worst, worst_name = (err if math.isfinite(err) else float("inf")), name
    if worst > rtol:
        raise SystemExit(f"compile error: torch.compile(backend='{backend}') gives wrong gradients on this device "
                         f"(relative error {worst:.3g} at {worst_name}); run with --compile=False "
                         f"or --compile_backend=aot_eager")
    return compiled


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
