"""eval_fid.py: the metrics against independent computations, the Fashion-MNIST path, sharding, bad input.
Offline and small: a TorchScript stand-in for Inception, a stub classifier, tiny synthetic data."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import eval_fid
from common import load_split, write_jsonl, write_split
from prepare_fmnist import captions_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def class_images(labels, seed):
    """32x32 RGB images whose class the stub classifier reads off the brightness (20 k + 10), with +-8 of
    noise: the high frequencies that a blur takes away."""
    noise = np.random.default_rng(seed).integers(-8, 9, (len(labels), 32, 32))
    gray = (20 * np.asarray(labels)[:, None, None] + 10 + noise).astype(np.uint8)
    return np.repeat(gray[..., None], 3, -1)


@pytest.fixture
def data(tmp_path):
    """A tiny prepared Fashion-MNIST dir, 40 images a split, labels i % 10."""
    labels = np.arange(40) % 10
    rows = [{"id": i, "label": int(k), "captions": captions_for(int(k))} for i, k in enumerate(labels)]
    for split, seed in (("train", 1), ("test", 2)):
        write_split(str(tmp_path / "fmnist"), split, class_images(labels, seed), rows, source="fashion-mnist")
    return str(tmp_path / "fmnist")


class StubClassifier(torch.nn.Module):
    """The fmnist classifier's interface, (features, logits) of (B, 1, 32, 32) in [-1, 1]; the class is the
    brightness level of class_images."""

    def forward(self, x):
        level = (x.mean((1, 2, 3)) + 1) * 127.5
        k = ((level - 10) / 20).round().clamp(0, 9).long()
        return F.adaptive_avg_pool2d(x, 4).flatten(1), F.one_hot(k, 10).float()


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(eval_fid, "fmnist_classifier", lambda data_dir, cache_dir: (StubClassifier(), 1.0))


class TinyInception(torch.nn.Module):
    """The call signature of inception-2015-12-05.pt: uint8-range images -> features (return_features=True)
    or softmax probabilities (no_output_bias drops the output layer's bias)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feat = torch.nn.Linear(48, 8)
        self.output = torch.nn.Linear(8, 5)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(img.to(torch.float32) / 128 - 1, 4).flatten(1)
        f = torch.tanh(self.feat(x))
        if return_features:
            return f
        logits = f @ self.output.weight.t() if no_output_bias else self.output(f)
        return torch.softmax(logits, 1)


@pytest.fixture
def tiny_inception(tmp_path):
    path = str(tmp_path / "inception.pt")
    torch.jit.script(TinyInception()).save(path)
    return path


def write_gen(folder, images, prompts=None):
    """A folder as sample.py writes it: 000000.png, ... and (with prompts) metadata.jsonl."""
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(np.asarray(a)).save(os.path.join(folder, f"{i:06d}.png"))
    if prompts is not None:
        write_jsonl([{"file_name": f"{i:06d}.png", "prompt": p, "seed": i, "steps": 1, "guidance": 2.0}
                     for i, p in enumerate(prompts)], os.path.join(folder, "metadata.jsonl"))
    return str(folder)


def fid_by_eigenvalues(a, b):
    """FID of two feature sets, independently: Tr (S1 S2)^1/2 = sum of sqrt(eigenvalues of S1 S2)."""
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
    return ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()


def test_frechet_distance_equals_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2, v1, v2 = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    diagonal = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # Gaussians with diagonal covariances
    assert eval_fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(diagonal, rel=1e-12)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 1
    fid = eval_fid.frechet_distance(*eval_fid.feature_stats(a), *eval_fid.feature_stats(b))
    assert fid == pytest.approx(fid_by_eigenvalues(a, b), rel=1e-9)
    assert eval_fid.frechet_distance(*eval_fid.feature_stats(a), *eval_fid.feature_stats(a)) == pytest.approx(0, abs=1e-9)


def test_inception_score_of_known_predictions():
    assert eval_fid.inception_score(np.full((100, 10), 0.1), 10) == pytest.approx((1, 0))
    one_hot = np.eye(10)[np.arange(80) % 4]  # every split of 8 holds each of 4 classes twice
    assert eval_fid.inception_score(one_hot, 10) == pytest.approx((4, 0))


def test_inception_path_uses_the_torchscript_file_it_is_given(tmp_path, tiny_inception):
    rng = np.random.default_rng(0)
    ref_images, gen_images = rng.integers(0, 256, (30, 16, 16, 3), np.uint8), rng.integers(0, 200, (25, 16, 16, 3), np.uint8)
    ref, gen = write_gen(tmp_path / "ref", ref_images), write_gen(tmp_path / "gen", gen_images)
    opts = dict(inception=tiny_inception, cache_dir=str(tmp_path / "cache"), is_splits=1, batch_size=7)
    rows = eval_fid.evaluate(gen, ref, **opts)

    net = torch.jit.load(tiny_inception)
    x = {k: torch.from_numpy(v).permute(0, 3, 1, 2).float() for k, v in (("ref", ref_images), ("gen", gen_images))}
    with torch.no_grad():
        feats = {k: net(v, return_features=True).double().numpy() for k, v in x.items()}
        p = net(x["gen"], no_output_bias=True).double().numpy()
    assert rows[0]["fid"] == pytest.approx(fid_by_eigenvalues(feats["gen"], feats["ref"]), rel=1e-6)
    assert rows[0]["inception_score"] == pytest.approx(np.exp((p * np.log(p / p.mean(0))).sum(1).mean()), rel=1e-6)
    assert rows[0]["n"] == 25 and "caption_accuracy" not in rows[0] and "clip_score" not in rows[0]

    metrics = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert metrics["features"] == "inception" and metrics["ref_n"] == 30 and metrics["results"] == rows
    assert (tmp_path / "gen" / "metrics_spectrum.png").exists()
    assert len(list((tmp_path / "cache").glob("ref_inception_*.npz"))) == 1
    assert eval_fid.evaluate(gen, ref, **opts)[0]["fid"] == pytest.approx(rows[0]["fid"], rel=1e-9)  # from the cache
    mu, sigma = feats["ref"].mean(0), np.cov(feats["ref"], rowvar=False)
    np.savez(tmp_path / "edm_style.npz", mu=mu, sigma=sigma)  # what EDM's and clean-fid's reference files hold
    [row] = eval_fid.evaluate(gen, str(tmp_path / "edm_style.npz"), **opts)
    assert row["fid"] == pytest.approx(rows[0]["fid"], rel=1e-6) and row["hf_ratio"] is None


def test_prompt_names_the_longest_class_in_it():
    assert eval_fid.prompt_class("a photo of a t-shirt") == 0
    assert eval_fid.prompt_class("a photo of a shirt") == 6
    assert eval_fid.prompt_class("A Product Photo of an Ankle Boot") == 9
    assert eval_fid.prompt_class("two sneakers") == 7
    assert eval_fid.prompt_class("an address") is None and eval_fid.prompt_class("a dog") is None


def test_caption_accuracy_counts_images_of_the_class_their_prompt_names(tmp_path, data, stub):
    images, rows = load_split(data, "test")  # row k (k < 10) has label k
    cases = [(0, "a photo of a t-shirt", True), (6, "a photo of a shirt", True), (9, "an ankle boot", True),
             (0, "a shirt", False),  # a t-shirt is not a shirt
             (6, "a picture of a t-shirt", False),  # nor a shirt a t-shirt: the longest class name wins
             (1, "a photo of a pair of trousers", True), (7, "a bag", False)]
    assert all(rows[k]["label"] == k for k, _, _ in cases)
    gen = write_gen(tmp_path / "gen", [images[k] for k, _, _ in cases], [p for _, p, _ in cases])
    [row] = eval_fid.evaluate(gen, data, cache_dir=str(tmp_path / "cache"))
    assert row["caption_accuracy"] == pytest.approx(4 / 7)
    assert "fid_fmnist_classifier" in row and "fid" not in row and "inception_score" not in row


def test_hf_ratio_is_one_for_the_reference_and_below_one_when_blurred(tmp_path, data, stub):
    images, rows = load_split(data, "test")
    prompts = [captions_for(r["label"])[0] for r in rows]
    same = write_gen(tmp_path / "same", images, prompts)
    blurred = write_gen(tmp_path / "blurred", [Image.fromarray(a).filter(ImageFilter.GaussianBlur(1)) for a in images], prompts)
    out = tmp_path / "report" / "m.json"
    same_row, blurred_row = eval_fid.evaluate(f"{same},{blurred}", data, cache_dir=str(tmp_path / "cache"), out=str(out))
    assert same_row["hf_ratio"] == pytest.approx(1, abs=1e-12)
    assert blurred_row["hf_ratio"] < 0.8
    assert same_row["fid_fmnist_classifier"] == pytest.approx(0, abs=1e-6)
    assert same_row["caption_accuracy"] == blurred_row["caption_accuracy"] == 1
    metrics = json.loads(out.read_text())
    assert "NOT Inception" in metrics["features"] and [r["gen"] for r in metrics["results"]] == [same, blurred]
    assert (tmp_path / "report" / "m_spectrum.png").exists() and not (tmp_path / "same" / "metrics.json").exists()


def test_paired_rmse_and_timing_columns(tmp_path, data, stub):
    images, rows = load_split(data, "test")
    prompts = [captions_for(r["label"])[0] for r in rows]
    teacher = write_gen(tmp_path / "teacher", images, prompts)
    close = write_gen(tmp_path / "close", np.clip(images.astype(int) + 2, 0, 255).astype(np.uint8), prompts)
    far = write_gen(tmp_path / "far", images[::-1], prompts)
    (tmp_path / "close" / "timing.json").write_text(json.dumps({"seconds_per_image": 0.25}))
    same_row, close_row, far_row = eval_fid.evaluate([teacher, close, far], data, paired=teacher,
                                                     cache_dir=str(tmp_path / "cache"))
    assert same_row["rmse_to_paired"] == 0
    assert close_row["rmse_to_paired"] == pytest.approx(2 / 255, rel=0.05)
    assert far_row["rmse_to_paired"] > 5 * close_row["rmse_to_paired"]
    assert close_row["seconds_per_image"] == 0.25 and "seconds_per_image" not in far_row


def test_classifier_trains_once_deterministically_then_loads_from_the_cache(tmp_path, data, monkeypatch):
    net, acc = eval_fid.fmnist_classifier(data, str(tmp_path / "a"))
    again, _ = eval_fid.fmnist_classifier(data, str(tmp_path / "b"))  # trained again, elsewhere: same weights
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())
    assert 0 <= acc <= 1 and len(list((tmp_path / "a").glob("fmnist_classifier_*.safetensors"))) == 1
    monkeypatch.setattr(eval_fid, "train_classifier", lambda *a: pytest.fail("trained although cached"))
    cached, cached_acc = eval_fid.fmnist_classifier(data, str(tmp_path / "a"))
    x = eval_fid.fmnist_input(load_split(data, "test")[0][:8])
    with torch.no_grad():
        assert cached_acc == acc and torch.equal(cached(x)[0], net(x)[0])


def test_a_shipped_classifier_is_used_only_for_the_data_and_recipe_it_was_trained_on(tmp_path, data, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file
    net, acc = eval_fid.fmnist_classifier(data, str(tmp_path / "a"))
    [cached] = (tmp_path / "a").glob("fmnist_classifier_*.safetensors")
    with safe_open(str(cached), "pt") as f:
        key = f.metadata()["key"]  # the cache's file carries its key: copied to assets/, it is the shipped one
    shipped = tmp_path / "shipped.safetensors"
    monkeypatch.setattr(eval_fid, "SHIPPED_CLASSIFIER", str(shipped))
    monkeypatch.setattr(eval_fid, "train_classifier", lambda *a: pytest.fail("trained although shipped"))
    other = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_file(other, str(shipped), metadata={"test_accuracy": "0.5", "key": key})
    loaded, loaded_acc = eval_fid.fmnist_classifier(data, str(tmp_path / "b"))  # nothing cached in b: the shipped one
    assert loaded_acc == 0.5 and all(torch.equal(v, loaded.state_dict()[k]) for k, v in other.items())
    save_file(other, str(shipped), metadata={"test_accuracy": "0.5", "key": "another-data"})
    assert eval_fid.fmnist_classifier(data, str(tmp_path / "a"))[1] == acc  # a key that differs: not used


def test_the_repo_ships_the_classifier_of_the_prepared_fashion_mnist(tmp_path, monkeypatch):
    from common import update_meta
    for split, n in (("train", 60000), ("test", 10000)):  # the meta.json prepare_fmnist.py writes
        update_meta(str(tmp_path), split, n, 32, 32, "fashion-mnist")
    monkeypatch.setattr(eval_fid, "train_classifier", lambda *a: pytest.fail(
        "assets/fmnist_classifier.safetensors was not trained on this data format or recipe: retrain and ship it"))
    net, acc = eval_fid.fmnist_classifier(str(tmp_path), str(tmp_path / "cache"))
    assert acc > 0.9 and not (tmp_path / "cache").exists()


def test_clip_score_is_the_mean_cosine_of_image_and_prompt(tmp_path, tiny_inception):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    import pretrain
    prompts = ["a bag", "an ankle boot", "a photo of a sneaker"]
    tokenizer = pretrain.build_tokenizer(prompts, 16)
    torch.manual_seed(0)
    layer = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    model = CLIPModel(CLIPConfig(projection_dim=16, vision_config=dict(image_size=32, patch_size=8, **layer),
                                 text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, bos_token_id=0,
                                                  eos_token_id=1, pad_token_id=1, **layer)))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
    gen = write_gen(tmp_path / "gen", images, prompts)
    [row] = eval_fid.evaluate(gen, gen, inception=tiny_inception, clip_model=str(tmp_path / "clip"),
                              cache_dir=str(tmp_path / "cache"))
    with torch.no_grad():  # the model's own image-text similarity, logit_scale taken out
        out = model.eval()(**processor(text=prompts, images=[Image.fromarray(a) for a in images], return_tensors="pt",
                                       padding=True))
    expected = (out.logits_per_image.diagonal() / model.logit_scale.exp()).mean().item()
    assert row["clip_score"] == pytest.approx(expected, rel=1e-5) and -1 <= row["clip_score"] <= 1


def test_two_ranks_give_the_single_process_result(tmp_path, tiny_inception):
    rng = np.random.default_rng(1)
    ref = write_gen(tmp_path / "ref", rng.integers(0, 256, (21, 16, 16, 3), np.uint8))
    gen = write_gen(tmp_path / "gen", rng.integers(0, 256, (13, 16, 16, 3), np.uint8))
    opts = [f"--ref={ref}", f"--inception={tiny_inception}", "--is_splits=3", "--batch_size=4", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "eval_fid.py", f"--gen={gen}",
                    f"--cache_dir={tmp_path / 'c2'}", f"--out={tmp_path / 'two.json'}", *opts],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    eval_fid.main([f"--gen={gen}", f"--cache_dir={tmp_path / 'c1'}", f"--out={tmp_path / 'one.json'}", *opts])
    two, one = (json.loads((tmp_path / f).read_text())["results"][0] for f in ("two.json", "one.json"))
    for k in ("fid", "inception_score", "inception_score_std", "hf_ratio"):
        assert two[k] == pytest.approx(one[k], rel=1e-6), k


def test_configs_are_valid():
    for name in ("coco30k_eval", "coco5k_eval"):
        cfg = eval_fid.__dict__.copy()
        from configurator import configure
        config = configure(cfg, [os.path.join(ROOT, "config", f"{name}.py")], print_config=False)
        assert config["features"] == "inception" and config["resolution_eval"] == 256


def bad_input(tmp_path, data, case):
    """(argv, what the error must say) of one broken evaluation."""
    images, rows = load_split(data, "test")
    prompts = [captions_for(r["label"])[0] for r in rows]
    gen, ref, extra = str(tmp_path / "gen"), data, []
    if case == "missing gen":
        gen, words = str(tmp_path / "nothing"), "not found"
    elif case == "empty gen":
        os.makedirs(gen)
        words = "no images"
    else:
        write_gen(gen, images[:5], prompts[:5])
    if case == "corrupt image":
        with open(os.path.join(gen, "000003.png"), "r+b") as f:
            f.truncate(os.path.getsize(f.name) // 2)
        words = "000003.png"
    elif case == "mixed sizes":
        Image.fromarray(images[0][:16, :16]).save(os.path.join(gen, "000004.png"))
        words = "different sizes"
    elif case == "missing ref":
        ref, words = str(tmp_path / "no_ref"), "not found"
    elif case.startswith("no metadata"):
        os.remove(os.path.join(gen, "metadata.jsonl"))
        words = "metadata.jsonl"
        if case == "no metadata for CLIP score":  # Inception features on a folder reference, CLIP needs prompts
            ref, extra = gen, ["--clip_model=some/clip"]
    elif case == "prompt names no class":
        write_jsonl([{"file_name": f"{i:06d}.png", "prompt": "a dog"} for i in range(5)], os.path.join(gen, "metadata.jsonl"))
        words = "names no Fashion-MNIST class"
    return [f"--gen={gen}", f"--ref={ref}", f"--cache_dir={tmp_path / 'cache'}", *extra], words


@pytest.mark.parametrize("case", ["missing gen", "empty gen", "corrupt image", "mixed sizes", "missing ref",
                                  "no metadata for caption accuracy", "no metadata for CLIP score",
                                  "prompt names no class"])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, data, stub, case):
    argv, words = bad_input(tmp_path, data, case)
    with pytest.raises(SystemExit, match=words) as e:
        eval_fid.main(argv)
    assert str(e.value).startswith("eval error: ") and "\n" not in str(e.value)
    assert not list(tmp_path.rglob("metrics*"))


def test_the_next_batch_is_decoded_while_the_network_runs_on_this_one(tmp_path, monkeypatch):
    """The network on batch k waits (up to 10 s) for a file of batch k + 1 to be read: it returns at once only when
    reading runs one batch ahead. The outputs stay in the set's order."""
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace
    folder = write_gen(tmp_path / "gen", class_images(np.arange(6), 0), ["a bag"] * 6)
    reads, real_read = [], eval_fid.read_image
    monkeypatch.setattr(eval_fid, "read_image", lambda path: reads.append(os.path.basename(path)) or real_read(path))
    overlapped = []

    def network(batch):
        k = len(overlapped)
        deadline = time.time() + 10
        while k < 2 and f"{2 * k + 2:06d}.png" not in reads and time.time() < deadline:
            time.sleep(0.01)
        overlapped.append(k == 2 or f"{2 * k + 2:06d}.png" in reads)
        return {"feat": batch.reshape(len(batch), -1)[:, :1].astype(np.float64)}
    d = SimpleNamespace(rank=0, world_size=1, master=True, ddp=False, device=torch.device("cpu"))
    with ThreadPoolExecutor(2) as pool:
        res = eval_fid.scan(eval_fid.folder_source(folder), network, None,
                            SimpleNamespace(batch_size=2, resolution_eval=0), d, pool)
    assert overlapped == [True, True, True]
    assert res["feat"][:, 0].tolist() == class_images(np.arange(6), 0)[:, 0, 0, 0].tolist()
