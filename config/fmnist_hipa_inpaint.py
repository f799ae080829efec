# HiPA for inpainting (paper Sec. 4.3) on the tiny inpainting teacher (assets/tiny-sd-fmnist-inpaint, made by
# pretrain.py from the t2i teacher), Fashion-MNIST train images with the paper's 50% peripheral mask.
#   python hipa.py config/fmnist_hipa_inpaint.py
#   python sample.py --model=assets/tiny-sd-fmnist-inpaint --init_images=DIR --mask=periphery --steps=1 \
#       --lora=out/hipa-fmnist-inpaint/pytorch_lora_weights.safetensors
# the t2i run's settings (measured there), then:
import os
exec(open(os.path.join(os.path.dirname(__file__), "fmnist_hipa.py")).read())
model = "assets/tiny-sd-fmnist-inpaint"
task = "inpaint"
mask = "periphery"  # the paper's: the centre kept, 50% of the pixels around it repainted
out_dir = "out/hipa-fmnist-inpaint"
