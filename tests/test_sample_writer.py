"""sample.py's PNG writers: threads beside generation, the same pixels, bounded, every image on disk before success,
a failed write stops the run in one line."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pixels(folder):
    return {f: np.array(Image.open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f[0].isdigit()}


def test_pil_releases_the_gil_while_it_saves_a_png(tmp_path):
    """Why the writers are threads, not processes: a pure-Python thread keeps counting while another saves PNGs (it
    would stall for the length of each C call that holds the GIL: about 2% of its rate, against 60-70% here)."""
    image = np.random.default_rng(0).integers(0, 64, (1024, 1024, 3), dtype=np.uint8)

    def count_per_second_beside(work):
        count, stop = [0], threading.Event()

        def spin():
            while not stop.is_set():
                count[0] += 1
        t = threading.Thread(target=spin)
        t.start()
        t0 = time.perf_counter()
        work()
        seconds = time.perf_counter() - t0
        stop.set()
        t.join()
        return count[0] / seconds
    saving = count_per_second_beside(lambda: [sample.save_png(image, str(tmp_path / "a.png"), 6) for _ in range(3)])
    assert saving > 0.25 * count_per_second_beside(lambda: time.sleep(0.5))


def test_written_pixels_are_the_synchronous_writers(tiny_sd, tmp_path, monkeypatch):
    """Threads and compression level change neither a pixel nor a file name: the PNGs decode to round(255 x) of the
    images generate returned, as the writer in the main loop at PIL's default level (the writer before threads)."""
    made, real = [], sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    args = [f"--model={tiny_sd}", "--prompts=a bag", "--num_per_prompt=6", "--grid=False"]
    sample.main(args + [f"--out_dir={tmp_path / 'sync'}", "--png_writers=0", "--png_compress_level=6",
                        "--batch_size=6"])
    sample.main(args + [f"--out_dir={tmp_path / 'threads'}", "--png_writers=3", "--batch_size=2"])
    sync, threads = pixels(tmp_path / "sync"), pixels(tmp_path / "threads")
    network = (made[0].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # the one batch of the first run
    assert list(sync) == list(threads) == [f"{i:06d}.png" for i in range(6)]
    assert all(np.array_equal(sync[f], threads[f]) and np.array_equal(sync[f], network[i]) for i, f in enumerate(sync))
    assert (tmp_path / "sync" / "metadata.jsonl").read_text() == (tmp_path / "threads" / "metadata.jsonl").read_text()
    assert not [f for f in os.listdir(tmp_path / "threads") if ".tmp" in f]


def test_every_image_is_on_disk_before_metadata_and_success(tiny_sd, tmp_path, monkeypatch):
    """Slow writers: the run still ends with every image written, and metadata.jsonl (written last) lists exactly the
    PNGs on disk at the moment it is written."""
    real_save, real_jsonl, on_disk = sample.save_png, sample.write_jsonl, []
    monkeypatch.setattr(sample, "save_png", lambda *a: time.sleep(0.05) or real_save(*a))
    monkeypatch.setattr(sample, "write_jsonl", lambda rows, path: on_disk.append(
        sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))) or real_jsonl(rows, path))
    sample.main([f"--model={tiny_sd}", "--prompts=a bag", "--num_per_prompt=8", "--batch_size=4",
                 "--png_writers=1", "--grid=False", f"--out_dir={tmp_path}"])
    listed = [json.loads(line)["file_name"] for line in open(tmp_path / "metadata.jsonl")]
    assert on_disk == [listed] and listed == [f"{i:06d}.png" for i in range(8)]


def test_generation_runs_ahead_of_the_writers_by_at_most_two_batches(tiny_sd, tmp_path, monkeypatch):
    """Generation does not wait for a batch to be written (the first save waits for batch 2 to start), and waits
    once two batches are queued, so memory stays bounded: when a batch starts, at most two batches and one image per
    writer thread are made but not yet on disk."""
    events, lock, second_batch, real_save, real_generate = [], threading.Lock(), threading.Event(), \
        sample.save_png, sample.generate

    def slow_save(*a):
        if not events.count("saved"):
            events.append("batch 2 was made before image 1 was written" if second_batch.wait(10) else "waited")
        time.sleep(0.02)
        real_save(*a)
        with lock:
            events.append("saved")

    def logged_generate(*a, **k):
        with lock:
            events.append("batch")
            if events.count("batch") == 2:
                second_batch.set()
        return real_generate(*a, **k)
    monkeypatch.setattr(sample, "save_png", slow_save)
    monkeypatch.setattr(sample, "generate", logged_generate)
    sample.main([f"--model={tiny_sd}", "--prompts=a bag", "--num_per_prompt=16", "--batch_size=2",
                 "--png_writers=1", "--grid=False", f"--out_dir={tmp_path}"])
    assert "batch 2 was made before image 1 was written" in events and events.count("saved") == 16
    made_unsaved = []  # at each batch's start: the images made before it that are not on disk yet
    for k, e in enumerate(events):
        if e == "batch":
            made_unsaved.append(2 * len(made_unsaved) - events[:k].count("saved"))
    assert max(made_unsaved) <= 2 * 2 + 1


def test_a_failed_write_stops_the_run_in_one_line(tiny_sd, tmp_path, monkeypatch):
    real_save = sample.save_png

    def disk_full_at_image_3(array, path, level):
        if path.endswith("000003.png"):
            raise OSError(28, "No space left on device")
        real_save(array, path, level)
    monkeypatch.setattr(sample, "save_png", disk_full_at_image_3)
    threads_before = threading.active_count()
    with pytest.raises(SystemExit) as e:
        sample.main([f"--model={tiny_sd}", "--prompts=a bag", "--num_per_prompt=8", "--batch_size=2",
                     "--png_writers=2", f"--out_dir={tmp_path}"])
    assert str(e.value) == (f"sample error: cannot write {tmp_path}/000003.png "
                            f"(OSError: [Errno 28] No space left on device)")
    assert not any((tmp_path / f).exists() for f in ("metadata.jsonl", "grid.png", "timing.json"))  # no success
    assert threading.active_count() == threads_before  # the writer threads are gone


def test_a_vanished_out_dir_exits_non_zero_with_one_line(tiny_sd, tmp_path):
    """A real failure, in a real process: out_dir removed once the run has started."""
    out = tmp_path / "out"
    code = ("import shutil, sys, sample\n"
            "real = sample.start_out_dir\n"
            "sample.start_out_dir = lambda *a: (real(*a), shutil.rmtree(sample.out_dir))[0]\n"
            "sample.main(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", code, f"--model={tiny_sd}", "--prompts=a bag", "--num_per_prompt=4",
                        f"--out_dir={out}", "--png_writers=2"],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert last.startswith(f"sample error: cannot write {out}/00000") and "(FileNotFoundError: " in last
    assert not out.exists()


def test_png_settings_are_checked(tiny_sd, tmp_path):
    with pytest.raises(SystemExit, match=r"png_compress_level must be 0-9 \(got 10\)"):
        sample.main([f"--model={tiny_sd}", "--png_compress_level=10", f"--out_dir={tmp_path}"])
    assert os.listdir(tmp_path) == []  # checked before anything is loaded or written


def test_bench_end_to_end_times_sample_py_on_a_512px_model(capsys):
    """bench.py --end_to_end=cheap512: its random model makes 512x512 images through sample.py, and the table has
    the three runs, the compute-only floor at 1.000x."""
    import bench
    bench.main(["--end_to_end=cheap512", "--e2e_images=2", "--batch_size=2", "--rounds=1", "--guidance=1"])
    out = capsys.readouterr().out
    assert "on cheap512 (512x512 px), 2 images per run" in out and "at compress_level 1" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "images/s" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["PNGs written (threads)", "written in the loop, level 6",
                                                      "not written (compute only)"]
    assert rows[-1].split("|")[3].strip() == "1.000x"
