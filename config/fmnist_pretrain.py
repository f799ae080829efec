# The shipped tiny teacher, assets/tiny-sd-fmnist: Fashion-MNIST 32x32 -> 4x8x8 latents.
# python prepare_fmnist.py && python pretrain.py config/fmnist_pretrain.py  (eager, never compiled; about an hour on 2 CPU cores)
out_dir = "out/pretrain-fmnist"
data_dir = "data/fmnist"
vae_channels = (32, 64, 64)
unet_channels = (64, 96)
layers_per_block = 1
vae_iters = 1000
vae_batch_size = 32
iters = 3000
batch_size = 128
lr = 5e-4
ema_decay = 0.999
sample_interval = 500
ckpt_interval = 250
compile = False  # Inductor on CPU gives zero gradients for the UNet's mid block and before (torch 2.13)
