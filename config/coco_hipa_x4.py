# HiPA for x4 super-resolution (paper Sec. 4.4): the SD x4 upscaler, 128 -> 512, 2,000 iterations, 15-step
# teacher. The sd2-community mirror holds StableDiffusionUpscalePipeline's diffusers folder (unet with 7 input
# channels and the noise-level class embedding, vae of factor 4, text_encoder, tokenizer, scheduler (v-prediction),
# low_res_scheduler). Low-res inputs: the 512 px COCO images downsampled 4x (antialiased bicubic).
#   python prepare_coco.py --annotations=/data/coco/annotations/captions_train2017.json \
#       --images=/data/coco/train2017 --out=data/coco2017 --resolution=512
#   torchrun --nproc_per_node=8 hipa.py config/coco_hipa_x4.py
# SD 2.1-base's run (LoRA, loss, lr), then:
import os
exec(open(os.path.join(os.path.dirname(__file__), "coco_hipa.py")).read())
task = "upscale"
noise_level = 20  # StableDiffusionUpscalePipeline's default
model = "sd2-community/stable-diffusion-x4-upscaler"
out_dir = "out/hipa-coco-x4"
resolution = 512  # the output; the input is 128
# 2,000 iterations, the paper's: epochs x num_examples / batch_size; rows are cycled (example k: image k mod 118k)
epochs = 1
num_examples = 64_000
teacher_cache = False  # each target is used once
# Not given in the paper: batch 32 (8 GPUs x 4; the x4 UNet at 128x128 latents costs about 4x SD 2.1-base's
# 64x64 per image).
batch_size = 32
# Memory: not estimated here (the x4 configs are not in this machine's HF cache for --dry_run); checkpointing on.
eval_interval = 250
ckpt_interval = 250
