"""
A D2O UNet -> a LoRA (diffusers' format for sample.py --lora and load_lora_weights, kohya's for ComfyUI and A1111):
for every Linear/Conv2d whose weight D2O changed, the truncated SVD of W_d2o - W_base, the best rank-r approximation
of the difference in Frobenius norm (Eckart-Young). What it leaves out is printed. The files' metadata says what
they are, as HiPA's do (lora_files.adaptor_metadata): the base model and its UNet fingerprint, the task, the rank.

    python extract_lora.py --unet=out/d2o-fmnist/unet --rank=32 --out=out/d2o-fmnist/d2o_lora_r32.safetensors
"""
import json
import os
import sys

import torch

# -----------------------------------------------------------------------------
model = "assets/tiny-sd-fmnist"  # the SD-format model D2O started from (hub id or folder)
unet = "out/d2o-fmnist/unet"  # the D2O UNet folder (UNet2DConditionModel.save_pretrained)
rank = 64  # LoRA rank; a layer with fewer rows or columns gets its full rank (then exact)
out = "out/d2o-fmnist/d2o_lora.safetensors"  # diffusers format; the kohya file goes beside it (..._kohya.safetensors)
# -----------------------------------------------------------------------------


@torch.no_grad()
def extract(base, tuned, rank):
    """(diffusers-format LoRA, {layer: relative Frobenius error of its difference}, that error over all changed
    weights, the other changed parameters: norms and biases, which a LoRA cannot carry)."""
    tuned_params = dict(tuned.named_parameters())
    layers = {n: m for n, m in base.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    others = [k for k, p in base.named_parameters() if not (k.endswith(".weight") and k[:-len(".weight")] in layers)
              and not torch.equal(p, tuned_params[k])]
    state, errors, residual, total = {}, {}, 0.0, 0.0
    for name, layer in layers.items():
        delta = (tuned_params[f"{name}.weight"].double() - layer.weight.double()).flatten(1)
        if not delta.any():
            continue  # frozen by D2O
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r, root = min(rank, len(S)), S[:rank].sqrt()
        A, B = root[:, None] * Vh[:r], U[:, :r] * root  # B A = U_r S_r V_r^T, the scale split evenly
        state[f"unet.{name}.lora_A.weight"] = A.float().reshape(r, *layer.weight.shape[1:]).contiguous()
        state[f"unet.{name}.lora_B.weight"] = B.float().reshape(-1, r, *[1] * (layer.weight.dim() - 2)).contiguous()
        left, all_ = S[r:].square().sum().item(), S.square().sum().item()
        errors[name], residual, total = (left / all_) ** 0.5, residual + left, total + all_
    return state, errors, (residual / total) ** 0.5 if total else 0.0, others


def d2o_run_config(unet_folder):
    """The config of the D2O run that saved unet_folder (d2o.py's out_dir/config.json beside out_dir/unet), {} if
    there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(unet_folder)), "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def same_folder(a, b):
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def main(argv):
    from configurator import configure
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from common import model_task
    from lora_files import adaptor_metadata, kohya_lora_state, unet_fingerprint
    configure(globals(), argv)
    if rank < 1:
        raise SystemExit(f"config error: rank must be >= 1, got {rank}")
    if not os.path.isdir(unet):
        raise SystemExit(f"extract error: D2O UNet folder {unet} not found")
    try:
        base = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
        tuned = UNet2DConditionModel.from_pretrained(unet, torch_dtype=torch.float32)
    except OSError as e:
        raise SystemExit(f"extract error: cannot load a UNet: {str(e).splitlines()[0]}")
    if {k: v.shape for k, v in base.state_dict().items()} != {k: v.shape for k, v in tuned.state_dict().items()}:
        raise SystemExit(f"extract error: {unet} is not a fine-tune of {model}'s UNet (other layers or shapes)")
    state, errors, overall, others = extract(base, tuned, rank)
    if not state:
        raise SystemExit(f"extract error: {unet} has the Linear/Conv2d weights of {model}: nothing to extract")
    # the files say what they are (lora_files.adaptor_metadata): the model's task, its UNet, and the D2O run's config
    # when the D2O UNet is a run's out_dir/unet; a run that started from another model is told
    trained = d2o_run_config(unet)
    if trained.get("model") not in (None, model) and not same_folder(trained["model"], model):
        print(f"warning: {unet} was trained from {trained['model']} (its run's config.json), not {model}: the LoRA "
              f"holds its difference to {model}")
    meta, kohya_meta = adaptor_metadata(model, unet_fingerprint(base), base, model_task(base, model), rank, rank,
                                        sorted(errors), f"extract_lora.py (rank-{rank} SVD of the D2O UNet {unet})",
                                        os.path.splitext(os.path.basename(out))[0], trained)
    files = {out: (state, meta)}
    try:
        files[os.path.splitext(out)[0] + "_kohya.safetensors"] = (kohya_lora_state(state, base), kohya_meta)
    except ValueError as e:  # a UNet without an LDM layout: the diffusers file only
        print(f"no kohya file: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for path, (tensors, metadata) in files.items():
        save_file(tensors, path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)
    worst = max(errors, key=errors.get)
    print(f"rank-{rank} LoRA of the {len(errors)} changed Linear/Conv2d layers -> {', '.join(files)}\n"
          f"relative Frobenius error of the weight difference: {overall:.4g} overall, worst layer "
          f"{errors[worst]:.4g} ({worst})" + (f"\nnot in the LoRA: {len(others)} other changed parameters (norms, "
          f"biases, e.g. {others[0]}); sample.py --unet={unet} keeps them" if others else ""))
    return {"overall": overall, "worst": errors[worst], "layers": errors, "others": others}

if __name__ == "__main__":
    main(sys.argv[1:])
