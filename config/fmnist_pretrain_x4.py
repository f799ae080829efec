# The x4 super-resolution teacher, assets/tiny-sd-fmnist-x4 (StableDiffusionUpscalePipeline, 8x8 -> 32x32):
# the t2i teacher's UNet widened to 7 input channels (extra ones zero) + a zero noise-level class embedding,
# fine-tuned with v-prediction on low-res inputs noised to a random level < 350; VAE rescaled to the pipeline's
# scaling factor 0.08333 (same latents, same decoder), text encoder, tokenizer copied.
# python pretrain.py config/fmnist_pretrain_x4.py
# cp -r out/pretrain-fmnist-x4/model assets/tiny-sd-fmnist-x4
# the inpainting teacher's fine-tune settings, then:
import os
exec(open(os.path.join(os.path.dirname(__file__), "fmnist_pretrain_inpaint.py")).read())
out_dir = "out/pretrain-fmnist-x4"
task = "upscale"
iters = 800
