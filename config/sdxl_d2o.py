# D2O-F on SDXL base 1.0 at 1024: config/coco_d2o.py (the paper's settings, on SD 2.1) with the changes below. An
# extension: the paper fine-tunes EDM/ADM networks at 32-64 px and has no SDXL settings, so each change says why.
#   python prepare_coco.py --annotations=/data/coco/annotations/captions_train2017.json \
#       --images=/data/coco/train2017 --out=data/coco2017-256 --resolution=256
#   HF_HUB_OFFLINE=1 torchrun --nproc_per_node=8 d2o.py config/sdxl_d2o.py
#   python sample.py --model=stabilityai/stable-diffusion-xl-base-1.0 --unet=out/d2o-sdxl/unet --guidance=1
exec(open("config/coco_d2o.py").read())
model = "stabilityai/stable-diffusion-xl-base-1.0"
out_dir = "out/d2o-sdxl"
resolution = 1024  # SDXL's native size; real images stay at 256 (the discriminator resizes every image to 224)
# Kept: D2O-F freezing, no guidance, the official Lite0 + DeiT discriminator at 224, R1 1e-4 (the same D input).
# Kept: G 8e-6 / D 4e-5. SDXL has SD's noise schedule (alphas_cumprod[999] = 0.0047), so its one-step x0 amplifies
# the UNet output by 14.6 as SD 2.1's does, and g_lr_rule gives it the same step (g_lr x 1/14.6).
# Batch 64, not 256: an SDXL generator step at 1024 costs ~10x SD 2.1's at 512; 2 images per GPU and micro-step on
# 8 GPUs: an estimated 58 GiB per GPU (README, "Memory"); it does not fit 40 GB cards.
batch_size = 64
grad_accum = 4
max_iters = 20000  # 1.3 M images; look at the grids early (the paper reports good images after 0.2 M)
log_interval = 10
eval_interval = 250
ckpt_interval = 250
num_val_prompts = 4
teacher_guidance = 5.0  # SDXL's pipeline default, for the grid's teacher column only
