"""
LoRA files: the two layouts hipa.py and extract_lora.py write (diffusers' keys are built by hipa.lora_state; here
kohya's, which ComfyUI and A1111 read, with the original LDM/SGM module names), and what a file says it is (its
safetensors metadata: base model, task, rank; checked before merging), and merge_lora, the one way an adaptor is
merged into a UNet's weights (sample.py --lora, d2o.py init_lora).
"""
import hashlib
import json
import os
import re

import torch

from common import is_sdxl, model_task

# ----------------------------------------------------------------------------- kohya's layout: LDM/SGM names


def ldm_unet_name(name, unet):
    """A diffusers UNet2DConditionModel module name -> its name in the original LDM/SGM UNet, which A1111 and
    ComfyUI use for SD 1.x/2.x and SDXL: input_blocks.0 is conv_in, then each down block has layers_per_block entries
    [resnet, attention] and (all but the last) one [downsampler]; middle_block is [resnet, attention, resnet];
    output_blocks has layers_per_block + 1 entries per up block, [resnet, attention, upsampler]; an attention's
    transformer_blocks keep their numbers (SDXL's depths 1 / 2 / 10); SDXL's added embedding (pooled text and
    size) is label_emb. The inverse of diffusers' single-file converter (tests/test_hipa.py checks every parameter
    of SD and SDXL layouts). ValueError for other names."""
    n = unet.config.layers_per_block
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    if is_sdxl(unet):
        top.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
    if name in top:
        return top[name]
    m = re.fullmatch(r"(down_blocks|mid_block|up_blocks)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                     r"\.(\d+)\.(.+)", name)
    if not isinstance(n, int) or m is None or m[3] == "resnets" and m[5] not in resnet:
        raise ValueError(f"no LDM name for the UNet layer '{name}' (an SD 1.x/2.x- or SDXL-style UNet is needed)")
    where, b, kind, j, rest = m[1], int(m[2] or 0), m[3], int(m[4]), resnet.get(m[5], m[5])
    if where == "mid_block":
        return f"middle_block.{2 * j if kind == 'resnets' else 1}.{rest}"
    if kind == "downsamplers":
        return f"input_blocks.{(b + 1) * (n + 1)}.0.op"
    if kind == "upsamplers":
        return f"output_blocks.{b * (n + 1) + n}.{1 + hasattr(unet.up_blocks[b], 'attentions')}.conv"
    block = 1 + b * (n + 1) + j if where == "down_blocks" else b * (n + 1) + j
    return f"{'input' if where == 'down_blocks' else 'output'}_blocks.{block}.{int(kind == 'attentions')}.{rest}"


def kohya_lora_state(state, unet):
    """A diffusers-format LoRA (lora_state) in the kohya layout of A1111 and ComfyUI: 'lora_unet_<LDM module
    path, dots as underscores>' + '.lora_down.weight' (A), '.lora_up.weight' (B, alpha / rank already folded in)
    and '.alpha' = rank, so that their scale alpha / rank is 1. diffusers reads it with
    pipe.load_lora_weights(path, unet_config=pipe.unet.config): its SD 1.x/2.x pipeline does not pass the config
    that maps LDM block numbers by itself (its SDXL pipeline does), and diffusers 0.42 fails on resnet layers in
    input/output blocks 10 and 11 of SD's layout (it takes them for block 1); ComfyUI and A1111 read those."""
    out = {}
    for key, A in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[len("unet."):-len(".lora_A.weight")]
            kohya = "lora_unet_" + ldm_unet_name(name, unet).replace(".", "_")
            out[f"{kohya}.lora_down.weight"] = A
            out[f"{kohya}.lora_up.weight"] = state[f"unet.{name}.lora_B.weight"]
            out[f"{kohya}.alpha"] = torch.tensor(float(A.shape[0]))
    return out


# ----------------------------------------------------------------------------- what an adaptor file says it is
# hipa.py and extract_lora.py write it into the safetensors metadata of their LoRA files; sample.py checks it.
ADAPTOR_MODELS = {"t2i": "t2i", "edit": "t2i", "inpaint": "inpaint", "upscale": "upscale"}  # task -> model kind


def unet_fingerprint(unet):
    """A UNet's weights in 16 hex digits: sha1 of every weight's name and shape and of 64 evenly spaced values of
    it rounded to fp16 (the same for the model loaded in fp32 or fp16; another seed, a fine-tune or a merged LoRA
    changes it). Milliseconds even for SDXL. None for a bf16 UNet, whose values no longer tell. Call it on the
    plain UNet (LoRA layers rename weights)."""
    state = unet.state_dict()
    if any(t.dtype == torch.bfloat16 for t in state.values()):
        return None
    h = hashlib.sha1("".join(f"{k}{tuple(t.shape)}" for k, t in state.items()).encode())
    values = [t.detach().flatten()[::max(1, t.numel() // 64)][:64].to(torch.float16) for t in state.values()]
    h.update(torch.cat(values).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def adaptor_metadata(model_path, fingerprint, unet, task, rank, alpha, targets, made_by, name, training_config):
    """(the diffusers file's, the kohya file's) safetensors metadata, str -> str: the base model as given and
    its unet_fingerprint, the task, lora_rank, lora_alpha (alpha / rank is already folded into lora_B), lora_targets,
    made_by and the training config (JSON); the kohya file also the ss_* fields of kohya's sd-scripts that A1111
    and ComfyUI show (ss_network_alpha = rank, as the file's .alpha tensors: the scale is 1)."""
    meta = {"base_model": model_path, "base_unet_fingerprint": fingerprint, "task": task, "lora_rank": str(rank),
            "lora_alpha": str(float(alpha)), "lora_targets": json.dumps(list(targets)), "made_by": made_by,
            "training_config": json.dumps(training_config, default=str)}
    version = "sdxl_base_v1-0" if is_sdxl(unet) else "sd_v2" if unet.config.cross_attention_dim == 1024 else "sd_v1"
    kohya = {**meta, "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
             "ss_network_alpha": str(float(rank)), "ss_base_model_version": version, "ss_v2": str(version == "sd_v2"),
             "ss_sd_model_name": model_path, "ss_output_name": name,
             "ss_training_comment": f"{made_by}: one-step {task} adaptor of {model_path}"}
    return meta, kohya


def check_adaptor(path, unet, model_path, who, verbose=True):
    """A LoRA file's metadata ({} for a file made elsewhere), checked against the plain UNet it is about to
    change: one line for a file that is no safetensors file (truncated, another format) and for an adaptor of
    another task (an x4 adaptor has the t2i UNet's layer shapes: it would load silently and make garbage); one
    warning line (if verbose) for an adaptor trained on other weights (another unet_fingerprint)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise SystemExit(f"{who} error: cannot read the LoRA file {path} (truncated, or not safetensors): {e}")
    made_for, kind = meta.get("task"), model_task(unet)
    if made_for in ADAPTOR_MODELS and ADAPTOR_MODELS[made_for] != kind:
        raise SystemExit(f"{who} error: {path} is an adaptor for the '{made_for}' task, trained on "
                         f"{meta.get('base_model')}; {model_path} is a {kind} model")
    theirs = meta.get("base_unet_fingerprint")
    ours = unet_fingerprint(unet) if verbose and theirs else None
    if ours and ours != theirs:
        print(f"warning: {path} was trained on {meta.get('base_model')} (UNet {theirs}), not on {model_path} "
              f"(UNet {ours}): its images may be off")
    return meta


# ----------------------------------------------------------------------------- merging an adaptor


def merge_lora(unet, path, model_path="the model", who="sample", verbose=True):
    """W <- W + B A for every adapted layer, from a diffusers-format LoRA file (keys
    'unet.<module>.lora_A.weight' / '.lora_B.weight', alpha / rank already folded into B). Its metadata first
    (lora_files.check_adaptor): an adaptor of another task is refused, one trained on other weights than model_path's
    warned about (when verbose); a file without metadata loads as it is."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise SystemExit(f"{who} error: LoRA file {path} not found")
    check_adaptor(path, unet, model_path, who, verbose)
    state = load_file(path)
    bad = next((k for k, v in state.items() if not torch.isfinite(v).all()), None)
    if bad:  # it would merge into NaN weights and black images
        raise SystemExit(f"{who} error: {path} holds non-finite values (NaN or inf) in {bad}; the run that made "
                         "it diverged")
    modules = dict(unet.named_modules())
    pairs = {k[len("unet."):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    if not pairs:
        raise SystemExit(f"{who} error: {path} has no 'unet.*.lora_A.weight' keys; not a diffusers LoRA file")
    for name in sorted(pairs):
        if name not in modules:
            raise SystemExit(f"{who} error: {path} adapts '{name}', which this UNet does not have "
                             f"(made for another base model?); {model_path} is {family_name(unet)} model")
        layer = modules[name]
        A, B = state[f"unet.{name}.lora_A.weight"].float(), state[f"unet.{name}.lora_B.weight"].float()
        if (B.shape[0], *A.shape[1:]) != layer.weight.shape or B.flatten(1).shape[1] != A.shape[0]:
            raise SystemExit(f"{who} error: {path} does not fit this UNet: {name} expects a weight of "
                             f"{tuple(layer.weight.shape)}, file has lora_B {tuple(B.shape)} x lora_A "
                             f"{tuple(A.shape)} (made for another base model?); {model_path} is {family_name(unet)} model")
        delta = (B.flatten(1) @ A.flatten(1)).view_as(layer.weight)
        with torch.no_grad():
            layer.weight += delta.to(layer.weight.dtype)
    return len(pairs)


def family_name(unet_):
    return "an SDXL" if is_sdxl(unet_) else "an SD 1.x/2.x"
