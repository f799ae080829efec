"""extract_lora.py: a D2O UNet -> a LoRA that reproduces it when its difference is low-rank, with the error told."""
import pytest
import torch

import extract_lora
from common import load_sd

LAYERS = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.resnets.0.conv1",
          "up_blocks.1.attentions.0.proj_out")  # a Linear, a 3x3 Conv2d, a 1x1 Conv2d


def tuned_unet(tiny_sd, folder, delta):
    """The tiny model's UNet with delta(shape, generator) added to LAYERS' weights, saved as d2o.py saves it."""
    unet = load_sd(tiny_sd)[2]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in LAYERS:
            w = unet.get_submodule(name).weight
            w += delta(w.shape, g)
    unet.save_pretrained(str(folder))
    return unet


def extract(tiny_sd, unet, out, rank):
    return extract_lora.main([f"--model={tiny_sd}", f"--unet={unet}", f"--rank={rank}", f"--out={out}"])


def rank2(shape, g):
    return (0.1 * torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1:].numel(), generator=g)).view(shape)


def unet_out(unet):
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([999, 500])
    c = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


def test_a_rank_r_difference_is_extracted_exactly_and_loads_like_a_hipa_adaptor(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    import sample
    tuned = tuned_unet(tiny_sd, tmp_path / "unet", rank2)
    res = extract(tiny_sd, tmp_path / "unet", tmp_path / "d2o_lora.safetensors", 2)
    assert sorted(res["layers"]) == sorted(LAYERS) and res["others"] == []  # only the changed layers
    assert res["overall"] < 1e-6 and res["worst"] < 1e-6  # rank 2 holds a rank-2 difference exactly

    merged = load_sd(tiny_sd)[2]
    sample.merge_lora(merged, str(tmp_path / "d2o_lora.safetensors"))  # sample.py --lora
    torch.testing.assert_close(unet_out(merged), unet_out(tuned), rtol=1e-4, atol=1e-5)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "d2o_lora.safetensors"))  # diffusers
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(tuned), rtol=1e-4, atol=1e-5)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(tmp_path / "d2o_lora_kohya.safetensors"), unet_config=pipe.unet.config)  # ComfyUI's
    torch.testing.assert_close(unet_out(pipe.unet), unet_out(tuned), rtol=1e-4, atol=1e-5)


def test_the_error_of_a_full_rank_difference_is_reported_and_falls_with_rank(tiny_sd, tmp_path, capsys):
    tuned = tuned_unet(tiny_sd, tmp_path / "unet", lambda shape, g: 0.01 * torch.randn(shape, generator=g))
    with torch.no_grad():  # D2O also trains norms and biases: a LoRA cannot carry them, and says so
        tuned.mid_block.resnets[0].norm1.bias += 0.1
    tuned.save_pretrained(str(tmp_path / "unet"))
    errors = [extract(tiny_sd, tmp_path / "unet", tmp_path / f"r{r}.safetensors", r) for r in (1, 4, 16, 288)]
    assert 0 < errors[2]["overall"] < errors[1]["overall"] < errors[0]["overall"] < 1
    assert errors[0]["worst"] >= errors[0]["overall"]
    assert errors[3]["overall"] < 1e-6  # full rank (288 = 32 x 3 x 3 for the conv): exact
    assert errors[0]["others"] == ["mid_block.resnets.0.norm1.bias"]
    out = capsys.readouterr().out
    assert "relative Frobenius error of the weight difference" in out and "not in the LoRA: 1 other" in out


def test_bad_input_is_one_clear_error(tiny_sd, tmp_path):
    with pytest.raises(SystemExit, match="D2O UNet folder .* not found"):
        extract(tiny_sd, tmp_path / "absent", tmp_path / "l.safetensors", 4)
    load_sd(tiny_sd)[2].save_pretrained(str(tmp_path / "same"))
    with pytest.raises(SystemExit, match="nothing to extract"):
        extract(tiny_sd, tmp_path / "same", tmp_path / "l.safetensors", 4)
    from diffusers import UNet2DConditionModel
    UNet2DConditionModel(block_out_channels=(32, 64), cross_attention_dim=32, layers_per_block=1, sample_size=8,
                         down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2
                         ).save_pretrained(str(tmp_path / "other"))  # another width: not the tiny model's UNet
    with pytest.raises(SystemExit, match="is not a fine-tune of"):
        extract(tiny_sd, tmp_path / "other", tmp_path / "l.safetensors", 4)
    with pytest.raises(SystemExit, match="rank must be >= 1"):
        extract(tiny_sd, tmp_path / "same", tmp_path / "l.safetensors", 0)
    assert not (tmp_path / "l.safetensors").exists()
