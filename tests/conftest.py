import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_tiny_sd(folder, prediction_type="epsilon", seed=0):
    """A tiny random model of Stable Diffusion's classes, saved as an SD folder (what the hub would give)."""
    import torch
    from diffusers import StableDiffusionPipeline

    import pretrain
    torch.manual_seed(seed)
    sizes = {"vae_channels": (16, 16), "unet_channels": (32, 32), "layers_per_block": 1, "text_width": 32}
    saved = {k: getattr(pretrain, k) for k in sizes}
    vars(pretrain).update(sizes)
    try:
        tokenizer = pretrain.build_tokenizer(["a photo of a sneaker", "a bag", "an ankle boot"], 16)
        vae, unet, text_encoder = pretrain.build_models(tokenizer, 16)
    finally:
        vars(pretrain).update(saved)
    scheduler = pretrain.make_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    with torch.no_grad():  # random weights give outputs of a realistic size, not ~0
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.05)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def make_tiny_sdxl(folder, seed=0, in_channels=4, force_zeros=True):
    """A tiny random model of SDXL's classes, as diffusers' own SDXL tests build them, saved as an SDXL folder
    (StableDiffusionXLPipeline.save_pretrained): two CLIP text encoders (the second with a projection), a UNet
    with the 'text_time' added embedding (projection_class_embeddings_input_dim = 6 x addition_time_embed_dim +
    projection_dim) and cross_attention_dim = the sum of the encoders' widths, SDXL's block kinds (a plain first
    block) and transformer depths that differ per level, a tiny VAE. in_channels=9: SDXL inpainting's layout."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import pretrain
    torch.manual_seed(seed)
    saved = {k: getattr(pretrain, k) for k in ("vae_channels", "unet_channels", "layers_per_block", "text_width")}
    vars(pretrain).update(vae_channels=(16, 16), unet_channels=(32, 32), layers_per_block=1, text_width=32)
    try:
        tokenizer = pretrain.build_tokenizer(["a photo of a sneaker", "a bag", "an ankle boot"], 16)
        vae, _, _ = pretrain.build_models(tokenizer, 16)
    finally:
        vars(pretrain).update(saved)
    clip = dict(vocab_size=len(tokenizer.get_vocab()), intermediate_size=64, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=2, **clip))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, num_hidden_layers=3,
                                                                projection_dim=24, **clip))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 24, norm_num_groups=16)
    with torch.no_grad():  # random weights give outputs of a realistic size, not ~0
        for p in unet.conv_out.parameters():
            p.normal_(0, 0.05)
    pipeline = StableDiffusionXLInpaintPipeline if in_channels == 9 else StableDiffusionXLPipeline
    pipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
             tokenizer_2=tokenizer, unet=unet, scheduler=pretrain.make_scheduler(),
             force_zeros_for_empty_prompt=force_zeros).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def real_data(tmp_path_factory):
    """16 random 16x16 images with 2 captions each: real images for D2O, captions for HiPA, data for pretrain."""
    import numpy as np

    from common import write_split
    root = tmp_path_factory.mktemp("real")
    words = ["a photo of a sneaker", "a bag", "an ankle boot", "a photo of a bag"]
    rows = [{"id": i, "captions": [words[i % 4], words[(i + 1) % 4]]} for i in range(16)]
    images = np.random.RandomState(0).randint(0, 256, (16, 16, 16, 3)).astype(np.uint8)
    write_split(str(root), "train", images, rows, source="test")
    return str(root)


class Killed(Exception):
    pass


def run_killed_after(module, argv, k, monkeypatch):
    """Run module.main(argv) as a process that dies right after writing its k-th checkpoint."""
    real_save, saves = module.atomic_save, []

    def save_then_die(obj, path):
        real_save(obj, path)
        saves.append(obj.get("iter"))
        if len(saves) == k:
            raise Killed
    monkeypatch.setattr(module, "atomic_save", save_then_die)
    with pytest.raises(Killed):
        module.main(argv)
    monkeypatch.setattr(module, "atomic_save", real_save)
    return saves


@pytest.fixture(autouse=True)
def own_stop_signals():
    """Tests call the trainers' main() in this process; one that ends in SystemExit leaves the trainer's SIGTERM and
    SIGUSR1 handlers (common.catch_stop_signals) installed: give pytest its own back after each test."""
    import signal
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
