# HiPA for x4 super-resolution (paper Sec. 4.4) on the tiny x4 teacher (assets/tiny-sd-fmnist-x4, made by
# pretrain.py: StableDiffusionUpscalePipeline format, 8x8 -> 32x32), Fashion-MNIST train images downsampled
# 32 -> 8 (antialiased bicubic) as the low-res inputs, noised to noise_level 20 as the pipeline does by default.
#   python hipa.py config/fmnist_hipa_x4.py
#   python sample.py --model=assets/tiny-sd-fmnist-x4 --init_images=DIR_OF_8PX_PNGS --steps=1 \
#       --lora=out/hipa-fmnist-x4/pytorch_lora_weights.safetensors
# the t2i run's settings (measured there), then:
import os
exec(open(os.path.join(os.path.dirname(__file__), "fmnist_hipa.py")).read())
model = "assets/tiny-sd-fmnist-x4"
task = "upscale"
noise_level = 20
out_dir = "out/hipa-fmnist-x4"
