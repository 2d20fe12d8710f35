"""The original U-Nets, in 2-D and 3-D, with 'same' padding.

* ``unet2d``: Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks
  for Biomedical Image Segmentation" (2015). Each step has two 3x3 convs;
  the width doubles at each of the ``depth`` 2x2 max poolings (64 ... 1024
  at ``features=64``, ``depth=4``); the synthesis path upsamples with 2x2
  transposed convolutions that halve the width, concatenates the
  full-resolution skip, and ends in a 1x1 conv. Unlike smp's encoders its
  first skip is at full resolution, which suits thin structures such as EM
  membranes.
* ``unet3d``: Çiçek et al., "3D U-Net: Learning Dense Volumetric
  Segmentation from Sparse Annotation" (2016). Four resolution steps; each
  analysis step has two 3x3x3 convs, the second doubling the width (32-64,
  64-128, 128-256, 256-512 at ``features=32``), then 2x2x2 max pooling; each
  synthesis step a 2x2x2 transposed conv that keeps the width, the skip
  concatenated, and two 3x3x3 convs; a 1x1x1 output. 19.07 M parameters for
  3 input channels and 3 classes, as in the paper.

Both use BatchNorm and ReLU (``activation="prelu"`` for PReLU) and are local
(no global pooling), so tiles are seam-exact. With 'same' padding the output
has the input's size; sides must be multiples of ``2**depth``."""
from __future__ import annotations

import torch
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_UP = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class DoubleConv(nn.Sequential):
    def __init__(self, dims: int, in_: int, mid: int, out: int, activation: str, norm: bool):
        layers = []
        for a, b in ((in_, mid), (mid, out)):
            layers += [_CONV[dims](a, b, 3, padding=1, bias=not norm)]
            if norm:
                layers.append(_NORM[dims](b))
            layers.append(nn.PReLU(b) if activation == "prelu" else nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """A U-Net of ``dims`` (2 or 3) spatial dimensions; see the module doc.

    ``scheme="ronneberger"`` doubles the width at the first conv of each
    step; ``"cicek"`` at the second (and keeps it through the transposed
    convolutions)."""

    def __init__(self, dims: int = 2, in_channels: int = 1, classes: int = 1, features: int = 64, depth: int = 4,
                 scheme: str = "ronneberger", activation: str = "relu", norm: bool = True):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if scheme not in ("ronneberger", "cicek"):
            raise ValueError(f"scheme must be ronneberger or cicek, got {scheme!r}")
        if activation not in ("relu", "prelu"):
            raise ValueError(f"activation must be relu or prelu, got {activation!r}")
        self.dims, self.depth = dims, depth
        self.output_stride = 2 ** depth
        self.spatial_dims = dims
        down, skips = nn.ModuleList(), []
        c_in = in_channels
        for level in range(depth + 1):
            if scheme == "ronneberger":
                mid = out = features * 2 ** level
            else:
                mid, out = features * 2 ** level, features * 2 ** (level + 1)
            down.append(DoubleConv(dims, c_in, mid, out, activation, norm))
            skips.append(out)
            c_in = out
        self.down = down
        self.pool = _POOL[dims](2)
        self.up, self.decode = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(depth)):
            skip = skips[level]
            up_out = c_in // 2 if scheme == "ronneberger" else c_in
            self.up.append(_UP[dims](c_in, up_out, 2, stride=2))
            self.decode.append(DoubleConv(dims, up_out + skip, skip, skip, activation, norm))
            c_in = skip
        self.head = _CONV[dims](c_in, classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, block, skip in zip(self.up, self.decode, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def unet2d(classes: int = 1, in_channels: int = 1, features: int = 64, depth: int = 4, **kw) -> UNet:
    return UNet(2, in_channels, classes, features=features, depth=depth, **{"scheme": "ronneberger", **kw})


def unet3d(classes: int = 1, in_channels: int = 1, features: int = 32, depth: int = 3, **kw) -> UNet:
    return UNet(3, in_channels, classes, features=features, depth=depth, **{"scheme": "cicek", **kw})
