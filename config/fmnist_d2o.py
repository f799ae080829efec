# D2O-F on the shipped tiny teacher (assets/tiny-sd-fmnist, 32x32 Fashion-MNIST, UNet 64/96), the embedded
# default: offline on a laptop CPU. A step costs about 1.7 s at batch 32 with the 2-core machine to itself
# (docs/d2o.md): 400 steps ~ 12 minutes, plus ~20 s per learning-curve point.
#   python prepare_fmnist.py && python d2o.py config/fmnist_d2o.py
#   python sample.py --unet=out/d2o-fmnist/unet --guidance=1 --compare=True --prompts="a photo of a sneaker"
model = "assets/tiny-sd-fmnist"
data_dir = "data/fmnist"  # 60,000 real 32x32 images with captions
out_dir = "out/d2o-fmnist"
freeze = 1  # D2O-F: the paper's best setting (Table 3)
guidance = 1.0  # the paper's generators use no guidance; the conditional discriminator carries the caption
# The official code's EfficientNet-Lite0 (ImageNet; offline, efficientnet_lite.py). The paper resizes to 224;
# here 64 px, a CPU trade-off (batch 32, 1 thread: features fwd+bwd 0.24 s at 64, 0.98 s at 128, 3.0 s at 224).
# At 128 px this config's FID(fmnist-clf) at 400 steps is 4.81 / 4.89 / 5.15 against 5.46 / 5.50 / 5.06 (seeds 0-2),
# for 2.3x the time; at 224, 4.71 (seed 0) for 4.5x: past make demo-d2o's 20 minutes (docs/d2o.md, "The
# discriminator at 224 px").
backbones = ("lite0",)
lite0_size = 64
joint_batch = True  # real and fake share the heads' BatchNorm statistics (see ProjectedDiscriminator.fake_and_real)
real_through_vae = True  # D sees reals after the VAE round trip the fakes get: FID 7.07 vs 8.89 at 400 steps (docs/d2o.md)
# Paper Table 10, CIFAR-10 (the paper's 0.2 M / 5 M-image results): G 1e-4, D 1e-4, Adam (0, 0.99). g_lr is in the
# official EDM generator's units: g_lr_rule (on by default) multiplies it by 1/14.6 here, so that one step moves
# the image as far as the official code's (docs/d2o.md, "Step size"). EMA half-life 0.5 Mimg, warm-up ratio 0.05.
# The demo's G lr is twice the paper's: at its 12.8k images it beats 1e-4 on each of three seeds (FID 4.93 against
# 5.36 on average; docs/d2o.md, "At the demo's budget"); `make demo-d2o-long` runs the paper's 1e-4.
g_lr = 2e-4
d_lr = 1e-4
ema_kimg = 500.0
ema_rampup = 0.05
# R1: the official gamma; d2o.r1_weight divides it by the per-GPU batch (32 here) for our mean-reduced losses.
r1_gamma = 1e-4
r1_interval = 16
cache_real_vae = True  # the reals' VAE round trips kept after their first use (0.37 GB of RAM)
# The paper reaches CIFAR FID 3.6 after 0.2 M images; a 30-minute CPU budget buys 400 x 32 = 12.8k images. The
# paper's batch is 256: `make demo-d2o-long` runs it (--g_lr=1e-4 --batch_size=256 --grad_accum=8) to 0.2 M; at 32 the
# curve (G 1e-4) turns back after ~1,200 steps (38.4k images), a clock that looks set by steps (docs/d2o.md).
batch_size = 32
max_iters = 400
log_interval = 10
eval_interval = 200
ckpt_interval = 100
curve_interval = 200  # the learning curve: 500 one-step EMA samples scored every 200 steps (~20 s each) -> curve.jsonl
num_val_prompts = 10  # one per class
teacher_steps = 25
teacher_guidance = 2.0
compile = False  # Inductor on CPU gives zero gradients for the UNet's mid block and before (torch 2.13)
