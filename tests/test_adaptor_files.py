"""Adaptor files say what they are (safetensors metadata: the base model and its UNet fingerprint, the task, rank,
alpha, targets, the training config; the kohya file also kohya's ss_* fields), and sample.py holds an adaptor to
it: another task's is refused, one of other base weights warned about, a file made elsewhere (no metadata) loads
as before, a truncated file is one line."""
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_sd
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_extract_lora import LAYERS, rank2, tuned_unet
from test_extract_lora import extract as extract_lora
from test_tasks import hipa_args, make_task_model

import hipa
import sample
from common import load_sd, write_split
from lora_files import adaptor_metadata, unet_fingerprint

LORA, KOHYA = hipa.EXPORTED


def metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def sample_args(model, lora, out):
    return [f"--model={model}", f"--lora={lora}", f"--out_dir={out}", "--num_per_prompt=1", "--grid=False"]


@pytest.fixture(scope="module")
def adaptors(tiny_sd, tmp_path_factory):
    """`make demo-tasks` in small: a t2i adaptor of the tiny model, and an x4 adaptor of a tiny x4 upscaler made
    from it (its attention layers have the t2i UNet's shapes), one HiPA step each."""
    root = tmp_path_factory.mktemp("adaptors")
    x4 = make_task_model(tiny_sd, root / "x4", "upscale")
    rows = [{"id": i, "captions": ["a bag", "an ankle boot"]} for i in range(4)]
    for size in (16, 32):
        pics = np.random.RandomState(size).randint(0, 256, (4, size, size, 3)).astype(np.uint8)
        write_split(str(root / f"data{size}"), "train", pics, rows, source="test")
    hipa.main(hipa_args(tiny_sd, root / "data16", root / "t2i", "t2i", "--epochs=1"))
    hipa.main(hipa_args(x4, root / "data32", root / "upscale", "upscale", "--epochs=1"))
    return {"x4": x4, "t2i": root / "t2i" / LORA, "upscale": root / "upscale" / LORA}


def test_the_files_say_what_they_were_trained_for(tiny_sd, adaptors):
    for task, model in (("t2i", tiny_sd), ("upscale", adaptors["x4"])):
        meta = metadata(adaptors[task])
        assert (meta["task"], meta["base_model"], meta["made_by"]) == (task, model, "hipa.py")
        assert meta["base_unet_fingerprint"] == unet_fingerprint(load_sd(model)[2])
        assert (meta["lora_rank"], meta["lora_alpha"]) == ("4", "16.0")
        assert json.loads(meta["lora_targets"]) == ["to_q", "to_k", "to_v", "to_out.0"]
        config = json.loads(meta["training_config"])
        assert (config["task"], config["model"], config["lora_rank"]) == (task, model, 4)
        kohya = metadata(adaptors[task].parent / KOHYA)
        assert {k: kohya[k] for k in meta} == meta  # the kohya file says the same, and more (below)


def test_the_unet_fingerprint_tells_weights_apart_not_dtypes(tiny_sd, tmp_path):
    unet = load_sd(tiny_sd)[2]
    fingerprint = unet_fingerprint(unet)
    assert len(fingerprint) == 16
    assert unet_fingerprint(load_sd(tiny_sd, dtype=torch.float16)[2]) == fingerprint  # sample.py's fp16 on CUDA
    assert unet_fingerprint(load_sd(make_tiny_sd(tmp_path / "other", seed=1))[2]) != fingerprint  # another model
    with torch.no_grad():  # a merged rank-1 LoRA (a fine-tune of one layer) is other weights too
        w = unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q.weight
        w += 0.01 * torch.ones(w.shape[0], 1) @ torch.ones(1, w.shape[1])
    assert unet_fingerprint(unet) != fingerprint
    assert unet_fingerprint(unet.to(torch.bfloat16)) is None  # bf16 lost the digits: no comparison


def test_the_kohya_file_carries_the_ss_fields_a1111_and_comfyui_show(tiny_sd, tiny_sdxl, adaptors):
    from diffusers import UNet2DConditionModel
    kohya = metadata(adaptors["t2i"].parent / KOHYA)
    assert {k: kohya[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
                                  "ss_v2", "ss_sd_model_name", "ss_output_name")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_sd_model_name": tiny_sd, "ss_output_name": "t2i"}
    assert "t2i" in kohya["ss_training_comment"]
    alphas = {v.item() for k, v in load_file(adaptors["t2i"].parent / KOHYA).items() if k.endswith(".alpha")}
    assert alphas == {float(kohya["ss_network_alpha"])}  # the tools' scale ss_network_alpha / dim: the file's, 1
    versions = {}  # the base model's version as kohya's sd-scripts writes it
    for name, unet in (("sdxl", load_sd(tiny_sdxl)[2]),
                       ("sd2", UNet2DConditionModel(block_out_channels=(32, 64), cross_attention_dim=1024,
                                                    layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                                    up_block_types=("CrossAttnUpBlock2D",) * 2))):
        kohya = adaptor_metadata("m", "0" * 16, unet, "t2i", 4, 4.0, ["to_q"], "hipa.py", "run", {})[1]
        versions[name] = (kohya["ss_base_model_version"], kohya["ss_v2"])
    assert versions == {"sdxl": ("sdxl_base_v1-0", "False"), "sd2": ("sd_v2", "True")}


def test_an_adaptor_of_another_task_is_refused_in_one_line(tiny_sd, adaptors, tmp_path):
    x4, upscale, t2i = adaptors["x4"], adaptors["upscale"], adaptors["t2i"]
    with pytest.raises(SystemExit) as e:  # the case: the x4 adaptor given to the t2i model
        sample.main(sample_args(tiny_sd, upscale, tmp_path / "out"))
    assert str(e.value) == (f"sample error: {upscale} is an adaptor for the 'upscale' task, trained on {x4}; "
                            f"{tiny_sd} is a t2i model")
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match=r"is an adaptor for the 't2i' task, .* is a upscale model"):
        sample.merge_lora(load_sd(x4)[2], str(t2i), x4)  # and the other way round
    meta = metadata(t2i)
    save_file(load_file(t2i), tmp_path / "edit.safetensors", metadata={**meta, "task": "edit"})
    assert sample.merge_lora(load_sd(tiny_sd)[2], str(tmp_path / "edit.safetensors")) > 0  # editing: a t2i model's


def test_a_file_without_metadata_loads_as_before(tiny_sd, adaptors, tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"  # as made elsewhere: the same tensors, no metadata
    save_file(load_file(adaptors["t2i"]), plain)
    assert metadata(plain) is None
    ours, theirs, layers = load_sd(tiny_sd)[2], load_sd(tiny_sd)[2], len(load_file(plain)) // 2
    assert sample.merge_lora(ours, str(adaptors["t2i"])) == sample.merge_lora(theirs, str(plain)) == layers
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), k
    save_file(load_file(adaptors["upscale"]), tmp_path / "x4_plain.safetensors")  # nothing to tell it is wrong:
    assert sample.merge_lora(load_sd(tiny_sd)[2], str(tmp_path / "x4_plain.safetensors")) == layers  # it loads
    assert "warning" not in capsys.readouterr().out


def test_an_adaptor_of_other_base_weights_is_one_warning_line(tiny_sd, adaptors, tmp_path, capsys):
    other = make_tiny_sd(tmp_path / "other", seed=1)  # the same layers, other weights
    sample.main(sample_args(other, adaptors["t2i"], tmp_path / "out"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {adaptors['t2i']} was trained on {tiny_sd}")
    for model in (tiny_sd, other):
        assert model in warnings[0] and unet_fingerprint(load_sd(model)[2]) in warnings[0]
    assert (tmp_path / "out" / "000000.png").exists()  # a warning: the images are made
    sample.main(sample_args(tiny_sd, adaptors["t2i"], tmp_path / "out2"))
    assert "warning" not in capsys.readouterr().out  # its own base model: nothing to say


@pytest.mark.parametrize("damage", ["truncated", "torch.save"])
def test_a_truncated_or_foreign_lora_file_is_one_line(tiny_sd, adaptors, tmp_path, damage):
    path = tmp_path / "bad.safetensors"
    if damage == "truncated":  # a copy cut short
        data = adaptors["t2i"].read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:  # a pickle under the name
        torch.save(load_file(adaptors["t2i"]), path)
    with pytest.raises(SystemExit) as e:
        sample.main(sample_args(tiny_sd, path, tmp_path / "out"))
    assert str(e.value).startswith(f"sample error: cannot read the LoRA file {path} (truncated, or not safetensors)")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_extracted_lora_files_say_what_they_are_and_which_run_made_them(tiny_sd, tmp_path, capsys):
    run = tmp_path / "d2o-run"  # d2o.py's out_dir: unet/ and config.json
    tuned_unet(tiny_sd, run / "unet", rank2)
    out = tmp_path / "lora.safetensors"
    extract_lora(tiny_sd, run / "unet", out, 2)
    meta = metadata(out)
    assert (meta["task"], meta["base_model"], meta["lora_rank"], meta["lora_alpha"]) == ("t2i", tiny_sd, "2", "2.0")
    assert meta["base_unet_fingerprint"] == unet_fingerprint(load_sd(tiny_sd)[2])
    assert json.loads(meta["lora_targets"]) == sorted(LAYERS) and json.loads(meta["training_config"]) == {}
    assert metadata(tmp_path / "lora_kohya.safetensors")["ss_network_dim"] == "2"
    sample.merge_lora(load_sd(tiny_sd)[2], str(out))
    assert "warning" not in capsys.readouterr().out  # its base model's fingerprint: the model's
    (run / "config.json").write_text(json.dumps({"model": "org/another-model", "lr": 1e-5}))
    extract_lora(tiny_sd, run / "unet", out, 2)
    assert (f"warning: {run / 'unet'} was trained from org/another-model (its run's config.json), not {tiny_sd}"
            in capsys.readouterr().out)
    assert json.loads(metadata(out)["training_config"]) == {"model": "org/another-model", "lr": 1e-5}
    (run / "config.json").write_text(json.dumps({"model": tiny_sd}))
    extract_lora(tiny_sd, run / "unet", out, 2)
    assert "warning" not in capsys.readouterr().out
