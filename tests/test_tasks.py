"""HiPA's other tasks (editing, inpainting, x4 super-resolution) in sample.py and hipa.py: the pipeline kind follows
from the model folder, the task only adds the UNet's extra input, the outputs are diffusers' pipelines' outputs,
and the adaptors load in diffusers' inpainting and upscaling pipelines."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from common import (encode_prompts, load_low_res_scheduler, load_sd, make_mask, seeded_noise, task_input,
                    images_to_tensor, ddim_sample, LOW_RES_NOISE_SEED)


def make_task_model(tiny_sd, folder, task, seed=0):
    """The tiny random t2i model turned into an inpainting model (UNet with 9 input channels, the extra ones
    random: a model that uses them) or an x4 upscaler (7 input channels, noise-level class embedding, a VAE of
    factor 4, a v-prediction schedule and a low_res_scheduler), saved in its diffusers pipeline's format."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionInpaintPipeline,
                           StableDiffusionUpscalePipeline, UNet2DConditionModel)
    text, vae, unet, scheduler = load_sd(tiny_sd)
    torch.manual_seed(seed)
    config = dict(unet.config)
    if task == "inpaint":
        new = UNet2DConditionModel.from_config({**config, "in_channels": 9})
        state = unet.state_dict()
        w = state["conv_in.weight"]
        state["conv_in.weight"] = torch.cat([w, torch.randn(w.shape[0], 5, *w.shape[2:]) * 0.05], 1)
        new.load_state_dict(state)
        new.conv_out.weight.data.normal_(0, 0.05)
        StableDiffusionInpaintPipeline(vae=vae, text_encoder=text.encoders[0], tokenizer=text.tokenizers[0], unet=new,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False).save_pretrained(str(folder))
        return str(folder)
    vae4 = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         norm_num_groups=8, sample_size=32, scaling_factor=0.08333)
    new = UNet2DConditionModel.from_config({**config, "in_channels": 7, "num_class_embeds": 1000})
    new.conv_out.weight.data.normal_(0, 0.05)
    sched = DDIMScheduler.from_config({**dict(scheduler.config), "prediction_type": "v_prediction"})
    low = DDPMScheduler(beta_schedule="linear", num_train_timesteps=1000)
    StableDiffusionUpscalePipeline(vae=vae4, text_encoder=text.encoders[0], tokenizer=text.tokenizers[0], unet=new,
                                   low_res_scheduler=low, scheduler=sched).save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_inpaint(tiny_sd, tmp_path_factory):
    return make_task_model(tiny_sd, tmp_path_factory.mktemp("tiny_inpaint"), "inpaint")


@pytest.fixture(scope="module")
def tiny_x4(tiny_sd, tmp_path_factory):
    return make_task_model(tiny_sd, tmp_path_factory.mktemp("tiny_x4"), "upscale")


def write_inputs(folder, n, size, prompts=None, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3)).astype(np.uint8)).save(os.path.join(folder, f"in{i}.png"))
    if prompts:
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            for i in range(n):
                f.write(json.dumps({"file_name": f"in{i}.png", "prompt": prompts[i % len(prompts)]}) + "\n")
    return str(folder)


def outputs(folder):
    return [np.array(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f[0].isdigit()]


def run(model, init, out, *extra):
    sample.main([f"--model={model}", f"--init_images={init}", f"--out_dir={out}", "--grid=False", *extra])
    return outputs(out)


# ----------------------------------------------------------------------------- the one generation path = diffusers


def test_editing_equals_diffusers_img2img(tiny_sd, tmp_path):
    """SDEdit at strength 0.5 in 2 steps is diffusers' img2img at strength 0.5 of a 4-step trailing schedule (the
    same timesteps 499, 249), from the same latents and noise; steps=1 is one UNet call returning x0."""
    from diffusers import StableDiffusionImg2ImgPipeline
    text, vae, unet, scheduler = load_sd(tiny_sd)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    cond = encode_prompts(text, ["a bag"])
    uncond = encode_prompts(text, [""])
    kw = task_input("t2i", vae, images, [0], 0, strength=0.5)
    ours = ddim_sample(unet, scheduler, seeded_noise([0], (4, 8, 8), 7), cond, uncond, 2, 2.0, **kw)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text.encoders[0], tokenizer=text.tokenizers[0],
                                          unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    theirs = pipe("a bag", image=kw["init_latents"], strength=0.5, num_inference_steps=4, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(7), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    calls = []
    unet.register_forward_hook(lambda *a: calls.append(1))
    ddim_sample(unet, scheduler, seeded_noise([0], (4, 8, 8), 7), cond, uncond, 1, 2.0, **kw)
    assert len(calls) == 1


def test_inpainting_equals_diffusers_inpaint_pipeline(tiny_inpaint):
    from diffusers import StableDiffusionInpaintPipeline
    text, vae, unet, scheduler = load_sd(tiny_inpaint)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = make_mask("periphery", 2, 16, 16)
    cond = encode_prompts(text, ["a bag", "an ankle boot"])
    uncond = encode_prompts(text, ["", ""])
    x_T = seeded_noise([0, 1], (4, 8, 8), 0)
    kw = task_input("inpaint", vae, images, [0, 1], 0, mask=mask)
    ours = ddim_sample(unet, scheduler, x_T, cond, uncond, 3, 2.0, **kw)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text.encoders[0], tokenizer=text.tokenizers[0],
                                          unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    theirs = pipe(["a bag", "an ankle boot"], image=images / 2 + 0.5, mask_image=mask, latents=x_T.clone(),
                  masked_image_latents=kw["image_input"][:, 1:], num_inference_steps=3, guidance_scale=2.0,
                  height=16, width=16, output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_upscaling_equals_diffusers_upscale_pipeline(tiny_x4):
    """The x4 task: latents + the low-res image noised to noise_level (the same noise), noise_level as the class
    label, v-prediction: diffusers' StableDiffusionUpscalePipeline's latents, and 4x the input's size."""
    from diffusers import StableDiffusionUpscalePipeline
    text, vae, unet, scheduler = load_sd(tiny_x4)
    low_res = torch.rand(1, 3, 8, 8)
    cond = encode_prompts(text, ["a bag"])
    uncond = encode_prompts(text, [""])
    x_T = seeded_noise([3], (4, 8, 8), 0)
    kw = task_input("upscale", vae, low_res * 2 - 1, [3], 0, low_res_scheduler=load_low_res_scheduler(tiny_x4),
                    noise_level=20)
    ours = ddim_sample(unet, scheduler, x_T, cond, uncond, 3, 2.0, **kw)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text.encoders[0], tokenizer=text.tokenizers[0],
                                          unet=unet,
                                          low_res_scheduler=load_low_res_scheduler(tiny_x4), scheduler=scheduler)
    theirs = pipe("a bag", image=low_res, latents=x_T.clone(), num_inference_steps=3, guidance_scale=2.0,
                  noise_level=20, generator=torch.Generator().manual_seed(LOW_RES_NOISE_SEED + 3),
                  output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- sample.py


def test_outputs_follow_their_inputs_and_prompts_come_from_metadata(tiny_sd, tiny_inpaint, tiny_x4, tmp_path):
    init = write_inputs(tmp_path / "in", 3, 16, ["a bag", "an ankle boot"])
    edit = run(tiny_sd, init, tmp_path / "edit", "--strength=0.5", "--steps=1")
    meta = [json.loads(line) for line in open(tmp_path / "edit" / "metadata.jsonl")]
    assert [(m["file_name"], m["source"], m["prompt"]) for m in meta] == [
        ("000000.png", "in0.png", "a bag"), ("000001.png", "in1.png", "an ankle boot"), ("000002.png", "in2.png", "a bag")]
    assert len(edit) == 3 and edit[0].shape == (16, 16, 3)
    low = write_inputs(tmp_path / "low", 2, 8)  # no metadata.jsonl: --prompts
    up = run(tiny_x4, low, tmp_path / "up", "--prompts=a bag", "--steps=2")
    assert [a.shape for a in up] == [(32, 32, 3)] * 2  # 4x the input
    assert all(json.loads(line)["prompt"] == "a bag" for line in open(tmp_path / "up" / "metadata.jsonl"))


def test_editing_strength_sets_how_far_the_output_leaves_the_input(tiny_sd):
    """SDEdit: a small strength keeps the input's latents, strength near 1 draws a new image (in latent space: the
    random tiny VAE reconstructs nothing)."""
    text, vae, unet, scheduler = load_sd(tiny_sd)
    cond, uncond = encode_prompts(text, ["a bag"] * 4), encode_prompts(text, [""] * 4)
    kw = task_input("t2i", vae, torch.rand(4, 3, 16, 16) * 2 - 1, range(4), 0)
    dist = {}
    for s in (0.05, 0.95):
        out = ddim_sample(unet, scheduler, seeded_noise(range(4), (4, 8, 8), 0), cond, uncond, 2, 2.0,
                          **{**kw, "strength": s})
        dist[s] = (out - kw["init_latents"]).norm() / kw["init_latents"].norm()
    assert dist[0.05] < 0.1 * dist[0.95], dist


def test_inpainting_ignores_the_masked_out_pixels_of_its_input(tiny_inpaint, tmp_path):
    """What is under the mask is unknown to the model: changing it changes nothing; changing a kept pixel does."""
    init = write_inputs(tmp_path / "a", 2, 16, ["a bag"])
    base = run(tiny_inpaint, init, tmp_path / "out_a", "--mask=periphery", "--steps=2")
    for name, where in (("b", (0, 0)), ("c", (8, 8))):  # a corner (masked by 'periphery'), the centre (kept)
        os.makedirs(tmp_path / name)
        for f in ("in0.png", "in1.png", "metadata.jsonl"):
            (tmp_path / name / f).write_bytes((tmp_path / "a" / f).read_bytes())
        img = np.array(Image.open(tmp_path / name / "in0.png"))
        img[where[0]: where[0] + 2, where[1]: where[1] + 2] = 255 - img[where[0]: where[0] + 2, where[1]: where[1] + 2]
        Image.fromarray(img).save(tmp_path / name / "in0.png")
        out = run(tiny_inpaint, str(tmp_path / name), tmp_path / f"out_{name}", "--mask=periphery", "--steps=2")
        assert np.array_equal(out[0], base[0]) == (name == "b") and np.array_equal(out[1], base[1])
    mask_png = tmp_path / "mask.png"  # a PNG mask (white = repaint) equal to 'center'
    Image.fromarray((make_mask("center", 1, 16, 16)[0, 0].numpy() * 255).astype(np.uint8)).save(mask_png)
    assert all(np.array_equal(a, b) for a, b in zip(
        run(tiny_inpaint, init, tmp_path / "png", f"--mask={mask_png}", "--steps=2"),
        run(tiny_inpaint, init, tmp_path / "center", "--mask=center", "--steps=2")))


def test_periphery_mask_is_half_the_pixels_around_a_kept_centre():
    m = make_mask("periphery", 1, 32, 32)[0, 0]
    assert abs(m.mean().item() - 0.5) < 0.02 and m[0].all() and m[:, 0].all() and not m[16, 16]
    assert torch.equal(make_mask("center", 1, 32, 32)[0, 0], 1 - m)


@pytest.mark.parametrize("which, size, extra, message", [
    ("t2i", 16, ["--mask=periphery"], "--mask needs an inpainting model"),
    ("t2i", 16, ["--strength=0"], r"strength must be in \(0, 1\]"),
    ("t2i", 16, ["--strength=1.5"], r"strength must be in \(0, 1\]"),
    ("t2i", 8, ["--strength=0.5"], "init images are 8x8, this t2i model takes 16x16"),
    ("inpaint", 16, [], "an inpainting model needs --mask"),
    ("inpaint", 16, ["--mask=periphery", "--strength=0.5"], "--strength .editing. needs --init_images and a text-to"),
    ("inpaint", 16, ["--mask=nothing.png"], "mask must be 'periphery', 'center' or a PNG file"),
    ("inpaint", 8, ["--mask=center"], "init images are 8x8, this inpaint model takes 16x16"),
    ("upscale", 9, [], "init images are 9x9, this upscale model takes low-res sizes that are multiples of 2"),
    ("upscale", 16, ["--height=32", "--width=32"], "init images are 16x16, this upscale model takes 8x8"),
    ("upscale", None, [], "is an upscale model: give its input images with --init_images"),
])
def test_bad_task_input_is_one_clear_line_and_writes_nothing(tiny_sd, tiny_inpaint, tiny_x4, tmp_path, which, size,
                                                             extra, message):
    model = {"t2i": tiny_sd, "inpaint": tiny_inpaint, "upscale": tiny_x4}[which]
    init = [f"--init_images={write_inputs(tmp_path / 'in', 2, size)}"] if size else []
    with pytest.raises(SystemExit, match=message):
        sample.main([f"--model={model}", f"--out_dir={tmp_path / 'out'}", *init, *extra])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- hipa.py: inpaint and upscale tasks


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Prepared data at two sizes: 16 px (the tiny inpainting model's output) and 32 px (the tiny x4's)."""
    from common import write_split
    words = ["a photo of a sneaker", "a bag", "an ankle boot", "a photo of a bag"]
    rows = [{"id": i, "captions": [words[i % 4], words[(i + 1) % 4]]} for i in range(16)]
    roots = {}
    for size in (16, 32):
        roots[size] = str(tmp_path_factory.mktemp(f"data{size}"))
        pics = np.random.RandomState(size).randint(0, 256, (16, size, size, 3)).astype(np.uint8)
        write_split(roots[size], "train", pics, rows, source="test")
    return roots


def hipa_args(model, data, out, task, *extra):
    return [f"--model={model}", f"--data_dir={data}", f"--out_dir={out}", f"--cache_dir={out}_cache", f"--task={task}",
            "--num_examples=4", "--batch_size=4", "--epochs=8", "--lora_rank=4", "--teacher_steps=3", "--lr=3e-3",
            "--eval_interval=8", "--ckpt_interval=8", "--log_interval=1", "--warmup_iters=1",
            "--vary_per_epoch=False", "--vgg_weights=absent", "--dists_weights=absent", *extra]


@pytest.fixture(scope="module")
def adaptors(tiny_sd, tiny_inpaint, tiny_x4, images, tmp_path_factory):
    import hipa
    out = tmp_path_factory.mktemp("adaptors")
    hipa.main(hipa_args(tiny_inpaint, images[16], out / "inpaint", "inpaint"))
    hipa.main(hipa_args(tiny_x4, images[32], out / "upscale", "upscale"))
    hipa.main(hipa_args(tiny_sd, images[16], out / "edit", "edit", "--strength=0.5"))
    return {task: out / task for task in ("inpaint", "upscale", "edit")}


@pytest.mark.parametrize("task", ["inpaint", "upscale", "edit"])
def test_task_training_moves_the_one_step_student_towards_the_teacher(adaptors, task):
    log = [json.loads(line) for line in open(adaptors[task] / "log.jsonl")]
    assert len(log) == 8 and all(r["skipped"] == 0 for r in log)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])  # the same 4 examples each step
    assert (adaptors[task] / "val_000008.png").exists()


@pytest.mark.parametrize("task", ["inpaint", "upscale"])
def test_task_adaptor_loads_in_the_diffusers_pipeline_and_equals_sample_py(tiny_inpaint, tiny_x4, adaptors, task,
                                                                           tmp_path):
    """StableDiffusionInpaintPipeline / StableDiffusionUpscalePipeline.load_lora_weights takes the adaptor and
    changes their one-step output to what sample.py --lora (the LoRA merged) makes from the same inputs."""
    from diffusers import DiffusionPipeline
    model = {"inpaint": tiny_inpaint, "upscale": tiny_x4}[task]
    lora = str(adaptors[task] / "pytorch_lora_weights.safetensors")
    size = 16 if task == "inpaint" else 8
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    text, vae, unet, scheduler = load_sd(model)
    pipe = DiffusionPipeline.from_pretrained(model, scheduler=scheduler, safety_checker=None)
    assert type(pipe).__name__ == {"inpaint": "StableDiffusionInpaintPipeline",
                                   "upscale": "StableDiffusionUpscalePipeline"}[task]
    mask = make_mask("periphery", 2, 16, 16)
    x_T = seeded_noise([0, 1], (4, 8, 8), 0)
    kw = task_input(task, vae, images * 2 - 1, [0, 1], 0, mask=mask,
                    low_res_scheduler=load_low_res_scheduler(model) if task == "upscale" else None)

    def theirs():
        args = dict(image=images, latents=x_T.clone(), num_inference_steps=1, guidance_scale=2.0, output_type="latent")
        if task == "inpaint":
            args.update(mask_image=mask, masked_image_latents=kw["image_input"][:, 1:], height=16, width=16)
        else:
            args.update(noise_level=20, generator=[torch.Generator().manual_seed(LOW_RES_NOISE_SEED + k) for k in (0, 1)])
        return pipe(["a bag", "an ankle boot"], **args).images

    before = theirs()
    pipe.load_lora_weights(lora)
    after = theirs()
    assert (after - before).abs().max() > 1e-2  # the adaptor changes the pipeline's output
    sample.merge_lora(unet, lora)
    ours = ddim_sample(unet, scheduler, x_T, encode_prompts(text, ["a bag", "an ankle boot"]),
                       encode_prompts(text, ["", ""]), 1, 2.0, **kw)
    torch.testing.assert_close(ours, after, rtol=1e-4, atol=1e-4)
    init = write_inputs(tmp_path / "in", 2, size, ["a bag"])  # and --compare: rows input | teacher | base | HiPA
    sample.main([f"--model={model}", f"--init_images={init}", f"--lora={lora}", "--compare=True", "--teacher_steps=2",
                 f"--out_dir={tmp_path / 'cmp'}"] + (["--mask=periphery"] if task == "inpaint" else []))
    out = 16 if task == "inpaint" else 32
    assert Image.open(tmp_path / "cmp" / "compare.png").size == (2 + 2 * (out + 2), 2 + 4 * (out + 2))


def test_task_targets_are_cached_per_task_input(tiny_inpaint, images, tmp_path, monkeypatch):
    """The inpainting teacher's targets depend on the mask and the images: another mask, other targets."""
    import hipa
    calls = []
    real = hipa.teacher_latents
    monkeypatch.setattr(hipa, "teacher_latents", lambda *a, **k: calls.append(len(a[6])) or real(*a, **k))
    cache = f"--cache_dir={tmp_path / 'cache'}"
    short = ["--epochs=1", "--eval_interval=100"]
    hipa.main(hipa_args(tiny_inpaint, images[16], tmp_path / "a", "inpaint", cache, *short))
    hipa.main(hipa_args(tiny_inpaint, images[16], tmp_path / "b", "inpaint", cache, *short))
    assert sum(calls) == 4  # the same inputs: reused
    hipa.main(hipa_args(tiny_inpaint, images[16], tmp_path / "c", "inpaint", cache, "--mask=center", *short))
    assert sum(calls) == 8 and len(list((tmp_path / "cache").glob("teacher_*.npy"))) == 2


@pytest.mark.parametrize("which, task, size, message", [
    ("t2i", "inpaint", 16, "task 'inpaint' but .* is a t2i model"),
    ("inpaint", "t2i", 16, "task 't2i' but .* is a inpaint model"),
    ("inpaint", "inpaint", 32, "holds 32x32 images; this inpaint model makes 16x16"),
    ("upscale", "upscale", 16, "holds 16x16 images; this upscale model makes 32x32"),
    ("upscale", "sr", 32, "task must be 't2i', 'edit', 'inpaint' or 'upscale'"),
    ("inpaint", "edit", 16, "task 'edit' but .* is a inpaint model"),
    ("t2i", "edit --strength=1.5", 16, r"strength must be in \(0, 1\]"),
    ("t2i", "edit --edit_captions=mine", 16, "edit_captions must be 'own' or 'other'"),
])
def test_task_config_errors_are_one_line(tiny_sd, tiny_inpaint, tiny_x4, images, tmp_path, which, task, size, message):
    import hipa
    model = {"t2i": tiny_sd, "inpaint": tiny_inpaint, "upscale": tiny_x4}[which]
    task, *extra = task.split()
    with pytest.raises(SystemExit, match=message):
        hipa.main(hipa_args(model, images[size], tmp_path / "out", task, *extra))
    assert not (tmp_path / "out").exists()


def test_task_dry_run_estimates_memory(tiny_inpaint, tiny_x4, images, tmp_path, capsys):
    import hipa
    for model, task, size in ((tiny_inpaint, "inpaint", 16), (tiny_x4, "upscale", 32)):
        peak = hipa.main(hipa_args(model, images[size], tmp_path / "out", task, "--dry_run=True", "--dry_run_gpus=1"))
        assert peak > 0 and not (tmp_path / "out").exists()


def test_exported_split_is_the_data_in_order_with_its_captions(images, tmp_path):
    """make demo-tasks' inputs and ground truth: image i of the split as {i:06d}.png with its first caption; the
    x4 inputs are the same images downsampled 4x, the resize the x4 adaptor is trained with."""
    from common import downsample, export_split, load_split
    export_split(images[32], "train", 5, str(tmp_path / "full"))
    export_split(images[32], "train", 5, str(tmp_path / "low"), factor=4)
    data, rows = load_split(images[32], "train")
    full, low = outputs(tmp_path / "full"), outputs(tmp_path / "low")
    assert len(full) == 5 and all(np.array_equal(f, d) for f, d in zip(full, data[:5]))
    expected = downsample(images_to_tensor(data[:5]), 4)
    assert np.abs(np.stack(low) / 127.5 - 1 - expected.permute(0, 2, 3, 1).numpy()).max() <= 1 / 127.5
    meta = [json.loads(line) for line in open(tmp_path / "low" / "metadata.jsonl")]
    assert [m["prompt"] for m in meta] == [r["captions"][0] for r in rows[:5]]


def test_editing_inputs_ask_for_another_class(images, tmp_path):
    """make demo-tasks' editing inputs: the test images with the caption of another class, each other class
    equally often, so caption accuracy scores whether the edit follows the text; data without labels is refused."""
    from collections import Counter
    from common import export_split, write_split
    from eval_fid import prompt_class
    from prepare_fmnist import captions_for
    labels = [3] * 18 + [0] * 9
    rows = [{"id": i, "label": k, "captions": captions_for(k)} for i, k in enumerate(labels)]
    write_split(str(tmp_path / "data"), "test", np.zeros((len(labels), 8, 8, 3), np.uint8), rows, source="test")
    export_split(str(tmp_path / "data"), "test", len(labels), str(tmp_path / "edit"), other_class=True)
    targets = [prompt_class(json.loads(line)["prompt"]) for line in open(tmp_path / "edit" / "metadata.jsonl")]
    assert Counter(targets[:18]) == {k: 2 for k in range(10) if k != 3}
    assert Counter(targets[18:]) == {k: 1 for k in range(1, 10)}
    with pytest.raises(SystemExit, match="class labels"):
        export_split(images[32], "train", 4, str(tmp_path / "unlabelled"), other_class=True)
    assert not (tmp_path / "unlabelled").exists()
