"""sample.py: deterministic, shardable, resumable generation; LoRA merged; clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files(folder):
    return {f: np.array(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f[0].isdigit()}


LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"  # a 32 x 32 Linear of the tiny UNet


def save_lora(path, a_shape=(4, 32), b_shape=(32, 4), seed=0):
    """A diffusers-format LoRA file adapting LAYER (other shapes: one made for another base model)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    save_file({f"unet.{LAYER}.lora_A.weight": torch.randn(a_shape, generator=g),
               f"unet.{LAYER}.lora_B.weight": torch.randn(b_shape, generator=g)}, str(path))
    return str(path)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a bag\n\na photo of a sneaker\nan ankle boot\n")
    return str(path)


def test_images_depend_only_on_their_index(tiny_sd, prompts, tmp_path):
    common = [f"--model={tiny_sd}", f"--prompts={prompts}", "--num_per_prompt=3", "--steps=2"]
    sample.main(common + [f"--out_dir={tmp_path / 'a'}", "--batch_size=4"])
    sample.main(common + [f"--out_dir={tmp_path / 'b'}", "--batch_size=2", "--seed=0"])
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert list(a) == [f"{i:06d}.png" for i in range(9)]
    assert all(np.array_equal(a[f], b[f]) for f in a)  # batch size does not change any image
    assert not np.array_equal(a["000000.png"], a["000001.png"])  # each image its own noise
    meta = [json.loads(line) for line in open(tmp_path / "a" / "metadata.jsonl")]
    assert meta[4] == {"file_name": "000004.png", "prompt": "a photo of a sneaker", "seed": 4, "steps": 2,
                       "guidance": 2.0}
    assert (tmp_path / "a" / "grid.png").exists()


def test_sharded_over_ranks_gives_the_same_files(tiny_sd, prompts, tmp_path):
    args = [f"--model={tiny_sd}", f"--prompts={prompts}", "--num_per_prompt=3", "--batch_size=2"]
    sample.main(args + [f"--out_dir={tmp_path / 'one'}"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    os.path.join(ROOT, "sample.py"), *args, f"--out_dir={tmp_path / 'two'}"],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert list(one) == list(two) and all(np.array_equal(one[f], two[f]) for f in one)
    assert (tmp_path / "one" / "metadata.jsonl").read_text() == (tmp_path / "two" / "metadata.jsonl").read_text()


def test_resume_makes_only_missing_images(tiny_sd, tmp_path, monkeypatch):
    args = [f"--model={tiny_sd}", "--prompts=a bag", "--num_per_prompt=4", f"--out_dir={tmp_path}"]
    sample.main(args)
    os.remove(tmp_path / "000002.png")
    made = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a: made.append(len(a[4])) or real(*a))
    sample.main(args)
    assert made == [1] and (tmp_path / "000002.png").exists()


def test_resume_refuses_a_folder_made_with_other_settings(tiny_sd, tmp_path):
    """skip_existing must never mix images of two settings, nor let metadata.jsonl claim settings the images were
    not made with: out_dir/settings.json records them; another run is refused, skip_existing=False starts over."""
    out, lora = tmp_path / "out", save_lora(tmp_path / "lora.safetensors")
    args = [f"--model={tiny_sd}", "--prompts=a bag", f"--out_dir={out}", f"--lora={lora}"]
    sample.main(args + ["--num_per_prompt=3"])
    images, meta = files(out), (out / "metadata.jsonl").read_text()
    with pytest.raises(SystemExit, match=r"sample error: .*out holds images made with other settings "
                                         r"\(steps 1 -> 2, guidance 2.0 -> 3.0\); use another out_dir or "
                                         r"--skip_existing=False$"):
        sample.main(args + ["--num_per_prompt=3", "--steps=2", "--guidance=3.0"])
    save_lora(lora, seed=1)  # another adaptor under the same file name
    with pytest.raises(SystemExit, match=r"other settings \(lora .*lora.safetensors \(sha256 \w+\) -> "):
        sample.main(args + ["--num_per_prompt=3"])
    assert all(np.array_equal(images[f], a) for f, a in files(out).items()) and len(files(out)) == 3
    assert (out / "metadata.jsonl").read_text() == meta
    sample.main(args + ["--num_per_prompt=2", "--steps=2", "--skip_existing=False"])
    sample.main(args + ["--num_per_prompt=2", "--steps=2", f"--out_dir={tmp_path / 'fresh'}"])
    regenerated, fresh = files(out), files(tmp_path / "fresh")
    assert list(regenerated) == list(fresh) == ["000000.png", "000001.png"]  # the old third image is gone
    assert all(np.array_equal(regenerated[f], fresh[f]) for f in fresh)
    os.remove(out / "settings.json")  # a folder from before settings.json: its images' settings are unknown
    with pytest.raises(SystemExit, match=r"other settings \(no settings.json"):
        sample.main(args + ["--num_per_prompt=2", "--steps=2"])


@pytest.mark.parametrize("spec", ["a photo of a sneaker.", "sneaker", "a photo of a bag.jpg", "3.5 ankle boots"])
def test_a_prompt_that_is_no_file_name_is_a_prompt(spec):
    assert sample.read_prompts(spec) == [spec]


def test_compare_grid(tiny_sd, tmp_path):
    sample.main([f"--model={tiny_sd}", "--prompts=a bag", "--num_per_prompt=2", f"--out_dir={tmp_path}",
                 "--compare=True", "--teacher_steps=3"])
    grid = Image.open(tmp_path / "compare.png")
    assert grid.size == (2 * 18 + 2, 3 * 18 + 2)  # rows teacher, base, adapted; one column per image


@pytest.mark.parametrize("extra, message", [
    (["--prompts=missing.txt"], "prompt file missing.txt not found"),
    (["--lora=missing.safetensors"], "LoRA file missing.safetensors not found"),
    (["--unet=/nonexistent"], "UNet folder /nonexistent not found"),
    (["--height=18"], "image size 18x16 must be a multiple of 4"),
    (["--model=/nonexistent/model"], "not an SD-format folder"),
    (["--prompts={tmp}/latin1.txt"], r"prompt file \S+latin1.txt is not UTF-8 text"),
    (["--prompts={tmp}/prompts.csv"], r"prompt file \S+prompts.csv must be a .txt file with one prompt per line"),
    (["--prompts=captions.csv"], "prompt file captions.csv must be a .txt file"),  # absent: not a prompt either
    (["--lora={tmp}/wide.safetensors"], rf"wide.safetensors does not fit this UNet: {LAYER} expects"),
    (["--lora={tmp}/transposed.safetensors"], r"transposed.safetensors does not fit this UNet: .* \(made for "
                                              r"another base model\?\)"),
])
def test_bad_input(tiny_sd, tmp_path, extra, message):
    (tmp_path / "latin1.txt").write_bytes("a caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "prompts.csv").write_text("a bag\n")
    save_lora(tmp_path / "wide.safetensors", a_shape=(4, 48))  # B A is 32 x 48, the layer's weight 32 x 32
    save_lora(tmp_path / "transposed.safetensors", a_shape=(4, 64), b_shape=(16, 4))  # 16 x 64: as many numbers
    with pytest.raises(SystemExit, match=message):
        sample.main([f"--model={tiny_sd}", f"--out_dir={tmp_path / 'out'}", *[e.format(tmp=tmp_path) for e in extra]])
    assert not (tmp_path / "out").exists()
