"""TernausNet: U-Net with a VGG11 or VGG16 encoder (Iglovikov & Shvets, 2018).

"TernausNet: U-Net with VGG11 Encoder Pre-Trained on ImageNet for Image
Segmentation" won the Kaggle Carvana challenge. The encoder is
torchvision's VGG ``features`` (five stages, 2x2 max pooling between them,
total stride 32); the decoder doubles the resolution with transposed
convolutions and concatenates the encoder stage of the same size:

* ``ternausnet11`` (UNet11): each decoder block is a 3x3 conv + ReLU, then a
  3x3 transposed conv (stride 2) + ReLU; widths 256-256-128-64-32 for
  ``num_filters=32``, as in the paper's figure;
* ``ternausnet16`` (UNet16, TernausNetV2's encoder): the same with VGG16 and
  4x4 transposed convolutions.

``decoder="bilinear"`` replaces each transposed convolution by bilinear
upsampling and two conv + ReLU, the authors' alternative. Attribute names
follow the authors' code, so their state dicts load. The network is local
(no pooling over the whole window), so tiling is seam-exact."""
from __future__ import annotations

import torch
from torch import nn

VGG_STAGES = {11: [(0,), (3,), (6, 8), (11, 13), (16, 18)],
              16: [(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]}
WIDTHS = (64, 128, 256, 512, 512)  # VGG's channels per stage


class ConvRelu(nn.Module):
    def __init__(self, in_: int, out: int):
        super().__init__()
        self.conv = nn.Conv2d(in_, out, 3, padding=1)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activation(self.conv(x))


class DecoderBlock(nn.Module):
    """Conv + ReLU, then x2 up: a transposed conv (kernel 3 with output
    padding for VGG11, 4 for VGG16) + ReLU, or bilinear + conv + ReLU."""

    def __init__(self, in_: int, mid: int, out: int, *, kernel: int = 3, bilinear: bool = False):
        super().__init__()
        if bilinear:
            self.block = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                       ConvRelu(in_, mid), ConvRelu(mid, out))
        elif kernel == 3:
            self.block = nn.Sequential(ConvRelu(in_, mid), nn.ConvTranspose2d(mid, out, 3, stride=2, padding=1,
                                                                               output_padding=1),
                                       nn.ReLU(inplace=True))
        else:
            self.block = nn.Sequential(ConvRelu(in_, mid), nn.ConvTranspose2d(mid, out, 4, stride=2, padding=1),
                                       nn.ReLU(inplace=True))

    def forward(self, x):
        return self.block(x)


class TernausNet(nn.Module):
    """U-Net with a VGG ``depth`` (11 or 16) encoder; see the module docstring.

    ``vgg_weights``: a local torchvision VGG state dict (``vgg11-8a719046.pth``)
    for the encoder; nothing is ever downloaded."""

    output_stride = 32

    def __init__(self, depth: int = 11, *, num_filters: int = 32, classes: int = 1, in_channels: int = 3,
                 decoder: str = "deconv", vgg_weights: str | None = None):
        super().__init__()
        import torchvision

        if depth not in VGG_STAGES:
            raise ValueError(f"TernausNet has VGG11 or VGG16 encoders, not VGG{depth}")
        if decoder not in ("deconv", "bilinear"):
            raise ValueError(f"decoder must be 'deconv' (the paper's) or 'bilinear', not {decoder!r}")
        self.encoder = getattr(torchvision.models, f"vgg{depth}")(weights=None).features
        if vgg_weights:
            load_vgg_features(self.encoder, vgg_weights)
        if in_channels != 3:
            first = self.encoder[0]
            self.encoder[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
        self.pool, self.relu, self.depth = nn.MaxPool2d(2, 2), nn.ReLU(inplace=True), depth
        self._stage_names = self._bind_stages(depth)
        nf, kw = num_filters, dict(kernel=3 if depth == 11 else 4, bilinear=decoder == "bilinear")
        e1, e2, e3, e4, e5 = WIDTHS
        self.center = DecoderBlock(e5, nf * 16, nf * 8, **kw)
        self.dec5 = DecoderBlock(e5 + nf * 8, nf * 16, nf * 8, **kw)
        self.dec4 = DecoderBlock(e4 + nf * 8, nf * 16, nf * (4 if depth == 11 else 8), **kw)
        self.dec3 = DecoderBlock(e3 + nf * (4 if depth == 11 else 8), nf * 8, nf * 2, **kw)
        self.dec2 = DecoderBlock(e2 + nf * 2, nf * 4, nf, **kw)
        self.dec1 = ConvRelu(e1 + nf, nf)
        self.final = nn.Conv2d(nf, classes, kernel_size=1)

    def _bind_stages(self, depth: int) -> list[list[str]]:
        """Name the encoder's convolutions as the authors' code does
        (conv1, conv2, conv3s, conv3, ...): UNet11 keeps them as attributes,
        UNet16 as per-stage Sequentials."""
        names = []
        for k, idx in enumerate(VGG_STAGES[depth], start=1):
            if depth == 11:
                stage = [f"conv{k}s" if len(idx) > 1 and j == 0 else f"conv{k}" for j in range(len(idx))]
                for name, i in zip(stage, idx):
                    setattr(self, name, self.encoder[i])
                names.append(stage)
            else:
                layers = []
                for i in idx:
                    layers += [self.encoder[i], self.relu]
                setattr(self, f"conv{k}", nn.Sequential(*layers))
                names.append([f"conv{k}"])
        return names

    def _stage(self, k: int, x):
        for name in self._stage_names[k]:
            x = getattr(self, name)(x)
            if self.depth == 11:
                x = self.relu(x)
        return x

    def forward(self, x):
        skips = []
        for k in range(5):
            x = self._stage(k, x if k == 0 else self.pool(x))
            skips.append(x)
        x = self.center(self.pool(x))
        for dec, skip in zip((self.dec5, self.dec4, self.dec3, self.dec2), skips[:0:-1]):
            x = dec(torch.cat([x, skip], 1))
        return self.final(self.dec1(torch.cat([x, skips[0]], 1)))


def load_vgg_features(features: nn.Module, path: str) -> None:
    """Load the ``features.*`` part of a torchvision VGG state dict file."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    part = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    if not part:
        raise ValueError(f"{path}: no 'features.*' weights: expected a torchvision VGG state dict")
    features.load_state_dict(part)


def ternausnet11(**kwargs) -> TernausNet:
    return TernausNet(11, **kwargs)


def ternausnet16(**kwargs) -> TernausNet:
    return TernausNet(16, **kwargs)
