"""pretrain.py: a tiny SD-format model from scratch, resumable bit-exactly, loadable by diffusers."""
import json

import numpy as np
import pytest
import torch
from conftest import run_killed_after

import pretrain
from common import load_checkpoint, load_sd, write_split


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    rows = [{"id": i, "label": i % 3, "captions": [f"a photo of a {w}", f"a {w}"]}
            for i, w in enumerate(["sneaker", "bag", "ankle boot"] * 5 + ["bag"])]
    write_split(str(root), "train", images, rows, source="test")
    return str(root)


def args(data, out, *extra):
    return [f"--data_dir={data}", f"--out_dir={out}", "--vae_channels=(16,16)", "--unet_channels=(32,32)",
            "--layers_per_block=1", "--text_width=32", "--vae_iters=2", "--iters=2", "--batch_size=4",
            "--vae_batch_size=4", "--ckpt_interval=1", "--sample_interval=100", "--sample_steps=2",
            "--log_interval=1", "--init_from=scratch", *extra]


def test_tokenizer_keeps_caption_words_whole():
    tok = pretrain.build_tokenizer(["a photo of an ankle boot", "a t-shirt"], max_length=16)
    assert tok.convert_ids_to_tokens(tok("a photo of an ankle boot").input_ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "an</w>", "ankle</w>", "boot</w>", "<|endoftext|>"]
    # an unseen word falls back to characters instead of the end token
    assert tok.convert_ids_to_tokens(tok("cat").input_ids)[1:-1] == ["c", "a", "t</w>"]


@pytest.mark.parametrize("kill_after_save", [1, 3])  # mid VAE phase; mid diffusion phase
def test_resume_continues_bit_exactly(tiny_data, tmp_path, monkeypatch, kill_after_save):
    pretrain.main(args(tiny_data, tmp_path / "straight"))
    straight = load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))

    run_killed_after(pretrain, args(tiny_data, tmp_path / "killed"), kill_after_save, monkeypatch)
    assert load_checkpoint(str(tmp_path / "killed" / "ckpt.pt"))["iter"] == kill_after_save
    pretrain.main(args(tiny_data, tmp_path / "killed", "--init_from=resume"))
    resumed = load_checkpoint(str(tmp_path / "killed" / "ckpt.pt"))

    assert resumed["iter"] == straight["iter"] == 4
    assert resumed["scaling_factor"] == straight["scaling_factor"] != 1.0
    vae_config = [json.loads((tmp_path / run / "model" / "vae" / "config.json").read_text())
                  for run in ("straight", "killed")]
    assert vae_config[0]["scaling_factor"] == vae_config[1]["scaling_factor"]  # the exported model too
    for part in ("vae", "denoiser", "ema"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k} differs after resume"


def test_output_is_a_stable_diffusion_folder(tiny_data, tmp_path):
    out = tmp_path / "run"
    pretrain.main(args(tiny_data, out))
    assert (out / "samples_000004.png").exists() and (out / "config.json").exists()
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"))
    assert pipe.scheduler.config.timestep_spacing == "trailing"  # so 1-step pipelines start at t=999
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on this model's own latents
    image = pipe(["a bag"], num_inference_steps=2, guidance_scale=2.0, height=16, width=16, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    weights = [f.suffix for f in (out / "model").rglob("*") if f.is_file() and f.suffix not in (".json", ".txt")]
    assert weights and set(weights) == {".safetensors"}  # safetensors only
    tokenizer, *_ = load_sd(str(out / "model"))
    assert len(tokenizer("a photo of a sneaker").input_ids) == 7  # start, 5 words, end


def test_bad_input(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="meta.json not found"):
        pretrain.main(args(str(tmp_path / "nowhere"), tmp_path / "x"))
    with pytest.raises(SystemExit, match="init_from must be"):
        pretrain.main(args(tiny_data, tmp_path / "x", "--init_from=latest"))
    with pytest.raises(SystemExit, match="no checkpoint"):
        pretrain.main(args(tiny_data, tmp_path / "y", "--init_from=resume"))


def test_the_shipped_teacher_is_a_small_safetensors_sd_folder():
    import os
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-sd-fmnist")
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 20 * 2**20
    assert {os.path.splitext(f)[1] for f in files} == {".json", ".txt", ".safetensors"}  # nothing to unpickle
    tokenizer, text_encoder, vae, unet, scheduler = load_sd(folder)
    assert unet.config.sample_size * 4 == 32 and scheduler.config.timestep_spacing == "trailing"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo of an ankle boot").input_ids)
    assert tokens[5:7] == ["ankle</w>", "boot</w>"]
