"""sample.py: deterministic, shardable, resumable generation; LoRA merged; clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files(folder):
    return {f: np.array(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f[0].isdigit()}


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
])
def test_bad_input(tiny_sd, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        sample.main([f"--model={tiny_sd}", f"--out_dir={tmp_path / 'out'}", *extra])
    assert not (tmp_path / "out").exists()
