# HiPA on the shipped tiny teacher (assets/tiny-sd-fmnist), Fashion-MNIST captions: the embedded default,
# offline on a laptop CPU (DISTS falls back to its announced stand-in when the VGG/DISTS weights are unreachable).
#   python prepare_fmnist.py && python hipa.py config/fmnist_hipa.py
model = "assets/tiny-sd-fmnist"
data_dir = "data/fmnist"
out_dir = "out/hipa-fmnist"
num_examples = 1024  # (prompt, noise) pairs; their 15-step teacher targets are computed once and cached
epochs = 5
batch_size = 32
lr = 1e-3  # a small adaptor on a small model, few steps: a larger lr than SD's 1e-4
warmup_iters = 10
lora_rank = 16
eval_interval = 40
ckpt_interval = 40
log_interval = 10
num_val_prompts = 10
