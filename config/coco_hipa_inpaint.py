# HiPA for inpainting (paper Sec. 4.3): SD 2 inpainting, COCO 2017 train, 1 epoch, 50% peripheral mask,
# 15-step teacher. Stability AI's repo is off the hub; the sd2-community mirror holds the same diffusers folder
# (StableDiffusionInpaintPipeline: unet with 9 input channels, vae, text_encoder, tokenizer, scheduler).
#   python prepare_coco.py --annotations=/data/coco/annotations/captions_train2017.json \
#       --images=/data/coco/train2017 --out=data/coco2017 --resolution=512     # the images: the masked inputs
#   torchrun --nproc_per_node=8 hipa.py config/coco_hipa_inpaint.py
# SD 2.1-base's run (LoRA, loss, lr, batch), then:
import os
exec(open(os.path.join(os.path.dirname(__file__), "coco_hipa.py")).read())
task = "inpaint"
mask = "periphery"
model = "sd2-community/stable-diffusion-2-inpainting"
out_dir = "out/hipa-coco-inpaint"
epochs = 1  # the paper's: 118k (image, caption, noise) examples
# One epoch: each teacher target is used once, so a cache would only cost disk (118k x 32 KB).
teacher_cache = False
# Memory per GPU: as SD 2.1-base's t2i run (the same UNet but for conv_in's 5 extra input channels), plus one
# VAE encode of the masked image per example; estimate with --dry_run=True where the model is in the HF cache.
