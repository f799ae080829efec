# COCO-5k: FID-5k against the 5000 images of COCO 2017 val (+ CLIP score with ViT-g/14).
# FID-5k is higher than FID-30k for the same model (fewer samples bias FID upwards): never compare it with
# FID-30k (config/coco30k_eval.py) or put the two in one table.
# 1. the reference, once (all of val2017, square, 512 px):
#    python prepare_coco.py --annotations=/data/coco/annotations/captions_val2017.json --images=/data/coco/val2017 \
#        --out=data/coco2017val --split=val --resolution=512
# 2. their prompts, one caption per image:
#    python -c "import json; [print(json.loads(l)['captions'][0]) for l in open('data/coco2017val/val_captions.jsonl')]" > coco5k.txt
# 3. torchrun --nproc_per_node=8 sample.py --model=... --lora=... --prompts=coco5k.txt --num_per_prompt=1 \
#        --height=512 --width=512 --out_dir=out/coco5k-hipa --grid=False
# 4. torchrun --nproc_per_node=8 eval_fid.py config/coco5k_eval.py --gen=out/coco5k-hipa,out/coco5k-base
ref = "data/coco2017val"
ref_split = "val"
features = "inception"
resolution_eval = 256  # as the 30k protocol; papers differ here (some keep 512): report it with the number
clip_model = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
batch_size = 100
