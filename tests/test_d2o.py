"""d2o.py: freezing, the projected discriminator, the GAN objective and the loop do what the paper and users rely on."""
import json

import numpy as np
import pytest
import torch
from conftest import run_killed_after

import d2o
from common import encode_prompts, images_to_tensor, load_sd, one_step_x0, write_split


def sd21_unet():
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):  # SD 2.1's UNet config, no memory
        return UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def frozen_fraction(stats):
    return sum(f for _, f in stats.values()) / sum(n for n, _ in stats.values())


# ----------------------------------------------------------------------------- D2O-F freezing

def test_freeze_levels_on_sd21_unet_freeze_the_papers_share():
    unet = sd21_unet()
    stats = {level: d2o.freeze_unet(unet, level) for level in range(4)}
    fractions = [frozen_fraction(stats[level]) for level in range(4)]
    print("frozen fractions on SD 2.1's UNet, levels 0-3:", [f"{f:.4f}" for f in fractions])
    assert fractions[0] == 0 and fractions[0] < fractions[1] < fractions[2] < fractions[3] < 1
    # Level 1 measures 85.39%: resnet convs 56.4% + feed-forward 17.2% + resamplers 6.1% + attention out-proj 2.9%
    # + proj_in/out 2.9%. The paper freezes 85.8% (Table 3) on NCSN++ ("85% of parameters frozen").
    assert 0.84 < fractions[1] < 0.87
    assert fractions[2] - fractions[1] == pytest.approx(0.0868, abs=1e-3)  # q/k/v
    assert fractions[3] - fractions[2] == pytest.approx(0.0269, abs=1e-3)  # skip convs
    level1 = stats[1]
    for kind in ("norm", "time", "skip", "qkv", "io"):  # what D2O-F tunes
        assert level1[kind][1] == 0, kind
    for kind in ("conv", "resample", "attn_out", "ff", "proj_io"):
        assert level1[kind][1] == level1[kind][0], kind
    names = dict(unet.named_parameters())
    d2o.freeze_unet(unet, 1)
    assert not names["down_blocks.0.resnets.0.conv1.weight"].requires_grad
    assert not names["mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"].requires_grad
    assert names["down_blocks.0.resnets.0.time_emb_proj.weight"].requires_grad
    assert names["up_blocks.1.resnets.0.conv_shortcut.weight"].requires_grad
    assert names["conv_in.weight"].requires_grad and names["conv_out.weight"].requires_grad
    assert "freeze level 1" in d2o.freeze_table(stats[1], 1) and "85.39%" in d2o.freeze_table(stats[1], 1)
    with pytest.raises(SystemExit, match="freeze must be 0"):
        d2o.freeze_unet(unet, 4)


def test_freeze_ff_false_keeps_the_layers_edm_has_not_trainable():
    """freeze_ff=False: the literal EDM rule (convs and attention out-projection only). On SD 2.1 the feed-forward
    (17.2%) and proj_in/out (2.9%) then train: 65.3% frozen at level 1 instead of 85.4%."""
    unet = sd21_unet()
    literal = d2o.freeze_unet(unet, 1, ff=False)
    assert literal["ff"][1] == 0 and literal["proj_io"][1] == 0 and literal["conv"][1] == literal["conv"][0]
    assert literal["attn_out"][1] == literal["attn_out"][0]
    assert frozen_fraction(literal) == pytest.approx(0.6532, abs=1e-3)
    assert frozen_fraction(d2o.freeze_unet(unet, 1, ff=True)) == pytest.approx(0.8539, abs=1e-3)
    names = dict(unet.named_parameters())
    d2o.freeze_unet(unet, 3, ff=False)
    assert names["mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"].requires_grad
    assert not names["mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"].requires_grad


@pytest.fixture
def sd(tiny_sd):
    return load_sd(tiny_sd)


def test_frozen_parameters_get_no_gradient_and_do_not_move(sd, monkeypatch):
    text, vae, unet, scheduler = sd
    d2o.freeze_unet(unet, 1)
    before = {k: p.detach().clone() for k, p in unet.named_parameters()}
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-2, betas=(0.0, 0.99))
    cond = encode_prompts(text, ["a bag", "a sneaker"])
    monkeypatch.setattr(d2o, "guidance", 1.0)
    fake = d2o.generate(unet, scheduler, vae, cond, None, (4, 8, 8), torch.device("cpu"))
    fake.square().mean().backward()
    for k, p in unet.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), k
    opt.step()
    for k, p in unet.named_parameters():
        assert torch.equal(p, before[k]) == (not p.requires_grad), k  # frozen: bit-identical; trainable: moved


# ----------------------------------------------------------------------------- discriminator


def check_only_heads_train(D, images, text):
    D.train()
    assert all(m.training for m in D.heads.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in D.heads.modules())
    assert not any(m.training for m in D.backbones.modules()) and not any(m.training for m in D.projectors.modules())
    assert not any(p.requires_grad for p in D.backbones.parameters())
    assert not any(p.requires_grad for p in D.projectors.parameters())
    logits = D(images, text)
    d2o.discriminator_loss(logits, [-l for l in logits]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in D.heads.parameters())
    assert all(p.grad is None for p in list(D.backbones.parameters()) + list(D.projectors.parameters()))
    return logits


def test_teacher_unet_discriminator_shapes_and_only_heads_train(sd):
    text, vae, unet, scheduler = sd
    uncond = encode_prompts(text, ["", "a bag", "a sneaker"])
    pooled = uncond.pooled
    D, names = d2o.build_discriminator(("teacher_unet",), unet, vae, scheduler, uncond[:1], 16, 32, "cpu")
    assert names == ["teacher_unet"] and len(D.heads) == 1 and len(D.heads[0]) == 4
    taps = D.backbones[0](torch.zeros(2, 3, 16, 16))
    assert [f.shape[-1] for f in taps] == [8, 8, 4, 4]  # conv_in, first resnet, last resnet, mid block (8x8 latents)
    maps = D.projectors[0](taps)
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 8, 8)]  # CSM: x2
    logits = check_only_heads_train(D, torch.rand(2, 3, 16, 16) * 2 - 1, pooled[1:])
    assert len(logits) == 1 and logits[0].shape == (2, 2 * 5 * 5 + 2 * 5 * 5)  # 4 heads, 5x5 logits each
    assert not unet.training and not vae.training  # the shared teacher stays in eval mode


def tiny_backbones(root):
    from transformers import DeiTConfig, DeiTModel, EfficientNetConfig, EfficientNetModel

    torch.manual_seed(0)
    eff = EfficientNetModel(EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                               hidden_dim=320, dropout_rate=0.0, drop_connect_rate=0.0))
    eff.save_pretrained(str(root / "effnet"))
    deit = DeiTModel(DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=64), add_pooling_layer=False)
    deit.save_pretrained(str(root / "deit"))
    # EfficientNet's processor normalises by image_std twice (include_top, the Keras port): sqrt(std) on file
    (root / "effnet" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.4785, 0.4733, 0.4743], "include_top": True}))
    return str(root / "effnet"), str(root / "deit")


def test_transformers_backbones_efficientnet_and_deit(sd, tmp_path):
    text, vae, unet, scheduler = sd
    effnet, deit = tiny_backbones(tmp_path)
    uncond = encode_prompts(text, ["", "a bag", "a sneaker"])
    pooled = uncond.pooled
    D, names = d2o.build_discriminator((effnet, deit), unet, vae, scheduler, uncond[:1], 16, 32, "cpu")
    assert names == [effnet, deit]
    eff_net, deit_net = D.backbones
    torch.testing.assert_close(eff_net.std.flatten(), torch.tensor([0.4785, 0.4733, 0.4743]) ** 2)
    torch.testing.assert_close(deit_net.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))  # ImageNet default
    x = torch.rand(2, 3, 16, 16) * 2 - 1  # resized to the backbones' input size (32 here, 224 for the real ones)
    assert [f.shape[-1] for f in eff_net(x)] == [8, 4, 2, 1]  # strides 4, 8, 16, 32
    tokens = deit_net(x)
    assert [tuple(t.shape[1:]) for t in tokens] == [(32, 4, 4)] * 4  # 4 of the blocks, 2 prefix tokens dropped
    maps = D.projectors[1](tokens)  # strides 4, 8, 16, 32 by the reassembly, then x2 by CSM
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    logits = check_only_heads_train(D, x, pooled[1:])
    # heads end at 8x8 (5x5 logits); smaller maps keep their size (3x3, 2x2). EfficientNet 16/8/4/2, DeiT 32/16/8/4
    assert [tuple(l.shape) for l in logits] == [(2, 2 * 5 * 5 + 3 * 3 + 2 * 2), (2, 3 * 5 * 5 + 3 * 3)]
    penalty = d2o.r1_penalty(D, x, pooled[1:])  # double backward through both networks
    assert penalty.shape == (2,) and torch.isfinite(penalty).all() and (penalty > 0).all()


def test_lite0_discriminator_heads_follow_projected_gan_at_the_fed_size(sd, monkeypatch):
    """'lite0': the official backbone, offline. At 224 the heads get Projected GAN's 4/3/2/1 DownBlocks to 8x8; at
    the embedded default's 64 px, 2/1/0/0 (maps 32/16/8/4 after CSM's x2)."""
    text, vae, unet, scheduler = sd
    uncond = encode_prompts(text, ["", "a bag", "a sneaker"])
    pooled = uncond.pooled
    depths = {}
    for size in (224, 64):
        monkeypatch.setattr(d2o, "lite0_size", size)
        D, names = d2o.build_discriminator(("lite0",), unet, vae, scheduler, uncond[:1], 16, 32, "cpu")
        assert names == ["lite0"] and D.backbones[0].input_size == size
        depths[size] = [sum(isinstance(m, torch.nn.BatchNorm2d) for m in head.modules()) for head in D.heads[0]]
    assert depths == {224: [4, 3, 2, 1], 64: [2, 1, 0, 0]}
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert [tuple(m.shape[1:]) for m in D.features(x)[0]] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    logits = check_only_heads_train(D, x, pooled[1:])
    assert logits[0].shape == (2, 5 * 5 + 5 * 5 + 5 * 5 + 3 * 3)
    penalty = d2o.r1_penalty(D, x, pooled[1:])  # R1's double backward through Lite0 (TF padding, ReLU6)
    assert penalty.shape == (2,) and (penalty > 0).all()


def test_joint_batch_lets_the_heads_see_a_mean_shift_between_real_and_fake():
    """Real maps = fake maps + a constant per channel: the plainest real/fake cue. Two calls (the official code)
    normalise each all-real / all-fake batch by its own BatchNorm statistics, which subtracts the shift but for
    the convs' zero-padded borders: the same head's logits for real and fake then differ 5x less than when it
    sees both as one batch."""
    torch.manual_seed(0)
    D = d2o.ProjectedDiscriminator([], 8, 64, 16, "cpu")
    D.heads.append(torch.nn.ModuleList([d2o.Head(64, 16, 8, 8, 16)]))  # one 16x16 map: a DownBlock with BN
    fake = torch.randn(16, 64, 16, 16)
    real = fake + torch.randn(1, 64, 1, 1)  # shifted per channel
    text = torch.randn(16, 8)
    gaps = {}
    for joint in (False, True):
        with torch.no_grad():
            f, r = D.fake_and_real([[fake]], [[real]], text, text, joint)
        gaps[joint] = (r[0] - f[0]).abs().mean().item()  # per image and position: what the shift changed
    assert gaps[False] < 0.25 * gaps[True], gaps


# ----------------------------------------------------------------------------- objective


def test_loss_signs():
    up, down = [torch.full((2, 5), 2.0)], [torch.full((2, 5), -2.0)]
    assert d2o.discriminator_loss(fake_logits=down, real_logits=up) < d2o.discriminator_loss(up, down)
    assert d2o.generator_loss(up) < d2o.generator_loss(down)  # G wants its fakes called real
    zero = [torch.zeros(2, 5), torch.zeros(2, 3)]  # two backbones: summed, each a mean
    torch.testing.assert_close(d2o.discriminator_loss(zero, zero), torch.tensor(4 * np.log(2), dtype=torch.float32))
    torch.testing.assert_close(d2o.generator_loss(zero), torch.tensor(2 * np.log(2), dtype=torch.float32))


def test_r1_penalty_is_the_hand_computed_gradient_norm():
    w = torch.nn.Parameter(torch.randn(1, 3, 4, 4))

    def toy_d(x, text):  # two "backbones": 0.5 t |x|^2 (one logit) and w * x per pixel (48 logits)
        return [0.5 * text[:, :1] * x.square().sum([1, 2, 3])[:, None], (w * x).flatten(1)]
    x, text = torch.randn(2, 3, 4, 4), torch.rand(2, 8)
    penalty = d2o.r1_penalty(toy_d, x, text)
    grad = text[:, :1, None, None] * x + w  # d/dx of the sum of all logits, per image
    torch.testing.assert_close(penalty, grad.square().sum([1, 2, 3]))
    penalty.sum().backward()  # the graph is kept: R1 trains D
    torch.testing.assert_close(w.grad, (2 * grad).sum(0, keepdim=True))


def test_ema_decay_is_the_official_formula():
    def official(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio):  # the authors' training_loop.py
        ema_halflife_nimg = ema_halflife_kimg * 1000
        if ema_rampup_ratio is not None and ema_rampup_ratio != 0:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
        return 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
    for seen in (0, 256, 10**4, 10**6, 10**7, 5 * 10**7):
        for batch, kimg, ramp in ((256, 500, 0.05), (32, 0.5, 0.05), (512, 50000, 0.05), (64, 10, 0.0)):
            assert d2o.ema_decay(seen, batch, kimg, ramp) == official(seen, batch, kimg, ramp)
    assert d2o.ema_decay(0, 256, 500, 0.05) == 0.0  # the first step copies the weights
    assert d2o.ema_decay(10**8, 256, 500, 0.05) == pytest.approx(0.5 ** (256 / 500_000))


# ----------------------------------------------------------------------------- the loop

def run_args(model, data, out, *extra):
    return [f"--model={model}", f"--data_dir={data}", f"--out_dir={out}", "--batch_size=4", "--max_iters=4",
            "--r1_interval=2", "--log_interval=1", "--eval_interval=100", "--ckpt_interval=1", "--teacher_steps=2",
            "--num_val_prompts=3", "--init_from=scratch", "--lite0_size=32", *extra]


def test_end_to_end_writes_an_ema_unet_that_diffusers_and_sample_load(tiny_sd, real_data, tmp_path):
    from diffusers import UNet2DConditionModel

    import sample
    out = tmp_path / "run"
    d2o.main(run_args(tiny_sd, real_data, out, "--g_lr=1e-3"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(np.isfinite(r["g_loss"]) and np.isfinite(r["d_loss"]) for r in log)
    assert [("r1" in r) for r in log] == [False, False, True, False]  # lazy R1 at iterations 2 (0-based)
    assert all(0 <= r["d_acc_real"] <= 1 and 0 <= r["d_acc_fake"] <= 1 for r in log)  # D's health: shares right
    assert all(r["logit_gap"] == pytest.approx(r["logit_real"] - r["logit_fake"]) for r in log)
    assert (out / "val_000004.png").exists() and (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not (out / "unet.tmp").exists()

    ck = torch.load(out / "ckpt.pt", weights_only=True)
    exported = UNet2DConditionModel.from_pretrained(out / "unet")
    text, _, base, scheduler = load_sd(tiny_sd)
    original = {k: p.clone() for k, p in base.named_parameters()}
    base.load_state_dict({**original, **ck["ema"]})
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(text, ["a bag", "an ankle boot"])
    with torch.no_grad():
        ours, theirs = (one_step_x0(u, scheduler, x_T, cond, None, 1.0) for u in (base, exported))
    assert torch.equal(ours, theirs)  # the folder holds exactly the EMA weights
    moved = {k for k in ck["ema"] if not torch.equal(ck["ema"][k], original[k])}
    assert moved and moved <= set(ck["g"])
    for k, p in exported.named_parameters():  # D2O-F: the frozen layers are exactly the pretrained ones
        if k not in ck["g"]:
            assert torch.equal(p, original[k]), k
    assert d2o.param_kind(min(set(original) - set(ck["g"]))) in d2o.FREEZE_LEVELS[1]

    sample.main([f"--model={tiny_sd}", f"--unet={out / 'unet'}", "--guidance=1", "--num_per_prompt=2",
                 f"--out_dir={tmp_path / 'samples'}", "--grid=False"])
    assert (tmp_path / "samples" / "000001.png").exists()


def test_first_ema_is_the_weights_and_transformers_backbones_train(tiny_sd, real_data, tmp_path):
    effnet, deit = tiny_backbones(tmp_path)
    out = tmp_path / "run"
    d2o.main(run_args(tiny_sd, real_data, out, "--max_iters=1", f"--backbones=('{effnet}', '{deit}')",
                      "--offline_fallback=False"))
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.equal(ck["g"][k], ck["ema"][k]) for k in ck["g"])  # EMA decay 0 at the first step
    assert len(ck["d_heads"]) > 0 and any(k.startswith("1.") for k in ck["d_heads"])  # two backbones' heads


@pytest.mark.parametrize("config", ["config/fmnist_d2o.py", "config/coco_d2o.py"])
def test_config_files_apply(config, monkeypatch):
    import os

    import configurator
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    resolved = configurator.configure(dict(vars(d2o)), [config], print_config=False)  # unknown key, wrong type: error
    assert resolved["freeze"] == 1 and resolved["batch_size"] % 8 == 0


def test_resume_continues_exactly(tiny_sd, real_data, tmp_path, monkeypatch):
    d2o.main(run_args(tiny_sd, real_data, tmp_path / "a", "--max_iters=5"))
    straight = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    # killed after iteration 3 (an epoch has 4), the R1 step at iteration 2 (0-based) behind
    run_killed_after(d2o, run_args(tiny_sd, real_data, tmp_path / "b", "--max_iters=5"), 3, monkeypatch)
    d2o.main(run_args(tiny_sd, real_data, tmp_path / "b", "--max_iters=5", "--init_from=resume"))
    resumed = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert resumed["iter"] == straight["iter"] == 5 and resumed["data_position"] == [1, 1]
    for part in ("g", "ema", "d_heads", "d_projectors"):
        assert straight[part].keys() == resumed[part].keys()
        for k in straight[part]:
            assert torch.equal(straight[part][k], resumed[part][k]), (part, k)
    for opt in ("opt_g", "opt_d"):
        for i, state in straight[opt]["state"].items():
            assert torch.equal(state["exp_avg_sq"], resumed[opt]["state"][i]["exp_avg_sq"]), (opt, i)


def test_unreachable_backbone_falls_back_loudly(sd, capsys, monkeypatch):
    text, vae, unet, scheduler = sd
    uncond = encode_prompts(text, [""])
    monkeypatch.setattr(d2o, "offline_fallback", True)
    D, names = d2o.build_discriminator(("/nonexistent/efficientnet", "teacher_unet"), unet, vae, scheduler, uncond,
                                       16, 32, "cpu")
    assert names == ["teacher_unet"] and isinstance(D.backbones[0], d2o.TeacherUNetFeatures)
    assert "WARNING: discriminator backbone '/nonexistent/efficientnet' cannot be loaded" in capsys.readouterr().out


@pytest.fixture(scope="module")
def captions_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions_only")
    rows = [{"id": i, "captions": ["a bag"]} for i in range(16)]
    write_split(str(root), "train", np.zeros((16, 16, 16, 3), np.uint8), rows, source="test")
    (root / "train_images.u8").unlink()
    return str(root)


@pytest.mark.parametrize("extra, message", [
    (["--freeze=4"], "freeze must be 0 .full D2O., 1, 2 or 3, not 4"),
    (["--data_dir=/nonexistent"], "meta.json not found"),
    (["--data_dir=CAPTIONS_ONLY"], "D2O trains on real images, but .* has no train_images.u8"),
    (["--backbones=('/nonexistent/effnet',)", "--offline_fallback=False"], "cannot load '/nonexistent/effnet'"),
    (["--model=/nonexistent/model"], "not an SD-format folder"),
    (["--batch_size=32"], "16 real images are fewer than one batch of 32"),
    (["--resolution=18"], "resolution 18 must be a multiple of 4"),
    (["--r1_interval=0"], "r1_interval must be > 0, got 0"),
    (["--unet_feature_t=1000"], r"unet_feature_t must be a timestep in \[0, 1000\)"),
    (["--init_from=latest"], "init_from must be"),
    (["--batch_size=-4"], "batch_size must be > 0, got -4"),  # once loaded the whole split as one batch
    (["--max_iters=-1"], "max_iters must be > 0, got -1"),  # once exported the untrained model, exit 0
    (["--d_lr=-1e-4"], "d_lr must be > 0"),
    (["--ckpt_interval=0"], "ckpt_interval must be > 0, got 0"),
])
def test_bad_input_fails_before_writing_anything(tiny_sd, real_data, captions_only, tmp_path, extra, message):
    extra = [e.replace("CAPTIONS_ONLY", captions_only) for e in extra]
    with pytest.raises(SystemExit, match=message):
        d2o.main(run_args(tiny_sd, real_data, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_a_scratch_run_never_destroys_an_earlier_one(tiny_sd, real_data, tmp_path):
    out = tmp_path / "run"
    d2o.main(run_args(tiny_sd, real_data, out, "--max_iters=1"))
    before = (out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="holds an earlier run .ckpt.pt, log.jsonl.*--overwrite=True"):
        d2o.main(run_args(tiny_sd, real_data, out, "--max_iters=1"))
    assert before == ((out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_bytes())
    d2o.main(run_args(tiny_sd, real_data, out, "--max_iters=1", "--overwrite=True", "--seed=1"))
    assert (out / "ckpt.pt").read_bytes() != before[0]


def test_divergence_stops_the_run_and_saves_no_unet(tiny_sd, real_data, tmp_path):
    out = tmp_path / "div"
    with pytest.raises(SystemExit, match="training error"):
        d2o.main(run_args(tiny_sd, real_data, out, "--g_lr=1e10", "--max_iters=12", "--max_nonfinite=2"))
    assert not (out / "unet").exists()
    for line in (out / "log.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no bare NaN


def test_real_and_fake_images_reach_the_features_with_the_same_spectrum():
    """COCO: reals stored at 256 by prepare_coco.py (PIL LANCZOS), fakes made at 512, both shrunk to 224 by D.
    For the same content (1/f noise, like natural images), the power above half the 224 Nyquist must not tell
    them apart; bilinear without antialiasing kept 2.8x more of it in the fake path here."""
    from PIL import Image

    def high_share(x):
        power = torch.fft.fft2(x).abs().square().mean((0, 1))
        f = torch.fft.fftfreq(x.shape[-1]).abs() * 2
        high = (f[:, None] > 0.5) | (f[None, :] > 0.5)
        return (power[high].sum() / power.sum()).item()
    f = torch.fft.fftfreq(512)
    pink = 1 / ((f[:, None] ** 2 + f[None, :] ** 2).sqrt() + 1 / 512)
    noise = torch.randn(4, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    fake = torch.fft.ifft2(torch.fft.fft2(noise) * pink).real
    fake = (fake / fake.std() * 0.25).clamp(-1, 1)
    u8 = ((fake + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    real = np.stack([np.array(Image.fromarray(a).resize((256, 256), Image.LANCZOS)) for a in u8])
    real, fake = d2o.resize(images_to_tensor(real), 224), d2o.resize(fake, 224)
    assert real.shape == fake.shape == (4, 3, 224, 224)
    assert 0.87 < high_share(fake) / high_share(real) < 1.15, (high_share(fake), high_share(real))


def test_real_images_reach_the_discriminator_through_the_generators_decoder(sd, monkeypatch):
    """Every fake is decoded by the frozen VAE; reals must be too (real_through_vae), or the heads learn the
    decoder's signature, which no generator behind it can remove. Off: the raw images."""
    from common import decode, encode
    vae = sd[1]
    u8 = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    raw = images_to_tensor(u8)
    with torch.no_grad():
        round_trip = decode(vae, encode(vae, raw)) * 2 - 1
    monkeypatch.setattr(d2o, "real_through_vae", True)
    seen = d2o.real_images(vae, u8, torch.device("cpu"))
    assert seen.shape == raw.shape and torch.allclose(seen, round_trip, atol=1e-6)
    assert (seen - raw).abs().mean() > 0.05  # (a random VAE: far from the identity)
    monkeypatch.setattr(d2o, "real_through_vae", False)
    assert torch.equal(d2o.real_images(vae, u8, torch.device("cpu")), raw)


def test_dry_run_estimates_memory_without_weights_and_writes_nothing(tiny_sd, real_data, tmp_path, capsys):
    def peak(*extra):
        return d2o.main(run_args(tiny_sd, real_data, tmp_path / "out", "--dry_run=True", "--dry_run_gpus=1",
                                 "--backbones=('teacher_unet',)", *extra))  # (Lite0's weights would dominate)
    large = peak("--batch_size=8")  # (each estimate takes ~8 s: tens of thousands of fake ops)
    assert "estimated peak GPU memory of one D2O step at 8 image(s) per GPU" in capsys.readouterr().out
    assert 0 < peak("--batch_size=8", "--grad_checkpointing=True") < large
    lite0 = d2o.main(run_args(tiny_sd, real_data, tmp_path / "out", "--dry_run=True", "--dry_run_gpus=1"))
    assert lite0 > 4.6e6 * 4  # the default 'lite0' D, built from its architecture alone: its weights count too
    assert not (tmp_path / "out").exists()


def test_gradient_checkpointing_trains_with_r1(tiny_sd, real_data, tmp_path):
    """R1's double backward recomputes the checkpointed VAE blocks; it must take the attention kernel the forward
    took (once it did not: CheckpointError at the first R1 step of every grad_checkpointing run)."""
    out = tmp_path / "gc"
    d2o.main(run_args(tiny_sd, real_data, out, "--max_iters=2", "--r1_interval=1", "--grad_checkpointing=True"))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert "r1" in log[-1] and (out / "unet").is_dir()


def test_learning_curve_scores_the_ema_by_the_demo_recipe_and_leaves_the_run_unchanged(tiny_sd, tmp_path,
                                                                                       monkeypatch):
    """curve_interval: points at 0 (the base model), every interval and the end, each from sample.py's one-step
    images of the EMA UNet scored by eval_fid.py, and a scratch run's curve never mixes in an earlier run's points;
    the training itself is bit-identical to a run without it."""
    import eval_fid
    from prepare_fmnist import captions_for
    rows = [{"id": i, "label": i % 10, "captions": captions_for(i % 10)} for i in range(16)]
    images = np.random.RandomState(0).randint(0, 256, (16, 16, 16, 3)).astype(np.uint8)
    for split in ("train", "test"):
        write_split(str(tmp_path / "fmnist"), split, images, rows, source="fashion-mnist")

    class Stub(torch.nn.Module):  # the classifier's interface, (features, logits); no training in a test
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1), x.mean((1, 2, 3))[:, None] * torch.arange(10.)
    monkeypatch.setattr(eval_fid, "fmnist_classifier", lambda data_dir, cache_dir: (Stub(), 1.0))
    (tmp_path / "prompts.txt").write_text("a photo of a sneaker\na bag\n")
    (tmp_path / "sample_cfg.py").write_text(f"prompts = '{tmp_path / 'prompts.txt'}'\nseed = 10**6\nbatch_size = 8\n")
    data = tmp_path / "fmnist"
    d2o.main(run_args(tiny_sd, data, tmp_path / "plain", "--ckpt_interval=4"))
    (tmp_path / "curve").mkdir()
    (tmp_path / "curve" / "curve.jsonl").write_text('{"iter": 100, "images_seen": 3200, "n": 500}\n')  # a stale run
    d2o.main(run_args(tiny_sd, data, tmp_path / "curve", "--ckpt_interval=4", "--curve_interval=3", "--curve_per_prompt=3",
                      f"--curve_sample_config={tmp_path / 'sample_cfg.py'}", f"--curve_cache_dir={tmp_path / 'cache'}"))
    curve = [json.loads(line) for line in (tmp_path / "curve" / "curve.jsonl").read_text().splitlines()]
    assert [(p["iter"], p["images_seen"], p["n"]) for p in curve] == [(0, 0, 6), (3, 12, 6), (4, 16, 6)]
    assert all(np.isfinite(p["fid_fmnist_classifier"]) and 0 <= p["caption_accuracy"] <= 1 for p in curve)
    plain, with_curve = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("plain", "curve"))
    for part in ("g", "ema", "d_heads"):
        assert all(torch.equal(plain[part][k], with_curve[part][k]) for k in plain[part]), part


# ----------------------------------------------------------------------------- issue 21: step size, R1, caches

def test_step_size_rule_follows_the_schedule_and_prediction_type(sd):
    """g_step_scale = EDM's c_out at sigma 80 (in data stds) / this model's x0 sensitivity at t = T-1: 1/14.6 for
    SD's epsilon schedule, whatever the resolution (the tiny teacher and SD at 512 share the betas); a v model
    ~1; a sample model EDM's own c_out."""
    from diffusers import DDIMScheduler
    assert d2o.EDM_C_OUT == pytest.approx(0.99998, abs=1e-5)
    scheduler = sd[3]
    assert d2o.output_scale(scheduler) == pytest.approx(14.6146, abs=1e-3)
    sd_config = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # SD 2.1 / SDXL
    assert d2o.g_step_scale(sd_config) == pytest.approx(d2o.g_step_scale(scheduler), rel=1e-6)
    assert d2o.g_step_scale(scheduler) == pytest.approx(1 / 14.6146, rel=1e-4)
    v = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    assert d2o.output_scale(v) == pytest.approx(np.sqrt(1 - v.alphas_cumprod[-1].item()))
    x0 = DDIMScheduler(prediction_type="sample")
    assert d2o.g_step_scale(x0) == d2o.EDM_C_OUT


def test_one_generator_step_at_the_rules_lr_moves_x0_as_far_as_the_official_generator_would(sd):
    """The rule's claim, measured: one Adam step (betas (0, 0.99): its first step moves each weight by lr) at
    lr x g_step_scale moves our one-step x0 by EDM_C_OUT times what one step at lr moves the network's raw
    output: what the same network would do to the official generator's image (its c_out) at the paper's lr."""
    text, vae, unet, scheduler = sd
    x_T = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(text, ["a bag", "a sneaker", "a bag", "a shirt"])
    t = scheduler.config.num_train_timesteps - 1
    target = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def motion(lr, raw):
        net = __import__("copy").deepcopy(unet).requires_grad_(True)
        f = (lambda: net(x_T, t, encoder_hidden_states=cond.hidden).sample) if raw else \
            (lambda: one_step_x0(net, scheduler, x_T, cond, None, 1.0))
        opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.0, 0.99))
        before = f()
        (before * target).sum().backward()
        opt.step()
        with torch.no_grad():
            return (f() - before.detach()).square().mean().sqrt().item()
    lr = 1e-6
    ours = motion(lr * d2o.g_step_scale(scheduler), raw=False)
    official = d2o.EDM_C_OUT * motion(lr, raw=True)
    assert ours == pytest.approx(official, rel=0.02)
    assert motion(lr, raw=False) == pytest.approx(14.6 * ours, rel=0.05)  # the paper's lr as given: 14.6x further


def test_r1_weight_gives_the_official_balance_of_r1_and_adversarial_terms(monkeypatch):
    """The official loss: adversarial terms summed over the per-GPU batch, R1 a batch mean times gamma / 2. Ours
    (means) times the per-GPU batch must be that loss, so the gradients differ only by that constant."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3 * 4 * 4) * 0.1)
    toy_d = lambda x, text: [(x.flatten(1) * w).sum(1, keepdim=True) + (x.flatten(1) ** 2 @ w.abs())[:, None]]
    real, fake, text = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4), torch.rand(6, 2)
    gamma, micro = 1e-1, 6

    def grads(loss):
        w.grad = None
        loss.backward()
        return w.grad.clone()
    penalty = d2o.r1_penalty(toy_d, real, text)
    official = sum(torch.nn.functional.softplus(toy_d(fake[i:i + 1], 0)[0]).sum() +
                   torch.nn.functional.softplus(-toy_d(real[i:i + 1], 0)[0]).sum() for i in range(micro)) \
        + gamma / 2 * penalty.mean()
    g_official = grads(official)
    monkeypatch.setattr(d2o, "r1_gamma", gamma)
    ours = d2o.discriminator_loss(toy_d(fake, 0), toy_d(real, 0)) + \
        d2o.r1_weight(micro) / 2 * d2o.r1_penalty(toy_d, real, text).mean()
    torch.testing.assert_close(grads(ours) * micro, g_official)


@pytest.mark.parametrize("cache", [True, False])
def test_cached_real_round_trips_equal_the_recomputed_ones(sd, monkeypatch, cache):
    vae = sd[1]
    u8 = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setattr(d2o, "real_through_vae", True)
    monkeypatch.setattr(d2o, "cache_real_vae", cache)
    reals = d2o.RealRoundTrips(u8)
    cpu = torch.device("cpu")
    fresh = d2o.real_images(vae, u8[[3, 1, 7]], cpu)
    first = reals(vae, [3, 1, 7], cpu)
    calls, recompute = [], d2o.real_images
    monkeypatch.setattr(d2o, "real_images", lambda *a: calls.append(a) or recompute(*a))
    again = reals(vae, [7, 3, 1], cpu)  # from the cache: no VAE call
    if cache:
        assert calls == [] and reals.done.sum() == 3
        assert torch.equal(first, fresh.half().float()) and torch.equal(again, first[[2, 0, 1]])
        assert (first - fresh).abs().max() < 1e-3  # fp16 of values in [-1, 1]: far below one 8-bit level
    else:
        assert len(calls) == 1 and reals.store is None and torch.equal(first, fresh)


def test_fake_clamp_modes_differ_only_in_the_gradient_of_saturated_pixels(sd):
    from common import decode
    vae = sd[1]
    z = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 6).requires_grad_(True)
    out = {}
    for mode in ("hard", "straight_through", "none"):
        z.grad = None
        x = decode(vae, z, mode)
        x.sum().backward()
        out[mode] = (x.detach(), z.grad.clone())
    raw = out["none"][0]
    assert ((raw < 0) | (raw > 1)).float().mean() > 1e-3  # (the test needs saturated pixels)
    assert torch.equal(out["hard"][0], out["straight_through"][0]) and torch.equal(out["hard"][0], raw.clamp(0, 1))
    torch.testing.assert_close(out["straight_through"][1], out["none"][1])
    assert not torch.allclose(out["hard"][1], out["none"][1])


def test_init_lora_starts_the_generator_at_the_merged_adaptor(tiny_sd, real_data, tmp_path):
    """init_lora: D2O's generator (and its EMA) start from the HiPA-adapted UNet, exactly: with a learning rate
    too small to move an fp32 weight, the exported UNet's one step is the adaptor's (unmerged LoRA forward)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    import hipa
    text, vae, unet, scheduler = load_sd(tiny_sd)
    loras = hipa.add_lora(unet, ("to_q", "to_k", "to_v", "to_out.0"), 4, 8.0)
    g = torch.Generator().manual_seed(0)
    for m in loras.values():
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.1
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    save_file(hipa.lora_state(loras), path)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = encode_prompts(text, ["a bag", "a sneaker"])
    with torch.no_grad():
        adapted = one_step_x0(unet, scheduler, x_T, cond, None, 1.0)
        hipa.set_lora(loras, False)
        plain = one_step_x0(unet, scheduler, x_T, cond, None, 1.0)
    out = tmp_path / "run"
    d2o.main(run_args(tiny_sd, real_data, out, f"--init_lora={path}", "--g_lr=1e-30", "--max_iters=2"))
    exported = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    with torch.no_grad():
        started = one_step_x0(exported, scheduler, x_T, cond, None, 1.0)
    torch.testing.assert_close(started, adapted, rtol=1e-4, atol=1e-4)  # (as sample.py's merge: x0 amplifies by 14.6)
    assert (started - plain).abs().max() > 1e-2
    with pytest.raises(SystemExit, match="resume error: the checkpoint's run started from init_lora="):
        d2o.main(run_args(tiny_sd, real_data, out, "--init_from=resume", "--max_iters=3"))  # frozen layers differ
    with pytest.raises(SystemExit, match="d2o error: LoRA file .* not found"):
        d2o.main(run_args(tiny_sd, real_data, tmp_path / "bad", "--init_lora=nope.safetensors"))
    assert not (tmp_path / "bad").exists()
