"""TransUNet (Chen et al., 2021): a CNN stem, a ViT on the 1/16 feature map,
and a cascaded upsampling decoder with skip connections.

Built from timm parts: the ResNet (``resnet50`` by default) stem and first
three stages come from ``timm.create_model(..., features_only=True)``, the
transformer layers are timm's ViT ``Block``. The paper's R50-ViT-B/16 is
the default: 12 layers, hidden 768, 12 heads, MLP 3072, decoder
(256, 128, 64, 16) with skips at 1/8, 1/4 and 1/2. Smaller variants take
other arguments (``backbone="resnet18", layers=(1, 1, 1, 1)``,
``hidden=64``, ``depth=2``...). With the defaults the parameter count is
the paper's 105.3M.

Position embeddings are learned for a ``img_size`` grid and resampled to
whatever grid a window gives (bicubic, timm's ``resample_abs_pos_embed``),
so the tiler may use any tile that is a multiple of 16. Upsampling is
bilinear with ``align_corners=False`` (the authors used ``True``, which
makes the output depend on the input size). Self-attention sees the whole
window, so the model is not local: tiling cannot be exact, and tilerseg
defaults to the gaussian merge for it."""
from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_: int, out: int):
        super().__init__(nn.Conv2d(in_, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """x2 bilinear, concatenate the skip (if any), two conv-BN-ReLU."""

    def __init__(self, in_: int, skip: int, out: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv1, self.conv2 = ConvBNReLU(in_ + skip, out), ConvBNReLU(out, out)

    def forward(self, x, skip=None):
        x = self.up(x)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNet(nn.Module):
    output_stride = 16

    def __init__(self, *, classes: int = 1, in_channels: int = 3, backbone: str = "resnet50", hidden: int = 768,
                 depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, img_size: int = 224,
                 decoder_channels=(256, 128, 64, 16), head_channels: int = 512, layers=(3, 4, 9, 3)):
        super().__init__()
        import timm
        from timm.models.vision_transformer import Block

        # stem (1/2), stage 1 (1/4), stage 2 (1/8), stage 3 (1/16): stage 4 is never built
        # the paper's hybrid ResNet-50 has (3, 4, 9) units in its three stages (timm's resnet50: 3, 4, 6)
        extra = {"layers": list(layers)} if layers and backbone.startswith("resnet") else {}
        self.cnn = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3),
                                     in_chans=in_channels, **extra)
        chans = self.cnn.feature_info.channels()
        self.patch_embed = nn.Conv2d(chans[3], hidden, kernel_size=1)  # patch size 1 on the 1/16 map
        self.grid = img_size // 16
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(hidden, heads, mlp_ratio=mlp_ratio, qkv_bias=True)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.conv_more = ConvBNReLU(hidden, head_channels)
        skips = (chans[2], chans[1], chans[0], 0)
        ins = (head_channels, *decoder_channels[:-1])
        self.decoder = nn.ModuleList([UpBlock(i, s, o) for i, s, o in zip(ins, skips, decoder_channels)])
        self.head = nn.Conv2d(decoder_channels[-1], classes, kernel_size=3, padding=1)

    def _positions(self, h: int, w: int):
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(self.pos_embed, new_size=(h, w), old_size=(self.grid, self.grid),
                                      num_prefix_tokens=0)

    def forward(self, x):
        H, W = x.shape[-2:]
        if H % 16 or W % 16:
            raise ValueError(f"TransUNet takes inputs whose sides are multiples of 16, got {H}x{W}")
        f2, f4, f8, f16 = self.cnn(x)
        t = self.patch_embed(f16)
        n, c, h, w = t.shape
        t = t.flatten(2).transpose(1, 2) + self._positions(h, w)
        t = self.norm(self.blocks(t))
        x = self.conv_more(t.transpose(1, 2).reshape(n, c, h, w))
        for block, skip in zip(self.decoder, (f8, f4, f2, None)):
            x = block(x, skip)
        return self.head(x)


def transunet(**kwargs) -> TransUNet:
    return TransUNet(**kwargs)
