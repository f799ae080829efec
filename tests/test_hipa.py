"""hipa.py: the LoRA, the losses and the loop do what the paper and a user rely on."""
import json

import numpy as np
import pytest
import torch
from conftest import run_killed_after

import hipa
import lora_files
from common import encode_prompts, guidance_text, load_sd, one_step_x0, write_split

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def test_lora_on_sd21_unet_has_the_papers_3_3M_parameters():
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):  # SD 2.1's UNet config, no memory
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        loras = hipa.add_lora(unet, TARGETS, 16, 16.0)
    assert sum(p.numel() for p in hipa.lora_params(loras)) == 3_319_808


@pytest.fixture
def sd(tiny_sd):
    return load_sd(tiny_sd)


def student_latents(sd, loras=None, guidance=2.0):
    text, vae, unet, scheduler = sd
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = encode_prompts(text, ["a bag", "a sneaker"])
    uncond = encode_prompts(text, ["", ""])
    with torch.no_grad():
        return one_step_x0(unet, scheduler, x_T, cond, uncond, guidance)


def randomise(loras, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in loras.values():
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1


def test_lora_starts_at_the_frozen_model_and_off_is_the_teacher(sd):
    before = student_latents(sd)
    loras = hipa.add_lora(sd[2], TARGETS, 4, 8.0)
    assert torch.equal(student_latents(sd), before)  # B = 0: training starts at the frozen model
    randomise(loras)
    assert not torch.allclose(student_latents(sd), before)
    hipa.set_lora(loras, False)
    assert torch.equal(student_latents(sd), before)  # LoRA off is exactly the frozen UNet
    assert all(not p.requires_grad for n, p in sd[2].named_parameters() if "lora_" not in n)


def test_exported_lora_reloads_in_diffusers_and_merges_in_sample(tiny_sd, sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    import sample
    loras = hipa.add_lora(sd[2], TARGETS, 4, 8.0)
    randomise(loras)
    ours = student_latents(sd)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    save_file(hipa.lora_state(loras), path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in f.keys())

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = sd[3]
    pipe.load_lora_weights(path)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    theirs = pipe(["a bag", "a sneaker"], latents=x_T, num_inference_steps=1, guidance_scale=2.0,
                  height=16, width=16, output_type="latent").images
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    fresh = load_sd(tiny_sd)
    sample.merge_lora(fresh[2], path)  # merged into the weights: the same images at no inference cost
    torch.testing.assert_close(student_latents(fresh), ours, rtol=1e-4, atol=1e-4)


def test_lora_on_convolutions_merges_too(tiny_sd, sd, tmp_path):
    from safetensors.torch import save_file

    import sample
    loras = hipa.add_lora(sd[2], ("conv1", "conv2"), 2, 2.0)
    assert all(isinstance(m.base, torch.nn.Conv2d) for m in loras.values())
    randomise(loras)
    save_file(hipa.lora_state(loras), str(tmp_path / "l.safetensors"))
    fresh = load_sd(tiny_sd)
    sample.merge_lora(fresh[2], str(tmp_path / "l.safetensors"))
    torch.testing.assert_close(student_latents(fresh), student_latents(sd), rtol=1e-4, atol=1e-4)


def test_bad_lora_config_is_one_clear_error(sd):
    with pytest.raises(SystemExit, match="lora_rank must be >= 1"):
        hipa.add_lora(sd[2], TARGETS, 0, 1.0)
    with pytest.raises(SystemExit, match=r"\['to_qq'\] match no layer.*candidates: .*'to_q'"):
        hipa.add_lora(sd[2], ("to_qq",), 4, 4.0)
    from diffusers import UNet2DConditionModel
    plain = UNet2DConditionModel(block_out_channels=(32, 32), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, mid_block_type=None, cross_attention_dim=32,
                                 layers_per_block=1, sample_size=8)
    with pytest.raises(SystemExit, match="no attention layers"):
        hipa.add_lora(plain, TARGETS, 4, 4.0)


# ----------------------------------------------------------------------------- losses

def test_dists_is_a_distance_with_zero_at_identity():
    dists = hipa.load_dists("absent", "absent", "/nonexistent", verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    assert dists(x, x).abs().max() < 1e-5
    torch.testing.assert_close(dists(x, x.flip(0)), dists(x.flip(0), x))
    noisy = [dists(x, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)).mean() for s in (0.05, 0.2, 0.5)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]
    sized = hipa.load_dists("absent", "absent", "/nonexistent", verbose=False, size=64)  # standin_size
    stages = sized.stages(x)
    assert stages[0].shape[-1] == 32 and stages[1].shape[-1] == 64  # the image as given; the network sees 64 px
    assert sized(x, x).abs().max() < 1e-5 and sized(x, x.roll(1, 0)).min() > 0


def test_lite0_standin_is_the_dists_form_on_imagenet_features(capsys):
    net = hipa.load_dists("absent", "absent", "/nonexistent", standin_kind="lite0", size=64)
    out = capsys.readouterr().out
    assert "stand-in 'lite0'" in out and "Not DISTS" in out  # announced, and never called DISTS
    assert net.channels == [3, 24, 40, 112, 320] and not any(p.requires_grad for p in net.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert net(x, x).abs().max() < 1e-5
    noisy = [net(x, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)).mean() for s in (0.05, 0.3)]
    assert 0 < noisy[0] < noisy[1]


def test_dists_loads_the_standard_weight_files_strictly(tmp_path, capsys):
    convs = [i for i, m in enumerate(hipa.DISTS(1.0).features) if isinstance(m, torch.nn.Conv2d)]
    net = hipa.DISTS(1.0)
    vgg = {f"features.{i}.{k}": torch.randn(getattr(net.features[i], k).shape)
           for i in convs for k in ("weight", "bias")}
    vgg["classifier.0.weight"] = torch.randn(4, 4)  # torchvision's file has the classifier too: ignored
    torch.save(vgg, tmp_path / "vgg16.pth")
    ab = {"alpha": torch.rand(1, 1475, 1, 1), "beta": torch.rand(1, 1475, 1, 1)}
    torch.save(ab, tmp_path / "weights.pt")
    net = hipa.load_dists(str(tmp_path / "vgg16.pth"), str(tmp_path / "weights.pt"), str(tmp_path), size=64)
    assert "WARNING" not in capsys.readouterr().out and net.size == 0  # real DISTS: images as they are
    assert net.channels == [3, 64, 128, 256, 512, 512]
    assert torch.equal(net.features[2].weight, vgg["features.2.weight"])
    assert torch.equal(net.alpha, ab["alpha"].flatten())
    del vgg["features.28.bias"]  # a wrong or truncated file is an error, never a half-random network
    torch.save(vgg, tmp_path / "vgg16_bad.pth")
    with pytest.raises(SystemExit, match=r"not torchvision's VGG16 .* \(keys or shapes differ at 28.bias\)"):
        hipa.load_dists(str(tmp_path / "vgg16_bad.pth"), str(tmp_path / "weights.pt"), str(tmp_path))
    hipa.load_dists(str(tmp_path / "absent.pth"), str(tmp_path / "weights.pt"), str(tmp_path))
    assert "WARNING: DISTS weights unreachable" in capsys.readouterr().out  # offline: loud, never silent


def test_high_pass_keeps_fine_detail_and_drops_coarse_layout():
    i = torch.arange(32.0)
    coarse = (0.5 + 0.5 * torch.sin(2 * np.pi * i / 32)).expand(32, 32)  # 1 cycle per image
    fine = (0.5 + 0.5 * torch.sin(2 * np.pi * 12 * i / 32)).expand(32, 32)  # 12 cycles: 0.75 Nyquist
    as_rgb = lambda m: m.expand(1, 3, 32, 32)
    assert hipa.fourier_pass(as_rgb(coarse), 0.25).abs().max() < 1e-4
    torch.testing.assert_close(hipa.fourier_pass(as_rgb(fine), 0.25)[0, 0], (fine - 0.5).expand(32, 32),
                               atol=1e-4, rtol=0)  # the signed detail itself, not its magnitude
    assert hipa.fourier_pass(as_rgb(fine), 0.25, high=False).std() < 1e-4  # low-pass: only the mean is left


def test_sobel_finds_edges_and_maps_share_the_teachers_scale():
    x = torch.zeros(2, 3, 8, 8)
    x[0, :, :, 4:] = 1  # a vertical edge between columns 3 and 4
    edges = hipa.sobel(x)
    assert edges[0, 0, :, 3:5].min() > 3 and edges[0, 0, :, :2].max() < 0.01 and edges[1].max() < 0.01
    student, teacher = hipa.as_images(0.5 * edges, edges, signed=False)
    assert teacher.shape == (2, 3, 8, 8) and teacher[0].max() == 1 and teacher[0].min() >= 0
    assert torch.allclose(student, 0.5 * teacher)  # half the edge strength shows as half the brightness
    alone = hipa.as_images(edges[:1], edges[:1], signed=False)[1]
    assert torch.equal(teacher[:1], alone)  # one factor per image pair, not coupled through the batch


def test_high_frequency_term_sees_a_student_that_lacks_high_frequency_amplitude():
    """A student whose every frequency above the cut-off is scaled to 0.3 (9% of that energy) must score worse
    than the teacher itself; with per-image min-max scaling it scored exactly 0."""
    dists = hipa.load_dists("absent", "absent", "/nonexistent", verbose=False)
    teacher = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    low = teacher - hipa.fourier_pass(teacher, 0.25)[:, :1]  # gray high-pass removed from every channel
    soft = (low + 0.3 * hipa.fourier_pass(teacher, 0.25)[:, :1]).clamp(0, 1)
    hp = lambda x: hipa.fourier_pass(x, 0.25)
    assert dists(*hipa.as_images(hp(soft), hp(teacher), signed=True)).min() > 0.05
    assert dists(*hipa.as_images(hp(teacher), hp(teacher), signed=True)).abs().max() < 1e-5


def test_table1_ablation_losses():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    assert set(hipa.adaptation_loss(x, y, None, "l2")) == {"l2"}
    high, low = hipa.adaptation_loss(x, y, None, "l2+high"), hipa.adaptation_loss(x, y, None, "l2+low")
    assert set(high) == set(low) == {"l2", "fft"} and high["fft"] != low["fft"]
    with pytest.raises(SystemExit, match="loss must be"):
        hipa.adaptation_loss(x, y, None, "l1")


# ----------------------------------------------------------------------------- the loop

@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    words = ["a photo of a sneaker", "a bag", "an ankle boot", "a photo of a bag"]
    rows = [{"id": i, "captions": [words[i % 4], words[(i + 1) % 4]]} for i in range(16)]
    write_split(str(root), "train", np.zeros((16, 16, 16, 3), np.uint8), rows, source="test")
    return str(root)


def run_args(model, data, out, *extra):
    return [f"--model={model}", f"--data_dir={data}", f"--out_dir={out}", f"--cache_dir={out}_cache",
            "--num_examples=8", "--batch_size=4", "--epochs=2", "--lora_rank=4", "--teacher_steps=3",
            "--eval_interval=100", "--ckpt_interval=1", "--log_interval=1", "--warmup_iters=1",
            "--vgg_weights=absent", "--dists_weights=absent", "--init_from=scratch", *extra]


def test_training_moves_the_one_step_student_towards_the_teacher(tiny_sd, captions, tmp_path):
    out = tmp_path / "run"  # one batch of 4 examples per epoch: every logged loss is on the same examples
    hipa.main(run_args(tiny_sd, captions, out, "--lr=3e-3", "--epochs=8", "--num_examples=4", "--eval_interval=8",
                       "--vary_per_epoch=False"))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 8 and all(r["skipped"] == 0 for r in log)
    first, last = log[0]["loss"], log[-1]["loss"]
    assert last < 0.7 * first, (first, last)  # the one-step student gets closer to the 3-step teacher
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "val_000008.png").exists()


def test_resume_continues_exactly(tiny_sd, captions, tmp_path, monkeypatch):
    hipa.main(run_args(tiny_sd, captions, tmp_path / "a", "--lr=1e-2"))
    straight = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    run_killed_after(hipa, run_args(tiny_sd, captions, tmp_path / "b", "--lr=1e-2"), 3, monkeypatch)  # mid epoch 2
    hipa.main(run_args(tiny_sd, captions, tmp_path / "b", "--lr=1e-2", "--init_from=resume"))
    resumed = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert resumed["iter"] == straight["iter"] == 4
    for a, b in zip(straight["lora"], resumed["lora"]):
        assert torch.equal(a, b)
    assert torch.equal(straight["opt"]["state"][0]["exp_avg"], resumed["opt"]["state"][0]["exp_avg"])


def test_teacher_targets_are_computed_once_and_reused(tiny_sd, captions, tmp_path, monkeypatch):
    calls = []
    real = hipa.teacher_latents
    monkeypatch.setattr(hipa, "teacher_latents", lambda *a, **k: calls.append(len(a[6])) or real(*a, **k))
    cache = f"--cache_dir={tmp_path / 'cache'}"
    hipa.main(run_args(tiny_sd, captions, tmp_path / "c", cache))
    assert sum(calls) == 16  # 8 examples x 2 epochs, each epoch's own captions and noise, each target made once
    cached = [np.load(f) for f in sorted((tmp_path / "cache").glob("teacher_*.npy"))]
    assert len(cached) == 2 and not np.allclose(cached[0], cached[1])  # epochs differ
    sd = load_sd(tiny_sd)
    loras = hipa.add_lora(sd[2], TARGETS, 4, 4.0)
    rows = hipa.load_split(captions, "train", need_images=False)[1]
    epoch0 = hipa.example_prompts(rows, 8, 0)
    direct = real(sd[2], loras, sd[3], guidance_text(sd[0]), epoch0, 0, [0, 5],
                  (4, 8, 8), torch.device("cpu"), torch.float32)
    assert any(np.allclose(c[[0, 5]], direct.numpy(), atol=2e-3, rtol=2e-3) for c in cached)  # fp16 on disk
    calls.clear()
    hipa.main(run_args(tiny_sd, captions, tmp_path / "d", cache))  # same model and settings: the cache is reused
    assert calls == []
    hipa.main(run_args(tiny_sd, captions, tmp_path / "e", cache, "--teacher_steps=2"))  # other settings: new targets
    assert sum(calls) == 16
    calls.clear()
    hipa.main(run_args(tiny_sd, captions, tmp_path / "f", cache, "--vary_per_epoch=False"))
    assert sum(calls) == 0  # the same pairs every epoch: epoch 0's targets, already cached
    hipa.main(run_args(tiny_sd, captions, tmp_path / "g", cache, "--teacher_cache=False"))
    assert sum(calls) == 16  # without the cache: every example, every epoch


def test_each_epoch_draws_new_captions_and_noise(captions, monkeypatch):
    rows = hipa.load_split(captions, "train", need_images=False)[1]
    monkeypatch.setattr(hipa, "vary_per_epoch", True)
    (p0, s0), (p1, s1) = hipa.epoch_examples(rows, 16, 0), hipa.epoch_examples(rows, 16, 1)
    assert p0 != p1 and s1 == s0 + 16  # other captions of the same rows, noise seeds never reused
    assert all(p in rows[k]["captions"] for k, p in enumerate(p1))
    monkeypatch.setattr(hipa, "vary_per_epoch", False)
    assert hipa.epoch_examples(rows, 16, 3) == (p0, s0)


def test_text_guided_edit_examples_take_another_rows_caption(monkeypatch):
    """task=edit, edit_captions='other': example k (image k) is edited toward a caption of a random other row;
    'own' keeps image k's captions (re-generation)."""
    rows = [{"id": i, "captions": [f"caption {i} a", f"caption {i} b"]} for i in range(5)]
    monkeypatch.setattr(hipa, "task", "edit")
    monkeypatch.setattr(hipa, "edit_captions", "other")
    row_of = [int(p.split()[1]) for p in hipa.epoch_examples(rows, 40, 0)[0]]
    assert all(r != k % 5 for k, r in enumerate(row_of)) and set(row_of) == set(range(5))
    monkeypatch.setattr(hipa, "edit_captions", "own")
    assert [int(p.split()[1]) for p in hipa.epoch_examples(rows, 40, 0)[0]] == [k % 5 for k in range(40)]


def test_non_finite_loss_skips_the_step(tiny_sd, captions, tmp_path, monkeypatch):
    real = hipa.adaptation_loss
    n = []

    def nan_once(x1, xT, dists, kind):
        terms = real(x1, xT, dists, kind)
        n.append(1)
        if len(n) == 2:  # the first training step (call 1 is the start-up check of `loss`)
            terms["spatial"] = terms["spatial"] * float("nan")
        return terms
    monkeypatch.setattr(hipa, "adaptation_loss", nan_once)
    hipa.main(run_args(tiny_sd, captions, tmp_path / "n", "--epochs=1"))
    log = [json.loads(line) for line in open(tmp_path / "n" / "log.jsonl")]
    assert log[0]["skipped"] == 1 and log[1]["skipped"] == 1 and np.isfinite(log[1]["loss"])
    ck = torch.load(tmp_path / "n" / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(p).all() for p in ck["lora"])


@pytest.mark.parametrize("extra, message", [
    (["--model=/nonexistent/model"], "not an SD-format folder"),
    (["--data_dir=/nonexistent"], "meta.json not found"),
    (["--resolution=18"], "image size 18x18 must be a multiple of 4"),
    (["--lora_rank=0"], "lora_rank must be >= 1"),
    (["--lora_targets=('attn_q',)"], "match no layer"),
    (["--loss=l1"], "loss must be"),
    (["--batch_size=16"], "8 examples are fewer than one batch of 16"),
    (["--batch_size=-4"], "batch_size must be > 0, got -4"),  # once wrote an all-zero teacher cache, exit 0
    (["--batch_size=0"], "batch_size must be > 0, got 0"),
    (["--epochs=0"], "epochs must be > 0, got 0"),  # once overwrote a trained adaptor with an untrained one
    (["--num_examples=-1"], "num_examples must be >= 0, got -1"),
    (["--lr=-1e-4"], "lr must be > 0"),
    (["--ckpt_interval=0"], "ckpt_interval must be > 0, got 0"),
    (["--init_from=resume"], "no checkpoint at"),
])
def test_bad_input_fails_before_writing_anything(tiny_sd, captions, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        hipa.main(run_args(tiny_sd, captions, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_cache").exists()


def test_a_scratch_run_never_destroys_an_earlier_one(tiny_sd, captions, tmp_path):
    out = tmp_path / "run"
    hipa.main(run_args(tiny_sd, captions, out, "--epochs=1"))
    before = {f: (out / f).read_bytes() for f in ("ckpt.pt", "log.jsonl", "pytorch_lora_weights.safetensors")}
    for extra in ([], ["--ckpt_interval=0"], ["--lr=2e-3"]):
        with pytest.raises(SystemExit, match="holds an earlier run .ckpt.pt, log.jsonl.*--overwrite=True"
                                             "|ckpt_interval"):
            hipa.main(run_args(tiny_sd, captions, out, "--epochs=1", *extra))
    assert before == {f: (out / f).read_bytes() for f in before}  # untouched
    hipa.main(run_args(tiny_sd, captions, out, "--epochs=1", "--lr=2e-3", "--overwrite=True"))
    assert (out / "ckpt.pt").read_bytes() != before["ckpt.pt"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 2  # a new log, not appended to the old one


def test_divergence_stops_the_run_and_exports_nothing(tiny_sd, captions, tmp_path):
    out = tmp_path / "div"
    with pytest.raises(SystemExit, match="consecutive steps with a non-finite loss or gradient"):
        hipa.main(run_args(tiny_sd, captions, out, "--lr=1e10", "--epochs=20", "--max_nonfinite=3"))
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # strict JSON: no bare NaN
    assert log[-1]["skipped"] >= 1 and log[-1]["loss"] is None


def test_resume_with_other_lora_targets_or_rank_is_one_clear_error(tiny_sd, captions, tmp_path):
    out = tmp_path / "r"
    hipa.main(run_args(tiny_sd, captions, out, "--epochs=1"))
    for extra in (["--lora_rank=8"], ["--lora_targets=('to_q',)"]):
        with pytest.raises(SystemExit, match="resume error: .* other LoRA targets or rank"):
            hipa.main(run_args(tiny_sd, captions, out, "--epochs=2", "--init_from=resume", *extra))


def test_resume_names_the_settings_that_changed(tiny_sd, captions, tmp_path, capsys):
    """A resumed run goes on with the settings given now; the ones that differ from the checkpoint's are named."""
    out = tmp_path / "r"
    hipa.main(run_args(tiny_sd, captions, out, "--epochs=1"))
    capsys.readouterr()
    hipa.main(run_args(tiny_sd, captions, out, "--epochs=2", "--init_from=resume", "--w_sobel=0.25"))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("resume:")]
    assert len(lines) == 1 and "epochs 1 -> 2" in lines[0] and "w_sobel" in lines[0] and "-> 0.25" in lines[0]
    assert "init_from" not in lines[0] and lines[0].count("->") == 2


def test_teacher_cache_key_covers_every_weight_and_the_dtype(sd):
    text, vae, unet, scheduler = sd
    text_encoder = text.encoders[0]
    before = hipa.weights_fingerprint(unet, text_encoder)
    with torch.no_grad():  # a mid-block weight (the old key looked at conv_in and conv_out only)
        w = unet.mid_block.resnets[0].conv1.weight
        w[0, 0, 0, 0] += 1e-3
        assert hipa.weights_fingerprint(unet, text_encoder) != before
        w[0, 0, 0, 0] -= 1e-3
        e = text_encoder.get_input_embeddings().weight
        e[1, 0] += 1e-3
        assert hipa.weights_fingerprint(unet, text_encoder) != before
        e[1, 0] -= 1e-3
    assert hipa.weights_fingerprint(unet, text_encoder) == before
    assert hipa.weights_fingerprint(unet.to(torch.bfloat16), text_encoder) != before


def test_two_ranks_train_the_same_adaptor_as_one(tiny_sd, captions, tmp_path):
    """torchrun with gloo: the global batch is split over ranks and the gradients averaged, so the result is
    the single-process one (up to float summation order); the teacher cache is built by both ranks."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = run_args(tiny_sd, captions, tmp_path / "one", "--lr=1e-2", f"--cache_dir={tmp_path}/cache1")
    hipa.main(args)
    args2 = run_args(tiny_sd, captions, tmp_path / "two", "--lr=1e-2", f"--cache_dir={tmp_path}/cache2")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                    os.path.join(root, "hipa.py"), *args2], check=True, cwd=root, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root))
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert two["iter"] == one["iter"] == 4 and len(two["rng"]) == 2
    for a, b in zip(one["lora"][1::2], two["lora"][1::2]):  # the B matrices: zero at the start, all update
        assert a.norm() > 0 and (a - b).norm() < 0.01 * a.norm()


def test_dry_run_estimates_memory_without_weights_and_writes_nothing(tiny_sd, captions, tmp_path, capsys):
    def peak(*extra):
        return hipa.main(run_args(tiny_sd, captions, tmp_path / "out", "--dry_run=True", "--dry_run_gpus=1", *extra))
    small, large = peak("--batch_size=2"), peak("--batch_size=8")
    assert "estimated peak GPU memory of one HiPA step at 8 image(s) per GPU" in capsys.readouterr().out
    assert 0 < small < large  # activations grow with the micro-batch
    assert peak("--batch_size=8", "--grad_checkpointing=True") < large  # checkpointing UNet, VAE and DISTS saves
    assert peak("--batch_size=8", "--grad_accum=4") == small  # grad_accum splits the per-GPU batch
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_cache").exists()


# ----------------------------------------------------------------------------- ComfyUI / kohya files, wandb

def sd_layout_unet():
    """SD 1.x/2.x's UNet block structure (3 cross-attention down blocks and a plain one, 2 layers per block)
    at toy width."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
                                attention_head_dim=8, sample_size=8)


@pytest.mark.parametrize("layout", ["sd", "shipped teacher"])
def test_ldm_names_are_what_diffusers_single_file_converter_reads(layout):
    """Every parameter renamed with lora_files.ldm_unet_name comes back to its own diffusers name (and value) through
    diffusers' converter of original LDM checkpoints: the kohya file names the layers A1111/ComfyUI have."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    import os
    torch.manual_seed(0)
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny-sd-fmnist")
    unet = sd_layout_unet() if layout == "sd" else UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(shipped, subfolder="unet"))
    state = unet.state_dict()
    ldm = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        ldm[f"model.diffusion_model.{lora_files.ldm_unet_name(module, unet)}.{param}"] = value
    assert len(ldm) == len(state)  # one LDM name per parameter
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="no LDM name for the UNet layer 'add_embedding.linear_1'"):
        lora_files.ldm_unet_name("add_embedding.linear_1", unet)  # SDXL's: not an SD 1.x/2.x layer


@pytest.mark.parametrize("targets", [TARGETS, ("conv1", "conv2")])
def test_kohya_file_gives_diffusers_the_same_images_as_the_diffusers_file(tiny_sd, sd, tmp_path, targets):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file
    loras = hipa.add_lora(sd[2], targets, 4, 8.0)
    randomise(loras)
    ours = student_latents(sd)
    save_file(hipa.lora_state(loras), str(tmp_path / "lora.safetensors"))
    save_file(lora_files.kohya_lora_state(hipa.lora_state(loras), sd[2]), str(tmp_path / "kohya.safetensors"))
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    assert len(kohya) == 3 * len(loras) and all(k.startswith("lora_unet_") for k in kohya)
    assert all(float(v) == 4 for k, v in kohya.items() if k.endswith(".alpha"))  # rank: scale 1, B holds alpha/r
    names = {k.split(".")[0] for k in kohya}
    assert ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q" in names if targets == TARGETS else
            "lora_unet_middle_block_2_out_layers_3" in names)  # LDM names, not diffusers'

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = sd[3]
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    latents = []
    for path, kwargs in ((tmp_path / "lora.safetensors", {}),
                         (tmp_path / "kohya.safetensors", {"unet_config": pipe.unet.config})):
        pipe.load_lora_weights(str(path), **kwargs)  # the kohya file goes through diffusers' own converter
        latents.append(pipe(["a bag", "a sneaker"], latents=x_T, num_inference_steps=1, guidance_scale=2.0,
                            height=16, width=16, output_type="latent").images)
        pipe.unload_lora_weights()
    assert (latents[1] - latents[0]).abs().max() < 1e-5
    torch.testing.assert_close(latents[1], ours, rtol=1e-5, atol=1e-5)


def test_without_wandb_log_wandb_is_never_imported(tiny_sd, captions, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "wandb", None)  # from here on, any `import wandb` raises ImportError
    out = tmp_path / "off"
    hipa.main(run_args(tiny_sd, captions, out, "--epochs=1"))
    assert (out / "log.jsonl").exists()
    assert (out / "pytorch_lora_weights_kohya.safetensors").exists()  # the ComfyUI file beside the diffusers one
    with pytest.raises(SystemExit, match=r"wandb_log=True needs the wandb package \(pip install wandb\)"):
        hipa.main(run_args(tiny_sd, captions, tmp_path / "on", "--wandb_log=True"))
    assert not (tmp_path / "on").exists()  # one line, before anything is written


def wandb_history(run_dir):
    """The history rows of an offline wandb run, read from its run-*.wandb file: wandb's protobuf records in
    LevelDB's log framing (32 KiB blocks, 7-byte record headers: crc, length, type 1 full / 2-4 pieces)."""
    from wandb.proto import wandb_internal_pb2
    (path,) = run_dir.glob("run-*.wandb")
    data, pos, record, rows = path.read_bytes(), 7, b"", []  # the file starts with a 7-byte ':W&B' header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        n, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        record, pos = record + data[pos + 7: pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(record)
            record = b""
            if r.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def test_wandb_log_sends_log_jsonl_records_and_grids_to_an_offline_run(tiny_sd, captions, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    hipa.main(run_args(tiny_sd, captions, out, "--epochs=1", "--eval_interval=1", "--wandb_log=True",
                       "--wandb_run_name=test"))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    history = wandb_history(run_dir)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for record in log:  # log.jsonl's records, each at its iteration
        (row,) = [r for r in history if r["_step"] == record["iter"] and "loss" in r]
        assert all(row[k] == v for k, v in record.items()) and {"img_per_s", "peak_mem_gb"} <= row.keys()
    grids = [r for r in history if r.get("val_grid/_type") == "image-file"]
    assert [r["_step"] for r in grids] == [1, 2] and (run_dir / "files" / grids[0]["val_grid/path"]).exists()
