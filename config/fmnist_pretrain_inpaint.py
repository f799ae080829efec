# The inpainting teacher, assets/tiny-sd-fmnist-inpaint (StableDiffusionInpaintPipeline): the t2i teacher's UNet
# widened to 9 input channels (extra ones zero) and fine-tuned on random masks; VAE, text encoder, tokenizer copied.
# python pretrain.py config/fmnist_pretrain_inpaint.py
# cp -r out/pretrain-fmnist-inpaint/model assets/tiny-sd-fmnist-inpaint
out_dir = "out/pretrain-fmnist-inpaint"
data_dir = "data/fmnist"
task = "inpaint"
init_model = "assets/tiny-sd-fmnist"
vae_iters = 0
iters = 1200
batch_size = 32
lr = 2e-4
warmup_iters = 50
ema_decay = 0.99
sample_interval = 200
ckpt_interval = 100
compile = False  # Inductor on CPU gives zero gradients for the UNet's mid block and before (torch 2.13)
