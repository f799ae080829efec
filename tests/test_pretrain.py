"""pretrain.py: a tiny SD-format model from scratch, resumable bit-exactly, loadable by diffusers."""
import json

import numpy as np
import pytest
import torch
from conftest import run_killed_after

import pretrain
from common import decode, encode, load_checkpoint, load_sd, write_split


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
    tokenizer = load_sd(str(out / "model"))[0].tokenizers[0]
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
    text, vae, unet, scheduler = load_sd(folder)
    assert unet.config.sample_size * 4 == 32 and scheduler.config.timestep_spacing == "trailing"
    tokenizer = text.tokenizers[0]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo of an ankle boot").input_ids)
    assert tokens[5:7] == ["ankle</w>", "boot</w>"]


# ----------------------------------------------------------------------------- the task teachers (HiPA's tasks)


@pytest.fixture(scope="module")
def tiny_t2i(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i")
    pretrain.main(args(tiny_data, out))
    return str(out / "model")


@pytest.mark.parametrize("task", ["inpaint", "upscale"])
def test_task_teachers_load_in_their_diffusers_pipelines(tiny_data, tiny_t2i, tmp_path, task):
    pretrain.main(args(tiny_data, tmp_path, f"--task={task}", f"--init_model={tiny_t2i}", "--vae_iters=0"))
    assert (tmp_path / "samples_000002.png").exists()  # input | output | ground truth
    import diffusers
    from PIL import Image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    if task == "inpaint":
        pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(str(tmp_path / "model"))
        assert pipe.unet.config.in_channels == 9
        mask = Image.fromarray((pretrain.make_mask("periphery", 1, 16, 16)[0, 0].numpy() * 255).astype(np.uint8))
        out = pipe(["a bag"], image=image, mask_image=mask, num_inference_steps=2, height=16, width=16,
                   output_type="np").images
        assert out.shape == (1, 16, 16, 3)
    else:
        pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(str(tmp_path / "model"))
        assert pipe.unet.config.in_channels == 7 and pipe.scheduler.config.prediction_type == "v_prediction"
        assert pipe.vae.config.scaling_factor == 0.08333  # as saved, so the pipeline does not overwrite it
        out = pipe(["a bag"], image=image.resize((8, 8)), num_inference_steps=2, output_type="np").images
        assert out.shape == (1, 16, 16, 3)  # the VAE's factor (2 here, 4 for the tiny teacher) up
    assert np.isfinite(out).all()
    # the pipelines encode with a posterior sample: it is the mean the teachers are trained on
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert pipe.vae.encode(x).latent_dist.std.max() < 1e-4
    t2i_text_encoder = load_sd(tiny_t2i)[0].encoders[0]
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in t2i_text_encoder.state_dict().items())
    weights = {f.suffix for f in (tmp_path / "model").rglob("*") if f.is_file() and f.suffix not in (".json", ".txt")}
    assert weights == {".safetensors"}


def test_widened_unet_computes_the_t2i_unet_at_init(tiny_t2i):
    """Zero extra input channels (and a zero class embedding): whatever the mask, masked image or low-res image
    and noise level, the task UNet starts as the t2i UNet, the property the fine-tuning starts from."""
    *_, t2i_unet, _ = load_sd(tiny_t2i)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    text = torch.randn(2, 16, 32)
    expected = t2i_unet(x, t, encoder_hidden_states=text).sample
    inpaint = pretrain.widen_unet(t2i_unet, 9)
    got = inpaint(torch.cat([x, torch.randn(2, 5, 8, 8)], 1), t, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    upscale = pretrain.widen_unet(t2i_unet, 7, num_class_embeds=1000)
    got = upscale(torch.cat([x, torch.randn(2, 3, 8, 8)], 1), t, encoder_hidden_states=text,
                  class_labels=torch.tensor([0, 349])).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_rescaled_vae_keeps_the_unets_latents_and_the_reconstruction(tiny_t2i):
    _, vae, _, _ = load_sd(tiny_t2i)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = encode(vae, x)
    recon = decode(vae, latents)
    pretrain.rescale_vae(vae, 0.08333)
    assert vae.config.scaling_factor == 0.08333
    torch.testing.assert_close(encode(vae, x), latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decode(vae, latents), recon, rtol=1e-4, atol=1e-5)


def test_random_masks_include_the_tasks_masks_and_full_masks():
    masks = pretrain.random_masks(400, 32, 32, torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 32, 32) and set(masks.unique().tolist()) == {0.0, 1.0}
    periphery = pretrain.make_mask("periphery", 1, 32, 32)[0]
    for kind in (periphery, 1 - periphery, torch.ones_like(periphery)):
        assert 20 < (masks == kind).flatten(1).all(1).sum() < 100  # 15%, 15%, 10% of 400
    assert 0.2 < masks.mean() < 0.8  # and random shapes between


def test_task_bad_input(tiny_data, tiny_t2i, tmp_path):
    with pytest.raises(SystemExit, match="task must be"):
        pretrain.main(args(tiny_data, tmp_path / "x", "--task=depth"))
    with pytest.raises(SystemExit, match="set init_model and vae_iters=0"):
        pretrain.main(args(tiny_data, tmp_path / "x", "--task=inpaint", f"--init_model={tiny_t2i}"))
    with pytest.raises(SystemExit, match="not an SD-format folder"):
        pretrain.main(args(tiny_data, tmp_path / "x", "--task=inpaint", "--init_model=nowhere", "--vae_iters=0"))
