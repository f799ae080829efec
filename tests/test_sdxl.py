"""SDXL: the same scripts on a tiny random SDXL-format model (conftest.make_tiny_sdxl), conditioned as diffusers'
StableDiffusionXLPipeline conditions it, with the family found from the model; SD 1.x/2.x files refused on it."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import d2o
import extract_lora
import hipa
import lora_files
import sample
from common import ddim_sample, empty_cond, encode_prompts, load_sd, one_step_x0
from conftest import make_tiny_sdxl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDXL_CONFIGS = os.path.join(ROOT, "assets", "configs", "sdxl-base-1.0")
PROMPTS = ["a bag", "an ankle boot"]


@pytest.fixture(scope="module")
def tiny_sdxl_encoded_uncond(tmp_path_factory):
    """An SDXL model whose pipeline does not force zeros for the empty prompt: uncond is the encoded ''."""
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl_no_zeros"), seed=1, force_zeros=False)


def xl_pipeline(model, scheduler):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.scheduler = scheduler  # load_sd's: DDIM, trailing spacing, final alpha 1
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe, x_T, steps, guidance=2.0):
    return pipe(PROMPTS, latents=x_T.clone(), num_inference_steps=steps, guidance_scale=guidance, height=16,
                width=16, output_type="latent").images


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sdxl_encoded_uncond"])
def test_ddim_equals_the_sdxl_pipeline(model, steps, request):
    """Both text encoders' penultimate states, the pooled text_embeds, the time ids and the unconditional branch
    (zeros where force_zeros_for_empty_prompt, else the encoded ''): our steps are the pipeline's."""
    path = request.getfixturevalue(model)
    text, vae, unet, scheduler = load_sd(path)
    assert text.zero_uncond == (model == "tiny_sdxl") and len(text.encoders) == 2
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(text, PROMPTS, (16, 16))
    assert cond.hidden.shape == (2, 16, 32 + 48) and cond.pooled.shape == (2, 24)  # 768 + 1280 and 1280 on SDXL
    assert cond.time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # original size, crop top-left, target size
    uncond = empty_cond(text, (16, 16)).expand(2)
    assert (uncond.hidden.abs().sum() == 0) == text.zero_uncond
    ours = ddim_sample(unet, scheduler, x_T, cond, uncond, steps, guidance=2.0)
    torch.testing.assert_close(ours, pipeline_latents(xl_pipeline(path, scheduler), x_T, steps), rtol=1e-4, atol=1e-5)


def test_sample_py_one_step_is_the_pipelines_image(tiny_sdxl, tmp_path):
    scheduler = load_sd(tiny_sdxl)[3]
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    sample.main([f"--model={tiny_sdxl}", f"--prompts={tmp_path / 'prompts.txt'}", "--num_per_prompt=1", "--steps=1",
                 "--guidance=2.0", "--seed=7", f"--out_dir={tmp_path / 'out'}", "--grid=False"])
    x_T = common.seeded_noise([0, 1], (4, 8, 8), 7)
    theirs = xl_pipeline(tiny_sdxl, scheduler)(PROMPTS, latents=x_T, num_inference_steps=1, guidance_scale=2.0,
                                               height=16, width=16, output_type="np").images
    ours = np.stack([np.array(Image.open(tmp_path / "out" / f"{i:06d}.png")) for i in range(2)]).astype(int)
    assert np.abs(ours - np.round(theirs * 255)).max() <= 1  # the same decode; rounding may differ by one level


def test_a_long_prompt_is_truncated_with_diffusers_warning(tiny_sdxl, capsys):
    text = load_sd(tiny_sdxl)[0]
    long = " ".join(["a bag"] * 20)
    cond = encode_prompts(text, [long], (16, 16))
    assert "truncated because CLIP can only handle sequences up to 16 tokens" in capsys.readouterr().err
    assert cond.hidden.shape[1] == 16


def test_lora_on_sdxl_base_has_the_figure_readme_gives():
    """The paper's attention-only adaptor at rank 16 on SDXL base's real UNet config (assets/configs)."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SDXL_CONFIGS, subfolder="unet"))
        assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base's UNet, 2.57B
        loras = hipa.add_lora(unet, ("to_q", "to_k", "to_v", "to_out.0"), 16, 16.0)
    assert len(loras) == 4 * 2 * 70  # 70 transformer blocks (2 + 2x2 + 2x10 down, 10 mid, 3 + 3x2 + 3x10 up)
    assert sum(p.numel() for p in hipa.lora_params(loras)) == 23_224_320


def sdxl_layout_unet():
    """SDXL base's block structure (3 levels, a plain first block, transformer depths 1 / 2 / 10, the added
    text-and-time embedding) at toy width."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(2, 4, 8), use_linear_projection=True, cross_attention_dim=40, norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)


def test_sgm_names_are_what_diffusers_single_file_converter_reads_for_sdxl():
    """Every parameter of an SDXL-layout UNet renamed with lora_files.ldm_unet_name comes back to its own name and value
    through diffusers' converter of original SGM checkpoints (the names ComfyUI and A1111 read)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    torch.manual_seed(0)
    unet = sdxl_layout_unet()
    state = unet.state_dict()
    sgm = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        sgm[f"model.diffusion_model.{lora_files.ldm_unet_name(module, unet)}.{param}"] = value
    assert len(sgm) == len(state)
    assert "model.diffusion_model.label_emb.0.0.weight" in sgm  # add_embedding.linear_1
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in sgm  # depth 10
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sgm  # the first up block's upsampler
    back = convert_ldm_unet_checkpoint(sgm, dict(unet.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def sdxl_captions(root):
    words = ["a photo of a sneaker", "a bag", "an ankle boot", "a photo of a bag"]
    rows = [{"id": i, "captions": [words[i % 4], words[(i + 1) % 4]]} for i in range(8)]
    images = np.random.RandomState(0).randint(0, 256, (8, 16, 16, 3)).astype(np.uint8)
    common.write_split(str(root), "train", images, rows, source="test")
    return str(root)


@pytest.fixture(scope="module")
def hipa_run(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_hipa")
    out = root / "run"
    hipa.main([f"--model={tiny_sdxl}", f"--data_dir={sdxl_captions(root / 'data')}", f"--out_dir={out}",
               f"--cache_dir={root / 'cache'}", "--num_examples=4", "--batch_size=2", "--epochs=1", "--lora_rank=4",
               "--teacher_steps=2", "--lr=1e-2", "--warmup_iters=1", "--log_interval=1", "--eval_interval=100",
               "--ckpt_interval=100", "--vgg_weights=absent", "--dists_weights=absent"])
    return out


def test_hipa_on_sdxl_exports_an_adaptor_diffusers_and_sample_py_agree_on(tiny_sdxl, hipa_run, tmp_path):
    log = [json.loads(line) for line in open(hipa_run / "log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) for r in log)
    path = hipa_run / "pytorch_lora_weights.safetensors"
    text, vae, unet, scheduler = load_sd(tiny_sdxl)
    before = pipeline_latents(xl_pipeline(tiny_sdxl, scheduler), torch.randn(2, 4, 8, 8), 1)
    sample.merge_lora(unet, str(path))  # sample.py --lora
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = one_step_x0(unet, scheduler, x_T, encode_prompts(text, PROMPTS, (16, 16)),
                           empty_cond(text, (16, 16)).expand(2), 2.0)
    latents = []
    for file in (path, hipa_run / "pytorch_lora_weights_kohya.safetensors"):
        pipe = xl_pipeline(tiny_sdxl, scheduler)
        pipe.load_lora_weights(str(file))  # the SDXL pipeline maps the kohya file's SGM names itself
        latents.append(pipeline_latents(pipe, x_T, 1))
    torch.testing.assert_close(latents[0], ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latents[1], latents[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, before, atol=1e-3)  # (the adaptor changed something)


def test_kohya_file_names_every_adapted_layer_by_its_sgm_name(hipa_run, tiny_sdxl):
    from safetensors.torch import load_file
    state, kohya = (load_file(str(hipa_run / f)) for f in ("pytorch_lora_weights.safetensors",
                                                            "pytorch_lora_weights_kohya.safetensors"))
    unet = load_sd(tiny_sdxl)[2]
    layers = {k[len("unet."):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    assert len(kohya) == 3 * len(layers)
    for name in layers:  # each layer once, under its SGM name, with the same A and B
        key = "lora_unet_" + lora_files.ldm_unet_name(name, unet).replace(".", "_")
        assert torch.equal(kohya[f"{key}.lora_down.weight"], state[f"unet.{name}.lora_A.weight"])
        assert torch.equal(kohya[f"{key}.lora_up.weight"], state[f"unet.{name}.lora_B.weight"])
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q" in {k.split(".")[0] for k in kohya}


def test_d2o_on_sdxl_saves_a_unet_that_sample_diffusers_and_extract_lora_load(tiny_sdxl, real_data, tmp_path):
    """Two GAN steps; the discriminator's text input is the pooled text_embeds (24 wide here, 1280 on SDXL),
    the teacher-UNet backbone adds SDXL's text-and-time embedding."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    out = tmp_path / "run"
    d2o.main([f"--model={tiny_sdxl}", f"--data_dir={real_data}", f"--out_dir={out}", "--batch_size=2",
              "--max_iters=2", "--r1_interval=1", "--log_interval=1", "--eval_interval=100", "--ckpt_interval=100",
              "--teacher_steps=2", "--num_val_prompts=2", "--backbones=('teacher_unet',)"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    tuned = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    assert common.is_sdxl(tuned)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, unet=tuned)
    images = pipe(PROMPTS[:1], num_inference_steps=1, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    sample.main([f"--model={tiny_sdxl}", f"--unet={out / 'unet'}", "--num_per_prompt=2", "--steps=1",
                 f"--out_dir={tmp_path / 'samples'}", "--grid=False"])
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    result = extract_lora.main([f"--model={tiny_sdxl}", f"--unet={out / 'unet'}", "--rank=512",
                                f"--out={tmp_path / 'd2o_lora.safetensors'}"])
    assert result["overall"] < 1e-5 and (tmp_path / "d2o_lora_kohya.safetensors").exists()  # full rank: exact
    assert any(k.startswith("lora_unet_label_emb") for k in load_file(str(tmp_path / "d2o_lora_kohya.safetensors")))


def test_dry_runs_estimate_sdxl_at_1024_from_config_files_alone(tmp_path, capsys):
    assert not any(f.endswith((".safetensors", ".bin")) for _, _, fs in os.walk(SDXL_CONFIGS) for f in fs)
    common_args = [f"--model={SDXL_CONFIGS}", f"--out_dir={tmp_path / 'out'}", "--dry_run=True", "--dry_run_gpus=8"]
    peak = hipa.main(common_args + ["--batch_size=8", "--grad_checkpointing=True"])
    assert 8 * 2**30 < peak < 40 * 2**30, peak / 2**30  # the bf16 UNet alone is 5.1 GB
    assert "estimated peak GPU memory of one HiPA step at 1 image(s) per GPU" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad input: one line, nothing written


def sd_lora(tiny_sd, path):
    from safetensors.torch import save_file
    unet = load_sd(tiny_sd)[2]
    loras = hipa.add_lora(unet, ("to_q",), 2, 2.0)
    save_file(hipa.lora_state(loras), str(path))


@pytest.mark.parametrize("case", ["sd lora on sdxl", "sdxl lora on sd", "sd unet on sdxl", "sdxl unet on sd"])
def test_files_of_the_other_family_are_one_clear_line(case, tiny_sd, tiny_sdxl, hipa_run, tmp_path):
    model = tiny_sdxl if case.endswith("on sdxl") else tiny_sd
    if case == "sd lora on sdxl":
        sd_lora(tiny_sd, tmp_path / "l.safetensors")
        extra = [f"--lora={tmp_path / 'l.safetensors'}"]
    elif case == "sdxl lora on sd":
        extra = [f"--lora={hipa_run / 'pytorch_lora_weights.safetensors'}"]
    else:
        load_sd(tiny_sd if case.startswith("sd unet") else tiny_sdxl)[2].save_pretrained(str(tmp_path / "unet"))
        extra = [f"--unet={tmp_path / 'unet'}"]
    family = "an SDXL model" if model == tiny_sdxl else "an SD 1.x/2.x model"
    with pytest.raises(SystemExit, match=f"sample error: .*{family}"):
        sample.main([f"--model={model}", f"--out_dir={tmp_path / 'out'}", *extra])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["StableDiffusion3Pipeline", "FluxPipeline", "folder with a transformer"])
def test_an_unsupported_family_is_named_in_one_line(kind, tmp_path):
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    if kind != "folder with a transformer":
        (tmp_path / "m" / "model_index.json").write_text(json.dumps({"_class_name": kind}))
    with pytest.raises(SystemExit, match="model error: .*(" + kind + "|transformer).*supported: SD 1.x / 2.x .* SDXL"):
        sample.main([f"--model={tmp_path / 'm'}", f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_x4_on_sdxl_is_one_clear_line(tiny_sdxl, tmp_path):
    with pytest.raises(SystemExit, match="there is no SDXL one"):
        hipa.main([f"--model={tiny_sdxl}", "--task=upscale", f"--data_dir={sdxl_captions(tmp_path / 'data')}",
                   "--batch_size=4", f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
    x4 = make_tiny_sdxl(tmp_path / "x4", in_channels=7)  # (no such model exists: an x4-shaped SDXL UNet)
    with pytest.raises(SystemExit, match="there is no SDXL x4 upscaler"):
        common.model_task(load_sd(x4)[2], x4)


def test_sdxl_inpainting_is_the_inpaint_task(tmp_path):
    """SDXL inpainting (diffusers/stable-diffusion-xl-1.0-inpainting-0.1's layout: 9 input channels) goes through
    the same inpainting path: mask and masked-image latents appended, the SDXL conditioning as for t2i."""
    model = make_tiny_sdxl(tmp_path / "inpaint", in_channels=9)
    assert common.model_task(load_sd(model)[2], model) == "inpaint"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(2):
        pixels = np.random.RandomState(i).randint(0, 256, (16, 16, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(inputs / f"{i}.png")
    sample.main([f"--model={model}", f"--init_images={inputs}", "--mask=periphery", "--prompts=a bag",
                 f"--out_dir={tmp_path / 'out'}", "--grid=False"])
    assert len(list((tmp_path / "out").glob("0*.png"))) == 2
