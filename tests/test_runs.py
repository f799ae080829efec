"""Runs on shared clusters: a SIGTERM checkpoints and resumes, one run per out_dir, an --overwrite=True run never
leaves the earlier run's model beside its own config, a full disk keeps what was written."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_killed_after
from test_d2o import run_args as d2o_args
from test_hipa import captions, run_args  # noqa: F401 (captions: a fixture)

import common
import d2o
import hipa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_sigterm_checkpoints_the_step_reached_and_resume_logs_each_step_once(tiny_sd, captions, tmp_path):
    out = tmp_path / "run"
    args = run_args(tiny_sd, captions, out, "--epochs=50", "--ckpt_interval=1000", "--log_interval=1")
    run = subprocess.Popen([sys.executable, os.path.join(ROOT, "hipa.py"), *args], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "log.jsonl").exists() and len(records(out)) >= 3):
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == common.EXIT_STOPPED, stderr[-2000:]
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    logged = [r["iter"] for r in records(out)]
    assert ck["iter"] == logged[-1] >= 3 and ck["iter"] < 100  # the step it was in, finished and saved
    assert f"stopped by SIGTERM after iteration {ck['iter']}" in stdout
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "run.lock").exists()
    with open(out / "log.jsonl", "a") as f:  # as if killed later, between checkpoints: records past ckpt.pt
        f.write(json.dumps({"iter": ck["iter"] + 1, "loss": 0.0}) + "\n")
    hipa.main(run_args(tiny_sd, captions, out, "--epochs=50", "--ckpt_interval=1000", "--log_interval=1",
                       "--init_from=resume"))
    logged = [r["iter"] for r in records(out)]
    assert logged == list(range(1, 101))  # every step once: the stray record dropped, none repeated
    assert (out / "pytorch_lora_weights.safetensors").exists()


def lock(out, host, pid):
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.lock").write_text(f"{host} {pid} 2026-01-01 00:00:00\n")


def test_a_second_run_into_a_locked_out_dir_is_refused_before_writing(tiny_sd, captions, tmp_path):
    out = tmp_path / "run"
    for host, pid in ((socket.gethostname(), 1), ("other-node", 12345)):  # pid 1 always runs; another host: unknown
        lock(out, host, pid)
        with pytest.raises(SystemExit, match=f"another run is writing to .*{host} pid {pid}"):
            hipa.main(run_args(tiny_sd, captions, out))
        assert sorted(os.listdir(out)) == ["run.lock"]


def test_a_dead_runs_lock_is_taken_over_with_a_line(tiny_sd, captions, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    lock(out, socket.gethostname(), dead.pid)
    hipa.main(run_args(tiny_sd, captions, out))
    assert "lock: taking over" in capsys.readouterr().out and (out / "pytorch_lora_weights.safetensors").exists()
    assert not (out / "run.lock").exists()  # released at the end


@pytest.mark.parametrize("trainer", ["hipa", "d2o"])
def test_an_interrupted_overwrite_run_leaves_no_earlier_model(trainer, tiny_sd, captions, real_data, tmp_path,
                                                              monkeypatch, capsys):
    out = tmp_path / "run"
    module, argv = (hipa, run_args(tiny_sd, captions, out)) if trainer == "hipa" else \
        (d2o, d2o_args(tiny_sd, real_data, out, "--ckpt_interval=1"))
    exported = out / ("pytorch_lora_weights.safetensors" if trainer == "hipa" else "unet")
    module.main(argv)
    assert exported.exists()
    run_killed_after(module, argv + ["--overwrite=True"], 1, monkeypatch)  # dies after its first checkpoint
    assert not exported.exists() and not (out / "pytorch_lora_weights_kohya.safetensors").exists()
    assert f"overwrite: removed the earlier run's {exported}" in capsys.readouterr().out


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_the_adaptor(tiny_sd, captions, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the last checkpoint (iteration 4), after the adaptor was exported
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="checkpoint error: cannot write .*ckpt.pt .No space left on device.; "
                                         "the previous .*ckpt.pt is kept"):
        hipa.main(run_args(tiny_sd, captions, out, "--ckpt_interval=2"))
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 2 and not (out / "ckpt.pt.tmp").exists()
    assert (out / "pytorch_lora_weights.safetensors").exists()


def test_a_teacher_cache_that_cannot_fit_says_how_much_it_needs(tiny_sd, captions, tmp_path, monkeypatch):
    from collections import namedtuple
    monkeypatch.setattr(hipa.shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(1, 0, 100))
    with pytest.raises(SystemExit, match=r"disk error: the teacher targets of this epoch need 4,096 bytes in .*, "
                                         r"which has 100 bytes free"):
        hipa.main(run_args(tiny_sd, captions, tmp_path / "run"))
    assert not list((tmp_path / "run_cache").glob("*.partial"))


def test_a_truncated_checkpoint_is_one_line(tiny_sd, captions, tmp_path):
    out = tmp_path / "run"
    hipa.main(run_args(tiny_sd, captions, out))
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="resume error: .*ckpt.pt is not a readable checkpoint"):
        hipa.main(run_args(tiny_sd, captions, out, "--init_from=resume"))


# ----------------------------------------------------------------------------- sample.py and eval_fid.py


def test_an_interrupted_regenerating_sample_run_is_refused_by_eval_fid(tiny_sd, tmp_path, monkeypatch):
    import eval_fid
    import sample
    args = [f"--model={tiny_sd}", "--prompts=a bag", "--num_per_prompt=4", "--batch_size=2", "--grid=False",
            f"--out_dir={tmp_path}"]
    sample.main(args)
    assert eval_fid.folder_source(str(tmp_path)).n == 4
    real, calls = sample.generate, []

    def stop_after_one_batch(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run stops with half of its images new and half old
        return real(*a)
    monkeypatch.setattr(sample, "generate", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        sample.main(args + ["--seed=1", "--skip_existing=False"])
    assert not (tmp_path / "metadata.jsonl").exists()  # the old one, which no longer describes the images, is gone
    with pytest.raises(SystemExit, match="eval error: .* is a sample.py folder without metadata.jsonl: its run did "
                                         "not finish"):
        eval_fid.folder_source(str(tmp_path))


def test_images_that_the_metadata_does_not_list_are_refused(tiny_sd, tmp_path):
    import eval_fid
    import sample
    sample.main([f"--model={tiny_sd}", "--prompts=a bag", "--num_per_prompt=2", "--grid=False",
                 f"--out_dir={tmp_path}"])
    (tmp_path / "000002.png").write_bytes((tmp_path / "000000.png").read_bytes())  # another run's image
    with pytest.raises(SystemExit, match="holds 1 images that .*metadata.jsonl does not list, e.g. 000002.png"):
        eval_fid.folder_source(str(tmp_path))


def test_non_finite_weights_are_refused_before_any_image(tiny_sd, tmp_path):
    from safetensors.torch import save_file

    import sample
    from common import load_sd
    unet = load_sd(tiny_sd)[2]
    loras = hipa.add_lora(unet, ("to_q",), 2, 2.0)
    state = hipa.lora_state(loras)
    state[next(k for k in state if k.endswith("lora_B.weight"))][0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(SystemExit, match="nan.safetensors holds non-finite values .NaN or inf. in unet.*lora_B"):
        sample.main([f"--model={tiny_sd}", f"--lora={tmp_path / 'nan.safetensors'}", f"--out_dir={tmp_path / 'a'}"])
    unet = load_sd(tiny_sd)[2]
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    unet.save_pretrained(str(tmp_path / "unet"))
    with pytest.raises(SystemExit, match="UNet .*unet holds non-finite values .NaN or inf. in conv_in.weight"):
        sample.main([f"--model={tiny_sd}", f"--unet={tmp_path / 'unet'}", f"--out_dir={tmp_path / 'b'}"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("arg, message", [
    ("--steps=0", "steps must be > 0"), ("--batch_size=0", "batch_size must be > 0"),
    ("--num_per_prompt=0", "num_per_prompt must be > 0"), ("--init_images=EMPTY", "000000.png is not a readable image"),
    ("--init_images=TEXT", "000000.png is not a readable image")])
def test_sample_bad_values_are_one_line_and_write_nothing(arg, message, tiny_sd, tmp_path):
    import sample
    for kind, data in (("EMPTY", b""), ("TEXT", b"not a png")):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "000000.png").write_bytes(data)
    arg = arg.replace("EMPTY", str(tmp_path / "EMPTY")).replace("TEXT", str(tmp_path / "TEXT"))
    with pytest.raises(SystemExit, match=message):
        sample.main([f"--model={tiny_sd}", arg, f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_hipa_negative_resolution_is_one_line_before_writing(tiny_sd, captions, tmp_path):
    with pytest.raises(SystemExit, match="resolution must be >= 0"):
        hipa.main(run_args(tiny_sd, captions, tmp_path / "out", "--resolution=-8"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_cache").exists()


def test_non_finite_metrics_are_null_in_valid_json_and_a_non_zero_exit(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    import eval_fid
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(gen / f"{i:06d}.png")  # all black
    monkeypatch.setattr(eval_fid, "load_inception", lambda spec, cache, d: TinyFeatures())
    monkeypatch.setattr(eval_fid, "frechet_distance", lambda *a: float("nan"))
    with pytest.raises(SystemExit, match=f"eval error: non-finite metrics .written as null. for {gen}"):
        eval_fid.evaluate(str(gen), str(gen), out=str(tmp_path / "m.json"), spectrum=False, cache_dir=str(tmp_path))
    row = json.loads((tmp_path / "m.json").read_text())["results"][0]  # parses: null, not a bare NaN
    assert row["fid"] is None


class TinyFeatures(torch.nn.Module):
    """inception-2015-12-05.pt's call signature on a toy network."""

    def forward(self, img, return_features=False, use_fp16=False, no_output_bias=False):
        f = torch.nn.functional.adaptive_avg_pool2d(img.float() / 128 - 1, 2).flatten(1)
        return f if return_features else torch.softmax(f[:, :4], 1)


def test_forked_workers_still_end_on_sigterm_after_the_trainer_catches_it():
    """A multiprocessing pool forked while a trainer catches SIGTERM (its workers inherit the handler) must still
    end: Pool.terminate stops its workers with SIGTERM. (A handler that only set the flag hung the join.)"""
    code = ("import common; common.catch_stop_signals()\n"
            "from multiprocessing import get_context\n"
            "with get_context('fork').Pool(2) as pool:\n"
            "    pass\n"
            "print('ended')")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0 and "ended" in run.stdout, run.stderr[-2000:]
