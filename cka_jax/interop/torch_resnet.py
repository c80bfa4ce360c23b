"""Build, in PyTorch, a ResNet exported by ``python -m cka_jax.export --format=safetensors``.

    from cka_jax.interop.torch_resnet import load_resnet

    model = load_resnet("student.json")          # reads student.json + student.safetensors
    logits = model(images_nchw)                   # float32 (B, C, H, W), preprocessed

The modules are torchvision's ResNet, block for block and name for name (``conv1``, ``bn1``,
``layer2.0.downsample.0``, ``fc``): BasicBlock (two 3x3 convolutions) and Bottleneck (1x1 ->
strided 3x3, optionally grouped -> 1x1), the ImageNet stem (7x7/2 conv + 3x3/2 max-pool) or
the 'small' stem (3x3/1 conv, no max-pool, ``maxpool`` an ``Identity``). Channel counts come
from the description in the JSON, so resnet10, narrow widths and 1-channel inputs are built as
they were trained. Weights are loaded with ``strict=True``.

torch is imported only when a model is built: importing this module (and cka_jax) needs no
torch. This file uses nothing else of cka_jax and may be copied next to the exported files.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

REQUIRED_KEYS = (
    "block",
    "stage_sizes",
    "width",
    "stem",
    "in_channels",
    "num_classes",
    "groups",
    "stage_widths",
    "stage_out_channels",
    "stage_strides",
)


def _blocks(nn):
    """``(conv, {'basic': BasicBlock, 'bottleneck': Bottleneck})``: torchvision's blocks."""

    def conv(cin, cout, kernel, stride=1, groups=1):
        return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)

    def downsample(cin, cout, stride):
        if stride == 1 and cin == cout:
            return None
        return nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    class BasicBlock(nn.Module):
        """torchvision's BasicBlock: 3x3 (strided) -> 3x3, identity or 1x1 shortcut."""

        def __init__(self, cin, inner, cout, stride, groups):
            super().__init__()
            if groups != 1 or inner != cout:
                raise ValueError("a basic block has groups 1 and equal inner/output channels")
            self.conv1 = conv(cin, cout, 3, stride)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = conv(cout, cout, 3)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = downsample(cin, cout, stride)

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + identity)

    class Bottleneck(nn.Module):
        """torchvision's Bottleneck (v1.5): 1x1 -> 3x3 (strided, grouped) -> 1x1."""

        def __init__(self, cin, inner, cout, stride, groups):
            super().__init__()
            self.conv1 = conv(cin, inner, 1)
            self.bn1 = nn.BatchNorm2d(inner)
            self.conv2 = conv(inner, inner, 3, stride, groups)
            self.bn2 = nn.BatchNorm2d(inner)
            self.conv3 = conv(inner, cout, 1)
            self.bn3 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample(cin, cout, stride)

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return self.relu(y + identity)

    return conv, {"basic": BasicBlock, "bottleneck": Bottleneck}


@functools.cache
def _modules():
    """The torch module classes (defined on first use, so that torch is imported then)."""
    try:
        import torch
        from torch import nn
    except ImportError as err:
        raise ImportError(
            "cka_jax.interop.torch_resnet needs PyTorch: pip install torch safetensors"
        ) from err

    conv, block = _blocks(nn)

    class ResNet(nn.Module):
        """torchvision's ResNet with the channel counts of an exported description."""

        def __init__(self, d: dict):
            super().__init__()
            block_type = block[d["block"]]
            width = d["width"]
            if d["stem"] == "imagenet":
                self.conv1 = conv(d["in_channels"], width, 7, 2)
                self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            else:  # 'small': CIFAR-style
                self.conv1 = conv(d["in_channels"], width, 3, 1)
                self.maxpool = nn.Identity()
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            cin = width
            self.num_stages = len(d["stage_sizes"])
            for s, blocks in enumerate(d["stage_sizes"]):
                inner, cout = d["stage_widths"][s], d["stage_out_channels"][s]
                layers = []
                for i in range(blocks):
                    stride = d["stage_strides"][s] if i == 0 else 1
                    layers.append(block_type(cin, inner, cout, stride, d["groups"]))
                    cin = cout
                setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(cin, d["num_classes"])

        def features(self, x):
            """The last stage's feature map (B, C, h, w)."""
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for s in range(1, self.num_stages + 1):
                x = getattr(self, f"layer{s}")(x)
            return x

        def forward(self, x):
            return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))

    return ResNet


def _check(description: dict) -> dict:
    d = description.get("architecture", description)
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise ValueError(
            f"not a cka_jax ResNet description: missing {', '.join(missing)} (expected the "
            f"JSON written by python -m cka_jax.export --format=safetensors)"
        )
    if d["block"] not in ("basic", "bottleneck"):
        raise ValueError(f"unknown block {d['block']!r}: expected 'basic' or 'bottleneck'")
    if d["stem"] not in ("imagenet", "small"):
        raise ValueError(f"unknown stem {d['stem']!r}: expected 'imagenet' or 'small'")
    n = len(d["stage_sizes"])
    for key in ("stage_widths", "stage_out_channels", "stage_strides"):
        if len(d[key]) != n:
            raise ValueError(f"{key} has {len(d[key])} entries but there are {n} stages")
    return d


def build_resnet(description: dict):
    """A ``torch.nn.Module`` (random weights, training mode) of the architecture
    ``description`` (an exported ``<out>.json``, or its ``architecture`` entry)."""
    return _modules()(_check(description))


def _files(path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".json"), path.with_name(path.name + ".safetensors")


def load_resnet(path, weights=None):
    """The exported model in eval mode: builds ``<out>.json``'s architecture and loads
    ``<out>.safetensors`` (or ``weights``) into it with ``strict=True``.

    ``path``: ``<out>.json``, ``<out>.safetensors`` or ``<out>``. The model takes NCHW float32
    images prepared as the JSON's ``preprocess`` says and returns logits in the order of its
    ``class_names``.
    """
    json_path, weights_path = _files(path)
    weights_path = Path(weights) if weights is not None else weights_path
    for p in (json_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist (written by python -m cka_jax.export)")
    description = json.loads(json_path.read_text())
    model = build_resnet(description)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return model.eval()
